// Package loraone is the pure-Go numerical core of peft-loraone: it
// computes LoRA-One (and, for comparison, LoRA-GA and PiSSA) adapter
// initializations from truncated SVDs of gradients or weights that live in
// foreign memory (torch or numpy tensors viewed in place).
//
// # Overview
//
// LoRA-One (Zhang, Liu, Chen, arXiv 2502.01235) initializes a LoRA pair
// from the top-r singular subspaces of the one-step full-fine-tuning
// gradient G (m×n, m = out features, n = in features). The work is one
// truncated SVD, done by RandSVD. By default (Options.Krylov, set by
// DefaultOptions) it is block Lanczos bidiagonalization with block size
// b = max(r, 16) (rounded up to a multiple of 16 for the simd kernels) and
// full re-orthogonalization:
//
//	P₁ = qr(Ω);  Q_j = orth(G·P_j ⊥ Q₁…Q_{j−1});  P_{j+1} = orth(Gᵀ·Q_j ⊥ P₁…P_j)
//
// with the rank-r estimate taken after every pass from the exact SVD of
// the small projected matrix T = Qᵀ·G·P (LAPACK's dgesdd when injected),
// and a thick restart that caps the basis at min(8b, max(256, 4b)) columns.
// With Options.Krylov false it is a randomized subspace iteration with a
// Gaussian start block of k = min(r+p, min(m, n)) columns, a thin QR
// after every product with G or Gᵀ, and an exact SVD of a k×k triangle
// only. Every pass over G yields a rank-r estimate for free,
//
//	after Y = G·Q_z = Q_y·R_y:    G·P_{Q_z} = Q_y·R_y·Q_zᵀ
//	after Z = Gᵀ·Q_y = Q_z·R_z:   P_{Q_y}·G = Q_y·R_zᵀ·Q_zᵀ
//
// Both stop once the estimated relative error of the rank-r estimate,
// extrapolated from the last two changes ‖X_t − X_{t−1}‖_F / ‖X_t‖_F, is
// <= Options.Tol, or after Options.MaxIters iterations (at most
// 2 + 2·MaxIters passes). The answer comes from the last pass. See
// DefaultOptions for the defaults and why.
//
// # Sketches
//
// LoRAOneSketch computes the same factors from randomized sketches of G
// that the caller accumulated without ever forming G (the plugin's
// capture="sketch": G = Σ_b δ_bᵀx_b, so G·Ω and Ψ·G add up batch by
// batch). Single pass (Tropp, Yurtsever, Udell, Cevher 2017): from
// Y = G·Ω (m×k) and W = Ψ·G (l×n), Q = orth(Y), X = (Ψ·Q)⁺·W, Ĝ = Q·X.
// Two pass: Y is already Q (Orthonormalize) and W = Qᵀ·G from a replay.
// The top-r SVD of the small X gives the factors by the LoRA-One formulas
// below, and a few test vectors Z = G·Ω_t give SketchResult.Accuracy, an
// estimate of the relative error of the init against the exact one (see
// LoRAOneSketch for the formula and how honest it measured).
//
// # Formulas
//
// With U, S, V the top singular triplets and σ₁ = S[0]:
//
//	LoRA-One  (SVD of −G, rank r):
//	    B = U_r·diag(√S_r)/√(γσ₁),  A = diag(√S_r)·V_rᵀ/√(γσ₁),  B·A = [−G]_r/(γσ₁)
//	LoRA-GA   (SVD of +G, rank 2r; the LoRA-One reference fork's variant):
//	    A = V[:, 0:r]ᵀ·m^¼/√γ,  B = U[:, r:2r]·m^¼/√γ;  caller: W0 ← W0 − s·B·A
//	PiSSA     (SVD of the weight W, rank r, scaling s):
//	    B = U_r·diag(√(S_r/s)),  A = diag(√(S_r/s))·V_rᵀ;   caller: W0 ← W0 − s·B·A
//
// B is PEFT's lora_B (m×r) and A is lora_A (r×n). Singular vectors are
// defined up to a common sign per pair; B·A does not depend on it.
//
// # Layouts and dtypes
//
// A Matrix is a read-only view of a logical m×n matrix. If Trans is false,
// element (i, j) is at i*Stride + j (row-major, Stride >= Cols); if Trans is
// true it is at j*Stride + i (column-major, Stride >= Rows), which is how a
// transposed torch tensor or a Fortran-ordered array looks. Elements are
// Float64, Float32, Float16 or BFloat16 (the last two as uint16 bits).
// Inputs are read in place and never copied whole: float64 views go to
// Dgemm directly, float32 views to Sgemm (the k-column panels are converted
// to float32), and half views are converted 64 stored rows at a time into
// a float32 buffer (with an injected Sgemm, as many rows as fit in 4 MiB,
// at least 64, so each product is large enough for a threaded BLAS). Panels, QR and the small SVD are float64, so float32
// and half inputs give float64 factors accurate to float32 rounding of the
// products (about 1e-7 relative).
//
// A Dense is a writable output view with the same layout rules, holding
// float32 or float64. Outputs are written only after everything succeeded,
// and only their Rows×Cols elements (never the padding). Outputs b and a
// must not overlap each other.
//
// # Kernels
//
// Almost all the time goes into the products with G. They use gonum's
// pure-Go Sgemm/Dgemm unless Options.Sgemm / Options.Dgemm inject faster
// ones (the type Gemm32 / Gemm64 has gonum's row-major contract); package
// fastblas provides them from a run-time loaded OpenBLAS, and the bridge
// injects them when Python found one. With an injected Dgemm the panel QR
// is CholeskyQR2 (two Cholesky QR rounds, all Dgemm work), falling back
// to Householder QR when a panel is too ill-conditioned for it (κ beyond
// ~1e6 or rank deficiency); the results agree with the pure-Go path to
// rounding. With Options.SIMD (DefaultOptions' choice) on a CPU with
// AVX-512, the products of float32 and half views with panels of a
// multiple of 16 columns (block Krylov rounds its block up to one) run on
// the Go-assembly kernels of loraone/internal/simd instead, split over
// Options.Threads goroutines, and half views are decoded with VCVTPH2PS:
// the kernels stream G once per product at about 2.5× OpenBLAS's rate on
// 16-column panels. loraone itself holds no kernel state: every call uses
// the kernels of its Options.
//
// # Errors
//
// Inputs and outputs are checked first, so misuse never panics. Every error
// wraps one sentinel, test it with errors.Is:
//
//	ErrShape      bad dimensions, stride or slice length; wrong output shape
//	ErrDType      unknown dtype, or not exactly one backing slice set
//	ErrRank       r < 1, r > min(m, n), or 2r > min(m, n) for LoRA-GA
//	ErrNonFinite  NaN/Inf in the input (the message names a row and
//	              column), values so large that a product overflows, or
//	              a gamma (scaling) so small that a factor would not be
//	              finite in the output's dtype
//	ErrZero       all-zero input (σ₁ = 0): keep the placeholder init
//	ErrArgument   gamma or scaling not finite and > 0; negative
//	              Oversampling or Tol; MaxIters < 0 or > MaxPowerIters
//	ErrCancelled  Options.Context was done at a check (see Cancellation)
//
// The input is not pre-scanned: it is searched for a NaN or Inf only after
// a product came out non-finite. Rank-deficient inputs are not errors: the
// missing singular values come out ~0 and the factors stay finite.
//
// # Cancellation
//
// Options.Context, when set, is checked before every pass over G and once
// more before the outputs are written; a done context ends the call with
// an error wrapping ErrCancelled and the context's cause, and nothing is
// written. A pass under way is not interrupted. MaxIters is capped at
// MaxPowerIters, so that even an uncancelled call always ends.
//
// # Concurrency
//
// There is no global mutable state; each call allocates its own scratch, so
// concurrent calls from several goroutines are safe (reading the same input
// concurrently is fine). Results are deterministic for a given Options.Seed.
// A run of calls can instead share one Workspace (Options.Workspace), one
// call at a time: block Krylov then reuses its memory instead of faulting
// fresh pages in, with bit-identical results.
package loraone // import "github.com/peft-loraone/peft-loraone/loraone"
