package dlpack

import (
	"encoding/binary"
	"errors"
	"math/big"
	"testing"
)

// sink keeps the fuzz target's view reads alive.
var sink float64

// decodeI64 reads up to max int64 values from b (little-endian, 8 bytes
// each; a short tail is zero-padded).
func decodeI64(b []byte, n int) []int64 {
	v := make([]int64, n)
	for i := range v {
		var w [8]byte
		if 8*i < len(b) {
			copy(w[:], b[8*i:])
		}
		v[i] = int64(binary.LittleEndian.Uint64(w[:]))
	}
	return v
}

// FuzzParse builds a managed tensor in C memory from arbitrary header
// fields and checks that Parse never crashes, and that an accepted tensor
// is consistent with what was written.
//
// ptrs bit 0: NULL shape, bit 1: NULL strides; dataMode 0: NULL data,
// 1: a C buffer of dataLen bytes, 2: a fake (never dereferenced) address.
// When 0 <= ndim <= 8 the shape/strides arrays hold exactly ndim values, so
// an over-read is visible under -asan; for any other ndim they hold 8 and
// Parse must reject before reading them.
func FuzzParse(f *testing.F) {
	le := func(v ...int64) []byte {
		b := make([]byte, 8*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint64(b[8*i:], uint64(x))
		}
		return b
	}
	// versioned, major, minor, flags, devType, devID, ndim, code, bits, lanes,
	// shape, strides, byteOffset, ptrs, dataMode, dataLen, fake
	f.Add(true, uint32(1), uint32(1), uint64(0), int32(1), int32(0), int32(2), uint8(2), uint8(32), uint16(1),
		le(2, 3), le(3, 1), uint64(0), uint8(0), uint8(1), uint16(24), uint64(0))
	f.Add(false, uint32(0), uint32(0), uint64(0), int32(1), int32(0), int32(2), uint8(2), uint8(32), uint16(1),
		le(2, 3), le(1, 2), uint64(4), uint8(2), uint8(1), uint16(32), uint64(0))
	f.Add(true, uint32(1), uint32(0), uint64(1), int32(1), int32(0), int32(3), uint8(4), uint8(16), uint16(1),
		le(2, 0, 5), le(0, 0, 0), uint64(0), uint8(0), uint8(0), uint16(0), uint64(0))
	f.Add(true, uint32(2), uint32(0), uint64(0), int32(1), int32(0), int32(2), uint8(2), uint8(32), uint16(1),
		le(2, 3), le(3, 1), uint64(0), uint8(0), uint8(1), uint16(24), uint64(0))
	f.Add(true, uint32(1), uint32(1), uint64(0), int32(2), int32(0), int32(2), uint8(2), uint8(64), uint16(1),
		le(2, 3), le(3, 1), uint64(0), uint8(0), uint8(1), uint16(48), uint64(0))
	f.Add(true, uint32(1), uint32(1), uint64(0), int32(1), int32(0), int32(9), uint8(2), uint8(32), uint16(1),
		le(1, 1, 1, 1, 1, 1, 1, 1), []byte(nil), uint64(0), uint8(0), uint8(1), uint16(4), uint64(0))
	f.Add(false, uint32(0), uint32(0), uint64(0), int32(1), int32(0), int32(2), uint8(2), uint8(32), uint16(1),
		le(1<<40, 1<<40), le(1<<40, 1), uint64(0), uint8(0), uint8(2), uint16(0), uint64(0x1000))
	f.Add(false, uint32(0), uint32(0), uint64(0), int32(1), int32(0), int32(1), uint8(2), uint8(16), uint16(1),
		le(3), le(-1), uint64(1), uint8(0), uint8(1), uint16(8), uint64(0))
	f.Add(true, uint32(1), uint32(1), uint64(0), int32(1), int32(0), int32(0), uint8(2), uint8(64), uint16(1),
		[]byte{}, []byte{}, uint64(8), uint8(3), uint8(1), uint16(16), uint64(0))
	// Every non-CPU device type (and unknown ones) on an otherwise valid
	// float32 2×3 tensor, both struct versions: only type 1 may be accepted.
	for _, dev := range []int32{0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, -1, 257} {
		f.Add(true, uint32(1), uint32(1), uint64(0), dev, int32(0), int32(2), uint8(2), uint8(32), uint16(1),
			le(2, 3), le(3, 1), uint64(0), uint8(0), uint8(1), uint16(24), uint64(0))
		f.Add(false, uint32(0), uint32(0), uint64(0), dev, int32(1), int32(2), uint8(2), uint8(32), uint16(1),
			le(2, 3), le(3, 1), uint64(0), uint8(0), uint8(1), uint16(24), uint64(0))
	}

	f.Fuzz(func(t *testing.T, versioned bool, major, minor uint32, flags uint64, devType, devID, ndim int32,
		code, bits uint8, lanes uint16, shapeB, stridesB []byte, byteOffset uint64, ptrs, dataMode uint8,
		dataLen uint16, fake uint64) {
		n := 8
		if ndim >= 0 && ndim <= 8 {
			n = int(ndim)
		}
		fx := Fixture{Versioned: versioned, Major: major, Minor: minor, Flags: flags,
			Device: Device{devType, devID}, NDim: ndim, DType: DType{code, bits, lanes}, ByteOffset: byteOffset}
		if ptrs&1 == 0 {
			fx.Shape = decodeI64(shapeB, n)
		}
		if ptrs&2 == 0 {
			fx.Strides = decodeI64(stridesB, n)
		}
		switch dataMode % 3 {
		case 1:
			fx.Data = make([]byte, int(dataLen)%4096)
			for i := range fx.Data {
				fx.Data[i] = byte(i)
			}
		case 2:
			// Small fake addresses are never Go heap, so a pointer made from
			// them does not upset the garbage collector.
			fx.FakeData = uintptr(fake % (1 << 20))
		}
		addr, free := NewFixture(fx)
		defer free()
		tn, err := Parse(addr, versioned)
		if FixtureDeleterCalls(addr) != 0 {
			t.Fatal("Parse called the deleter")
		}
		if err != nil {
			if tn != nil {
				t.Fatal("tensor returned with an error")
			}
			known := false
			for _, s := range []error{ErrNull, ErrVersion, ErrDevice, ErrDType, ErrShape, ErrLayout, ErrAlign} {
				known = known || errors.Is(err, s)
			}
			if !known {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		checkAccepted(t, fx, tn)
	})
}

func checkAccepted(t *testing.T, fx Fixture, tn *Tensor) {
	t.Helper()
	if fx.Versioned && tn.Major != 1 {
		t.Fatalf("accepted major version %d", tn.Major)
	}
	if tn.Device.Type != DeviceCPU || tn.DType.Lanes != 1 || tn.DType != fx.DType {
		t.Fatalf("accepted device %v dtype %v", tn.Device, tn.DType)
	}
	if tn.ReadOnly != (fx.Versioned && fx.Flags&1 != 0) {
		t.Fatalf("ReadOnly %v for flags %#x", tn.ReadOnly, fx.Flags)
	}
	nd := int(fx.NDim)
	if nd < 0 || nd > MaxNDim || len(tn.Shape) != nd || len(tn.Strides) != nd {
		t.Fatalf("ndim %d accepted with len(Shape)=%d len(Strides)=%d", fx.NDim, len(tn.Shape), len(tn.Strides))
	}
	elem := int64(fx.DType.Bits) / 8
	// Recompute numel, strides and extent with big integers.
	numel := big.NewInt(1)
	for i, d := range tn.Shape {
		if d != fx.Shape[i] || d < 0 {
			t.Fatalf("shape %v, written %v", tn.Shape, fx.Shape)
		}
		numel.Mul(numel, big.NewInt(d))
	}
	if numel.Cmp(big.NewInt(tn.Numel())) != 0 || numel.Cmp(big.NewInt(MaxBytes)) > 0 {
		t.Fatalf("numel %d, want %v", tn.Numel(), numel)
	}
	if fx.Strides != nil {
		for i := range tn.Strides {
			if tn.Strides[i] != fx.Strides[i] {
				t.Fatalf("strides %v, written %v", tn.Strides, fx.Strides)
			}
		}
	} else {
		s := int64(1)
		for i := nd - 1; i >= 0; i-- {
			if tn.Strides[i] != s {
				t.Fatalf("filled strides %v for shape %v", tn.Strides, tn.Shape)
			}
			s *= max(tn.Shape[i], 1)
		}
	}
	ext := new(big.Int)
	if numel.Sign() > 0 {
		ext.SetInt64(1)
		for i, d := range tn.Shape {
			if d > 1 {
				if tn.Strides[i] < 0 {
					t.Fatalf("negative stride accepted: %v %v", tn.Shape, tn.Strides)
				}
				ext.Add(ext, new(big.Int).Mul(big.NewInt(d-1), big.NewInt(tn.Strides[i])))
			}
		}
	}
	if ext.Cmp(big.NewInt(tn.Extent())) != 0 || tn.Extent()*elem > MaxBytes {
		t.Fatalf("extent %d, want %v", tn.Extent(), ext)
	}
	if tn.Extent() == 0 {
		if tn.data != nil {
			t.Fatal("empty tensor has a data pointer")
		}
	} else {
		base := uint64(uintptr(tn.data))
		if base == 0 || base%uint64(min(elem, 8)) != 0 {
			t.Fatalf("data %#x accepted for %s", base, tn.DType)
		}
	}
	// Read the whole view when it lies inside the fixture's buffer.
	inBuffer := fx.Data != nil && fx.ByteOffset <= uint64(len(fx.Data)) &&
		uint64(tn.Extent()*elem) <= uint64(len(fx.Data))-fx.ByteOffset
	var length int
	var err error
	switch tn.DType {
	case Float32:
		var x []float32
		x, err = tn.Float32s()
		length = len(x)
		if inBuffer {
			var sum float32
			for _, v := range x {
				sum += v
			}
			sink += float64(sum)
		}
	case Float64:
		var x []float64
		x, err = tn.Float64s()
		length = len(x)
		if inBuffer {
			var sum float64
			for _, v := range x {
				sum += v
			}
			sink += float64(sum)
		}
	case Float16, BFloat16:
		var x []uint16
		x, err = tn.Halfs()
		length = len(x)
		if inBuffer {
			sum := 0
			for _, v := range x {
				sum += int(v)
			}
			sink += float64(sum)
		}
	default:
		_, err = tn.Float32s()
		if !errors.Is(err, ErrDType) {
			t.Fatalf("Float32s on %s: %v", tn.DType, err)
		}
		err = nil
		length = int(tn.Extent())
	}
	if err != nil || int64(length) != tn.Extent() {
		t.Fatalf("view length %d, err %v; extent %d", length, err, tn.Extent())
	}
	// Matrix and Vector results must address elements inside the extent.
	if rows, cols, stride, trans, err := tn.Matrix(); err == nil && rows > 0 && cols > 0 {
		last := int64(rows-1)*int64(stride) + int64(cols-1)
		lead := cols
		if trans {
			last = int64(cols-1)*int64(stride) + int64(rows-1)
			lead = rows
		}
		if last >= tn.Extent() || stride < lead {
			t.Fatalf("Matrix %dx%d stride %d trans %v outside extent %d (shape %v strides %v)",
				rows, cols, stride, trans, tn.Extent(), tn.Shape, tn.Strides)
		}
	}
	if n, err := tn.Vector(); err == nil && int64(n) > tn.Extent() {
		t.Fatalf("Vector %d longer than extent %d", n, tn.Extent())
	}
}
