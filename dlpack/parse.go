package dlpack

import (
	"fmt"
	"math"
	"unsafe"
)

const (
	// MaxNDim is the largest rank Parse accepts.
	MaxNDim = 8
	// MaxBytes caps the bytes spanned by an accepted tensor (64 TiB), so that
	// every size computation stays far from overflow.
	MaxBytes = int64(1) << 46

	flagReadOnly = uint64(1) << 0 // DLPACK_FLAG_BITMASK_READ_ONLY
)

// Tensor is a validated, borrowed description of a CPU tensor.
//
// Shape and Strides are Go copies and may be kept. The views returned by
// Float32s, Float64s and Halfs alias the producer's memory: they must not be
// used after the call (or asynchronous job) during which Python holds the
// capsule, and must not be written when ReadOnly is set.
type Tensor struct {
	// Major and Minor are the DLPack version of a versioned tensor, and
	// (0, 8) for an unversioned DLManagedTensor.
	Major, Minor uint32
	Device       Device
	DType        DType
	// Shape is a copy of the producer's shape (len(Shape) == ndim, all >= 0).
	Shape []int64
	// Strides, counted in elements, is a copy of the producer's strides, or
	// the row-major strides when the producer passed NULL. A dimension of
	// size > 1 never has a negative stride.
	Strides []int64
	// ReadOnly is bit 0 (READ_ONLY) of the versioned struct's flags; always
	// false for an unversioned tensor.
	ReadOnly bool

	data   unsafe.Pointer // data + byte_offset; nil when the tensor is empty
	extent int64          // elements spanned: max offset + 1, or 0
	numel  int64          // product of Shape
}

// Parse reads the DLManagedTensor (versioned=false, capsule "dltensor") or
// DLManagedTensorVersioned (versioned=true, capsule "dltensor_versioned") at
// addr and validates it. The memory at addr must stay valid during the call
// (Python holds the capsule); Parse never calls the deleter.
//
// Checks, in order, each returning a wrapped sentinel:
//
//	addr != 0                                              ErrNull
//	versioned: version.major == 1, else nothing more read  ErrVersion
//	device.device_type == CPU (1)                          ErrDevice
//	dtype.lanes == 1, dtype.bits in {8,16,32,64,128}       ErrDType
//	0 <= ndim <= 8 (before shape is read)                  ErrShape
//	shape != NULL when ndim > 0                            ErrNull
//	every dim >= 0, dims and extent within MaxBytes        ErrShape
//	no negative stride on a dimension of size > 1          ErrLayout
//	data != NULL unless the tensor has zero elements       ErrNull
//	data + byte_offset aligned to min(element size, 8)     ErrAlign
//
// The extent (elements spanned) is 1 + Σ (shape[i]-1)·strides[i] over the
// dimensions of size > 1, or 0 for a tensor with no elements.
func Parse(addr uintptr, versioned bool) (*Tensor, error) {
	if addr == 0 {
		return nil, fmt.Errorf("dlpack: the managed tensor address is 0; pass the pointer held by a live DLPack capsule: %w", ErrNull)
	}
	t := &Tensor{Major: 0, Minor: 8}
	if versioned {
		t.Major, t.Minor = cVersion(addr)
		if t.Major != 1 {
			// dlpack.h: on a major mismatch the consumer reads no other field.
			if t.Major == 0 {
				return nil, fmt.Errorf("dlpack: versioned capsule claims DLPack version %d.%d, but versioned tensors start at 1.0; the producer is broken, export with max_version=None for an unversioned capsule: %w", t.Major, t.Minor, ErrVersion)
			}
			return nil, fmt.Errorf("dlpack: DLPack version %d.%d is newer than this engine reads (1.x); export with max_version=(1, 1) or upgrade peft-loraone: %w", t.Major, t.Minor, ErrVersion)
		}
	}
	h := cHeader(addr, versioned)
	if versioned {
		t.ReadOnly = h.flags&flagReadOnly != 0
	}
	t.Device = Device{Type: h.devType, ID: h.devID}
	if t.Device.Type != DeviceCPU {
		return nil, fmt.Errorf("dlpack: tensor is on %s, the engine reads CPU memory only; move it with .cpu(): %w", t.Device, ErrDevice)
	}
	t.DType = DType{Code: h.code, Bits: h.bits, Lanes: h.lanes}
	if t.DType.Lanes != 1 {
		return nil, fmt.Errorf("dlpack: dtype %s has %d lanes, only scalar (lanes=1) dtypes are supported; convert with .float(): %w", t.DType, t.DType.Lanes, ErrDType)
	}
	elem := int64(t.DType.Bits) / 8
	switch t.DType.Bits {
	case 8, 16, 32, 64, 128:
	default:
		return nil, fmt.Errorf("dlpack: dtype %s has %d bits per element, only whole-byte power-of-two sizes are supported; convert with .float(): %w", t.DType, t.DType.Bits, ErrDType)
	}
	if h.ndim < 0 || h.ndim > MaxNDim {
		return nil, fmt.Errorf("dlpack: tensor has ndim %d, supported are 0 to %d dimensions: %w", h.ndim, MaxNDim, ErrShape)
	}
	n := int(h.ndim)
	if n > 0 && h.shape == 0 {
		return nil, fmt.Errorf("dlpack: tensor has ndim %d but a NULL shape pointer; the producer is broken: %w", n, ErrNull)
	}
	t.Shape = make([]int64, n)
	t.Strides = make([]int64, n)
	cCopyInt64(t.Shape, h.shape)
	if h.strds != 0 {
		cCopyInt64(t.Strides, h.strds)
	}

	maxElems := MaxBytes / elem
	if maxElems > math.MaxInt {
		maxElems = math.MaxInt
	}
	// numel, and the product of max(dim, 1) that bounds row-major strides.
	t.numel = 1
	span := int64(1)
	for _, d := range t.Shape {
		if d < 0 {
			return nil, fmt.Errorf("dlpack: tensor has a negative dimension in shape %v: %w", t.Shape, ErrShape)
		}
		if d > 1 {
			if span > maxElems/d {
				return nil, fmt.Errorf("dlpack: tensor of shape %v and dtype %s is larger than %d bytes: %w", t.Shape, t.DType, MaxBytes, ErrShape)
			}
			span *= d
		}
		t.numel *= d // cannot overflow: |numel| <= span
	}
	if h.strds == 0 {
		s := int64(1)
		for i := n - 1; i >= 0; i-- {
			t.Strides[i] = s
			s *= max(t.Shape[i], 1) // <= span
		}
	}
	if t.numel == 0 {
		return t, nil
	}
	// Extent: 1 + Σ (d-1)·s over dims of size > 1.
	t.extent = 1
	for i, d := range t.Shape {
		if d <= 1 {
			continue
		}
		s := t.Strides[i]
		if s < 0 {
			return nil, fmt.Errorf("dlpack: tensor of shape %v has negative strides %v; make it contiguous with .contiguous() (torch) or np.ascontiguousarray (numpy): %w", t.Shape, t.Strides, ErrLayout)
		}
		if s > (maxElems-t.extent)/(d-1) {
			return nil, fmt.Errorf("dlpack: tensor of shape %v and strides %v spans more than %d bytes: %w", t.Shape, t.Strides, MaxBytes, ErrShape)
		}
		t.extent += (d - 1) * s
	}
	if h.data == 0 {
		return nil, fmt.Errorf("dlpack: tensor of shape %v has %d elements but a NULL data pointer; the producer is broken: %w", t.Shape, t.numel, ErrNull)
	}
	base := uint64(h.data) + h.byteOffset
	if base < h.byteOffset || base > uint64(^uintptr(0)) || uint64(^uintptr(0))-base < uint64(t.extent*elem) {
		return nil, fmt.Errorf("dlpack: data pointer %#x + byte_offset %d + %d bytes overflows the address space; the producer is broken: %w", h.data, h.byteOffset, t.extent*elem, ErrShape)
	}
	if align := min(elem, 8); base%uint64(align) != 0 {
		return nil, fmt.Errorf("dlpack: data pointer %#x + byte_offset %d is not aligned to %d bytes (dtype %s); copy the tensor with .clone() or .contiguous(): %w", h.data, h.byteOffset, align, t.DType, ErrAlign)
	}
	t.data = cPointer(uintptr(base))
	return t, nil
}

// Numel returns the number of elements, the product of Shape.
func (t *Tensor) Numel() int64 { return t.numel }

// Extent returns the number of elements spanned by the layout (the largest
// element offset + 1, or 0 for an empty tensor): the length of the views.
func (t *Tensor) Extent() int64 { return t.extent }

// Matrix checks that t is a 2-D row-major or column-major matrix and
// returns its logical dimensions rows×cols, the stride of the stored layout
// and whether that layout is column-major.
//
//	row-major    (trans=false): element (i, j) at i*stride + j, stride >= cols
//	column-major (trans=true):  element (i, j) at j*stride + i, stride >= rows
//
// A dimension of size <= 1 may have any stride; when both layouts fit,
// row-major wins. For an empty matrix or one whose leading stride is
// irrelevant, stride is max(cols, 1) (row-major) or max(rows, 1).
// It returns ErrShape when ndim != 2 and ErrLayout for any other strides.
func (t *Tensor) Matrix() (rows, cols, stride int, trans bool, err error) {
	if len(t.Shape) != 2 {
		return 0, 0, 0, false, fmt.Errorf("dlpack: expected a 2-D matrix, got shape %v (ndim %d); reshape it to 2-D: %w", t.Shape, len(t.Shape), ErrShape)
	}
	r, c := t.Shape[0], t.Shape[1]
	s0, s1 := t.Strides[0], t.Strides[1]
	rows, cols = int(r), int(c)
	if t.numel == 0 {
		return rows, cols, max(cols, 1), false, nil
	}
	if (c <= 1 || s1 == 1) && (r <= 1 || s0 >= c) {
		stride = max(cols, 1)
		if r > 1 {
			stride = int(s0)
		}
		return rows, cols, stride, false, nil
	}
	if (r <= 1 || s0 == 1) && (c <= 1 || s1 >= r) {
		stride = max(rows, 1)
		if c > 1 {
			stride = int(s1)
		}
		return rows, cols, stride, true, nil
	}
	return 0, 0, 0, false, fmt.Errorf("dlpack: matrix of shape %v has strides %v, which is neither row-major nor column-major; call .contiguous() before passing it: %w", t.Shape, t.Strides, ErrLayout)
}

// Vector checks that t is 1-D with a unit stride (any stride when its
// length is <= 1) and returns its length. It returns ErrShape when
// ndim != 1 and ErrLayout for a non-unit stride.
func (t *Tensor) Vector() (n int, err error) {
	if len(t.Shape) != 1 {
		return 0, fmt.Errorf("dlpack: expected a 1-D vector, got shape %v (ndim %d); flatten it with .reshape(-1): %w", t.Shape, len(t.Shape), ErrShape)
	}
	if t.Shape[0] > 1 && t.Strides[0] != 1 {
		return 0, fmt.Errorf("dlpack: vector of shape %v has stride %v, not 1; call .contiguous() before passing it: %w", t.Shape, t.Strides, ErrLayout)
	}
	return int(t.Shape[0]), nil
}

func (t *Tensor) checkDType(want string, ok bool) error {
	if !ok {
		return fmt.Errorf("dlpack: expected a %s tensor, got %s; convert it with .to(...) first: %w", want, t.DType, ErrDType)
	}
	return nil
}

// Float32s returns the Extent() elements of a float32 tensor, starting at
// data + byte_offset (nil when empty). The slice aliases borrowed memory.
// It returns ErrDType for any other dtype.
func (t *Tensor) Float32s() ([]float32, error) {
	if err := t.checkDType("float32", t.DType == Float32); err != nil {
		return nil, err
	}
	if t.extent == 0 {
		return nil, nil
	}
	return unsafe.Slice((*float32)(t.data), int(t.extent)), nil
}

// Float64s returns the Extent() elements of a float64 tensor, starting at
// data + byte_offset (nil when empty). The slice aliases borrowed memory.
// It returns ErrDType for any other dtype.
func (t *Tensor) Float64s() ([]float64, error) {
	if err := t.checkDType("float64", t.DType == Float64); err != nil {
		return nil, err
	}
	if t.extent == 0 {
		return nil, nil
	}
	return unsafe.Slice((*float64)(t.data), int(t.extent)), nil
}

// Halfs returns the Extent() raw 16-bit elements of a float16 or bfloat16
// tensor (check DType to tell them apart), starting at data + byte_offset
// (nil when empty). The slice aliases borrowed memory. It returns ErrDType
// for any other dtype.
func (t *Tensor) Halfs() ([]uint16, error) {
	if err := t.checkDType("float16 or bfloat16", t.DType == Float16 || t.DType == BFloat16); err != nil {
		return nil, err
	}
	if t.extent == 0 {
		return nil, nil
	}
	return unsafe.Slice((*uint16)(t.data), int(t.extent)), nil
}

// Writable returns ErrReadOnly when the producer set the READ_ONLY flag;
// call it on every tensor the engine writes.
func (t *Tensor) Writable() error {
	if t.ReadOnly {
		return fmt.Errorf("dlpack: the output tensor is marked read-only by its producer; pass a writable tensor (e.g. torch.empty(...)): %w", ErrReadOnly)
	}
	return nil
}
