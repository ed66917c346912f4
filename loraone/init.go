package loraone

import (
	"fmt"
	"math"
)

// Result describes a computed initialization.
type Result struct {
	// S holds the top singular values used: length r for LoRA-One and
	// PiSSA, 2r for LoRA-GA. Descending, >= 0.
	S []float64
	// Sigma1 is S[0], the spectral norm estimate of the input.
	Sigma1    float64
	Accuracy  float64 // SVD.Accuracy of the underlying RandSVD
	Passes    int     // SVD.Passes
	Converged bool    // SVD.Converged
	// GapRatio, Ambiguous and ResidualExcess describe the rank-r
	// truncation (SVD.GapRatio, SVD.Ambiguous, SVD.ResidualExcess).
	GapRatio       float64
	Ambiguous      bool
	ResidualExcess float64
}

// writeFactors sets column j of b to U[:, uOff+j]·fb(j) and row j of a to
// V[:, j]ᵀ·fa(j), for j < r, then writes both outputs. Before writing it
// checks opt.Context (ErrCancelled) and that every entry is finite in its
// output's dtype (ErrNonFinite, naming the scalar name = x that scales the
// factors like 1/√x, and the fix); on either error it writes nothing.
func writeFactors(b, a Dense, s *SVD, r, uOff int, fb, fa func(j int) float64, opt Options, name string, x float64) error {
	m, n := b.Rows, a.Cols
	bb := make([]float64, m*r) // Shape: (m, r)
	ab := make([]float64, r*n) // Shape: (r, n)
	for j := 0; j < r; j++ {
		f := fb(j)
		for i := 0; i < m; i++ {
			bb[i*r+j] = s.U.At(i, uOff+j) * f
		}
		f = fa(j)
		for i := 0; i < n; i++ {
			ab[j*n+i] = s.V.At(i, j) * f
		}
	}
	if err := opt.cancelled(s.Passes); err != nil {
		return err
	}
	for _, out := range []struct {
		what string
		d    Dense
		v    []float64
	}{{"B", b, bb}, {"A", a, ab}} {
		if k, ok := nonFinite(out.v, out.d.F32 != nil); ok {
			dt, fix := "float64", ""
			if out.d.F32 != nil {
				dt, fix = "float32", " or float64 outputs"
			}
			cols := out.d.Cols
			return fmt.Errorf("loraone: %s = %v makes the factors overflow: %s[%d, %d] = %v is not finite in %s (the factors scale like 1/√%s; σ₁ = %v); use a larger %s%s: %w",
				name, x, out.what, k/cols, k%cols, out.v[k], dt, name, s.S[0], name, fix, ErrNonFinite)
		}
	}
	b.set(bb)
	a.set(ab)
	return nil
}

// nonFinite returns the index of the first element of v that is NaN or
// ±Inf, or that rounds to ±Inf in float32 when f32 is set.
func nonFinite(v []float64, f32 bool) (int, bool) {
	for k, x := range v {
		y := x
		if f32 {
			y = float64(float32(x))
		}
		if math.IsNaN(y) || math.IsInf(y, 0) {
			return k, true
		}
	}
	return 0, false
}

func result(s *SVD) Result {
	return Result{S: s.S, Sigma1: s.S[0], Accuracy: s.Accuracy, Passes: s.Passes, Converged: s.Converged,
		GapRatio: s.GapRatio, Ambiguous: s.Ambiguous, ResidualExcess: s.ResidualExcess}
}

func checkPositive(name string, x float64) error {
	if !(x > 0) || math.IsInf(x, 0) {
		return fmt.Errorf("loraone: %s = %v must be finite and > 0: %w", name, x, ErrArgument)
	}
	return nil
}

// decompose validates the scalar, the input, the rank and both outputs
// (b m×r, a r×n), then returns the truncated SVD of g at rank rankMul·r.
func decompose(b, a Dense, g Matrix, name string, x float64, opt Options, rankMul int) (*SVD, error) {
	if err := checkPositive(name, x); err != nil {
		return nil, err
	}
	if err := g.Validate(); err != nil {
		return nil, err
	}
	m, n, r := g.Rows, g.Cols, opt.Rank
	what := "rank"
	if rankMul == 2 {
		what = "2·rank (LoRA-GA)"
	}
	if r < 1 {
		return nil, fmt.Errorf("loraone: rank %d < 1: %w", r, ErrRank)
	}
	if err := opt.check(m, n, rankMul*r, what); err != nil {
		return nil, err
	}
	if err := b.check("output b", m, r); err != nil {
		return nil, err
	}
	if err := a.check("output a", r, n); err != nil {
		return nil, err
	}
	return randSVD(g, rankMul*r, opt)
}

// LoRAOne writes the LoRA-One initialization computed from the one-step
// full-fine-tuning gradient g (m×n, m = out features, n = in features)
// into b (lora_B, m×r) and a (lora_A, r×n), r = opt.Rank:
//
//	−G ≈ U_r · diag(S_r) · V_rᵀ          (RandSVD of −G)
//	B  = U_r · diag(√S_r) / √(γ·σ₁)
//	A  = diag(√S_r) · V_rᵀ / √(γ·σ₁)
//	B·A = [−G]_r / (γ·σ₁)                 σ₁ = S_r[0]
//
// so s·B·A is one gradient step truncated to rank r with spectral norm
// s/γ. W0 is not modified. −G is never formed: the SVD of G is computed
// and the sign goes to A (−G = U·S·(−V)ᵀ).
//
// gamma must be finite and > 0 (ErrArgument). A zero gradient (σ₁ = 0)
// returns ErrZero: leave that module at its placeholder init (B = 0). A
// gamma so small that a factor entry would not be finite in the output's
// dtype (|entry| <= 1/√γ; float32 overflows above ~3.4e38, so γ below
// ~1e-77) returns ErrNonFinite. A done opt.Context returns ErrCancelled.
// On any error b and a are untouched. They are written only at the end,
// after g was last read, and must not overlap each other.
//
// Cost: Result.Passes products of G or Gᵀ with an n×k or m×k block
// (k = min(r + Oversampling, min(m, n))), O((m+n)·k) float64 memory.
func LoRAOne(b, a Dense, g Matrix, gamma float64, opt Options) (Result, error) {
	s, err := decompose(b, a, g, "gamma", gamma, opt, 1)
	if err != nil {
		return Result{}, err
	}
	c := 1 / (math.Sqrt(gamma) * math.Sqrt(s.S[0])) // no overflow in gamma·sigma1
	f := func(j int) float64 { return math.Sqrt(s.S[j]) * c }
	neg := func(j int) float64 { return -f(j) } // A carries the sign of −G
	if err := writeFactors(b, a, s, opt.Rank, 0, f, neg, opt, "gamma", gamma); err != nil {
		return Result{}, err
	}
	return result(s), nil
}

// LoRAGA writes the reference LoRA-GA initialization (arXiv 2407.05000,
// as in the LoRA-One reference fork) from gradient g (m×n) into b (m×r)
// and a (r×n):
//
//	G ≈ U_{2r} · diag(S_{2r}) · V_{2r}ᵀ   (RandSVD of +G at rank 2r)
//	A = V[:, 0:r]ᵀ  · m^¼ / √γ
//	B = U[:, r:2r]  · m^¼ / √γ
//
// No singular values enter the factors. The caller offsets the weight,
// W0 ← W0 − s·B·A, so the function is unchanged at step 0. (PEFT's merged
// lora_ga differs: it scales B by singular values and only B.)
//
// Needs 2r <= min(m, n) (ErrRank); Result.S has length 2r. Errors and
// write rules as LoRAOne.
func LoRAGA(b, a Dense, g Matrix, gamma float64, opt Options) (Result, error) {
	s, err := decompose(b, a, g, "gamma", gamma, opt, 2)
	if err != nil {
		return Result{}, err
	}
	r := opt.Rank
	f := math.Pow(float64(g.Rows), 0.25) / math.Sqrt(gamma)
	constant := func(int) float64 { return f }
	// B from U[:, r:2r], A from V[:, 0:r]
	if err := writeFactors(b, a, s, r, r, constant, constant, opt, "gamma", gamma); err != nil {
		return Result{}, err
	}
	return result(s), nil
}

// PiSSA writes the PiSSA initialization of weight w (m×n) into b (m×r)
// and a (r×n), for a layer with scaling s > 0 (alpha/r or alpha/√r):
//
//	W ≈ U_r · diag(S_r) · V_rᵀ
//	B = U_r · diag(√(S_r/s))
//	A = diag(√(S_r/s)) · V_rᵀ
//	s·B·A = [W]_r
//
// The caller offsets the weight, W0 ← W0 − s·B·A. scaling must be finite
// and > 0 (ErrArgument); a zero weight returns ErrZero; a scaling so small
// that a factor entry would not be finite in the output's dtype returns
// ErrNonFinite. Errors and write rules as LoRAOne.
func PiSSA(b, a Dense, w Matrix, scaling float64, opt Options) (Result, error) {
	s, err := decompose(b, a, w, "scaling", scaling, opt, 1)
	if err != nil {
		return Result{}, err
	}
	f := func(j int) float64 { return math.Sqrt(s.S[j] / scaling) }
	if err := writeFactors(b, a, s, opt.Rank, 0, f, f, opt, "scaling", scaling); err != nil {
		return Result{}, err
	}
	return result(s), nil
}
