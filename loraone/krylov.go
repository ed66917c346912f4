package loraone

import (
	"fmt"
	"math"
	"math/rand/v2"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack/lapack64"

	"github.com/peft-loraone/peft-loraone/loraone/internal/simd"
)

// krylovCap returns the largest basis (columns of Q) the block Krylov
// iteration keeps before a thick restart, for block size b: 8b, but not
// more than 256 columns unless b is large (at least 4b, so that a restart
// keeps 2b Ritz vectors and can still grow).
func krylovCap(b int) int {
	return min(8*b, max(256, 4*b))
}

// krylovBlock is the block size of the Krylov iteration for rank r: r, but
// at least 16 columns (thin panels run the GEMM far below its peak, and a
// block of 16 needed fewer passes than 8 at r = 8), rounded up to a
// multiple of 16 when the simd kernels run the products (Options.SIMD),
// and at most min(m, n).
func krylovBlock(r, m, n int, opt Options) int {
	b := max(r, 16)
	if opt.SIMD && simd.Available() {
		b = (b + simd.Width - 1) / simd.Width * simd.Width // the kernels' panel width
	}
	return min(b, m, n)
}

// krylovNear: after a Gᵀ-pass whose residuals put the G-pass estimate
// within krylovNear·Tol, the SVD of T is made even where it costs more
// than half a pass, so that the next G-pass can stop on that estimate's
// residuals (residualEstimate) instead of making another, larger SVD and
// a further pass. Traced on the all-MiniLM-L6-v2 gradients (384×384,
// 1536×384, 384×1536; r = 8, 16, 64) against the exact SVD, the Gᵀ-pass
// estimate was 6.8–86× more accurate than the G-pass estimate before it
// once that one's error was below 4e-2 (1.7–10× before), and the residual
// estimate of a G-pass estimate was 1.6–2.7× its true error; 50 instead of
// 30 saved a pass on two MiniLM r = 64 rows but added one on flat spectra
// at r = 16 (the extra estimate changes the change-based extrapolation),
// with no gain in time.
const krylovNear = 30.0

// krylovSlow weights the nominal flops of an injected (LAPACK) small SVD
// against a pass's GEMM flops in the rule that decides whether to make an
// estimate after a Gᵀ-pass.
const krylovSlow = 2.0

// krylovSVD is RandSVD with Options.Krylov set: block Lanczos
// bidiagonalization with full re-orthogonalization, block size b = r,
//
//	P₁ = qr(Ω)            (n×b Gaussian, PCG opt.Seed)
//	pass 2j−1:  Y = G·P_j,   Q_j = orth(Y ⊥ Q₁…Q_{j−1})
//	pass 2j:    Z = Gᵀ·Q_j,  P_{j+1} = orth(Z ⊥ P₁…P_j)
//
// The projected matrix T = Qᵀ·G·P (block upper triangular, nq×np) is kept
// exactly: its new column block is Qᵀ·Y and its new row block (P̃ᵀ·Z)ᵀ,
// and every other new entry is zero because G·P_old ⊂ span(Q_old) and
// Gᵀ·Q_old ⊂ span(P_old). After every G-pass (and after a Gᵀ-pass while
// T is small enough that its SVD costs well under a pass, or when the
// tolerance is near) the rank-r estimate X = (Q·Ũ_r)·diag(S_r)·(P·Ṽ_r)ᵀ
// comes from the exact SVD (Gesvd) of T, and the iteration stops when the
// error extrapolated from the relative Frobenius changes between
// consecutive estimates (krylovEstimate), or the one from the Ritz
// residuals that the next pass reveals (residualEstimate), is <= Tol.
//
// The basis grows by b columns per pass; once Q would exceed
// krylovCap(b) columns (never when m < krylovCap(b): the basis then
// grows until it spans Rᵐ or Rⁿ) it is thick-
// restarted: after a G-pass, T = Ũ Σ Ṽᵀ, and with the following Gᵀ-pass
// Q ← Q·Ũ_k, P ← [P·Ṽ_k, P_new], T ← [Σ_k | Ũ_lastᵀ·(P_newᵀ Z)ᵀ] with
// k = cap − 2b, which keeps T = Qᵀ·G·P exact and the Krylov recurrence
// valid. A new block that is rounding noise (breakdown: rank-deficient
// G, or an exhausted Krylov space) is completed with Gaussian columns;
// when Q spans all of Rᵐ (or P all of Rⁿ) the estimate is exact and the
// iteration stops with Accuracy 0.
func krylovSVD(g Matrix, r int, opt Options) (*SVD, error) {
	m, n := g.Rows, g.Cols
	b := krylovBlock(r, m, n, opt)
	capQ := min(krylovCap(b), m)
	capP := min(capQ+b, n)
	opt.Workspace.begin()
	ws := opt.Workspace
	k := &krylov{
		m: m, n: n, r: r, b: b, capQ: capQ, capP: capP,
		// Q and P start with room for two blocks and grow by doubling
		// (growCols) up to capQ / capP: most calls stop long before the cap.
		// Only their first nq / np columns are ever read, each written
		// (setCols, growCols) before.
		q: ws.generalDirty(m, min(2*b, capQ)), p: ws.generalDirty(n, min(2*b, capP)),
		t: ws.general(capQ, capP),
		// y0, wm, z0, wn, coef: each use writes them first (products,
		// copies, gemm with beta = 0)
		y0: ws.generalDirty(m, b), wm: ws.generalDirty(m, b),
		z0: ws.generalDirty(n, b), wn: ws.generalDirty(n, b),
		kn:   newKernels(opt),
		rng:  rand.New(rand.NewPCG(opt.Seed, 0x4c6f52412d4f6e65)), // "LoRA-One"
		coef: ws.float64sDirty(capP * b),
		acc:  ws.float64sDirty(capP * b), // orthNew clears what it uses
		sCur: make([]float64, r),
	}
	k.qrw = &workspace{m: m, n: n, k: b, kn: k.kn, rt: general(b, b)}
	k.est = &workspace{m: m, n: n, r: r, kn: k.kn,
		u: general(m, r), v: general(n, r),
		cross: general(r, r), cross2: general(r, r), ps: make([]float64, r)}
	prod := newProduct(g, b, k.kn)

	// P₁: orthonormal Gaussian start block.
	w := blas64.General{Rows: n, Cols: b, Stride: b, Data: k.wn.Data}
	k.randomFill(w, 0, b)
	if !k.cholQR(w) {
		k.hqr(w)
	}
	k.setCols(k.p, 0, w)
	k.np, k.pLast = b, 0

	maxPasses := 2 + 2*min(opt.MaxIters, MaxPowerIters)
	res := &SVD{}
	restart := false
	// The SVD of T costs about 20·nq·np·min(nq, np) flops of gonum's
	// level-1/2 code, a pass 2·m·n·b flops of (possibly injected) GEMM.
	// Estimates after Gᵀ-passes are made while the SVD costs less than
	// half a pass (weighting its flops 16× when a fast kernel is
	// injected), or when the tolerance is near (krylovNear); the G-pass
	// estimates are always made unless the residuals of a Gᵀ-pass
	// estimate stop the iteration first. Skipping a Gᵀ-pass estimate
	// makes Accuracy the change over two passes (more conservative).
	slow := 1.0
	switch {
	case opt.Gesdd != nil:
		slow = krylovSlow
	case opt.Sgemm != nil || opt.Dgemm != nil:
		slow = 16
	}
	passFlops := 2 * float64(m) * float64(n) * float64(b)
	estimated := false // an estimate was made after the last pass
	cPrev2 := 0.0      // the change recorded before res.Change
	for pass := 1; pass <= maxPasses; pass++ {
		if err := opt.cancelled(pass - 1); err != nil {
			return nil, err
		}
		cheap := true // the SVD of T after this pass costs well under a pass
		if pass%2 == 0 {
			nq, np := float64(k.nq), float64(min(k.np+b, n))
			cheap = 20*nq*np*min(nq, np)*slow <= passFlops/2
			if !cheap && pass == maxPasses {
				break // a last pass without an estimate would be wasted
			}
		}
		var err error
		exhausted := false
		// resValid: the last SVD of T is the estimate made just before
		// this pass, whose Ritz residuals the pass reveals.
		resValid := pass > 2 && estimated && !restart && k.svdQ == k.nq && k.svdP == k.np
		if pass%2 == 1 {
			exhausted, err = k.passG(g, prod, pass)
		} else {
			exhausted, err = k.passGT(g, prod, pass, restart)
			restart = false
		}
		if err != nil {
			return nil, err
		}
		resEst := math.Inf(1)
		if resValid && !exhausted {
			// Stop on the residuals of the previous estimate (kept: the
			// bases only grew since), without another SVD of T.
			resEst = k.residualEstimate(pass%2 == 0)
			if resEst <= res.Accuracy {
				res.Passes = pass
				estimated = true
				if res.record(res.Change, resEst, opt.Tol) {
					break
				}
			}
		}
		if exhausted {
			// The current T is exact (G = Q·T·Pᵀ): another pass would
			// not change its SVD.
			if !estimated {
				if err := k.estimate(true); err != nil {
					return nil, err
				}
			}
			res.Accuracy, res.Change = 0, 0
			res.Converged = opt.Tol > 0
			break
		}
		res.Passes = pass
		// After a Gᵀ-pass, estimate while the SVD is cheap, and also when
		// the residuals of the G-pass estimate say the tolerance is near:
		// the next G-pass then reveals this estimate's residuals, and near
		// convergence a Gᵀ-pass estimate is far more accurate than the
		// G-pass one before it (krylovNear).
		side := pass%2 == 0 && !cheap && resEst <= krylovNear*opt.Tol
		est := pass%2 == 1 || cheap || side
		estimated = est
		if !est {
			continue
		}
		// A thick restart follows a G-pass estimate once Q is full; it
		// needs the whole SVD of T.
		restart = pass%2 == 1 && k.nq+b > capQ && capQ == krylovCap(b)
		afterSide := k.side
		if afterSide {
			k.keepMain()
		}
		if err := k.estimate(restart); err != nil {
			return nil, err
		}
		if afterSide {
			k.restoreMain()
		}
		if side {
			// A side estimate: only its residuals, revealed by the next
			// G-pass, may stop on it. Its change would span one pass where
			// the changes before it span two (no Gᵀ-pass estimates
			// between), and the extrapolation in krylovEstimate would take
			// the shorter step for a faster rate (64×64 gradient, r = 2:
			// an estimate of 3.5e-5 for a true error of 6.1e-5); the next
			// estimate's change is measured against the one before it.
			k.side = true
			continue
		}
		if pass == 1 {
			continue
		}
		c := k.change()
		e := krylovEstimate(c, res.Change, cPrev2, k.ritzGap())
		cPrev2 = res.Change
		if res.record(c, e, opt.Tol) {
			break
		}
	}
	k.factors()
	k.truncation(g, res, opt.Tol)
	return res.finish(k.est.u, k.est.v, k.sCur)
}

// truncation sets res.GapRatio, res.Ambiguous and res.ResidualExcess
// from the last SVD of T (see SVD).
func (k *krylov) truncation(g Matrix, res *SVD, tol float64) {
	r := k.r
	res.ResidualExcess = -1
	if len(k.sv) <= r || !(k.sv[r-1] > 0) {
		return
	}
	res.GapRatio = k.sv[r] / k.sv[r-1]
	res.Ambiguous = 1-res.GapRatio < ambiguousGap(max(tol, res.Accuracy))
	if !res.Ambiguous {
		return
	}
	// In units of θ₁² (no overflow for any finite G).
	s1 := k.sv[0]
	g2 := g.frobeniusSq(s1)
	var top, tail float64
	for i, x := range k.sv {
		x /= s1
		if i < r {
			top += x * x
		} else {
			tail += x * x
		}
	}
	a := max(g2-top, 0) // ‖G − X‖²
	switch {
	case a == 0:
		res.ResidualExcess = 0
	case tail == 0:
		res.ResidualExcess = math.Inf(1)
	default:
		res.ResidualExcess = max(math.Sqrt(max(a, tail)/tail)-1, 0)
	}
}

// krylovGapFloor is the Ritz gap θ_{r+1}/θ_r above which krylovEstimate
// keeps errorEstimate's floor c/2.
const krylovGapFloor = 0.95

// krylovEstimate is errorEstimate for block Krylov, from the last three
// changes c, c1, c2 (newest first; 0 when missing) and the Ritz gap
// θ_{r+1}/θ_r of the estimate just made:
//
//	ρ = max(c/c1, √(c/c2)),   e = c·ρ/(1−ρ)   (9·c when ρ >= 0.9)
//
// with the floor e >= c/2 only when the gap is above krylovGapFloor.
//
// Block Krylov converges superlinearly once the rank-r space is separated
// from the rest of the spectrum: the change c mostly measures the error of
// the previous estimate, and the current one is far smaller. The floor c/2
// then costs a whole pass (4096×11008, spectrum clustered in fours,
// r = 64: true error 2.2e-4 after 5 passes, where c/2 said 2.0e-3). The
// two-step rate √(c/c2) guards against the uneven steps seen on flat
// spectra (a large step after a small one makes c/c1 alone too
// optimistic), and where the r-th and (r+1)-th values are within 5%
// convergence is irregular and the floor stays.
//
// Measured on traces of 57 matrices (synthetic spectra at 300×400 to
// 11008×4096, r = 8, 16, 64, and 15 all-MiniLM-L6-v2 gradients), stopping
// at tol 1e-2 … 1e-5: 5080 passes in all against 5190 with
// errorEstimate, no stop above 2·tol, and at the stops the estimate at
// most 1.91× below the true error (errorEstimate: 1.92×); see
// bench/RESULTS.md.
func krylovEstimate(c, c1, c2, gap float64) float64 {
	if c == 0 || c1 <= 0 || c2 <= 0 {
		return errorEstimate(c, c1)
	}
	rho := max(c/c1, math.Sqrt(c/c2))
	if rho >= 0.9 {
		return 9 * c
	}
	e := c * rho / (1 - rho)
	if !(gap <= krylovGapFloor) {
		e = max(e, c/2)
	}
	return e
}

// ritzGap returns θ_{r+1}/θ_r from the last SVD of T (1 when there is no
// θ_{r+1} or θ_r is 0).
func (k *krylov) ritzGap() float64 {
	if len(k.sv) <= k.r || !(k.sv[k.r-1] > 0) {
		return 1
	}
	return k.sv[k.r] / k.sv[k.r-1]
}

// krylovResidualSafety multiplies the residual estimate
// (residualEstimate).
const krylovResidualSafety = 2.0

// krylovResidualMinGap is the relative gap 1 − θ_{r+1}/θ_r below which
// residualEstimate gives no estimate (the ambiguous-truncation threshold's
// upper end, ambiguousGap).
const krylovResidualMinGap = 0.01

// residualEstimate estimates the relative error of the estimate of the last
// SVD of T from its Ritz residuals, which the pass just made reveals
// (transposed: that pass multiplied by Gᵀ, so the estimate was made after
// a G-pass). With T = Ũ Θ Ṽᵀ, u_i = Q·ũ_i and v_i = P·ṽ_i, after a G-pass
// G·v_i = θ_i·u_i exactly and the Gᵀ-pass gives
//
//	Gᵀ·u_i = θ_i·v_i + P_new·E·ũ_i[last Q block],   ρ_i = ‖E·ũ_i[last]‖
//
// with E = P_newᵀ·Gᵀ·Q_last the new block of T; after a Gᵀ-pass it is the
// other way round: Gᵀ·u_i = θ_i·v_i exactly, and the G-pass gives
// G·v_i = θ_i·u_i + Q_new·E'·ṽ_i[last P block], ρ_i = ‖E'·ṽ_i[last]‖, with
// E' = Q_newᵀ·G·P_last. The estimate is
//
//	e = krylovResidualSafety·√2·‖ρ_{1..r}‖ / ‖θ_{1..r}‖
//
// (+Inf when 1 − θ_{r+1}/θ_r < krylovResidualMinGap). Unlike the changes
// between estimates, it measures the error of the current estimate rather
// than of the previous one, which saves the last pass and the largest SVD
// of T where Krylov converges superlinearly (small matrices, gradients of
// low rank).
//
// First-order perturbation theory turns a residual ρ_i into an angle of up
// to ρ_i·θ_i/(θ_i² − σ²) towards a singular vector of value σ <= σ_{r+1};
// with σ = θ_{r+1} that bound overestimated the true error 1.4–65× (median
// about 10×, flat spectra the most) at 91 residual checks on 27 traces
// (the MiniLM gradients and 1024² / 768×3072 synthetic spectra, r = 8,
// 16, 64): the residual points mostly at the small singular values the
// Krylov space has not reached yet. Without that factor, √2·‖ρ‖/‖θ‖ was
// 0.76–1.41× the true error wherever the true error was in [1e−6, 1e−2]
// (0.58–1.11× above 1e−2; at the float32 floor below 1e−6 as low as
// 0.09×), so with the safety factor 2 the estimate stayed above the truth
// at every check in that range; see bench/RESULTS.md (issue 16). Where
// θ_r and θ_{r+1} are within krylovResidualMinGap the rank-r space is
// nearly degenerate, small residuals no longer mean a small error against
// G_r (a cluster of 146 equal values with r inside it stopped with
// ResidualExcess 4), and the change-based estimate decides alone.
func (k *krylov) residualEstimate(transposed bool) float64 {
	r := k.r
	if len(k.sv) <= r {
		return math.Inf(1)
	}
	ex := k.scaleExp
	if ex == 1<<20 {
		ex = 0
	}
	if !(k.sv[r] < (1-krylovResidualMinGap)*k.sv[r-1]) {
		return math.Inf(1)
	}
	// The new block of T: rows q0:q0+qw, columns p0:p0+pw; the Ritz vector
	// it multiplies is ũ_i over its rows (transposed) or ṽ_i over its
	// columns.
	q0, qw := k.qLast, k.nq-k.qLast
	p0, pw := k.pLast, k.np-k.pLast
	t := func(l, j int) float64 { return k.t.Data[(q0+l)*k.t.Stride+p0+j] }
	var num, den float64
	for i := 0; i < r; i++ {
		th := math.Ldexp(k.sv[i], -ex)
		var rho2 float64
		if transposed {
			for j := 0; j < pw; j++ {
				var s float64
				for l := 0; l < qw; l++ {
					s += t(l, j) * k.su[(q0+l)*k.svdQ+i]
				}
				s = math.Ldexp(s, -ex)
				rho2 += s * s
			}
		} else {
			vi := k.svt[i*k.svdP+p0 : i*k.svdP+p0+pw]
			for l := 0; l < qw; l++ {
				var s float64
				for j, x := range vi {
					s += t(l, j) * x
				}
				s = math.Ldexp(s, -ex)
				rho2 += s * s
			}
		}
		num += rho2
		den += th * th
	}
	if den == 0 {
		return math.Inf(1)
	}
	return krylovResidualSafety * math.Sqrt(2*num/den)
}

// krylov is the state of one block Krylov call.
type krylov struct {
	m, n, r, b   int
	capQ, capP   int
	q, p         blas64.General // m×capQ, n×capP; the first nq / np columns are the bases
	t            blas64.General // capQ×capP; T = Qᵀ·G·P in the leading nq×np block
	nq, np       int
	qLast, pLast int            // first column of the last Q / P block
	y0, wm       blas64.General // m×b: G·P_last, orthogonalization scratch
	z0, wn       blas64.General // n×b
	coef         []float64      // projection coefficients, up to capP×b
	acc          []float64      // orthNew's summed projection coefficients, up to capP×b
	kn           kernels
	rng          *rand.Rand

	ts, su, svt []float64 // SVD of T: copy of T, Ũ (nq×nq), Ṽᵀ (np×np)
	gram, lam   []float64 // gramSVD: T·Tᵀ, then its eigenvectors; eigenvalues
	sv, sw      []float64
	svdQ, svdP  int // nq, np of the last SVD
	tau, work   []float64
	cmp         []float64 // restart scratch
	sCur        []float64 // current S_r
	sScaled     []float64 // S_r·2^−scaleExp, for change()
	scaleExp    int
	est         *workspace
	qrw         *workspace // CholeskyQR2 scratch for b-column blocks

	// The current and previous estimates in the bases' coordinates:
	// U = Q[:, :len/r]·cu, V = P[:, :len/r]·cv (row-major, r columns).
	// The bases only grow by appended columns between restarts, so older
	// coordinates padded with zero rows stay valid; a restart rewrites
	// the current ones (the restarted bases begin with the estimate).
	cu, cv, pcu, pcv []float64
	// side: the last estimate was a side estimate (after a Gᵀ-pass, made
	// only for its residuals); keepCu, keepCv, keepS: keepMain's copies.
	side                  bool
	keepCu, keepCv, keepS []float64
	norm0                 []float64
	norm1                 []float64
}

// growCols returns a with room for at least c columns (doubling, at most
// limit), copying the stored columns when it has to reallocate (from ws).
func growCols(ws *Workspace, a blas64.General, c, limit int) blas64.General {
	if c <= a.Cols {
		return a
	}
	b := ws.generalDirty(a.Rows, min(max(c, 2*a.Cols), limit)) // columns past a.Cols: setCols writes them
	for i := 0; i < a.Rows; i++ {
		copy(b.Data[i*b.Stride:i*b.Stride+a.Cols], a.Data[i*a.Stride:i*a.Stride+a.Cols])
	}
	return b
}

// cols returns columns c0:c1 of a as a view.
func cols(a blas64.General, c0, c1 int) blas64.General {
	return blas64.General{Rows: a.Rows, Cols: c1 - c0, Stride: a.Stride, Data: a.Data[c0:]}
}

// setCols copies the contiguous block w into a starting at column c0.
func (k *krylov) setCols(a blas64.General, c0 int, w blas64.General) {
	for i := 0; i < w.Rows; i++ {
		copy(a.Data[i*a.Stride+c0:i*a.Stride+c0+w.Cols], w.Data[i*w.Stride:i*w.Stride+w.Cols])
	}
}

// randomFill fills columns c0:c1 of w with Gaussian values.
func (k *krylov) randomFill(w blas64.General, c0, c1 int) {
	for i := 0; i < w.Rows; i++ {
		for j := c0; j < c1; j++ {
			w.Data[i*w.Stride+j] = k.rng.NormFloat64()
		}
	}
}

// hqr overwrites the contiguous panel a (rows >= cols) with the thin Q of
// its Householder QR.
func (k *krylov) hqr(a blas64.General) {
	if len(k.tau) < a.Cols {
		k.tau = make([]float64, a.Cols)
	}
	tau := k.tau[:a.Cols]
	q := []float64{0}
	lapack64.Geqrf(a, tau, q, -1)
	lw := int(q[0])
	lapack64.Orgqr(a, tau, q, -1)
	lw = max(lw, int(q[0]), 1)
	if len(k.work) < lw {
		k.work = make([]float64, lw)
	}
	lapack64.Geqrf(a, tau, k.work, len(k.work))
	lapack64.Orgqr(a, tau, k.work, len(k.work))
}

// coefs computes c = basisᵀ·w into k.coef (basis.Cols × w.Cols).
func (k *krylov) coefs(w, basis blas64.General) blas64.General {
	c := blas64.General{Rows: basis.Cols, Cols: w.Cols, Stride: w.Cols, Data: k.coef[:basis.Cols*w.Cols]}
	k.kn.gemm64(blas.Trans, blas.NoTrans, 1, basis, w, 0, c)
	return c
}

// project sets w ← w − basis·(basisᵀ·w), adding the coefficients
// basisᵀ·w to acc (basis.Cols × w.Cols) when acc is not nil.
func (k *krylov) project(w, basis blas64.General, acc []float64) {
	c := k.coefs(w, basis)
	if acc != nil {
		for i, x := range c.Data {
			acc[i] += x
		}
	}
	k.kn.gemm64(blas.NoTrans, blas.NoTrans, -1, basis, c, 1, w)
}

// newCoefs returns basisᵀ·y (basis.Cols × y.Cols, in k.coef) for the
// panel y that orthNew just turned into the last basis.Cols − nOld
// columns of basis. When orthNew reported the factorization known
// (y = basis_old·C + basis_new·R), that is [C; R] from k.acc and k.qrw.rt;
// otherwise it is computed.
func (k *krylov) newCoefs(y, basis blas64.General, nOld int, known bool) blas64.General {
	if !known {
		return k.coefs(y, basis)
	}
	w := y.Cols
	c := blas64.General{Rows: basis.Cols, Cols: w, Stride: w, Data: k.coef[:basis.Cols*w]}
	copy(c.Data, k.acc[:nOld*w])
	rt := k.qrw.rt
	for i := nOld; i < basis.Cols; i++ {
		copy(c.Data[i*w:(i+1)*w], rt.Data[(i-nOld)*rt.Stride:(i-nOld)*rt.Stride+w])
	}
	return c
}

// orthNew turns the contiguous rows×wIn panel w into an orthonormal block
// of wOut <= wIn columns orthogonal to basis, whose span contains the part
// of w outside span(basis) (when wOut < wIn, the complement of basis has
// exactly wOut dimensions and any basis of it is returned). Columns that
// are rounding noise after the projection (breakdown) are replaced by
// Gaussian columns. The block is returned as a contiguous view of w.Data.
//
// Block Gram–Schmidt with the DGKS criterion: w is projected once, and a
// second time only if some column lost more than 1 − 1/√2 of its norm
// (cancellation). In the Lanczos recurrence the new block's component in
// span(basis) lies almost entirely along the last block (the coupling
// term), so w is first projected against the last local columns alone:
// the full projection that follows then removes only rounding and rarely
// needs the second round (it did on 11 of 13 blocks without the local step).
// The block is then factored by CholeskyQR2 when a fast
// Dgemm is injected. A block CholeskyQR2 accepts (condition number below
// ~1e3) is orthonormal and orthogonal to basis to rounding; otherwise the
// Householder QR and an explicit check of the new columns against basis
// (the slow but robust path) take over.
//
// It also reports whether the factorization w = basis·C + out·R is known,
// with C (basis.Cols × w.Cols, the summed projection coefficients) in k.acc
// and R (upper triangular) in k.qrw.rt: true when the first projection
// round and CholeskyQR2 succeeded on the whole block. The caller then has
// the new entries of T without another product with the basis.
func (k *krylov) orthNew(w, basis blas64.General, wOut, local int) (blas64.General, bool) {
	whole := wOut == w.Cols // otherwise w is replaced by random columns
	if wOut < w.Cols {
		w = blas64.General{Rows: w.Rows, Cols: wOut, Stride: wOut, Data: w.Data[:w.Rows*wOut]}
		k.randomFill(w, 0, wOut)
	}
	if basis.Cols == 0 {
		if !k.cholQR(w) {
			k.hqr(w)
			return w, false
		}
		return w, whole
	}
	acc := k.acc[:basis.Cols*w.Cols]
	clear(acc)
	if local > 0 && local < basis.Cols {
		// The big component first: against the last local columns alone
		// (their coefficients are the last rows of acc).
		off := basis.Cols - local
		k.project(w, cols(basis, off, basis.Cols), acc[off*w.Cols:])
	}
	for it := 0; ; it++ {
		before := k.colNorms(w, &k.norm0)
		k.project(w, basis, acc)
		after := k.colNorms(w, &k.norm1)
		for j := range after {
			if !(after[j] >= before[j]/math.Sqrt2) {
				k.project(w, basis, acc)
				break
			}
		}
		if k.cholQR(w) {
			return w, whole && it == 0
		}
		acc = nil
		if it > 0 {
			k.project(w, basis, nil) // the Householder path projects twice
		}
		k.hqr(w)
		if it == 5 {
			break
		}
		// How much of each new (unit) column still lies in span(basis)?
		c := k.coefs(w, basis)
		var worst float64
		for j := 0; j < w.Cols; j++ {
			var s float64
			for i := 0; i < c.Rows; i++ {
				s += c.Data[i*c.Stride+j] * c.Data[i*c.Stride+j]
			}
			if s > 0.25 { // mostly inside: the column came from noise
				k.randomFill(w, j, j+1)
			}
			worst = max(worst, s)
		}
		if worst <= 1e-26 {
			break
		}
	}
	return w, false
}

// colNorms returns the Euclidean norms of the columns of w in *buf.
func (k *krylov) colNorms(w blas64.General, buf *[]float64) []float64 {
	if len(*buf) < w.Cols {
		*buf = make([]float64, w.Cols)
	}
	out := (*buf)[:w.Cols]
	clear(out)
	for i := 0; i < w.Rows; i++ {
		row := w.Data[i*w.Stride : i*w.Stride+w.Cols]
		for j, x := range row {
			out[j] += x * x
		}
	}
	for j := range out {
		out[j] = math.Sqrt(out[j])
	}
	return out
}

// cholQR factors a full-width block (b columns) in place by CholeskyQR2
// when a fast Dgemm is injected; it reports false (a untouched) otherwise,
// or when the block is too ill-conditioned for it.
func (k *krylov) cholQR(a blas64.General) bool {
	if k.kn.d == nil || a.Cols != k.qrw.k {
		return false
	}
	return k.qrw.cholQR2(a)
}

// passG multiplies G by the last P block and extends Q and T. It reports
// true (and does nothing) when Q already spans Rᵐ.
func (k *krylov) passG(g Matrix, prod *product, pass int) (bool, error) {
	room := k.m - k.nq
	if room == 0 {
		return true, nil
	}
	x := cols(k.p, k.pLast, k.np)
	pw := x.Cols
	y0 := blas64.General{Rows: k.m, Cols: pw, Stride: pw, Data: k.y0.Data[:k.m*pw]}
	prod.mulG(y0, x)
	if err := checkPanel(g, y0, pass); err != nil {
		return false, err
	}
	w := blas64.General{Rows: k.m, Cols: pw, Stride: pw, Data: k.wm.Data[:k.m*pw]}
	copy(w.Data, y0.Data)
	// G·P_last lies in span(Q) plus the new block, mostly along the last
	// Q block (all of Q right after a restart: qLast = 0).
	qn, known := k.orthNew(w, cols(k.q, 0, k.nq), min(pw, room), k.nq-k.qLast)
	k.q = growCols(k.kn.ws, k.q, k.nq+qn.Cols, k.capQ)
	k.setCols(k.q, k.nq, qn)
	k.qLast = k.nq
	k.nq += qn.Cols
	// T[0:nq, pLast:np] = Qᵀ·Y; T[qLast:nq, 0:pLast] = 0.
	c := k.newCoefs(y0, cols(k.q, 0, k.nq), k.qLast, known) // nq×pw
	for i := 0; i < k.nq; i++ {
		copy(k.t.Data[i*k.t.Stride+k.pLast:i*k.t.Stride+k.pLast+pw], c.Data[i*pw:(i+1)*pw])
	}
	for i := k.qLast; i < k.nq; i++ {
		clear(k.t.Data[i*k.t.Stride : i*k.t.Stride+k.pLast])
	}
	return false, nil
}

// passGT multiplies Gᵀ by the last Q block and extends P and T, with a
// thick restart from the last SVD of T when restart is set. It reports
// true (and does nothing) when P already spans Rⁿ.
func (k *krylov) passGT(g Matrix, prod *product, pass int, restart bool) (bool, error) {
	room := k.n - k.np
	if room == 0 {
		return true, nil
	}
	x := cols(k.q, k.qLast, k.nq)
	qw := x.Cols
	z0 := blas64.General{Rows: k.n, Cols: qw, Stride: qw, Data: k.z0.Data[:k.n*qw]}
	prod.mulGT(z0, x)
	if err := checkPanel(g, z0, pass); err != nil {
		return false, err
	}
	w := blas64.General{Rows: k.n, Cols: qw, Stride: qw, Data: k.wn.Data[:k.n*qw]}
	copy(w.Data, z0.Data)
	pn, known := k.orthNew(w, cols(k.p, 0, k.np), min(qw, room), k.np-k.pLast)
	wp := pn.Cols
	if !restart {
		k.p = growCols(k.kn.ws, k.p, k.np+wp, k.capP)
		k.setCols(k.p, k.np, pn)
		k.pLast = k.np
		k.np += wp
		// T[qLast:nq, 0:np] = (Pᵀ·Z)ᵀ; T[0:qLast, pLast:np] = 0.
		c := k.newCoefs(z0, cols(k.p, 0, k.np), k.pLast, known) // np×qw
		for i := 0; i < qw; i++ {
			row := k.t.Data[(k.qLast+i)*k.t.Stride:]
			for j := 0; j < k.np; j++ {
				row[j] = c.Data[j*qw+i]
			}
		}
		for i := 0; i < k.qLast; i++ {
			clear(k.t.Data[i*k.t.Stride+k.pLast : i*k.t.Stride+k.np])
		}
		return false, nil
	}
	// Thick restart from the SVD of T (nq×np, after the last G-pass).
	nq, np := k.svdQ, k.svdP
	kk := k.restartKeep(nq, np)
	f := k.coefs(z0, pn) // wp×qw = P_newᵀ·Z
	fd := append([]float64(nil), f.Data...)
	if len(k.cmp) < max(k.m, k.n)*kk {
		k.cmp = k.kn.ws.float64sDirty(max(k.m, k.n) * kk) // gemm output
	}
	// Q ← Q·Ũ_k
	tmp := blas64.General{Rows: k.m, Cols: kk, Stride: kk, Data: k.cmp[:k.m*kk]}
	uk := blas64.General{Rows: nq, Cols: kk, Stride: nq, Data: k.su}
	k.kn.gemm64(blas.NoTrans, blas.NoTrans, 1, cols(k.q, 0, nq), uk, 0, tmp)
	k.setCols(k.q, 0, tmp)
	// P ← [P·Ṽ_k, P_new]
	tmp = blas64.General{Rows: k.n, Cols: kk, Stride: kk, Data: k.cmp[:k.n*kk]}
	vkt := blas64.General{Rows: kk, Cols: np, Stride: np, Data: k.svt}
	k.kn.gemm64(blas.NoTrans, blas.Trans, 1, cols(k.p, 0, np), vkt, 0, tmp)
	k.setCols(k.p, 0, tmp)
	k.setCols(k.p, kk, pn)
	// T ← [Σ_k | Ũ_lastᵀ·Fᵀ]
	for i := 0; i < kk; i++ {
		row := k.t.Data[i*k.t.Stride : i*k.t.Stride+kk+wp]
		clear(row)
		row[i] = k.sv[i]
		for j := 0; j < wp; j++ {
			var s float64
			for l := 0; l < qw; l++ {
				s += k.su[(k.qLast+l)*nq+i] * fd[j*qw+l]
			}
			row[kk+j] = s
		}
	}
	k.nq, k.np = kk, kk+wp
	k.qLast, k.pLast = 0, kk
	// The estimate of that SVD is now U = Q[:, :r], V = P[:, :r].
	k.cu, k.cv = k.cu[:kk*k.r], k.cv[:kk*k.r]
	clear(k.cu)
	clear(k.cv)
	for i := 0; i < k.r; i++ {
		k.cu[i*k.r+i], k.cv[i*k.r+i] = 1, 1
	}
	return false, nil
}

// estimate computes the SVD of T and the coordinates of the rank-r
// estimate in the bases (Ũ_r, Ṽ_r), keeping the previous ones for
// change(); factors() forms U and V. It factors T through T·Tᵀ (gramSVD)
// where it can: for the top r triplets, or, when full is set (a thick
// restart follows), for all restartKeep of them that the restart keeps.
func (k *krylov) estimate(full bool) error {
	nq, np, r := k.nq, k.np, k.r
	e := k.est
	grow := func(s []float64, n int) []float64 {
		if len(s) < n {
			return make([]float64, n)
		}
		return s[:n]
	}
	k.ts = grow(k.ts, nq*np)
	k.su = grow(k.su, nq*nq)
	k.svt = grow(k.svt, np*np)
	k.sv = grow(k.sv, min(nq, np))
	for i := 0; i < nq; i++ {
		copy(k.ts[i*np:(i+1)*np], k.t.Data[i*k.t.Stride:i*k.t.Stride+np])
	}
	mn := min(nq, np)
	ts := blas64.General{Rows: nq, Cols: np, Stride: np, Data: k.ts}
	su := blas64.General{Rows: nq, Cols: mn, Stride: nq, Data: k.su}   // thin Ũ, row stride nq
	svt := blas64.General{Rows: mn, Cols: np, Stride: np, Data: k.svt} // thin Ṽᵀ
	need, ratio := r, gramMinRatio
	if full {
		need, ratio = k.restartKeep(nq, np), gramRestartRatio
	}
	if !k.gramSVD(ts, su, svt, need, ratio) {
		if !k.kn.thinSVD(ts, k.sv, su, svt, &k.sw) {
			return fmt.Errorf("loraone: %d×%d projected SVD did not converge: %w", nq, np, ErrNonFinite)
		}
	}
	k.svdQ, k.svdP = nq, np
	for _, x := range k.sv {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return fmt.Errorf("loraone: non-finite singular value of the %d×%d projected matrix: %w", nq, np, ErrNonFinite)
		}
	}
	k.cu, k.pcu = k.pcu, k.cu
	k.cv, k.pcv = k.pcv, k.cv
	k.cu, k.cv = grow(k.cu, nq*r), grow(k.cv, np*r)
	for i := 0; i < nq; i++ {
		copy(k.cu[i*r:(i+1)*r], k.su[i*nq:i*nq+r])
	}
	for j := 0; j < r; j++ {
		for i := 0; i < np; i++ {
			k.cv[i*r+j] = k.svt[j*np+i]
		}
	}
	copy(k.sCur, k.sv[:r])
	// change() squares the singular values: compare them scaled by a
	// fixed power of two (σ₁ of the first estimate in [0.5, 1)) so that
	// σ ≈ 1e±300 neither overflows nor underflows there.
	if k.scaleExp == 0 && k.sCur[0] > 0 {
		_, k.scaleExp = math.Frexp(k.sCur[0])
		if k.scaleExp == 0 {
			k.scaleExp = 1 << 20 // sentinel for "scale 1, already chosen"
		}
	}
	ex := k.scaleExp
	if ex == 1<<20 {
		ex = 0
	}
	if len(k.sScaled) < r {
		k.sScaled = make([]float64, r)
	}
	copy(e.ps, k.sScaled)
	for i, x := range k.sCur {
		k.sScaled[i] = math.Ldexp(x, -ex)
	}
	e.s = k.sScaled
	return nil
}

// gramMinRatio is the smallest θ_r/θ₁ for which gramSVD factors T through
// T·Tᵀ: its eigenvalues carry an absolute error of about ε·θ₁², so θ_i
// and ṽ_i = Tᵀ·ũ_i/θ_i keep a relative error of about ε·(θ₁/θ_i)², at most
// 1e-8 for the top r here.
const gramMinRatio = 1e-4

// gramRestartRatio is gramMinRatio for the Ritz vectors a thick restart
// keeps (restartKeep of them): they become the restarted bases, whose
// orthonormality every later projection assumes, so their error
// ε·(θ₁/θ_k)² is held to 2e-12 instead of 1e-8. On LAPACK at 1 thread
// dsyevd of T·Tᵀ took 4.5 ms at 256×256 against 10.7 ms for dgesdd of T
// (128×128: 0.93 against 1.92 ms), and a 1024² gradient with a flat
// spectrum at r = 64 restarts twice in its 13 passes.
const gramRestartRatio = 1e-2

// restartKeep returns the number of Ritz vectors a thick restart keeps
// from the SVD of an nq×np T: krylovCap(b) − 2b, at least r.
func (k *krylov) restartKeep(nq, np int) int {
	return max(min(krylovCap(k.b)-2*k.b, nq, np), k.r)
}

// gramSVD factors the nq×np matrix ts (nq <= np; not modified) through the
// eigendecomposition of ts·tsᵀ = Ũ·Θ²·Ũᵀ with the injected Syevd:
// k.sv = Θ (descending), su = Ũ and the leading need rows of svt =
// Θ⁻¹·Ũᵀ·ts (rows of a zero θ are left as Ũᵀ·ts). Ũ is orthonormal to
// working precision, those rows of svt to about ε·(θ₁/θ_need)²; the
// other rows of svt are not written (no consumer reads them). It reports
// false, with nothing written that the SVD would not overwrite, when no
// Syevd is injected, nq > np, θ_need < minRatio·θ₁ (a rank-deficient T),
// or Syevd fails.
func (k *krylov) gramSVD(ts, su, svt blas64.General, need int, minRatio float64) bool {
	nq, np := ts.Rows, ts.Cols
	if k.kn.eig == nil || nq > np || nq < need {
		return false
	}
	if len(k.gram) < nq*nq {
		k.gram = make([]float64, nq*nq)
	}
	if len(k.lam) < nq {
		k.lam = make([]float64, nq)
	}
	gram := blas64.General{Rows: nq, Cols: nq, Stride: nq, Data: k.gram[:nq*nq]}
	lam := k.lam[:nq]
	k.kn.gemm64(blas.NoTrans, blas.Trans, 1, ts, ts, 0, gram)
	if !k.kn.eig(nq, gram.Data, nq, lam) {
		return false
	}
	top := lam[nq-1]
	if !(top > 0) || !(lam[nq-need] >= minRatio*minRatio*top) || math.IsInf(top, 0) {
		return false
	}
	for i := 0; i < nq; i++ {
		k.sv[i] = math.Sqrt(max(lam[nq-1-i], 0))
	}
	for row := 0; row < nq; row++ {
		src := gram.Data[row*nq : (row+1)*nq]
		dst := su.Data[row*su.Stride : row*su.Stride+nq]
		for i := range dst {
			dst[i] = src[nq-1-i]
		}
	}
	// Only the leading need rows of Ṽᵀ are read (estimate, residualEstimate,
	// a restart): 4× fewer flops than all of them at r = 64, nq = 256.
	un := blas64.General{Rows: nq, Cols: need, Stride: su.Stride, Data: su.Data}
	vt := blas64.General{Rows: need, Cols: np, Stride: svt.Stride, Data: svt.Data[:(need-1)*svt.Stride+np]}
	k.kn.gemm64(blas.Trans, blas.NoTrans, 1, un, ts, 0, vt)
	for i := 0; i < need; i++ {
		if s := k.sv[i]; s > 0 {
			row := svt.Data[i*svt.Stride : i*svt.Stride+np]
			for j := range row {
				row[j] /= s
			}
		}
	}
	return true
}

// keepMain saves the previous estimate's coordinates and scaled singular
// values before an estimate that follows a side estimate (k.side): the
// estimate about to be made moves the side estimate into their place.
func (k *krylov) keepMain() {
	k.keepCu = append(k.keepCu[:0], k.pcu...)
	k.keepCv = append(k.keepCv[:0], k.pcv...)
	k.keepS = append(k.keepS[:0], k.est.ps...)
}

// restoreMain puts back what keepMain saved, so that change() compares the
// new estimate with the last estimate that was not a side estimate.
func (k *krylov) restoreMain() {
	k.pcu = append(k.pcu[:0], k.keepCu...)
	k.pcv = append(k.pcv[:0], k.keepCv...)
	copy(k.est.ps, k.keepS)
	k.side = false
}

// change returns the relative Frobenius change between the current and
// previous estimates (workspace.change), with U_{t−1}ᵀU_t = C̃u_{t−1}ᵀC̃u_t
// and V_tᵀV_{t−1} = C̃v_tᵀC̃v_{t−1} formed from their coordinates in the
// orthonormal bases (O((nq+np)·r²) flops instead of O((m+n)·r·(nq+r))).
func (k *krylov) change() float64 {
	r, e := k.r, k.est
	cross := func(a, b []float64, dst blas64.General) {
		rows := min(len(a), len(b)) / r // missing rows are zeros
		ga := blas64.General{Rows: rows, Cols: r, Stride: r, Data: a}
		gb := blas64.General{Rows: rows, Cols: r, Stride: r, Data: b}
		blas64.Gemm(blas.Trans, blas.NoTrans, 1, ga, gb, 0, dst)
	}
	cross(k.pcu, k.cu, e.cross)
	cross(k.cv, k.pcv, e.cross2)
	return e.changeOf()
}

// factors forms the m×r and n×r factors of the current estimate,
// U = Q·C̃u and V = P·C̃v, in k.est.u and k.est.v.
func (k *krylov) factors() {
	r, e := k.r, k.est
	nq, np := len(k.cu)/r, len(k.cv)/r
	cu := blas64.General{Rows: nq, Cols: r, Stride: r, Data: k.cu}
	cv := blas64.General{Rows: np, Cols: r, Stride: r, Data: k.cv}
	k.kn.gemm64(blas.NoTrans, blas.NoTrans, 1, cols(k.q, 0, nq), cu, 0, e.u)
	k.kn.gemm64(blas.NoTrans, blas.NoTrans, 1, cols(k.p, 0, np), cv, 0, e.v)
}
