package dlpack

import "errors"

// Sentinel errors. Every error returned by this package wraps exactly one of
// them (test with errors.Is) and carries context that names the offending
// value and the fix, because the messages reach Python users.
var (
	// ErrNull: the address, the shape pointer or the data pointer is NULL
	// where a value is required.
	ErrNull = errors.New("dlpack: null pointer")
	// ErrVersion: a DLManagedTensorVersioned with a major version other than 1.
	ErrVersion = errors.New("dlpack: unsupported DLPack version")
	// ErrDevice: the tensor does not live in CPU memory.
	ErrDevice = errors.New("dlpack: unsupported device")
	// ErrDType: the element type is not supported or not the one asked for.
	ErrDType = errors.New("dlpack: unsupported dtype")
	// ErrShape: bad ndim, negative or too large dimensions, or the wrong rank.
	ErrShape = errors.New("dlpack: unsupported shape")
	// ErrLayout: strides that the engine cannot read (negative, or not a
	// row-major or column-major matrix / unit-stride vector).
	ErrLayout = errors.New("dlpack: unsupported memory layout")
	// ErrAlign: data + byte_offset is not aligned to the element size.
	ErrAlign = errors.New("dlpack: misaligned data")
	// ErrReadOnly: the producer marked the tensor READ_ONLY but it is used as
	// an output.
	ErrReadOnly = errors.New("dlpack: read-only tensor")
)
