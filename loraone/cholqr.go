package loraone

import (
	"math"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack"
	"gonum.org/v1/gonum/lapack/lapack64"
)

// cholQR holds the scratch of the Cholesky QR (CholeskyQR2) used when a
// fast Dgemm is injected: a second panel and k×k triangles.
type cholQR struct {
	tmp       []float64 // rows×k panel (the largest panel)
	gram, inv blas64.General
	r1        blas64.General
	work      []float64 // Dtrcon scratch (3k)
	iwork     []int     // Dtrcon scratch (k)
}

func newCholQR(ws *Workspace, rows, k int) *cholQR {
	return &cholQR{tmp: ws.float64sDirty(rows * k), gram: general(k, k), inv: general(k, k), r1: general(k, k),
		work: make([]float64, 3*k), iwork: make([]int, k)}
}

// cholOneRound is the largest estimated κ(R₁) for which CholeskyQR2 keeps
// the first round's result: ε·κ² ≈ 1e-10 orthogonality, far below the
// float32 rounding of the products the bases come from.
const cholOneRound = 1e3

// condR estimates the 1-norm condition number of the triangle R₁ in c.r1
// (Dtrcon: within a small factor of the truth, +Inf when singular).
func (w *workspace) condR(c *cholQR) float64 {
	k := c.r1.Rows
	tri := blas64.Triangular{Uplo: blas.Upper, Diag: blas.NonUnit, N: k, Stride: c.r1.Stride, Data: c.r1.Data}
	rc := lapack64.Trcon(lapack.MaxColumnSum, tri, c.work, c.iwork)
	if !(rc > 0) {
		return math.Inf(1)
	}
	return 1 / rc
}

// cholRound computes the Cholesky factor R (upper, k×k) of aᵀa into c.gram
// and dst = a·R⁻¹ (2 Dgemm calls of 2·rows·k² flops each). It reports false,
// leaving a untouched, if the Gram matrix is not numerically positive
// definite or R is too ill-conditioned (diagonal ratio below minRatio) for
// the next step to be trusted.
func (w *workspace) cholRound(c *cholQR, a, dst blas64.General, minRatio float64) bool {
	k := w.k
	w.kn.gemm64(blas.Trans, blas.NoTrans, 1, a, a, 0, c.gram)
	sym := blas64.Symmetric{Uplo: blas.Upper, N: k, Stride: k, Data: c.gram.Data}
	if _, ok := lapack64.Potrf(sym); !ok {
		return false
	}
	dmin, dmax := math.Inf(1), 0.0
	for i := 0; i < k; i++ {
		d := c.gram.Data[i*k+i]
		dmin, dmax = math.Min(dmin, d), math.Max(dmax, d)
	}
	if !(dmin > minRatio*dmax) {
		return false
	}
	return w.solveR(c, k, a, dst)
}

// solveR takes the Cholesky factor R in the upper triangle of c.gram, zeroes
// its strictly lower part, and writes dst = src·R⁻¹ (R⁻¹ in c.inv). It
// reports false when R is singular.
func (w *workspace) solveR(c *cholQR, k int, src, dst blas64.General) bool {
	for i := 0; i < k; i++ {
		for j := 0; j < k; j++ {
			if j < i {
				c.inv.Data[i*k+j] = 0
				c.gram.Data[i*k+j] = 0
			} else {
				c.inv.Data[i*k+j] = c.gram.Data[i*k+j]
			}
		}
	}
	if ok := lapack64.Trtri(blas64.Triangular{Uplo: blas.Upper, Diag: blas.NonUnit, N: k, Stride: k, Data: c.inv.Data}); !ok {
		return false
	}
	w.kn.gemm64(blas.NoTrans, blas.NoTrans, 1, src, c.inv, 0, dst)
	return true
}

// cholQR2 overwrites the panel a (rows×k) with an orthonormal Q of the same
// range and writes R (a = Q·R, upper triangular) into w.rt, by two rounds of
// Cholesky QR: all the O(rows·k²) work is Dgemm, which the injected fast
// kernel does much faster than the Householder QR's level-2 steps.
//
// It reports false, leaving a untouched, when the panel is too
// ill-conditioned for it (κ(a) beyond ~1e6, rank deficiency): the second
// round's factor R₂ must be within 0.1 of the identity elementwise, which
// bounds the orthogonality error of the first round; the caller then uses
// Householder QR.
//
// The second round is skipped when the first is already orthogonal to
// about 1e-10: the orthogonality error of one Cholesky QR round is about
// ε·κ(a)², and κ(a) = κ(R₁), estimated by LAPACK's Dtrcon (O(k²)), is at
// most cholOneRound (measured on Krylov blocks: κ(R₁) 2–1250 at
// 4096×11008, r = 64, 6 of 7 below 1e3; 1.5–17 at 4096², r = 16).
func (w *workspace) cholQR2(a blas64.General) bool {
	k := w.k
	if w.cq == nil {
		w.cq = newCholQR(w.kn.ws, max(w.m, w.n), k)
	}
	c := w.cq
	q1 := blas64.General{Rows: a.Rows, Cols: k, Stride: k, Data: c.tmp[:a.Rows*k]}
	if !w.cholRound(c, a, q1, 1e-6) {
		return false
	}
	copy(c.r1.Data, c.gram.Data)
	if w.condR(c) <= cholOneRound {
		for i := 0; i < a.Rows; i++ {
			copy(a.Data[i*a.Stride:i*a.Stride+k], q1.Data[i*k:(i+1)*k])
		}
		copy(w.rt.Data, c.r1.Data)
		return true
	}
	// Second round into a, only once R₂ ≈ I is confirmed (a is still the
	// input until then).
	w.kn.gemm64(blas.Trans, blas.NoTrans, 1, q1, q1, 0, c.gram)
	sym := blas64.Symmetric{Uplo: blas.Upper, N: k, Stride: k, Data: c.gram.Data}
	if _, ok := lapack64.Potrf(sym); !ok {
		return false
	}
	for i := 0; i < k; i++ {
		for j := i; j < k; j++ {
			want := 0.0
			if i == j {
				want = 1
			}
			if !(math.Abs(c.gram.Data[i*k+j]-want) <= 0.1) {
				return false
			}
		}
	}
	if !w.solveR(c, k, q1, a) {
		return false
	}
	// R = R₂·R₁ (both upper triangular).
	blas64.Gemm(blas.NoTrans, blas.NoTrans, 1, c.gram, c.r1, 0, w.rt)
	return true
}
