package loraone

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	"gonum.org/v1/gonum/mat"
)

// svdImpl is one implementation under the shared suite: RandSVD, or
// gonum's exact SVD truncated to rank r (the reference, which must pass
// the same checks).
type svdImpl func(g Matrix, opt Options) (*SVD, error)

func exactImpl(g Matrix, opt Options) (*SVD, error) {
	if err := g.Validate(); err != nil {
		return nil, err
	}
	if i, j, x, ok := g.findNonFinite(); ok {
		return nil, fmt.Errorf("loraone: input element (row %d, col %d) is %v: %w", i, j, x, ErrNonFinite)
	}
	d := mat.NewDense(g.Rows, g.Cols, nil)
	for i := 0; i < g.Rows; i++ {
		for j := 0; j < g.Cols; j++ {
			d.Set(i, j, g.at(i, j))
		}
	}
	var svd mat.SVD
	if !svd.Factorize(d, mat.SVDThin) {
		return nil, errors.New("mat.SVD failed")
	}
	s := svd.Values(nil)
	if s[0] == 0 {
		return nil, ErrZero
	}
	var u, v mat.Dense
	svd.UTo(&u)
	svd.VTo(&v)
	r := opt.Rank
	return &SVD{
		U: mat.DenseCopyOf(u.Slice(0, g.Rows, 0, r)),
		V: mat.DenseCopyOf(v.Slice(0, g.Cols, 0, r)),
		S: s[:r], Converged: true,
	}, nil
}

type svdCase struct {
	kind    string
	m, n, r int
	s       []float64 // spectrum of G (len <= min(m, n)); nil: see kind
	check   string    // "vectors", "residual" or "exact"
	tol     float64
	wantErr error
}

func svdCases() []svdCase {
	flat := make([]float64, 100)
	for i := range flat {
		flat[i] = 1 - 0.4*float64(i)/100 // 1 … 0.6: no usable gap anywhere
	}
	return []svdCase{
		// Fast decay (σ_{i+1}/σ_i = 0.5): the rate per pass is about
		// σ_{k+1}/σ_r = 2^-11, so a few passes reach rounding level;
		// 1e-9 on singular values/vectors leaves margin for the
		// ~1e-8 resolution of the stopping estimate.
		{kind: "fastdecay", m: 200, n: 150, r: 10, s: geometric(150, 10, 0.5), check: "vectors", tol: 1e-9},
		// Flat spectrum: no gap, so the vectors are ill-defined; check
		// ‖G − USVᵀ‖_F <= (1+tol)·optimal. Subspace iteration with
		// k = 2r is within a fraction of a percent here; 1% is generous.
		{kind: "flat", m: 120, n: 100, r: 10, s: flat, check: "residual", tol: 1e-2},
		// Exactly rank r: the sketch captures range(G) exactly after
		// one pass, so the reconstruction is exact up to rounding
		// (1e-12 relative = a few thousand ulps of float64).
		{kind: "lowrank", m: 150, n: 120, r: 10, s: geometric(10, 5, 0.7), check: "exact", tol: 1e-12},
		// Rank 3 < r = 8: σ_4…σ_8 must be ~0, vectors orthonormal,
		// reconstruction exact to rounding.
		{kind: "rankdeficient", m: 100, n: 80, r: 8, s: []float64{3, 2, 1}, check: "exact", tol: 1e-12},
		// Tall and wide, moderate decay 0.7 (rate 0.7^5 ≈ 0.17 per
		// pass with r = 5, p = 10): 1e-7 is reached well within MaxIters.
		{kind: "tall", m: 300, n: 40, r: 5, s: geometric(40, 1, 0.7), check: "vectors", tol: 1e-7},
		{kind: "wide", m: 40, n: 300, r: 5, s: geometric(40, 1, 0.7), check: "vectors", tol: 1e-7},
		// A single row / column: rank 1, k = 1, exact after one pass.
		{kind: "1xn", m: 1, n: 50, r: 1, s: []float64{2}, check: "exact", tol: 1e-12},
		{kind: "nx1", m: 50, n: 1, r: 1, s: []float64{2}, check: "exact", tol: 1e-12},
		{kind: "1x1", m: 1, n: 1, r: 1, s: []float64{3}, check: "exact", tol: 1e-14},
		{kind: "zero", m: 30, n: 20, r: 3, wantErr: ErrZero},
		{kind: "nan", m: 30, n: 20, r: 3, s: geometric(20, 1, 0.8), wantErr: ErrNonFinite},
	}
}

func svdSuite(t *testing.T, impl svdImpl) {
	for _, c := range svdCases() {
		prefix := fmt.Sprintf("m=%d,n=%d,r=%d,kind=%s", c.m, c.n, c.r, c.kind)
		var g *mat.Dense
		if c.s == nil {
			g = mat.NewDense(c.m, c.n, nil)
		} else {
			g = synth(uint64(c.m*1000+c.n), c.m, c.n, c.s)
		}
		v := view64(g, 3)
		if c.kind == "nan" {
			v.F64[3*v.Stride+5] = math.NaN()
		}
		opt := DefaultOptions(c.r)
		opt.Tol = 1e-7
		res, err := impl(v, opt)
		if c.wantErr != nil {
			if !errors.Is(err, c.wantErr) {
				t.Errorf("%s: err = %v, want %v", prefix, err, c.wantErr)
			}
			if c.kind == "nan" && (err == nil || !strings.Contains(err.Error(), "row 3, col 5")) {
				t.Errorf("%s: error %v does not name row 3, col 5", prefix, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: unexpected error %v", prefix, err)
			continue
		}
		t.Logf("%s: passes=%d iters=%d accuracy=%.2g converged=%v", prefix, res.Passes, res.Iters, res.Accuracy, res.Converged)
		checkSVDShape(t, prefix, res, c.m, c.n, c.r)
		eu, ev, es := exact(t, g)
		switch c.check {
		case "vectors":
			for i := 0; i < c.r; i++ {
				if d := math.Abs(res.S[i]-es[i]) / es[0]; d > c.tol {
					t.Errorf("%s: S[%d] = %v, want %v (rel %g)", prefix, i, res.S[i], es[i], d)
				}
				// Singular pairs are defined up to a common sign; sin θ of
				// a perturbed vector is bounded by ‖E‖/gap (Wedin), so the
				// allowed distance scales with σ₁/(σ_i − σ_{i+1}).
				lim := c.tol * es[0] / (es[i] - es[i+1])
				if du, dv := alignedDist(res.U, eu, i), alignedDist(res.V, ev, i); du > lim || dv > lim {
					t.Errorf("%s: vector %d: sign-aligned distance %g, %g > %g", prefix, i, du, dv, lim)
				}
			}
		case "residual":
			var opt2 float64
			for _, x := range es[c.r:] {
				opt2 += x * x
			}
			var d mat.Dense
			d.Sub(g, lowRank(res.U, res.S, res.V, c.r))
			if got, best := mat.Norm(&d, 2), math.Sqrt(opt2); got > (1+c.tol)*best {
				t.Errorf("%s: residual %g > (1+%g)·optimal %g", prefix, got, c.tol, best)
			}
		case "exact":
			if d := relDiff(lowRank(res.U, res.S, res.V, c.r), g); d > c.tol {
				t.Errorf("%s: reconstruction error %g > %g", prefix, d, c.tol)
			}
			for i := len(c.s); i < c.r; i++ {
				if res.S[i] > c.tol*res.S[0] {
					t.Errorf("%s: S[%d] = %g, want ~0", prefix, i, res.S[i])
				}
			}
		}
	}
}

// checkSVDShape checks shapes, descending non-negative finite S, and
// orthonormal columns (1e-12: Householder QR and Gemm keep QᵀQ = I to a
// few k·ε).
func checkSVDShape(t *testing.T, prefix string, res *SVD, m, n, r int) {
	t.Helper()
	if um, ur := res.U.Dims(); um != m || ur != r {
		t.Errorf("%s: U is %d×%d", prefix, um, ur)
	}
	if vn, vr := res.V.Dims(); vn != n || vr != r {
		t.Errorf("%s: V is %d×%d", prefix, vn, vr)
	}
	if len(res.S) != r {
		t.Fatalf("%s: len(S) = %d", prefix, len(res.S))
	}
	for i, x := range res.S {
		if !(x >= 0) || math.IsInf(x, 0) || (i > 0 && x > res.S[i-1]) {
			t.Errorf("%s: S not descending non-negative: %v", prefix, res.S)
			break
		}
	}
	if e := orthoErr(res.U); e > 1e-12 {
		t.Errorf("%s: |UᵀU − I| = %g", prefix, e)
	}
	if e := orthoErr(res.V); e > 1e-12 {
		t.Errorf("%s: |VᵀV − I| = %g", prefix, e)
	}
}

func TestSVDSuite(t *testing.T) {
	t.Run("exact", func(t *testing.T) { t.Parallel(); svdSuite(t, exactImpl) })
	t.Run("rand", func(t *testing.T) { t.Parallel(); svdSuite(t, RandSVD) })
}

// alignedDist returns min(‖x_j − y_j‖, ‖x_j + y_j‖) for column j.
func alignedDist(x, y mat.Matrix, j int) float64 {
	rows, _ := x.Dims()
	var dm, dp float64
	for i := 0; i < rows; i++ {
		a, b := x.At(i, j), y.At(i, j)
		dm += (a - b) * (a - b)
		dp += (a + b) * (a + b)
	}
	return math.Sqrt(math.Min(dm, dp))
}
