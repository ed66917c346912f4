// Package bridge is the façade that gopy turns into the CPython extension
// peft_loraone._engine. It is the only package gopy sees.
//
// # Overview
//
// Python hands the bridge the addresses of DLPack managed tensors (the gradient
// or weight to factor, and the output tensors it allocated) together with plain
// option values: [Compute] and [Pool] for a dense matrix, [SketchLoRAOne] and
// [Orthonormalize] for the sketches of a matrix that was never formed. The bridge validates them through package dlpack, builds
// loraone views over the foreign memory, calls package loraone and writes the
// results into the output tensors. Nothing is copied across the boundary and Go
// never hands Go memory to Python.
//
// # Rules for callers
//
// Python must keep every capsule (and the storage behind it) alive and
// unrenamed until the call returns, or, for a job of a [Pool], until
// [Pool.Wait] or [Pool.Poll] has reported it done, also after [Pool.Cancel].
// The bridge keeps no view after that.
//
// # Errors
//
// gopy can only raise RuntimeError with the error's text, so every error the
// bridge returns starts with a stable kind followed by ": ":
//
//	invalid-argument    shape, stride, rank, option or version problems
//	unsupported-dtype   an element type the engine does not read or write
//	unsupported-device  a tensor that is not in CPU memory
//	read-only           an output tensor marked read-only
//	non-finite          NaN or Inf in the input, or factors that would not be
//	                    finite in the output dtype (gamma or scaling too small)
//	zero-gradient       an all-zero input (sigma1 = 0)
//	cancelled           a job stopped by Pool.Cancel (nothing was written)
//	internal            a recovered Go panic (a bug: please report it)
//
// The Python layer maps the kind to an exception class.
//
// # Panics
//
// Every exported function and every worker goroutine recovers panics and turns
// them into an "internal:" error, because a Go panic would otherwise kill the
// Python interpreter.
//
// # State
//
// Asynchronous work goes through a [Pool] that Python creates once and keeps.
// The one process-wide setting is the optimized BLAS ([UseBLAS], [UseGonum]):
// a dlopen'd library is process-wide by nature. It is stored atomically and
// read once per computation, when the computation is validated.
package bridge // import "github.com/peft-loraone/peft-loraone/bridge"
