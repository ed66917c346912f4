package loraone

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack/lapack64"
	"gonum.org/v1/gonum/mat"
)

// Options controls the randomized subspace iteration of RandSVD.
type Options struct {
	// Rank is r, the number of singular triplets wanted: 1 <= r <= min(m, n).
	Rank int
	// Oversampling is p >= 0, the extra columns of the sketch. The block
	// size is k = min(r+p, min(m, n)). Convergence of the top r triplets
	// goes like (σ_{k+1}/σ_r)^(passes), so p buys a faster rate.
	Oversampling int
	// MaxIters caps the power (subspace) iterations, 0 <= MaxIters <=
	// MaxPowerIters. RandSVD makes at most 2 + 2·MaxIters passes over G
	// (MaxIters = 0 is the plain two-pass range finder).
	MaxIters int
	// Tol >= 0 stops the iteration early once the accuracy estimate (see
	// SVD.Accuracy) is <= Tol. Tol == 0 always runs MaxIters iterations.
	// The estimate cannot resolve changes much below 1e-8 (it is computed
	// from a difference of squared norms), so Tol below that acts like 0.
	Tol float64
	// Seed seeds the PCG generator of the Gaussian test matrix; equal
	// seeds give bit-identical results.
	Seed uint64
	// Sgemm, if not nil, replaces gonum's pure-Go Sgemm in the products
	// with float32, float16 and bfloat16 inputs (the bulk of the work).
	// nil means gonum. See Gemm32 for the contract.
	Sgemm Gemm32
	// Dgemm, if not nil, replaces gonum's Dgemm in the products with
	// float64 inputs and in the float64 panel products of every estimate.
	// nil means gonum. See Gemm64.
	Dgemm Gemm64
	// Gesdd, if not nil, replaces gonum's Dgesvd for the small dense SVDs
	// of every estimate (the k×k triangle, or block Krylov's projected
	// matrix). nil means gonum. See Gesdd for the contract.
	Gesdd Gesdd
	// Syevd, if not nil, lets block Krylov factor its projected matrix T
	// (nq×np, nq <= np) through the eigendecomposition of T·Tᵀ instead of
	// an SVD of T (half the time of LAPACK's dgesdd at the sizes of small
	// gradients), wherever the top r singular values are within 10⁴ of σ₁,
	// or, before a thick restart, the Ritz values it keeps within 10² of
	// σ₁ (they become the restarted bases). nil means the SVD always. See
	// Syevd for the contract.
	Syevd Syevd
	// Krylov, if true (DefaultOptions' choice), replaces the subspace
	// iteration by block Lanczos bidiagonalization (block Krylov: block
	// size b = max(r, 16), full re-orthogonalization, thick restart once
	// the basis exceeds min(8b, max(256, 4b)) columns). Same contract,
	// Seed determinism, Tol and MaxIters cap, with its own error estimate
	// (krylovEstimate); Oversampling is not used. An estimate is made
	// after every pass with G, and after a pass with Gᵀ while the small
	// SVD costs well under a pass or the tolerance is near (krylovNear);
	// the next pass's Ritz residuals may stop the iteration on it
	// (residualEstimate). Once the basis spans all of
	// Rᵐ or Rⁿ the estimate is exact and the iteration stops with
	// Accuracy 0. The zero value (false) is the subspace iteration.
	Krylov bool
	// SIMD, if true (DefaultOptions' choice), runs the products of float32,
	// float16 and bfloat16 inputs with panels of a multiple of 16 columns
	// on the AVX-512 kernels of loraone/internal/simd when the CPU has
	// them (instead of Sgemm: 2.5× OpenBLAS's rate on 16-column panels
	// here), and rounds block Krylov's block up to a multiple of 16; the
	// float64 products of a basis with a panel of 8k columns (the Krylov
	// projections) run on their float64 kernels (about 1.8× OpenBLAS's
	// Dgemm there) instead of Dgemm. On other CPUs it changes nothing. The kernels sum in a different order
	// than Sgemm, so results differ from SIMD = false in the last bits.
	SIMD bool
	// Threads is the number of goroutines the simd kernels split one
	// product over (<= 1: the calling goroutine alone). Set it like the
	// BLAS thread count: the kernels replace the BLAS for these products.
	Threads int
	// Workspace, if not nil, is the scratch memory block Krylov calls
	// reuse instead of allocating their own (see Workspace). nil: each
	// call allocates.
	Workspace *Workspace
	// Context, if not nil, cancels the computation. It is checked before
	// every pass over G (both algorithms) and, in LoRAOne, LoRAGA and
	// PiSSA, once more before the outputs are written. A call that finds
	// it done returns an error wrapping ErrCancelled and
	// context.Cause(Context), and writes nothing. A pass under way is not
	// interrupted: cancellation takes effect within one product of G or
	// Gᵀ with a block. nil means never cancelled. (An options field rather
	// than a parameter, so that the signatures stay those of a plain
	// computation; the checks poll its Err method, which costs nothing
	// next to a pass.)
	Context context.Context
}

// MaxPowerIters is the largest Options.MaxIters accepted: 1000 power
// iterations, at most 2002 passes over G. That is 33× the default cap (30)
// and 60× the reference LoRA-One code's fixed niter = 16. The cap exists so
// that no value makes an endless call: with Tol = 0 every iteration runs.
// More would not buy anything the stop rule can see: even at a rate
// σ_{k+1}/σ_r = 0.99 per pass (a nearly flat spectrum, where a wider block
// or block Krylov is the remedy), 2000 passes shrink the error by
// 0.99^2000 ≈ 2e-9, below the ~1e-8 that Accuracy resolves.
const MaxPowerIters = 1000

// Gemm32 is an injectable single-precision matrix multiply with the
// contract of gonum's blas.Float32Level3.Sgemm (row-major):
//
//	C = alpha·op(A)·op(B) + beta·C,   op(A) m×k, op(B) k×n, C m×n
//
// It must be safe for concurrent use, keep no reference to the slices
// after returning, and compute to float32 accuracy; results may then
// differ from gonum's in the last bits (different summation order), so
// Options.Seed gives bit-identical results only for the same Gemm32. The
// fastblas package's Lib.Sgemm (a run-time loaded OpenBLAS) is one.
type Gemm32 func(tA, tB blas.Transpose, m, n, k int, alpha float32, a []float32, lda int,
	b []float32, ldb int, beta float32, c []float32, ldc int)

// Gemm64 is Gemm32 for float64 (gonum's blas.Float64Level3.Dgemm).
type Gemm64 func(tA, tB blas.Transpose, m, n, k int, alpha float64, a []float64, lda int,
	b []float64, ldb int, beta float64, c []float64, ldc int)

// Gesdd is an injectable thin SVD of a row-major m×n float64 matrix a
// (which it may destroy), with q = min(m, n):
//
//	a = u·diag(s)·vt,   s descending (q values), u m×q (row stride ldu),
//	vt q×n (row stride ldvt)
//
// It reports false if it failed; the outputs are then undefined. It must be
// safe for concurrent use and keep no reference to the slices. The
// fastblas package's Lib.Dgesdd (LAPACK's dgesdd from a run-time loaded
// OpenBLAS) is one.
type Gesdd func(m, n int, a []float64, lda int, s, u []float64, ldu int, vt []float64, ldvt int) bool

// Syevd is an injectable eigendecomposition of the symmetric row-major n×n
// float64 matrix a (its upper triangle is read): w gets the eigenvalues in
// ascending order and a the orthonormal eigenvectors, column j
// (a[i*lda+j]) belonging to w[j]. It reports false if it failed; a and w
// are then undefined. It must be safe for concurrent use and keep no
// reference to the slices. The fastblas package's Lib.Dsyevd is one.
type Syevd func(n int, a []float64, lda int, w []float64) bool

// DefaultOptions returns the documented defaults for rank r:
//
//	Krylov       = true         block Krylov, block max(r, 16)
//	Oversampling = max(10, 2r)  (subspace iteration only) k = r + max(10, 2r) ≈ 3r
//	MaxIters     = 30           at most 62 passes over G
//	Tol          = 1e-4         stop once the estimated relative error is <= 1e-4
//	Seed         = 0
//
// Why Krylov: on 4096×4096 float32 matrices with decaying, flat and
// clustered spectra it reached a true error <= 1e-3 in 0.44–0.83× the time of
// the subspace iteration at r = 8, 16 and 64 (bench/RESULTS.md), because
// every pass adds new directions instead of refining the same k.
//
// Why the subspace defaults: the rate per pass is about σ_{k+1}/σ_r, so a block well beyond r
// turns the small gaps of gradient spectra (σ_{r+1}/σ_r ≈ 1) into a usable
// ratio; p >= 10 keeps small ranks robust (Halko–Martinsson–Tropp).
// Measured on 300×300 matrices with geometric spectra and counted in
// column-passes (passes·k) to reach Tol = 1e-4: at r = 16, p = 2r cost
// 336 (decay 0.95) and 1248 (decay 0.99) against 416 and 1632 for p = r;
// at r = 8, p = 2r cost 288 and 1080, while p = r did not converge within
// 30 iterations at decay 0.99. Larger p gave no further saving.
//
// The reference LoRA-One code runs torch.svd_lowrank with niter = 16 and
// no stopping rule; the adaptive stop usually needs far fewer passes, and
// 30 iterations is a cap for nearly flat spectra, not the expected count.
// Accuracy extrapolates the error from the last two changes (see
// SVD.Accuracy); 1e-4 is far below the noise of a gradient estimated from
// a handful of batches, and one pass more than 1e-3 in the runs measured.
func DefaultOptions(rank int) Options {
	return Options{Rank: rank, Oversampling: max(10, 2*rank), MaxIters: 30, Tol: 1e-4, Krylov: true, SIMD: true}
}

// check validates opt for an m×n input and a wanted rank r.
func (opt Options) check(m, n, r int, what string) error {
	if r < 1 || r > min(m, n) {
		return fmt.Errorf("loraone: %s %d outside [1, min(%d, %d)]: %w", what, r, m, n, ErrRank)
	}
	if opt.Oversampling < 0 {
		return fmt.Errorf("loraone: negative Oversampling %d: %w", opt.Oversampling, ErrArgument)
	}
	if opt.MaxIters < 0 {
		return fmt.Errorf("loraone: negative MaxIters %d: %w", opt.MaxIters, ErrArgument)
	}
	if opt.MaxIters > MaxPowerIters {
		return fmt.Errorf("loraone: MaxIters %d is above the limit MaxPowerIters = %d (at most %d passes over G); use at most %d, or a Tol > 0 to stop earlier: %w",
			opt.MaxIters, MaxPowerIters, 2+2*MaxPowerIters, MaxPowerIters, ErrArgument)
	}
	if opt.Tol < 0 || math.IsNaN(opt.Tol) {
		return fmt.Errorf("loraone: Tol %v must be >= 0: %w", opt.Tol, ErrArgument)
	}
	return nil
}

// cancelled returns an error wrapping ErrCancelled (and the context's
// cause) when opt.Context is done, after passes passes over G; nil
// otherwise.
func (opt Options) cancelled(passes int) error {
	ctx := opt.Context
	if ctx == nil || ctx.Err() == nil {
		return nil
	}
	return fmt.Errorf("loraone: stopped after %d passes over G: %w (%w)", passes, ErrCancelled, context.Cause(ctx))
}

// SVD is a truncated singular value decomposition
//
//	G ≈ U · diag(S) · Vᵀ
//
// with U m×r and V n×r (float64, orthonormal columns) and S of length r,
// descending and >= 0.
type SVD struct {
	U, V *mat.Dense
	S    []float64
	// Accuracy estimates the relative Frobenius error of the rank-r
	// approximation X = U·diag(S)·Vᵀ against the exact truncated SVD
	// [G]_r, ‖X − [G]_r‖_F / ‖[G]_r‖_F, by extrapolating the last
	// changes (see Change) under geometric convergence: about
	// c·ρ/(1−ρ) with ρ the recent rate of the changes, or 9·c when
	// ρ >= 0.9 (errorEstimate, krylovEstimate). It is an estimate, not
	// a bound, and it cannot resolve errors much below 1e-8. Tol
	// applies to it.
	Accuracy float64
	// Change is the relative Frobenius change of the estimate between
	// the last two estimates, ‖X_t − X_{t−1}‖_F / ‖X_t‖_F.
	Change float64
	// Passes counts multiplications of G or Gᵀ by a block (2 + 2·Iters
	// at most; odd when the iteration stopped half-way).
	Passes int
	// Iters is the number of power iterations started: (Passes−1)/2.
	Iters int
	// Converged reports Accuracy <= Tol (false when Tol == 0 or when
	// MaxIters was reached first).
	Converged bool
	// GapRatio is θ_{r+1}/θ_r, the ratio of the (r+1)-th to the r-th
	// singular value of the final projected matrix (an estimate of
	// σ_{r+1}/σ_r); 0 when there is no θ_{r+1} (r = min(m, n), or a
	// basis of r columns).
	GapRatio float64
	// Ambiguous reports that σ_r and σ_{r+1} are too close for the
	// rank-r truncation to be resolved at the accuracy asked for:
	// 1 − GapRatio < min(10·ε, 0.01) with ε = max(Tol, Accuracy)
	// (ambiguousGap).
	// Then Accuracy, which measures the distance to [G]_r, is not a
	// meaningful guarantee: any rank-r choice inside the cluster of
	// σ_r is as good an approximation of G, and ResidualExcess is the
	// error that stays true.
	Ambiguous bool
	// ResidualExcess is an upper bound of ‖G − X‖_F / ‖G − [G]_r‖_F − 1,
	// how much worse the residual of the estimate X = U·diag(S)·Vᵀ is
	// than the best rank-r residual (0 for the exact truncation; it does
	// not depend on which truncation inside a cluster is taken). From
	// the final projected matrix T = Qᵀ·G·P and ‖G‖_F:
	//
	//	‖G − X‖² = ‖G‖² − Σ_{i<=r} θ_i²,  ‖G − [G]_r‖² >= ‖T‖² − Σ_{i<=r} θ_i²
	//
	// (the energy of G outside the bases, τ² = ‖G‖² − ‖T‖², bounds what the
	// top r singular values can add to Σθ_i²). It is exact up to the
	// rounding of the float32 products (about 1e-7·‖G‖²/‖G − [G]_r‖²);
	// +Inf when the bases hold no energy beyond the top r (the bound says
	// nothing there). It is loose where the bases miss much of G's energy
	// (then ‖T‖² − Σθ_i² is far below ‖G − [G]_r‖²). It costs one read of
	// G (up to a fifth of a pass), so it is computed only where it matters
	// (Ambiguous); otherwise it is −1 (not computed). Only block Krylov
	// computes it; the subspace iteration reports −1.
	ResidualExcess float64
}

// ambiguousGap returns the relative gap 1 − σ_{r+1}/σ_r below which a
// truncation is reported Ambiguous at accuracy eps: 10·eps, at most 1%.
// Swapping the r-th and (r+1)-th pairs changes X by about σ_r·√2, but the
// residual ‖G − X‖ by only about σ_r·√(2δ) at a relative gap δ, so where
// δ is within a small multiple of eps the errors the estimate sees cannot
// tell the two truncations apart. (Measured: 4096-class gradients and the
// benchmark's synthetic spectra have δ >= 0.008 at r = 8, 16, 64; the
// cluster of the issue report has δ = 1e-5.)
func ambiguousGap(eps float64) float64 {
	return min(10*eps, 0.01)
}

// RandSVD computes the top-r singular triplets of g by randomized subspace
// iteration with an adaptive stop:
//
//	Ω  n×k Gaussian (PCG, opt.Seed), orthonormalized:  Q_z = qr(Ω)
//	repeat:
//	    Y = G·Q_z    = Q_y·R_y   (thin Householder QR)   G·P_{Q_z} = Q_y R_y Q_zᵀ
//	    Z = Gᵀ·Q_y   = Q_z·R_z                          P_{Q_y}·G = Q_y R_zᵀ Q_zᵀ
//
// with k = min(r + p, min(m, n)). Every pass yields a rank-r estimate from
// the exact SVD of the k×k triangle (R_y or R_zᵀ); the iteration stops when
// the estimate's relative change is <= opt.Tol, or after opt.MaxIters power
// iterations. The result comes from the last pass (no extra pass over G).
//
// g is read in place and never copied: float64 views go to Dgemm directly,
// float32 views to Sgemm (panels converted to float32), and Float16 /
// BFloat16 views are converted 64 stored rows at a time (with an injected
// Sgemm, as many rows as fit in 4 MiB, at least 64). Panels, QR and
// the small SVD are float64. Memory: O((m+n)·k) plus, for half types,
// 64 stored rows (or 4 MiB) as float32.
//
// Errors: an invalid view (ErrShape, ErrDType), a bad rank (ErrRank) or
// option (ErrArgument); a NaN or Inf in g (ErrNonFinite, naming its row and
// column; g is scanned only after a product came out non-finite); an
// all-zero g (ErrZero); opt.Context done before a pass (ErrCancelled).
// Rank-deficient g is fine: the extra singular values are ~0 and the
// vectors stay orthonormal. RandSVD is safe for concurrent use; each call
// allocates its own scratch.
func RandSVD(g Matrix, opt Options) (*SVD, error) {
	if err := g.Validate(); err != nil {
		return nil, err
	}
	if err := opt.check(g.Rows, g.Cols, opt.Rank, "rank"); err != nil {
		return nil, err
	}
	return randSVD(g, opt.Rank, opt)
}

// randSVD is RandSVD for an already validated g and rank r.
func randSVD(g Matrix, r int, opt Options) (*SVD, error) {
	if opt.Krylov {
		return krylovSVD(g, r, opt)
	}
	m, n := g.Rows, g.Cols
	k := min(r+min(opt.Oversampling, min(m, n)), min(m, n)) // no int overflow
	w := newWorkspace(m, n, k, r)
	w.kn = newKernels(opt)
	prod := newProduct(g, k, w.kn)

	// Orthonormal Gaussian start block Q_z (n×k).
	rng := rand.New(rand.NewPCG(opt.Seed, 0x4c6f52412d4f6e65)) // "LoRA-One"
	for i := range w.z.Data {
		w.z.Data[i] = rng.NormFloat64()
	}
	w.qr(w.z)

	maxPasses := 2 + 2*min(opt.MaxIters, MaxPowerIters)
	res := &SVD{}
	for pass := 1; pass <= maxPasses; pass++ {
		if err := opt.cancelled(pass - 1); err != nil {
			return nil, err
		}
		if pass%2 == 1 {
			prod.mulG(w.y, w.z) // Y = G·Q_z
			if err := checkPanel(g, w.y, pass); err != nil {
				return nil, err
			}
		} else {
			prod.mulGT(w.z, w.y) // Z = Gᵀ·Q_y
			if err := checkPanel(g, w.z, pass); err != nil {
				return nil, err
			}
		}
		if err := w.estimate(pass%2 == 1); err != nil {
			return nil, err
		}
		res.Passes = pass
		if pass == 1 {
			continue
		}
		if c := w.change(); res.record(c, errorEstimate(c, res.Change), opt.Tol) {
			break
		}
	}
	res.ResidualExcess = -1
	if r < len(w.sk) && w.sk[r-1] > 0 {
		res.GapRatio = w.sk[r] / w.sk[r-1]
		res.Ambiguous = 1-res.GapRatio < ambiguousGap(max(opt.Tol, res.Accuracy))
	}
	return res.finish(w.u, w.v, w.s[:r:r])
}

// record takes the change c of the estimate just made and its error
// estimate e: it updates Change and Accuracy and reports whether Accuracy
// is within tol (setting Converged), that is, whether the iteration stops.
func (res *SVD) record(c, e, tol float64) bool {
	res.Accuracy, res.Change = e, c
	res.Converged = tol > 0 && res.Accuracy <= tol
	return res.Converged
}

// finish sets Iters and the factors of the final estimate (u m×r, v n×r,
// s of length r), or reports ErrZero when σ₁ is 0.
func (res *SVD) finish(u, v blas64.General, s []float64) (*SVD, error) {
	res.Iters = (res.Passes - 1) / 2
	if s[0] == 0 {
		return nil, fmt.Errorf("loraone: sigma1 == 0: %w", ErrZero)
	}
	res.U = mat.NewDense(u.Rows, u.Cols, u.Data)
	res.V = mat.NewDense(v.Rows, v.Cols, v.Data)
	res.S = s
	return res, nil
}

// errorEstimate extrapolates the error of the current estimate from the
// relative change c it just made and the change cPrev of the estimate
// before it (0 when there is none). With geometric convergence at a rate
// ρ = c/cPrev the changes still to come sum to about c·ρ/(1−ρ), the
// distance to the limit (Aitken's extrapolation):
//
//	e = max(c·ρ/(1−ρ), c/2)   for ρ < 0.9,     e = 9·c   otherwise
//
// (ρ >= 0.9: slow or no progress). Traced pass by pass on 4096×4096
// float32 matrices with decaying, flat and clustered spectra and r = 8, 16,
// 64 (bench/RESULTS.md): for block Krylov, c alone overestimated the true
// error by 1.4–175×, and c·ρ/(1−ρ) alone fell to 0.2× of it at some passes;
// with the floor c/2 the estimate stays at or above ~0.7× the error there.
func errorEstimate(c, cPrev float64) float64 {
	if c == 0 {
		return 0
	}
	if cPrev <= 0 {
		return c
	}
	rho := c / cPrev
	if rho >= 0.9 {
		return 9 * c
	}
	return max(c*rho/(1-rho), c/2)
}

// checkPanel reports a non-finite product (scanning g for the culprit) or,
// after the first pass, an all-zero product.
func checkPanel(g Matrix, p blas64.General, pass int) error {
	allZero := true
	for _, v := range p.Data {
		if v != 0 {
			allZero = false
			if math.IsNaN(v) || math.IsInf(v, 0) {
				if i, j, x, ok := g.findNonFinite(); ok {
					return fmt.Errorf("loraone: input element (row %d, col %d) is %v: %w", i, j, x, ErrNonFinite)
				}
				return fmt.Errorf("loraone: product with G overflowed (max |G| = %g, dtype %v): %w",
					g.maxAbs(), g.DType, ErrNonFinite)
			}
		}
	}
	if allZero && pass == 1 {
		if mx := g.maxAbs(); mx != 0 {
			return fmt.Errorf("loraone: product with G underflowed to zero (max |G| = %g): %w", mx, ErrZero)
		}
		return fmt.Errorf("loraone: all-zero input (%d×%d): %w", g.Rows, g.Cols, ErrZero)
	}
	return nil
}

// workspace holds the panels and small matrices of one RandSVD call.
type workspace struct {
	m, n, k, r int
	y, z       blas64.General // m×k, n×k panels (Q_y, Q_z after QR)
	tau, work  []float64
	rt         blas64.General // k×k triangle
	su, svt    blas64.General // k×k SVD factors of rt
	sw         []float64      // Gesvd work
	u, v       blas64.General // current estimate m×r, n×r
	s          []float64      // current estimate, length r (prefix of sk)
	sk         []float64      // k singular values of rt
	pu, pv     blas64.General // previous estimate
	ps         []float64
	cross      blas64.General // r×r
	cross2     blas64.General // r×r
	kn         kernels
	cq         *cholQR // CholeskyQR2 scratch, when kn.d is injected
}

func general(r, c int) blas64.General {
	return blas64.General{Rows: r, Cols: c, Stride: c, Data: make([]float64, r*c)}
}

func newWorkspace(m, n, k, r int) *workspace {
	w := &workspace{m: m, n: n, k: k, r: r,
		y: general(m, k), z: general(n, k),
		rt: general(k, k), su: general(k, k), svt: general(k, k),
		u: general(m, r), v: general(n, r), pu: general(m, r), pv: general(n, r),
		cross: general(r, r), cross2: general(r, r),
		tau: make([]float64, k), sk: make([]float64, k),
		ps: make([]float64, r),
	}
	// Workspace queries (lwork = -1) for the QR of the taller panel and
	// for the k×k SVD.
	big := w.y
	if n > m {
		big = w.z
	}
	q := make([]float64, 1)
	lapack64.Geqrf(big, w.tau, q, -1)
	lw := int(q[0])
	lapack64.Orgqr(big, w.tau, q, -1)
	lw = max(lw, int(q[0]), 1)
	w.work = make([]float64, lw)
	return w
}

// qr overwrites the panel a (rows×k, rows >= k) with the thin Q of its
// Householder QR (Geqrf + Orgqr; the full rows×rows Q is never formed) and
// copies R into w.rt.
//
// With an injected Dgemm it first tries CholeskyQR2 (cholQR2), whose work is
// all Dgemm, and falls back to Householder for ill-conditioned panels.
func (w *workspace) qr(a blas64.General) {
	if w.kn.d != nil && w.cholQR2(a) {
		return
	}
	k := w.k
	lapack64.Geqrf(a, w.tau, w.work, len(w.work))
	for i := 0; i < k; i++ {
		row := w.rt.Data[i*k : (i+1)*k]
		for j := range row {
			if j < i {
				row[j] = 0
			} else {
				row[j] = a.Data[i*a.Stride+j]
			}
		}
	}
	lapack64.Orgqr(a, w.tau, w.work, len(w.work))
}

// estimate orthonormalizes the panel just produced and forms the rank-r
// estimate of this pass, saving the previous one.
//
// After Y = G·Q_z (right == true): G·P_{Q_z} = Q_y·R_y·Q_zᵀ and
// R_y = Ũ S Ṽᵀ give U = Q_y·Ũ_r, V = Q_z·Ṽ_r.
// After Z = Gᵀ·Q_y: P_{Q_y}·G = Q_y·R_zᵀ·Q_zᵀ and R_z = Ũ S Ṽᵀ give
// U = Q_y·Ṽ_r, V = Q_z·Ũ_r.
func (w *workspace) estimate(right bool) error {
	w.u, w.pu = w.pu, w.u
	w.v, w.pv = w.pv, w.v
	copy(w.ps, w.sk[:w.r])
	// Scale the panel by an exact power of two so that its largest
	// element is in [0.5, 1): QR and the small SVD then cannot overflow
	// or lose range, and the singular values are scaled back below.
	panel := w.z
	if right {
		panel = w.y
	}
	var mx float64
	for _, x := range panel.Data {
		mx = math.Max(mx, math.Abs(x))
	}
	_, e := math.Frexp(mx)
	if mx == 0 {
		e = 0
	}
	if e != 0 {
		for i, x := range panel.Data {
			panel.Data[i] = math.Ldexp(x, -e)
		}
	}
	w.qr(panel)
	for _, x := range w.rt.Data {
		if math.IsNaN(x) || math.IsInf(x, 0) { // never expected after scaling
			return fmt.Errorf("loraone: non-finite triangle in QR of a %d×%d panel: %w", panel.Rows, panel.Cols, ErrNonFinite)
		}
	}
	if !w.kn.thinSVD(w.rt, w.sk, w.su, w.svt, &w.sw) {
		return fmt.Errorf("loraone: %d×%d projected SVD did not converge: %w", w.k, w.k, ErrNonFinite)
	}
	k, r := w.k, w.r
	ur := blas64.General{Rows: k, Cols: r, Stride: k, Data: w.su.Data}   // Ũ_r  (k×r)
	vtr := blas64.General{Rows: r, Cols: k, Stride: k, Data: w.svt.Data} // Ṽ_rᵀ (r×k)
	if right {
		w.kn.gemm64(blas.NoTrans, blas.NoTrans, 1, w.y, ur, 0, w.u)
		w.kn.gemm64(blas.NoTrans, blas.Trans, 1, w.z, vtr, 0, w.v)
	} else {
		w.kn.gemm64(blas.NoTrans, blas.Trans, 1, w.y, vtr, 0, w.u)
		w.kn.gemm64(blas.NoTrans, blas.NoTrans, 1, w.z, ur, 0, w.v)
	}
	if e != 0 {
		for i, x := range w.sk {
			w.sk[i] = math.Ldexp(x, e)
		}
	}
	if math.IsInf(w.sk[0], 0) {
		return fmt.Errorf("loraone: largest singular value overflows float64: %w", ErrNonFinite)
	}
	w.s = w.sk[:r]
	return nil
}

// change returns ‖X_t − X_{t−1}‖_F / ‖X_t‖_F for the current and previous
// rank-r estimates X = U·diag(S)·Vᵀ in O((m+n)·r²):
//
//	‖X_t − X_{t−1}‖² = ‖S_t‖² + ‖S_{t−1}‖² − 2·tr(S_{t−1}·(U_{t−1}ᵀU_t)·S_t·(V_tᵀV_{t−1}))
//
// clamped at 0 (rounding limits its resolution to about 1e-8).
func (w *workspace) change() float64 {
	w.kn.gemm64(blas.Trans, blas.NoTrans, 1, w.pu, w.u, 0, w.cross)  // U_{t−1}ᵀ U_t
	w.kn.gemm64(blas.Trans, blas.NoTrans, 1, w.v, w.pv, 0, w.cross2) // V_tᵀ V_{t−1}
	return w.changeOf()
}

// changeOf is change() once w.cross = U_{t−1}ᵀU_t and w.cross2 = V_tᵀV_{t−1}
// are set (block Krylov forms them from the small coordinates of the
// estimates in its bases, without the m×r and n×r factors).
func (w *workspace) changeOf() float64 {
	r := w.r
	// The change is a ratio: scale both spectra by the same power of two so that
	// squares of singular values near 1e±300 neither overflow nor underflow.
	_, e := math.Frexp(max(w.s[0], w.ps[0]))
	var tr, nc, np float64
	for i := 0; i < r; i++ {
		si, pi := math.Ldexp(w.s[i], -e), math.Ldexp(w.ps[i], -e)
		nc += si * si
		np += pi * pi
		for j := 0; j < r; j++ {
			tr += pi * w.cross.Data[i*r+j] * math.Ldexp(w.s[j], -e) * w.cross2.Data[j*r+i]
		}
	}
	if nc == 0 {
		if np == 0 {
			return 0
		}
		return 1
	}
	d := max(nc+np-2*tr, 0)
	return math.Sqrt(d / nc)
}
