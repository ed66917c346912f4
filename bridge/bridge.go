package bridge

import (
	"errors"
	"fmt"
	"math"

	"github.com/peft-loraone/peft-loraone/dlpack"
	"github.com/peft-loraone/peft-loraone/loraone"
)

// Method codes accepted by Compute and Pool.Submit.
const (
	// MethodLoRAOne: factors of the SVD of -G (LoRA-One). scale is gamma.
	MethodLoRAOne = 0
	// MethodLoRAGA: the reference LoRA-GA factors of +G (rank 2r SVD). scale is gamma.
	MethodLoRAGA = 1
	// MethodPiSSA: factors of the SVD of the weight W. scale is the LoRA scaling s.
	MethodPiSSA = 2

	// AlgorithmDefault, AlgorithmSubspace and AlgorithmKrylov select the
	// truncated SVD: the engine's default (block Krylov), randomized
	// subspace iteration, or block Krylov (loraone.Options.Krylov).
	AlgorithmDefault  = -1
	AlgorithmSubspace = 0
	AlgorithmKrylov   = 1

	// MaxPowerIters is the largest maxIters accepted (loraone.MaxPowerIters);
	// a larger one is an "invalid-argument:" error naming the limit.
	MaxPowerIters = loraone.MaxPowerIters

	// methodPanic forces a panic inside the computation; only tests use it, to
	// show that a panic comes back to Python as an "internal:" error.
	methodPanic = 99
)

// request is one validated computation: views over borrowed memory plus options.
type request struct {
	method int
	g      loraone.Matrix
	b, a   loraone.Dense
	s      []float64 // the S output (float64 vector), len >= number of singular values
	info   []float64 // info output: accuracy, passes, converged
	scale  float64
	opt    loraone.Options
}

// Compute runs one initialization synchronously and returns the accuracy
// estimate of its truncated SVD.
//
// Each tensor is given as the address of its DLPack managed struct and whether
// that struct is the versioned one (DLManagedTensorVersioned, capsule
// "dltensor_versioned") or the v0.8 one (DLManagedTensor, capsule "dltensor"):
//
//	g     the m×n input (gradient G, or weight W for PiSSA): float32, float64,
//	      float16 or bfloat16, row-major or column-major (a transposed view)
//	b     the m×r output for lora_B (float32 or float64, writable)
//	a     the r×n output for lora_A (float32 or float64, writable)
//	s     a float64 vector for the singular values (r, or 2r for LoRA-GA)
//	info  a float64 vector of length 3: accuracy, passes over G, converged (0/1);
//	      of length 6 or more, also the truncation: gap ratio σ_{r+1}/σ_r,
//	      ambiguous (0/1), residual excess (−1: not computed; see
//	      loraone.SVD.GapRatio, Ambiguous, ResidualExcess)
//
// method is MethodLoRAOne, MethodLoRAGA or MethodPiSSA; scale is gamma for the
// first two and the LoRA scaling for PiSSA. oversampling, maxIters and tol
// below zero select the engine's defaults; maxIters above MaxPowerIters is
// refused; algorithm is AlgorithmDefault, AlgorithmSubspace or
// AlgorithmKrylov. The call releases the GIL; the tensors must stay alive
// until it returns. Compute cannot be cancelled: for a call Python waits on
// interruptibly, use Pool.Run, Pool.Poll and Pool.Cancel.
func Compute(method int, g uintptr, gVersioned bool, b uintptr, bVersioned bool,
	a uintptr, aVersioned bool, s uintptr, sVersioned bool, info uintptr, infoVersioned bool,
	rank int, scale float64, oversampling int, maxIters int, tol float64, seed int64, algorithm int) (acc float64, err error) {
	defer recoverError(&err)
	req, err := newRequest(method, g, gVersioned, b, bVersioned, a, aVersioned, s, sVersioned,
		info, infoVersioned, rank, scale, oversampling, maxIters, tol, seed, algorithm)
	if err != nil {
		return 0, err
	}
	return req.run()
}

// ForcePanic panics inside the bridge with msg. It exists so tests can show
// that a Go panic comes back to Python as an exception.
func ForcePanic(msg string) (n int, err error) {
	defer recoverError(&err)
	panic(msg)
}

// newRequest parses and validates every tensor and option. It reads no tensor
// data, so a validation error leaves every tensor untouched.
func newRequest(method int, g uintptr, gv bool, b uintptr, bv bool, a uintptr, av bool,
	s uintptr, sv bool, info uintptr, iv bool,
	rank int, scale float64, oversampling int, maxIters int, tol float64, seed int64, algorithm int) (*request, error) {
	switch method {
	case MethodLoRAOne, MethodLoRAGA, MethodPiSSA, methodPanic:
	default:
		return nil, kindf(kindInvalid, "unknown method code %d", method)
	}
	if math.IsNaN(scale) || math.IsInf(scale, 0) || scale <= 0 {
		name := "gamma"
		if method == MethodPiSSA {
			name = "scaling"
		}
		return nil, kindf(kindInvalid, "%s must be a positive finite number, got %v", name, scale)
	}
	opt := loraone.DefaultOptions(rank)
	if oversampling >= 0 {
		opt.Oversampling = oversampling
	}
	if maxIters > MaxPowerIters {
		return nil, kindf(kindInvalid, "power_iters (maxIters) = %d is above the limit MaxPowerIters = %d (at most %d passes over G); use at most %d, or tol > 0 to stop earlier",
			maxIters, MaxPowerIters, 2+2*MaxPowerIters, MaxPowerIters)
	}
	if maxIters >= 0 {
		opt.MaxIters = maxIters
	}
	if tol >= 0 {
		opt.Tol = tol
	}
	opt.Seed = uint64(seed)
	switch algorithm {
	case AlgorithmDefault:
	case AlgorithmSubspace:
		opt.Krylov = false
	case AlgorithmKrylov:
		opt.Krylov = true
	default:
		return nil, kindf(kindInvalid, "unknown algorithm code %d", algorithm)
	}
	withBLAS(&opt) // the optimized BLAS loaded by UseBLAS, if any

	req := &request{method: method, scale: scale, opt: opt}
	var err error
	if req.g, err = inputMatrix("grad", g, gv); err != nil {
		return nil, err
	}
	if req.b, err = outputMatrix("out_b", b, bv); err != nil {
		return nil, err
	}
	if req.a, err = outputMatrix("out_a", a, av); err != nil {
		return nil, err
	}
	if req.s, err = outputVector("S", s, sv); err != nil {
		return nil, err
	}
	if req.info, err = outputVector("info", info, iv); err != nil {
		return nil, err
	}
	if len(req.info) < 3 {
		return nil, kindf(kindInvalid, "info must hold 3 float64 values, got %d", len(req.info))
	}
	nsv := rank
	if method == MethodLoRAGA {
		nsv = 2 * rank
	}
	if rank >= 1 && len(req.s) < nsv {
		return nil, kindf(kindInvalid, "S must hold %d float64 values, got %d", nsv, len(req.s))
	}
	return req, nil
}

// run computes the factors and fills the outputs, on a workspace from
// the shared free list (scratch).
func (req *request) run() (float64, error) {
	var (
		res loraone.Result
		err error
	)
	req.opt.Workspace = takeWorkspace()
	defer giveWorkspace(req.opt.Workspace)
	switch req.method {
	case MethodLoRAOne:
		res, err = loraone.LoRAOne(req.b, req.a, req.g, req.scale, req.opt)
	case MethodLoRAGA:
		res, err = loraone.LoRAGA(req.b, req.a, req.g, req.scale, req.opt)
	case MethodPiSSA:
		res, err = loraone.PiSSA(req.b, req.a, req.g, req.scale, req.opt)
	case methodPanic:
		panic("bridge: panic forced by a test")
	}
	if err != nil {
		return 0, classify(err)
	}
	copy(req.s, res.S)
	req.info[0] = res.Accuracy
	req.info[1] = float64(res.Passes)
	req.info[2] = 0
	if res.Converged {
		req.info[2] = 1
	}
	if len(req.info) >= 6 {
		req.info[3] = res.GapRatio
		req.info[4] = 0
		if res.Ambiguous {
			req.info[4] = 1
		}
		req.info[5] = res.ResidualExcess
	}
	return res.Accuracy, nil
}

// inputMatrix builds a read-only loraone view over the 2-D tensor at addr.
func inputMatrix(name string, addr uintptr, versioned bool) (loraone.Matrix, error) {
	t, err := dlpack.Parse(addr, versioned)
	if err != nil {
		return loraone.Matrix{}, classify(fmt.Errorf("%s: %w", name, err))
	}
	rows, cols, stride, trans, err := t.Matrix()
	if err != nil {
		return loraone.Matrix{}, classify(fmt.Errorf("%s: %w", name, err))
	}
	m := loraone.Matrix{Rows: rows, Cols: cols, Stride: stride, Trans: trans}
	switch t.DType {
	case dlpack.Float32:
		m.DType = loraone.Float32
		m.F32, err = t.Float32s()
	case dlpack.Float64:
		m.DType = loraone.Float64
		m.F64, err = t.Float64s()
	case dlpack.Float16:
		m.DType = loraone.Float16
		m.Half, err = t.Halfs()
	case dlpack.BFloat16:
		m.DType = loraone.BFloat16
		m.Half, err = t.Halfs()
	default:
		return loraone.Matrix{}, kindf(kindDType,
			"%s has dtype %s; the engine reads float32, float64, float16 or bfloat16: convert it with .float()", name, t.DType)
	}
	if err != nil {
		return loraone.Matrix{}, classify(fmt.Errorf("%s: %w", name, err))
	}
	return m, nil
}

// outputMatrix builds a writable loraone view over the 2-D tensor at addr.
func outputMatrix(name string, addr uintptr, versioned bool) (loraone.Dense, error) {
	t, err := dlpack.Parse(addr, versioned)
	if err != nil {
		return loraone.Dense{}, classify(fmt.Errorf("%s: %w", name, err))
	}
	if err := t.Writable(); err != nil {
		return loraone.Dense{}, classify(fmt.Errorf("%s: %w", name, err))
	}
	rows, cols, stride, trans, err := t.Matrix()
	if err != nil {
		return loraone.Dense{}, classify(fmt.Errorf("%s: %w", name, err))
	}
	d := loraone.Dense{Rows: rows, Cols: cols, Stride: stride, Trans: trans}
	switch t.DType {
	case dlpack.Float32:
		d.F32, err = t.Float32s()
	case dlpack.Float64:
		d.F64, err = t.Float64s()
	default:
		return loraone.Dense{}, kindf(kindDType,
			"%s has dtype %s; outputs must be float32 or float64", name, t.DType)
	}
	if err != nil {
		return loraone.Dense{}, classify(fmt.Errorf("%s: %w", name, err))
	}
	return d, nil
}

// outputVector returns a writable float64 view over the 1-D tensor at addr.
func outputVector(name string, addr uintptr, versioned bool) ([]float64, error) {
	t, err := dlpack.Parse(addr, versioned)
	if err == nil {
		err = t.Writable()
	}
	if err == nil {
		_, err = t.Vector()
	}
	if err != nil {
		return nil, classify(fmt.Errorf("%s: %w", name, err))
	}
	if t.DType != dlpack.Float64 {
		return nil, kindf(kindDType, "%s has dtype %s; it must be float64", name, t.DType)
	}
	v, err := t.Float64s()
	if err != nil {
		return nil, classify(fmt.Errorf("%s: %w", name, err))
	}
	return v, nil
}

// The stable error kinds; Python maps them to exception classes.
const (
	kindInvalid  = "invalid-argument"
	kindDType    = "unsupported-dtype"
	kindDevice   = "unsupported-device"
	kindReadOnly = "read-only"
	kindNonFin   = "non-finite"
	kindZero     = "zero-gradient"
	kindCancel   = "cancelled"
	kindInternal = "internal"
)

// kindError is an error whose text starts with its kind.
type kindError struct {
	kind string
	err  error
}

func (e *kindError) Error() string { return e.kind + ": " + e.err.Error() }
func (e *kindError) Unwrap() error { return e.err }

func kindf(kind, format string, args ...any) error {
	return &kindError{kind: kind, err: fmt.Errorf(format, args...)}
}

// classify prefixes err with the kind of the sentinel it wraps.
func classify(err error) error {
	var ke *kindError
	if errors.As(err, &ke) {
		return err
	}
	kind := kindInvalid
	switch {
	case errors.Is(err, dlpack.ErrDevice):
		kind = kindDevice
	case errors.Is(err, dlpack.ErrDType), errors.Is(err, loraone.ErrDType):
		kind = kindDType
	case errors.Is(err, dlpack.ErrReadOnly):
		kind = kindReadOnly
	case errors.Is(err, loraone.ErrNonFinite):
		kind = kindNonFin
	case errors.Is(err, loraone.ErrZero):
		kind = kindZero
	case errors.Is(err, loraone.ErrCancelled):
		kind = kindCancel
	}
	return &kindError{kind: kind, err: err}
}

// recoverError turns a panic into an "internal:" error stored in *err.
func recoverError(err *error) {
	if r := recover(); r != nil {
		*err = kindf(kindInternal, "Go panic: %v (this is a bug in peft-loraone; please report it)", r)
	}
}
