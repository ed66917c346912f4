package loraone

import (
	"fmt"
	"math"
	"sync/atomic"
	"testing"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/blas/gonum"
	"gonum.org/v1/gonum/mat"
)

type blasT = blas.Transpose

// countingKernels returns Options.Sgemm and Options.Dgemm values that call
// gonum's implementation and count their calls.
func countingKernels(s32, s64 *atomic.Int64) (Gemm32, Gemm64) {
	impl := gonum.Implementation{}
	return func(tA, tB blasT, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
			s32.Add(1)
			impl.Sgemm(tA, tB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		}, func(tA, tB blasT, m, n, k int, alpha float64, a []float64, lda int, b []float64, ldb int, beta float64, c []float64, ldc int) {
			s64.Add(1)
			impl.Dgemm(tA, tB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		}
}

// countingGesdd returns an Options.Gesdd that factors through gonum's
// mat.SVD (full U and V, copied out thin) and counts its calls.
func countingGesdd(calls *atomic.Int64) Gesdd {
	return func(m, n int, a []float64, lda int, s, u []float64, ldu int, vt []float64, ldvt int) bool {
		calls.Add(1)
		var f mat.SVD
		if !f.Factorize(mat.NewDense(m, n, denseRows(a, m, n, lda)), mat.SVDThin) {
			return false
		}
		var uu, vv mat.Dense
		f.UTo(&uu)
		f.VTo(&vv)
		copy(s, f.Values(nil))
		q := min(m, n)
		for i := 0; i < m; i++ {
			for j := 0; j < q; j++ {
				u[i*ldu+j] = uu.At(i, j)
			}
		}
		for i := 0; i < q; i++ {
			for j := 0; j < n; j++ {
				vt[i*ldvt+j] = vv.At(j, i)
			}
		}
		return true
	}
}

// denseRows copies the m×n matrix stored with row stride ld.
func denseRows(a []float64, m, n, ld int) []float64 {
	out := make([]float64, 0, m*n)
	for i := 0; i < m; i++ {
		out = append(out, a[i*ld:i*ld+n]...)
	}
	return out
}

// TestSVDSuiteInjected runs the shared suite with injected kernels, for
// the subspace iteration and for block Krylov.
func TestSVDSuiteInjected(t *testing.T) {
	for _, kry := range []bool{false, true} {
		var n32, n64, nsvd atomic.Int64
		s, d := countingKernels(&n32, &n64)
		svd := countingGesdd(&nsvd)
		svdSuite(t, func(g Matrix, opt Options) (*SVD, error) {
			opt.Sgemm, opt.Dgemm, opt.Gesdd, opt.Krylov = s, d, svd, kry
			return RandSVD(g, opt)
		})
		if n64.Load() == 0 || nsvd.Load() == 0 {
			t.Errorf("krylov=%v: injected Dgemm called %d times, Gesdd %d times", kry, n64.Load(), nsvd.Load())
		}
	}
}

// TestInjectedKernels: with every dtype and layout, injected kernels are
// called and, being gonum's own, give bit-identical results.
func TestInjectedKernels(t *testing.T) {
	g := gapped()
	for _, dt := range []DType{Float32, Float64, Float16, BFloat16} {
		for _, trans := range []bool{false, true} {
			v, _ := layout(g, dt, trans, 2)
			prefix := fmt.Sprintf("dtype=%v,trans=%v", dt, trans)
			opt := DefaultOptions(4)
			opt.SIMD = false // the products go through the injected Sgemm
			want, err := RandSVD(v, opt)
			if err != nil {
				t.Fatalf("%s: %v", prefix, err)
			}
			var n32, n64 atomic.Int64
			opt.Sgemm, opt.Dgemm = countingKernels(&n32, &n64)
			got, err := RandSVD(v, opt)
			if err != nil {
				t.Fatalf("%s: %v", prefix, err)
			}
			if dt != Float64 && n32.Load() == 0 {
				t.Errorf("%s: injected Sgemm never called", prefix)
			}
			if n64.Load() == 0 {
				t.Errorf("%s: injected Dgemm never called", prefix)
			}
			// The injected Dgemm switches the panel QR to CholeskyQR2: the
			// same subspaces up to rounding, so the same passes and results
			// (to float64 rounding for float64 input, float32 rounding
			// amplified by the gap otherwise).
			tol := 1e-9
			if dt != Float64 {
				tol = 1e-6
			}
			d := relDiff(lowRank(got.U, got.S, got.V, 4), lowRank(want.U, want.S, want.V, 4))
			if got.Passes != want.Passes || d > tol {
				t.Errorf("%s: injected kernels: passes %d (want %d), relative difference %g", prefix, got.Passes, want.Passes, d)
			}
		}
	}
}

// TestCholQR2: a well-conditioned panel is factored (orthonormal Q, Q·R equal
// to the input, R upper triangular); a rank-deficient one is refused and left
// untouched, so qr falls back to Householder.
func TestCholQR2(t *testing.T) {
	var n32, n64 atomic.Int64
	_, d := countingKernels(&n32, &n64)
	const rows, k = 200, 12
	for _, kind := range []string{"gaussian", "graded 1e4", "rank-deficient"} {
		w := newWorkspace(rows, rows, k, 4)
		w.kn = kernels{d: d}
		g := synth(5, rows, k, geometric(k, 1, 1))
		switch kind {
		case "graded 1e4":
			g = synth(5, rows, k, geometric(k, 1, math.Pow(1e-4, 1.0/(k-1))))
		case "rank-deficient":
			g = synth(5, rows, k, geometric(k-3, 1, 0.9))
		}
		a := blas64.General{Rows: rows, Cols: k, Stride: k, Data: append([]float64(nil), g.RawMatrix().Data...)}
		orig := append([]float64(nil), a.Data...)
		ok := w.cholQR2(a)
		if kind == "rank-deficient" {
			if ok || !bitsEqual(a.Data, orig) {
				t.Errorf("kind=%s: ok = %v, input changed = %v", kind, ok, !bitsEqual(a.Data, orig))
			}
			continue
		}
		if !ok {
			t.Fatalf("kind=%s: CholeskyQR2 refused a well-conditioned panel", kind)
		}
		q := mat.NewDense(rows, k, a.Data)
		if e := orthoErr(q); e > 1e-13 {
			t.Errorf("kind=%s: |QᵀQ − I| = %g", kind, e)
		}
		var qr mat.Dense
		qr.Mul(q, mat.NewDense(k, k, w.rt.Data))
		if e := relDiff(&qr, g); e > 1e-13 {
			t.Errorf("kind=%s: |QR − A|/|A| = %g", kind, e)
		}
		for i := 0; i < k; i++ {
			for j := 0; j < i; j++ {
				if w.rt.Data[i*k+j] != 0 {
					t.Fatalf("kind=%s: R not upper triangular", kind)
				}
			}
		}
	}
}
