// Package dlpack reads and validates DLPack tensors that Python lends to Go
// by address. It is the only package of peft-loraone that touches foreign
// memory.
//
// # Overview
//
// Python exports a tensor with __dlpack__, takes the pointer out of the
// capsule with ctypes (PyCapsule_GetPointer) and passes that integer, plus a
// flag saying which struct it points to, to Go:
//
//	capsule "dltensor"            -> DLManagedTensor           (Parse(addr, false))
//	capsule "dltensor_versioned"  -> DLManagedTensorVersioned  (Parse(addr, true))
//
// Parse copies the header (version, flags, device, dtype, shape, strides)
// into a Go Tensor and checks it. Matrix and Vector check the layout the
// engine needs and return dimensions and strides; Float32s, Float64s and
// Halfs return typed views of the elements; Writable checks an output.
//
//	t, err := dlpack.Parse(addr, versioned)
//	rows, cols, stride, trans, err := t.Matrix()
//	x, err := t.Float32s() // len(x) == t.Extent()
//
// # Borrowing
//
// The memory belongs to the producer. Python keeps the capsule alive and
// unrenamed for the whole call (or asynchronous job), and its destructor
// calls the deleter. This package never calls the deleter, never renames a
// capsule and never keeps a view: the slices returned by Float32s, Float64s
// and Halfs must not outlive the borrow, and must not be written when
// ReadOnly is set (call Writable on outputs). Shape and Strides are copies
// and may be kept.
//
// Parse and the Tensor methods keep no state: they are safe for concurrent
// use, and several goroutines may read the same borrowed tensor.
//
// # Invariants
//
// Parse checks foreign memory before reading it, in this order:
//
//   - addr != 0.
//   - Versioned: the major version is 1. On any other major version Parse
//     reads nothing but the version field and returns ErrVersion, so the
//     capsule stays unconsumed and its destructor frees it (dlpack.h).
//   - The device is CPU; anything else is ErrDevice naming the device.
//   - lanes == 1 and bits is 8, 16, 32, 64 or 128 (ErrDType).
//   - 0 <= ndim <= MaxNDim, checked before the shape array is read.
//   - shape is non-NULL when ndim > 0; every dimension is >= 0.
//   - Strides are counted in elements; NULL means row-major, and Parse fills
//     them in. A dimension of size > 1 must not have a negative stride
//     (ErrLayout); zero strides (broadcasting) are accepted by Parse and
//     rejected by Matrix and Vector.
//   - The bytes spanned, Extent()·elemsize, and the number of elements are at
//     most MaxBytes (64 TiB), so no size computation overflows.
//   - For a tensor with at least one element: data is non-NULL, and
//     data + byte_offset is aligned to the element size (at most 8 bytes,
//     the alignment of the largest C scalar), else ErrAlign. An empty tensor
//     may have any data pointer; its views are nil.
//
// The extent is the number of elements the layout spans:
//
//	extent = 1 + Σ_{i: shape[i] > 1} (shape[i]-1)·strides[i]   (0 when empty)
//
// and every view has exactly extent elements starting at data + byte_offset.
//
// # Errors
//
// Every error wraps one sentinel (ErrNull, ErrVersion, ErrDevice, ErrDType,
// ErrShape, ErrLayout, ErrAlign, ErrReadOnly) for errors.Is, and its message
// starts with "dlpack: ", names the offending value and says how to fix it
// on the Python side (.cpu(), .contiguous(), .clone(), ...), because bridge/
// forwards it to Python users.
//
// # cgo
//
// Only cdlpack.go imports "C". Its preamble declares private copies of
// DLTensor, DLManagedTensor and DLManagedTensorVersioned, pinned to the
// documented layout by static assertions, and small static readers that
// take the address as an integer. The integer-to-pointer conversion happens
// in C, so go vet stays quiet; the only pointer Go derives from it is the
// element base, made after validation. No C type is exported.
//
// # Test fixtures
//
// Tests cannot use cgo, so NewFixture and the other Fixture* functions,
// exported from an ordinary file, build managed tensors in C memory with
// arbitrary (also malformed) fields. Other packages' tests may use them;
// production code must not.
package dlpack // import "github.com/peft-loraone/peft-loraone/dlpack"
