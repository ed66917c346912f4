package loraone

import "errors"

// Sentinel error kinds. Every error returned by this package wraps exactly one
// of them, with context, so callers test the kind with errors.Is:
//
//	if errors.Is(err, loraone.ErrNonFinite) { ... }
var (
	// ErrShape reports bad dimensions, strides or backing-slice lengths,
	// or an output whose shape does not match the input and rank.
	ErrShape = errors.New("loraone: bad shape")
	// ErrDType reports an unknown dtype or a backing slice that does not
	// match it (none or several of F32/F64/Half set).
	ErrDType = errors.New("loraone: bad dtype")
	// ErrRank reports r < 1, r > min(m, n), or 2r > min(m, n) for LoRA-GA.
	ErrRank = errors.New("loraone: bad rank")
	// ErrNonFinite reports a NaN or ±Inf in the input (the message names
	// the row and column of one offending element), a product that
	// overflowed, or factors that would not be finite in the output's
	// dtype (a gamma or scaling too small for it; the message names it).
	ErrNonFinite = errors.New("loraone: non-finite value")
	// ErrZero reports an all-zero input (sigma1 == 0): there is no
	// direction to initialize from.
	ErrZero = errors.New("loraone: zero matrix")
	// ErrArgument reports a bad scalar argument: gamma or scaling <= 0 or
	// not finite, negative Oversampling, MaxIters negative or above
	// MaxPowerIters, negative or NaN Tol.
	ErrArgument = errors.New("loraone: bad argument")
	// ErrCancelled reports that Options.Context was done at one of the
	// checks between passes or before the outputs are written; the error
	// also wraps context.Cause of that context. Nothing was written.
	ErrCancelled = errors.New("loraone: cancelled")
)
