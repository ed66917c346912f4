package loraone

import (
	"errors"
	"fmt"
	"math"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack"
	"gonum.org/v1/gonum/lapack/lapack64"
	"gonum.org/v1/gonum/mat"
	"gonum.org/v1/gonum/stat/distuv"
)

// Sketch holds randomized sketches of a gradient G (m×n, m = out
// features, n = in features) that was never formed, accumulated by the
// caller with Gaussian test matrices Ω (n×k), Ψ (l×m) and Ω_t (n×t):
//
//	single pass (TwoPass false):            two pass (TwoPass true):
//	Y = G·Ω      m×k                         Y = Q = orth(G·Ω)   m×k (Orthonormalize)
//	W = Ψ·G      l×n                         W = X = Qᵀ·G        k×n
//	Psi = Ψ      l×m                         Psi unused (zero value)
//	Z = G·Ω_t    m×t   (test vectors, both modes; from either pass)
//	OmegaT = Ω_t n×t
//
// with r <= k <= min(m, n) and l >= k. Ω, Ψ and Ω_t must be independent
// and have i.i.d. N(0, 1) entries (torch.randn): the reconstruction
// needs Ψ·Q well conditioned, and the error estimate needs Ω_t
// independent of everything else. Any Matrix layout and dtype is read;
// nothing is written.
type Sketch struct {
	Y, W, Psi, Z, OmegaT Matrix
	TwoPass              bool
}

// SketchResult describes an initialization reconstructed from a Sketch.
type SketchResult struct {
	// S holds the r largest singular values of the reconstruction Ĝ,
	// descending, >= 0; Sigma1 is S[0].
	S      []float64
	Sigma1 float64
	// Accuracy estimates the relative error of the initialization against
	// the exact LoRA-One initialization from G,
	//
	//	‖[Ĝ]_r/σ̂₁ − [G]_r/σ₁‖_F / ‖[G]_r/σ₁‖_F,
	//
	// which is the relative error of s·B·A. See LoRAOneSketch for the
	// formula. It is an estimate from the test vectors, not a bound.
	Accuracy float64
	// Residual estimates ‖G − [Ĝ]_r‖_F / ‖G‖_F from the test vectors:
	// ‖Z − [Ĝ]_r·Ω_t‖_F / ‖Z‖_F. It includes G's own tail beyond rank r,
	// which no rank-r initialization can capture.
	Residual float64
	// K is the sketch size k (columns of Y).
	K int
	// Rank is the numerical rank of Ĝ: the number of its k singular
	// values above σ̂₁·max(m, n)·eps, eps the machine epsilon of the
	// sketch's dtype (numpy.linalg.matrix_rank's rule). Rank < K means
	// G was (numerically) of rank < k and the sketch captured it whole.
	Rank int
}

// epsOf returns the machine epsilon of dt as numpy's finfo gives it.
func epsOf(dt DType) float64 {
	switch dt {
	case Float64:
		return 0x1p-52
	case Float32:
		return 0x1p-23
	case Float16:
		return 0x1p-10
	default:
		return 0x1p-7 // bfloat16
	}
}

// readGeneral copies the view g into a row-major float64 matrix, or its
// transpose when trans is set.
func readGeneral(g Matrix, trans bool) blas64.General {
	if trans {
		out := general(g.Cols, g.Rows)
		for i := 0; i < g.Rows; i++ {
			for j := 0; j < g.Cols; j++ {
				out.Data[j*out.Stride+i] = g.at(i, j)
			}
		}
		return out
	}
	out := general(g.Rows, g.Cols)
	for i := 0; i < g.Rows; i++ {
		row := out.Data[i*out.Stride : i*out.Stride+g.Cols]
		for j := range row {
			row[j] = g.at(i, j)
		}
	}
	return out
}

// scanSketch validates the view g named what, checks it for NaN and ±Inf
// (ErrNonFinite naming the element) and, when nonzero is set, for being
// all zero (ErrZero).
func scanSketch(what string, g Matrix, nonzero bool) error {
	if err := g.Validate(); err != nil {
		return fmt.Errorf("loraone: sketch %s: %w", what, err)
	}
	if i, j, v, ok := g.findNonFinite(); ok {
		return fmt.Errorf("loraone: sketch %s element (row %d, col %d) is %v: %w", what, i, j, v, ErrNonFinite)
	}
	if nonzero && g.maxAbs() == 0 {
		return fmt.Errorf("loraone: sketch %s (%d×%d) is all zero: %w", what, g.Rows, g.Cols, ErrZero)
	}
	return nil
}

// scalePow2 scales a by the power of two 2^−e that brings its largest
// magnitude into [0.5, 1) and returns e (0 for an all-zero a), so that a
// QR or SVD of a can neither overflow nor lose range.
func scalePow2(a blas64.General) int {
	var mx float64
	for i := 0; i < a.Rows; i++ {
		for _, x := range a.Data[i*a.Stride : i*a.Stride+a.Cols] {
			mx = math.Max(mx, math.Abs(x))
		}
	}
	if mx == 0 {
		return 0
	}
	_, e := math.Frexp(mx)
	for i := 0; i < a.Rows; i++ {
		row := a.Data[i*a.Stride : i*a.Stride+a.Cols]
		for j, x := range row {
			row[j] = math.Ldexp(x, -e)
		}
	}
	return e
}

// householderQR overwrites a (rows×k, rows >= k) with the thin Q of its
// Householder QR and returns R (k×k, upper triangular).
func householderQR(a blas64.General) blas64.General {
	k := a.Cols
	tau := make([]float64, k)
	q := []float64{0}
	lapack64.Geqrf(a, tau, q, -1)
	lw := int(q[0])
	lapack64.Orgqr(a, tau, q, -1)
	work := make([]float64, max(lw, int(q[0]), 1))
	lapack64.Geqrf(a, tau, work, len(work))
	rt := general(k, k)
	for i := 0; i < k; i++ {
		copy(rt.Data[i*k+i:(i+1)*k], a.Data[i*a.Stride+i:i*a.Stride+k])
	}
	lapack64.Orgqr(a, tau, work, len(work))
	return rt
}

// Orthonormalize overwrites y (m×k, m >= k, float32 or float64, any
// layout) with the thin Q factor of its QR decomposition,
//
//	Y = Q·R,   Q m×k with QᵀQ = I,   R k×k upper triangular,
//
// computed by Householder QR (LAPACK's Dgeqrf + Dorgqr) in float64 on a
// copy scaled by a power of two, then written back in y's dtype: Q is
// orthonormal to working precision even when Y is ill-conditioned or
// rank-deficient (its extra columns then span arbitrary directions
// orthogonal to the rest). It is the first step of the two-pass sketch
// (see Sketch): Q = orth(G·Ω).
//
// It returns the numerical rank of Y: the number of singular values of R
// above σ₁(R)·max(m, k)·eps, eps = 2⁻²³ for float32 and 2⁻⁵² for
// float64 (numpy.linalg.matrix_rank's rule).
//
// Errors (y untouched): a bad view or k > m (ErrShape, ErrDType), a NaN or
// ±Inf in y (ErrNonFinite), an all-zero y (ErrZero).
func Orthonormalize(y Dense) (rank int, err error) {
	if err := y.check("sketch Y", y.Rows, y.Cols); err != nil {
		return 0, err
	}
	m, k := y.Rows, y.Cols
	if k > m {
		return 0, fmt.Errorf("loraone: sketch Y is %d×%d: Orthonormalize needs rows >= cols: %w", m, k, ErrShape)
	}
	view := y.view()
	if err := scanSketch("Y", view, true); err != nil {
		return 0, err
	}
	a := readGeneral(view, false)
	scalePow2(a)
	rt := householderQR(a)
	rank = numericalRank(singularValues(rt), max(m, k), epsOf(view.DType))
	for _, x := range a.Data {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return 0, fmt.Errorf("loraone: QR of the %d×%d sketch Y is not finite: %w", m, k, ErrNonFinite)
		}
	}
	y.set(a.Data)
	return rank, nil
}

// singularValues returns the singular values of a (destroyed), descending
// (Dgesvd, values only; all ones if it did not converge, which only
// weakens the rank it informs).
func singularValues(a blas64.General) []float64 {
	s := make([]float64, min(a.Rows, a.Cols))
	none := blas64.General{Stride: 1}
	q := []float64{0}
	lapack64.Gesvd(lapack.SVDNone, lapack.SVDNone, a, none, none, s, q, -1)
	work := make([]float64, max(int(q[0]), 1))
	if !lapack64.Gesvd(lapack.SVDNone, lapack.SVDNone, a, none, none, s, work, len(work)) {
		for i := range s {
			s[i] = 1
		}
	}
	return s
}

// numericalRank counts the values of the descending s above s[0]·dim·eps.
func numericalRank(s []float64, dim int, eps float64) int {
	tol := s[0] * float64(dim) * eps
	n := 0
	for _, x := range s {
		if x > tol {
			n++
		}
	}
	return n
}

// view returns d as a read-only Matrix over the same memory.
func (d Dense) view() Matrix {
	g := Matrix{Rows: d.Rows, Cols: d.Cols, Stride: d.Stride, Trans: d.Trans, F32: d.F32, F64: d.F64}
	g.DType = Float64
	if d.F32 != nil {
		g.DType = Float32
	}
	return g
}

// sketchSVD is the reconstruction Ĝ = Q·X = (Q·U_x)·diag(S)·Vᵀ of a
// validated sketch.
type sketchSVD struct {
	m, n, k, r int
	q          blas64.General // m×k, orthonormal basis of range(Y)
	ux         blas64.General // k×k, left singular vectors of X (Û = Q·U_x)
	v          blas64.General // n×k, right singular vectors of Ĝ
	s          []float64      // k singular values of Ĝ, descending
	// single pass only: Ψ·Q = 2^ce·Q_c·R_c
	qc, rc blas64.General // l×k, k×k
	ce     int
}

// reconstruct computes the SVD of the reconstruction from the sketch:
//
//	single pass:  Q = orth(Y);  Ψ·Q = Q_c·R_c;  Xᵀ = Wᵀ·Q_c·R_c⁻ᵀ   (X = (Ψ·Q)⁺·W)
//	two pass:     Q = Y;  X = W
//	both:         Xᵀ = Q₂·R₂;  R₂ᵀ = U_x·diag(S)·V_sᵀ;  V = Q₂·V_s
//
// so that Ĝ = Q·X = (Q·U_x)·diag(S)·Vᵀ, all in float64.
func reconstruct(sk Sketch, r int, kn kernels) (*sketchSVD, error) {
	m, k, n := sk.Y.Rows, sk.Y.Cols, sk.W.Cols
	d := &sketchSVD{m: m, n: n, k: k, r: r}
	var xt blas64.General // n×k
	d.q = readGeneral(sk.Y, false)
	if sk.TwoPass {
		if e := orthoError(d.q); !(e <= 1e-3) {
			return nil, fmt.Errorf("loraone: two-pass sketch Y must hold Q = orth(G·Ω) (Orthonormalize), but |QᵀQ − I| = %.3g: %w", e, ErrArgument)
		}
		xt = readGeneral(sk.W, true)
	} else {
		scalePow2(d.q)
		householderQR(d.q)
		l := sk.Psi.Rows
		pq := general(l, k) // Ψ·Q, then Q_c
		newProduct(sk.Psi, k, kn).mulG(pq, d.q)
		if !finite(pq.Data) {
			return nil, fmt.Errorf("loraone: Psi·Q overflowed (max |Psi| = %g): %w", sk.Psi.maxAbs(), ErrNonFinite)
		}
		e := scalePow2(pq) // (Ψ·Q)⁺ = 2^−e·(2^−e·Ψ·Q)⁺
		rc := householderQR(pq)
		tri := blas64.Triangular{Uplo: blas.Upper, Diag: blas.NonUnit, N: k, Stride: k, Data: rc.Data}
		if rcond := lapack64.Trcon(lapack.MaxColumnSum, tri, make([]float64, 3*k), make([]int, k)); !(rcond > 1e-10) {
			return nil, fmt.Errorf("loraone: Psi·Q (%d×%d) is singular to working precision (reciprocal condition %.3g): Psi must be a Gaussian test matrix independent of Omega: %w",
				l, k, rcond, ErrArgument)
		}
		d.qc, d.rc, d.ce = pq, rc, e
		xt = general(n, k)
		newProduct(sk.W, k, kn).mulGT(xt, pq) // Wᵀ·Q_c
		blas64.Trsm(blas.Right, blas.Trans, math.Ldexp(1, -e), tri, xt)
		if !finite(xt.Data) {
			return nil, fmt.Errorf("loraone: the reconstructed core X overflowed (max |W| = %g): %w", sk.W.maxAbs(), ErrNonFinite)
		}
	}
	e := scalePow2(xt)
	r2 := householderQR(xt) // xt now holds Q₂
	r2t := general(k, k)
	for i := 0; i < k; i++ {
		for j := i; j < k; j++ {
			r2t.Data[j*k+i] = r2.Data[i*k+j]
		}
	}
	d.s = make([]float64, k)
	d.ux, d.v = general(k, k), general(n, k)
	vst := general(k, k)
	var work []float64
	if !kn.thinSVD(r2t, d.s, d.ux, vst, &work) {
		return nil, fmt.Errorf("loraone: SVD of the %d×%d sketch core did not converge: %w", k, k, ErrNonFinite)
	}
	kn.gemm64(blas.NoTrans, blas.Trans, 1, xt, vst, 0, d.v)
	for i, x := range d.s {
		d.s[i] = math.Ldexp(x, e)
	}
	if !finite(d.s) || math.IsInf(d.s[0], 0) {
		return nil, fmt.Errorf("loraone: largest singular value of the sketch overflows float64: %w", ErrNonFinite)
	}
	if d.s[0] == 0 {
		return nil, fmt.Errorf("loraone: the sketch reconstructs G = 0 (sigma1 == 0): %w", ErrZero)
	}
	return d, nil
}

// finite reports whether every element of v is finite.
func finite(v []float64) bool {
	for _, x := range v {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return false
		}
	}
	return true
}

// orthoError returns max |QᵀQ − I| for the m×k matrix q.
func orthoError(q blas64.General) float64 {
	k := q.Cols
	g := general(k, k)
	blas64.Gemm(blas.Trans, blas.NoTrans, 1, q, q, 0, g)
	var e float64
	for i := 0; i < k; i++ {
		for j := 0; j < k; j++ {
			want := 0.0
			if i == j {
				want = 1
			}
			e = math.Max(e, math.Abs(g.Data[i*k+j]-want))
		}
	}
	if !finite(g.Data) {
		return math.Inf(1)
	}
	return e
}

// sketchEst holds the test-vector estimates (each a squared Frobenius
// norm divided by t, so an unbiased estimate of the squared norm of the
// matrix it samples) with Δ = G − Ĝ, P = Q·Qᵀ and Û = Q·U_x:
type sketchEst struct {
	g2      float64 // ‖Z‖²/t                 ≈ ‖G‖²
	out2    float64 // ‖(I−P)·Z‖²/t            ≈ ‖(I−P)·G‖²
	inTop2  float64 // ‖Û_rᵀ·Δ·Ω_t‖²/t         ≈ ‖Û_rᵀ·Δ‖²
	inRest2 float64 // ‖Û_{r+1:k}ᵀ·Δ·Ω_t‖²/t  ≈ ‖Û_{r+1:k}ᵀ·Δ‖²
	res2    float64 // ‖Z − [Ĝ]_r·Ω_t‖²/t     ≈ ‖G − [Ĝ]_r‖²
	top1    float64 // ‖û₁ᵀ·Δ·Ω_t‖²/t          ≈ ‖û₁ᵀ·Δ‖²
	// s4 ≈ ‖Rᵀ·R‖²_F = Σσᵢ(R)⁴, R = (I−P)·G: the mean square of the
	// off-diagonal entries of K = ((I−P)·Z)ᵀ·(I−P)·Z (t×t), whose
	// expectation is exactly that (+Inf when t = 1).
	s4 float64
}

// testVectors computes the estimates from Z = G·Ω_t and Ω_t, in
// O((m+n)·k·t).
func (d *sketchSVD) testVectors(zm, om Matrix, kn kernels) sketchEst {
	t := zm.Cols
	z := readGeneral(zm, false) // m×t
	o := readGeneral(om, false) // n×t
	qtz := general(d.k, t)      // Qᵀ·Z
	ctz := general(d.k, t)      // Ûᵀ·Z
	vto := general(d.k, t)      // Vᵀ·Ω_t
	kn.gemm64(blas.Trans, blas.NoTrans, 1, d.q, z, 0, qtz)
	kn.gemm64(blas.Trans, blas.NoTrans, 1, d.ux, qtz, 0, ctz)
	kn.gemm64(blas.Trans, blas.NoTrans, 1, d.v, o, 0, vto)
	var est sketchEst
	for _, x := range z.Data {
		est.g2 += x * x
	}
	kn.gemm64(blas.NoTrans, blas.NoTrans, -1, d.q, qtz, 1, z) // (I−P)·Z
	for _, x := range z.Data {
		est.out2 += x * x
	}
	est.s4 = math.Inf(1)
	if t > 1 {
		kk := general(t, t)
		kn.gemm64(blas.Trans, blas.NoTrans, 1, z, z, 0, kk)
		var sum float64
		for a := 0; a < t; a++ {
			for b := 0; b < t; b++ {
				if a != b {
					sum += kk.Data[a*t+b] * kk.Data[a*t+b]
				}
			}
		}
		est.s4 = sum / float64(t*(t-1))
	}
	est.res2 = est.out2
	for i := 0; i < d.k; i++ {
		var in2, c2 float64
		for j := 0; j < t; j++ {
			c := ctz.Data[i*t+j]
			e := c - d.s[i]*vto.Data[i*t+j]
			in2 += e * e
			c2 += c * c
		}
		if i < d.r {
			est.inTop2 += in2
			est.res2 += in2
		} else {
			est.inRest2 += in2
			est.res2 += c2
		}
		if i == 0 {
			est.top1 = in2
		}
	}
	ft := float64(t)
	est.g2 /= ft
	est.out2 /= ft
	est.inTop2 /= ft
	est.inRest2 /= ft
	est.res2 /= ft
	est.top1 /= ft
	return est
}

// leakage returns, for the single-pass sketch, cn[i] = ‖(U_xᵀ·(Ψ·Q)⁺)_i‖²
// and rho[j] ≈ ‖(I−P)·G·v̂_j‖², for i, j < k:
//
//	W − (Ψ·Q)·X = (I − P_C)·Ψ·(I−P)·G     (C = Ψ·Q, P_C its projector)
//
// and Ψ·(I−P) is Gaussian and independent of C, so each column
// (W − C·X)·v̂_j has expected squared norm (l−k)·‖(I−P)·G·v̂_j‖².
func (d *sketchSVD) leakage(w Matrix, kn kernels) (cn, rho []float64) {
	k, l := d.k, d.qc.Rows
	// M = U_xᵀ·R_c⁻¹: the rows of U_xᵀ·C⁺ = 2^−ce·M·Q_cᵀ have the norms of M's.
	mt := general(k, k)
	for i := 0; i < k; i++ {
		for j := 0; j < k; j++ {
			mt.Data[i*k+j] = d.ux.Data[j*k+i]
		}
	}
	tri := blas64.Triangular{Uplo: blas.Upper, Diag: blas.NonUnit, N: k, Stride: k, Data: d.rc.Data}
	blas64.Trsm(blas.Right, blas.NoTrans, math.Ldexp(1, -d.ce), tri, mt)
	cn = make([]float64, k)
	for i := 0; i < k; i++ {
		for _, x := range mt.Data[i*k : (i+1)*k] {
			cn[i] += x * x
		}
	}
	// (W − C·X)·V = W·V − 2^ce·Q_c·R_c·U_x·diag(S)
	wv := general(l, k)
	newProduct(w, k, kn).mulG(wv, d.v)
	rus := general(k, k)
	kn.gemm64(blas.NoTrans, blas.NoTrans, 1, d.rc, d.ux, 0, rus)
	for i := 0; i < k; i++ {
		for j := 0; j < k; j++ {
			rus.Data[i*k+j] *= math.Ldexp(d.s[j], d.ce)
		}
	}
	kn.gemm64(blas.NoTrans, blas.NoTrans, -1, d.qc, rus, 1, wv)
	rho = make([]float64, k)
	for i := 0; i < l; i++ {
		for j, x := range wv.Data[i*k : (i+1)*k] {
			rho[j] += x * x
		}
	}
	for j := range rho {
		rho[j] /= float64(l - k)
	}
	return cn, rho
}

// sketchSafety is the factor applied to the raw estimate at t = 10 test
// vectors (see LoRAOneSketch).
const sketchSafety = 1.5

// safetyFactor returns sketchSafety·max(1, g(t)/g(10)), with
// g(t) = √(t/q_t) and q_t the 5% quantile of χ²_t: the factor by which a
// squared norm estimated from t Gaussian test vectors falls short of its
// mean with probability 5% when the matrix sampled has rank one.
func safetyFactor(t int) float64 {
	g := func(t int) float64 {
		return math.Sqrt(float64(t) / distuv.ChiSquared{K: float64(t)}.Quantile(0.05))
	}
	return sketchSafety * max(1, g(t)/g(10))
}

// sketchFloor is the least Accuracy reported: the float64 rounding of the
// reconstruction itself (measured 1e-15–3e-15 on exact float64 sketches),
// which the test vectors cannot see.
const sketchFloor = 100 * 0x1p-52

// minLeakRows is the least l − k for which the single-pass sketch's row
// residual W − (Ψ·Q)·X is used to estimate the leakage ‖(I−P)·G·v̂_j‖²
// (each from a χ²_{l−k} sample); below it the bounds of the two-pass
// estimate are used.
const minLeakRows = 4

// accuracy returns the Accuracy of LoRAOneSketch (see there) from the
// test-vector estimates and, for a single-pass sketch with l − k >=
// minLeakRows, the leakage estimates cn, rho (nil otherwise).
func (d *sketchSVD) accuracy(est sketchEst, cn, rho []float64, t int) float64 {
	r, k, s := d.r, d.k, d.s
	var h2 float64
	for _, x := range s[:r] {
		h2 += x * x
	}
	h := math.Sqrt(h2)
	bound := 2 * math.Sqrt(est.res2) / h
	var f2, t2, dsig float64 // first-order², second-order², δσ₁
	if rho != nil {
		f2 = est.inTop2
		for j := 0; j < r; j++ {
			f2 += rho[j]
		}
		for i := 0; i < r; i++ {
			for j := r; j < k; j++ {
				a2, b2 := s[i]*s[i], s[j]*s[j]
				den := (a2 - b2) * (a2 - b2)
				amp2 := a2 * (a2 + b2) / den
				f2 += (amp2-1)*cn[i]*rho[j] + amp2*cn[j]*rho[i]
				t2 += a2 * rho[i] * rho[j] / den
			}
		}
		dsig = math.Sqrt(cn[0]*rho[0]) + rho[0]/(2*s[0])
	} else {
		// Σ_{j<=r} ρ_j <= (sum of the r largest eigenvalues of RᵀR)
		// <= min(‖R‖², √(r·‖RᵀR‖²)); Σ_{i<=r<j<=k} (v_iᵀRᵀRv_j)² <=
		// min(‖R‖⁴/4, ‖RᵀR‖²/2); ρ_1 <= min(‖R‖², ‖RᵀR‖).
		f2 = min(est.out2, math.Sqrt(float64(r)*est.s4)) + est.inTop2
		if r < k {
			a, b := s[r-1], s[r]
			w := a / ((a - b) * (a + b))
			t2 = w * w * min(est.out2*est.out2/4, est.s4/2)
		}
		dsig = math.Sqrt(est.top1) + min(est.out2, math.Sqrt(est.s4))/(2*s[0])
	}
	n := h * dsig / s[0]
	first := math.Sqrt(f2+t2+n*n) / h
	if math.IsNaN(first) { // 0/0 in a gap between equal (zero) singular values
		first = math.Inf(1)
	}
	return max(safetyFactor(t)*min(bound, first), sketchFloor)
}

// LoRAOneSketch writes the LoRA-One initialization of a gradient G that
// was never formed, reconstructed from its sketches sk (see Sketch), into
// b (lora_B, m×r) and a (lora_A, r×n), r = opt.Rank:
//
//	single pass (Tropp, Yurtsever, Udell, Cevher 2017):
//	    Q = orth(Y),   X = (Ψ·Q)⁺·W   (least squares via the QR of Ψ·Q)
//	two pass:   Q = Y, X = W = Qᵀ·G   (the range finder, exact core)
//	Ĝ = Q·X = Û·diag(S)·Vᵀ            (SVD of the k×n core X via the QR of Xᵀ)
//	B = Û_r·diag(√S_r)/√(γ·σ̂₁),  A = −diag(√S_r)·V_rᵀ/√(γ·σ̂₁)
//	B·A = [−Ĝ]_r/(γ·σ̂₁)
//
// exactly LoRAOne's formulas with Ĝ for G (the sign of −G goes to A), so
// that a sketch of a G of rank <= k gives LoRAOne's factors. All the
// algebra is float64; the QR and the k×k SVD use opt.Gesdd when set (else
// gonum) and opt.Dgemm/Sgemm for the products with W and Ψ. Only
// opt.Rank and the kernels (and opt.Context) are used; the iteration
// options are ignored. Cost: two products of W (l×n) and one of Ψ (l×m)
// with k-column panels, a QR of n×k, O((m+n)·k·(k+t)) more.
//
// # Error estimate
//
// Residual = ‖Z − [Ĝ]_r·Ω_t‖_F / ‖Z‖_F estimates ‖G − [Ĝ]_r‖_F/‖G‖_F
// (E‖M·Ω_t‖²_F = t·‖M‖²_F for Gaussian Ω_t independent of M).
//
// Accuracy estimates ε = ‖[Ĝ]_r/σ̂₁ − [G]_r/σ₁‖_F / ‖[G]_r/σ₁‖_F, the
// relative error of s·B·A against LoRAOne's, as the first-order
// perturbation of the truncated SVD at Ĝ under Δ = G − Ĝ, split into its
// part outside range(Q), R = (I−P)·G, and inside, E = Qᵀ·G − X (zero in
// two-pass mode). With h = ‖S_r‖, a_i = S_i, Û = Q·U_x, and
//
//	τ²   = ‖Û_rᵀ·Δ·Ω_t‖²/t              (≈ ‖Û_rᵀ·E‖², the kept rows of E)
//	ρ_j  = ‖(W − Ψ·Q·X)·v_j‖²/(l−k)     (≈ ‖R·v_j‖², leakage of G's range; single pass)
//	c_i  = ‖(U_xᵀ·(Ψ·Q)⁺)_i‖²           (E = −(Ψ·Q)⁺·Ψ·R row by row: E[e_ij²] = c_i·ρ_j)
//	m_ij = a_i²(a_i²+b_j²)/(a_i²−b_j²)²  (amplification of the pair i <= r < j <= k, b_j = S_j)
//
// the single-pass estimate is
//
//	F² = τ² + Σ_{j<=r} ρ_j + Σ_{i<=r<j<=k} [(m_ij − 1)·c_i·ρ_j + m_ij·c_j·ρ_i]     (first order)
//	T² = Σ_{i<=r<j<=k} a_i²·ρ_i·ρ_j/(a_i²−b_j²)²                               (Rᵀ·R turning V_r)
//	N  = h·(√(c_1·ρ_1) + ρ_1/(2σ̂₁))/σ̂₁                                         (error of σ̂₁)
//
// and in two-pass mode (or l − k < 4), where ρ is not observed, it is
// bounded through the test vectors' view of R, (I−P)·Z = R·Ω_t, with
// ω² = ‖(I−P)·Z‖²/t ≈ ‖R‖²_F and κ⁴ ≈ ‖RᵀR‖²_F (the mean square of the
// off-diagonal entries of the t×t Gram matrix of (I−P)·Z, whose
// expectation it is): Σ_{j<=r}ρ_j <= (sum of the r largest eigenvalues of
// RᵀR) <= min(ω², √r·κ²), Σ_{i<=r<j}(v_iᵀRᵀRv_j)² <= min(ω⁴/4, κ⁴/2) and
// ρ_1 <= min(ω², κ²):
//
//	F² = min(ω², √r·κ²) + τ²
//	T  = a_r/(a_r² − a_{r+1}²) · min(ω²/2, κ²/√2)
//	N  = h·(τ₁ + min(ω², κ²)/(2σ̂₁))/σ̂₁            (τ₁² = ‖û₁ᵀ·Δ·Ω_t‖²/t)
//
// Then
//
//	Accuracy = max( f_t · min(2·√res²/h, √(F² + T² + N²)/h),  100·2⁻⁵² )
//	res² = ‖Z − [Ĝ]_r·Ω_t‖²/t
//
// The first argument of min is the bound ‖[G]_r − [Ĝ]_r‖ <= 2‖G − [Ĝ]_r‖
// ([G]_r is optimal), which caps the first-order estimate where a tiny
// gap a_r − a_{r+1} makes it explode (r splitting a cluster of equal
// singular values, where [G]_r itself is ill-determined). f_t is the
// safety factor 1.5·max(1, g(t)/g(10)), g(t) = √(t/q_t), q_t the 5%
// quantile of χ²_t (the shortfall of a squared norm estimated from t
// Gaussian test vectors, at 5%, for a matrix of rank one): 1.5 for
// t >= 10, 1.97 for t = 5, 2.75 for t = 3, 15 for t = 1. The 1.5 is
// measured: without it the worst case below was 1.65× optimistic. The
// floor 100·2⁻⁵² is the float64 rounding of the reconstruction itself,
// which the test vectors cannot see.
//
// Measured (TestLoRAOneSketchSweep) on 150×450 float64 sketches of 9
// spectra (geometric with ratio 0.5, 0.8, 0.9, 0.95; power law 1/i;
// flat; clusters of 4 within 1e-3; 0.8ⁱ down to a floor 0.05; rank 5),
// r = 4, 8, 16, k = 2r+1, 4r, 8r, l = 2k+1, t = 10, 10 seeds: the ratio
// true error / Accuracy over 810 cases per mode was 0.06–1.10 (median
// 0.59) single-pass and 0.055–0.79 (median 0.21) two-pass; never
// optimistic by more than 1.10×. On float32 sketches of 384×1536 and
// 1024×4096 gradient-like matrices (σ_{i+1}/σ_i = 0.9) it was 0.46–0.74
// single-pass and 0.15–0.37 two-pass. The two-pass estimate is the
// conservative one because its sketch holds no row sketch to observe
// the leakage ρ. Accuracy is an estimate, not a bound: like any estimate
// from random test vectors it can be optimistic, with small probability.
//
// # Errors
//
// Before anything is written: gamma not finite and > 0 (ErrArgument); a
// bad view (ErrShape, ErrDType); inconsistent shapes: Y m×k, W l×n (k×n
// two-pass), Psi l×m (single pass), Z m×t, OmegaT n×t, b m×r, a r×n
// (ErrShape); r < 1, r > k or k > min(m, n) (ErrRank); l < k (ErrShape); a
// NaN or ±Inf in any sketch (ErrNonFinite, naming the matrix and
// element); an all-zero Y or W, or Ĝ = 0 (ErrZero: keep the placeholder
// init); an all-zero Z with a nonzero Y, a singular Ψ·Q, or a two-pass Y
// that is not orthonormal (max |QᵀQ − I| > 1e-3) (ErrArgument); overflow
// (ErrNonFinite); a done opt.Context (ErrCancelled). b and a are written
// only at the end and must not overlap each other or the sketches.
func LoRAOneSketch(b, a Dense, sk Sketch, gamma float64, opt Options) (SketchResult, error) {
	if err := checkPositive("gamma", gamma); err != nil {
		return SketchResult{}, err
	}
	if err := sk.check(opt.Rank); err != nil {
		return SketchResult{}, err
	}
	m, n, k, r := sk.Y.Rows, sk.W.Cols, sk.Y.Cols, opt.Rank
	if err := opt.check(m, n, r, "rank"); err != nil {
		return SketchResult{}, err
	}
	if err := b.check("output b", m, r); err != nil {
		return SketchResult{}, err
	}
	if err := a.check("output a", r, n); err != nil {
		return SketchResult{}, err
	}
	if err := sk.scan(); err != nil {
		return SketchResult{}, err
	}
	kn := newKernels(opt)
	kn.ws = nil // the sketch path allocates its own (small) scratch
	d, err := reconstruct(sk, r, kn)
	if err != nil {
		return SketchResult{}, err
	}
	est := d.testVectors(sk.Z, sk.OmegaT, kn)
	var cn, rho []float64
	if !sk.TwoPass && sk.W.Rows-k >= minLeakRows {
		cn, rho = d.leakage(sk.W, kn)
	}
	res := SketchResult{
		S: d.s[:r:r], Sigma1: d.s[0], K: k,
		Accuracy: d.accuracy(est, cn, rho, sk.Z.Cols),
		Residual: math.Sqrt(est.res2 / est.g2),
		Rank:     numericalRank(d.s, max(m, n), epsOf(sk.Y.DType)),
	}
	// Û_r = Q·U_x[:, :r], V_r = V[:, :r]
	u := general(m, r)
	kn.gemm64(blas.NoTrans, blas.NoTrans, 1, d.q, blas64.General{Rows: k, Cols: r, Stride: k, Data: d.ux.Data}, 0, u)
	v := general(n, r)
	for i := 0; i < n; i++ {
		copy(v.Data[i*r:(i+1)*r], d.v.Data[i*k:i*k+r])
	}
	svd := &SVD{U: mat.NewDense(m, r, u.Data), V: mat.NewDense(n, r, v.Data), S: res.S}
	c := 1 / (math.Sqrt(gamma) * math.Sqrt(d.s[0])) // no overflow in gamma·sigma1
	f := func(j int) float64 { return math.Sqrt(d.s[j]) * c }
	neg := func(j int) float64 { return -f(j) } // A carries the sign of −G
	if err := writeFactors(b, a, svd, r, 0, f, neg, opt, "gamma", gamma); err != nil {
		return SketchResult{}, err
	}
	return res, nil
}

// check validates the views and their shapes against each other and the
// rank r (see LoRAOneSketch).
func (sk Sketch) check(r int) error {
	views := []struct {
		what string
		g    Matrix
	}{{"Y", sk.Y}, {"W", sk.W}, {"Z", sk.Z}, {"OmegaT", sk.OmegaT}}
	if !sk.TwoPass {
		views = append(views, struct {
			what string
			g    Matrix
		}{"Psi", sk.Psi})
	}
	for _, v := range views {
		if err := v.g.Validate(); err != nil {
			return fmt.Errorf("loraone: sketch %s: %w", v.what, err)
		}
	}
	m, k, n, t := sk.Y.Rows, sk.Y.Cols, sk.W.Cols, sk.Z.Cols
	if r < 1 || r > k {
		return fmt.Errorf("loraone: rank %d outside [1, k = %d] (k = columns of sketch Y): %w", r, k, ErrRank)
	}
	if k > min(m, n) {
		return fmt.Errorf("loraone: sketch size k = %d > min(m, n) = min(%d, %d): %w", k, m, n, ErrRank)
	}
	shape := func(what string, g Matrix, rows, cols int) error {
		if g.Rows != rows || g.Cols != cols {
			return fmt.Errorf("loraone: sketch %s is %d×%d, want %d×%d: %w", what, g.Rows, g.Cols, rows, cols, ErrShape)
		}
		return nil
	}
	if sk.TwoPass {
		if err := shape("W (X = Qᵀ·G, two-pass)", sk.W, k, n); err != nil {
			return err
		}
	} else {
		l := sk.W.Rows
		if l < k {
			return fmt.Errorf("loraone: sketch W has l = %d rows < k = %d: %w", l, k, ErrShape)
		}
		if err := shape("Psi", sk.Psi, l, m); err != nil {
			return err
		}
	}
	if err := shape("Z", sk.Z, m, t); err != nil {
		return err
	}
	return shape("OmegaT", sk.OmegaT, n, t)
}

// scan checks every sketch for NaN and ±Inf, and Y, W (single pass) and
// Z for being all zero.
func (sk Sketch) scan() error {
	if err := scanSketch("Y", sk.Y, true); err != nil {
		return err
	}
	if err := scanSketch("W", sk.W, true); err != nil {
		return err
	}
	if !sk.TwoPass {
		if err := scanSketch("Psi", sk.Psi, false); err != nil {
			return err
		}
	}
	if err := scanSketch("OmegaT", sk.OmegaT, false); err != nil {
		return err
	}
	if err := scanSketch("Z", sk.Z, true); err != nil {
		if errors.Is(err, ErrZero) {
			return fmt.Errorf("loraone: test sketch Z = G·Ω_t is all zero while Y is not: were the test vectors accumulated? %w", ErrArgument)
		}
		return err
	}
	return nil
}
