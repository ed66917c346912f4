package bridge

import (
	"math"

	"github.com/peft-loraone/peft-loraone/loraone"
)

// SketchInfoLen is the least length of SketchLoRAOne's info vector.
const SketchInfoLen = 4

// sketchPanicRank, given as rank, forces a panic inside SketchLoRAOne; only
// tests use it, to show that a panic comes back as an "internal:" error.
const sketchPanicRank = -99

// Orthonormalize overwrites the m×k tensor at y (float32 or float64, any
// layout, writable, m >= k) with the thin Q factor of its QR decomposition,
// Y = Q·R with QᵀQ = I (Householder in float64, then written back in y's
// dtype), and returns the numerical rank of Y (singular values of R above
// sigma_1·max(m, k)·eps of y's dtype, numpy.linalg.matrix_rank's rule).
//
// It is pass 1's last step in the two-pass sketch mode: Python accumulates
// Y = G·Omega, calls this, then accumulates X = Qᵀ·G on the replay and
// calls SketchLoRAOne with twoPass = True.
//
// Errors (y untouched): "invalid-argument:" (not 2-D, rows < cols, null
// address), "unsupported-dtype:", "unsupported-device:", "read-only:",
// "non-finite:" (NaN or Inf in y), "zero-gradient:" (y all zero: G = 0).
func Orthonormalize(y uintptr, yVersioned bool) (rank int, err error) {
	defer recoverError(&err)
	d, err := outputMatrix("Y", y, yVersioned)
	if err != nil {
		return 0, err
	}
	rank, err = loraone.Orthonormalize(d)
	if err != nil {
		return 0, classify(err)
	}
	return rank, nil
}

// SketchLoRAOne writes the LoRA-One initialization of a gradient G (m×n)
// that Python never formed, reconstructed from randomized sketches of it,
// into b (lora_B, m×r) and a (lora_A, r×n), and returns its Accuracy
// estimate (also info[0]).
//
// Tensors are passed like Compute's (address of the DLPack managed struct,
// and whether it is the versioned one). Inputs may be float32, float64,
// float16 or bfloat16, row- or column-major; Omega (n×k), Psi (l×m) and
// OmegaT (n×t) are independent N(0, 1) test matrices (torch.randn), with
// r <= k <= min(m, n), l >= k (l = 2k+1 recommended), t >= 1 (10
// recommended):
//
//	single pass (twoPass False)            two pass (twoPass True)
//	y       G·Omega      m×k               Q = orth(G·Omega)  m×k (Orthonormalize)
//	w       Psi·G        l×n               X = Qᵀ·G           k×n
//	psi     Psi          l×m               unused: pass 0
//	z       G·OmegaT     m×t   (both modes; from either pass)
//	omegaT  OmegaT       n×t
//	b       m×r output (float32 or float64, writable)
//	a       r×n output (float32 or float64, writable)
//	s       float64 vector, length >= r: the r singular values of the reconstruction
//	info    float64 vector, length >= SketchInfoLen (4):
//	          info[0]  Accuracy: estimated relative error of s·B·A against the
//	                   exact LoRA-One init from G (loraone.LoRAOneSketch)
//	          info[1]  Residual: estimated ‖G − [Ĝ]_r‖_F / ‖G‖_F (includes G's
//	                   own tail beyond rank r)
//	          info[2]  k, the sketch size
//	          info[3]  numerical rank of the reconstruction Ĝ (< k: G was of
//	                   rank < k and the sketch captured it whole)
//
// gamma is LoRA-One's gamma (> 0). B·A = [−Ĝ]_r/(gamma·sigma1), the
// formulas of Compute with MethodLoRAOne. The optimized BLAS loaded by
// UseBLAS, if any, runs the products and the small SVD. The call releases
// the GIL; the tensors must stay alive until it returns, and the outputs
// must not overlap each other or the inputs.
//
// Errors, all before any output is written: "invalid-argument:" (shapes
// that disagree, rank outside [1, k], k > min(m, n), l < k, gamma not > 0,
// psi = 0 in single-pass mode, short s or info, an all-zero z, a singular
// Psi·Q, a two-pass y that is not orthonormal), "unsupported-dtype:",
// "unsupported-device:", "read-only:" (an output), "non-finite:" (NaN or
// Inf in a sketch, or an overflow), "zero-gradient:" (y or w all zero:
// G = 0; keep the placeholder init), "internal:" (a recovered panic).
func SketchLoRAOne(y uintptr, yVersioned bool, w uintptr, wVersioned bool, psi uintptr, psiVersioned bool,
	z uintptr, zVersioned bool, omegaT uintptr, omegaTVersioned bool,
	b uintptr, bVersioned bool, a uintptr, aVersioned bool, s uintptr, sVersioned bool,
	info uintptr, infoVersioned bool, rank int, gamma float64, twoPass bool) (acc float64, err error) {
	defer recoverError(&err)
	if rank == sketchPanicRank {
		panic("bridge: panic forced by a test")
	}
	if math.IsNaN(gamma) || math.IsInf(gamma, 0) || gamma <= 0 {
		return 0, kindf(kindInvalid, "gamma must be a positive finite number, got %v", gamma)
	}
	sk := loraone.Sketch{TwoPass: twoPass}
	inputs := []struct {
		name string
		addr uintptr
		v    bool
		dst  *loraone.Matrix
	}{{"Y", y, yVersioned, &sk.Y}, {"W", w, wVersioned, &sk.W}, {"Z", z, zVersioned, &sk.Z}, {"OmegaT", omegaT, omegaTVersioned, &sk.OmegaT}}
	if !twoPass {
		if psi == 0 {
			return 0, kindf(kindInvalid, "Psi is required in single-pass mode (its address is 0)")
		}
		inputs = append(inputs, struct {
			name string
			addr uintptr
			v    bool
			dst  *loraone.Matrix
		}{"Psi", psi, psiVersioned, &sk.Psi})
	}
	for _, in := range inputs {
		if *in.dst, err = inputMatrix(in.name, in.addr, in.v); err != nil {
			return 0, err
		}
	}
	bd, err := outputMatrix("out_b", b, bVersioned)
	if err != nil {
		return 0, err
	}
	ad, err := outputMatrix("out_a", a, aVersioned)
	if err != nil {
		return 0, err
	}
	sv, err := outputVector("S", s, sVersioned)
	if err != nil {
		return 0, err
	}
	iv, err := outputVector("info", info, infoVersioned)
	if err != nil {
		return 0, err
	}
	if len(iv) < SketchInfoLen {
		return 0, kindf(kindInvalid, "info must hold %d float64 values, got %d", SketchInfoLen, len(iv))
	}
	if rank >= 1 && len(sv) < rank {
		return 0, kindf(kindInvalid, "S must hold %d float64 values, got %d", rank, len(sv))
	}
	opt := loraone.DefaultOptions(rank)
	withBLAS(&opt)
	res, err := loraone.LoRAOneSketch(bd, ad, sk, gamma, opt)
	if err != nil {
		return 0, classify(err)
	}
	copy(sv, res.S)
	iv[0] = res.Accuracy
	iv[1] = res.Residual
	iv[2] = float64(res.K)
	iv[3] = float64(res.Rank)
	return res.Accuracy, nil
}
