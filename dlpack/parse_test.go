package dlpack

import (
	"encoding/binary"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
)

var cpu = Device{Type: DeviceCPU}

func f32bytes(v ...float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.NativeEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func f64bytes(v ...float64) []byte {
	b := make([]byte, 8*len(v))
	for i, x := range v {
		binary.NativeEndian.PutUint64(b[8*i:], math.Float64bits(x))
	}
	return b
}

func u16bytes(v ...uint16) []byte {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.NativeEndian.PutUint16(b[2*i:], x)
	}
	return b
}

func seq32(n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(i) + 0.5
	}
	return v
}

// parseFixture builds f, parses it and checks that Parse left the deleter
// alone.
func parseFixture(t *testing.T, f Fixture) (*Tensor, error) {
	t.Helper()
	addr, free := NewFixture(f)
	t.Cleanup(free)
	tn, err := Parse(addr, f.Versioned)
	if n := FixtureDeleterCalls(addr); n != 0 {
		t.Fatalf("Parse called the deleter %d times", n)
	}
	return tn, err
}

func TestParseTable(t *testing.T) {
	type want struct {
		err     error
		shape   []int64
		strides []int64
		extent  int64
		ro      bool
		major   uint32
		minor   uint32
	}
	m23 := func(v bool, dt DType, elem int) Fixture {
		return Fixture{Versioned: v, Major: 1, Minor: 1, Device: cpu, NDim: 2, DType: dt,
			Shape: []int64{2, 3}, Strides: []int64{3, 1}, Data: make([]byte, 6*elem)}
	}
	with := func(f Fixture, mod func(*Fixture)) Fixture { mod(&f); return f }
	cases := []struct {
		name string
		f    Fixture
		want want
	}{
		{"v0.8 float32", m23(false, Float32, 4), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, minor: 8}},
		{"v1 float32", m23(true, Float32, 4), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, major: 1, minor: 1}},
		{"v1 float64", m23(true, Float64, 8), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, major: 1, minor: 1}},
		{"v0.8 float16", m23(false, Float16, 2), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, minor: 8}},
		{"v1 bfloat16", m23(true, BFloat16, 2), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, major: 1, minor: 1}},
		{"int64 parses", m23(true, DType{0, 64, 1}, 8), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, major: 1, minor: 1}},
		{"v1 minor 7 accepted", with(m23(true, Float32, 4), func(f *Fixture) { f.Minor = 7 }), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, major: 1, minor: 7}},
		{"read-only flag", with(m23(true, Float32, 4), func(f *Fixture) { f.Flags = 1 | 2 }), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, ro: true, major: 1, minor: 1}},
		{"flags ignored for v0.8", with(m23(false, Float32, 4), func(f *Fixture) { f.Flags = 1 }), want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, minor: 8}},
		{"NULL strides filled row-major", with(m23(true, Float32, 4), func(f *Fixture) {
			f.NDim, f.Shape, f.Strides, f.Data = 3, []int64{2, 3, 4}, nil, make([]byte, 96)
		}), want{shape: []int64{2, 3, 4}, strides: []int64{12, 4, 1}, extent: 24, major: 1, minor: 1}},
		{"NULL strides with a zero dim", with(m23(true, Float32, 4), func(f *Fixture) {
			f.NDim, f.Shape, f.Strides, f.Data = 3, []int64{2, 0, 4}, nil, nil
		}), want{shape: []int64{2, 0, 4}, strides: []int64{4, 4, 1}, extent: 0, major: 1, minor: 1}},
		{"column-major", with(m23(true, Float32, 4), func(f *Fixture) { f.Strides = []int64{1, 2} }),
			want{shape: []int64{2, 3}, strides: []int64{1, 2}, extent: 6, major: 1, minor: 1}},
		{"row stride > cols", with(m23(true, Float32, 4), func(f *Fixture) { f.Strides, f.Data = []int64{5, 1}, make([]byte, 32) }),
			want{shape: []int64{2, 3}, strides: []int64{5, 1}, extent: 8, major: 1, minor: 1}},
		{"zero-size NULL data", with(m23(true, Float32, 4), func(f *Fixture) { f.Shape, f.Data = []int64{0, 3}, nil }),
			want{shape: []int64{0, 3}, strides: []int64{3, 1}, extent: 0, major: 1, minor: 1}},
		{"zero-size misaligned", with(m23(true, Float32, 4), func(f *Fixture) { f.Shape, f.ByteOffset = []int64{2, 0}, 1 }),
			want{shape: []int64{2, 0}, strides: []int64{3, 1}, extent: 0, major: 1, minor: 1}},
		{"scalar ndim 0, NULL shape", Fixture{Versioned: true, Major: 1, Device: cpu, DType: Float32, Data: f32bytes(7)},
			want{shape: []int64{}, strides: []int64{}, extent: 1, major: 1}},
		{"zero stride (broadcast) parses", with(m23(true, Float32, 4), func(f *Fixture) { f.Strides = []int64{0, 1} }),
			want{shape: []int64{2, 3}, strides: []int64{0, 1}, extent: 3, major: 1, minor: 1}},
		{"negative stride on size-1 dim", with(m23(true, Float32, 4), func(f *Fixture) { f.Shape, f.Strides = []int64{1, 3}, []int64{-7, 1} }),
			want{shape: []int64{1, 3}, strides: []int64{-7, 1}, extent: 3, major: 1, minor: 1}},
		{"byte_offset aligned", with(m23(true, Float32, 4), func(f *Fixture) { f.ByteOffset, f.Data = 8, make([]byte, 32) }),
			want{shape: []int64{2, 3}, strides: []int64{3, 1}, extent: 6, major: 1, minor: 1}},

		// Rejections.
		{"version 2", with(m23(true, Float32, 4), func(f *Fixture) { f.Major = 2 }), want{err: ErrVersion}},
		{"version 0 versioned", with(m23(true, Float32, 4), func(f *Fixture) { f.Major = 0 }), want{err: ErrVersion}},
		{"cuda", with(m23(true, Float32, 4), func(f *Fixture) { f.Device = Device{DeviceCUDA, 0} }), want{err: ErrDevice}},
		{"cuda v0.8", with(m23(false, Float32, 4), func(f *Fixture) { f.Device = Device{DeviceCUDA, 1} }), want{err: ErrDevice}},
		{"lanes 2", with(m23(true, DType{2, 32, 2}, 8), func(*Fixture) {}), want{err: ErrDType}},
		{"lanes 0", with(m23(true, DType{2, 32, 0}, 4), func(*Fixture) {}), want{err: ErrDType}},
		{"4-bit dtype", with(m23(true, DType{17, 4, 1}, 1), func(*Fixture) {}), want{err: ErrDType}},
		{"24-bit dtype", with(m23(true, DType{0, 24, 1}, 3), func(*Fixture) {}), want{err: ErrDType}},
		{"ndim 9", with(m23(true, Float32, 4), func(f *Fixture) { f.NDim = 9 }), want{err: ErrShape}},
		{"ndim -1", with(m23(true, Float32, 4), func(f *Fixture) { f.NDim = -1 }), want{err: ErrShape}},
		{"ndim 1<<30 with short shape", with(m23(true, Float32, 4), func(f *Fixture) { f.NDim = 1 << 30 }), want{err: ErrShape}},
		{"NULL shape", with(m23(true, Float32, 4), func(f *Fixture) { f.Shape = nil }), want{err: ErrNull}},
		{"negative dim", with(m23(true, Float32, 4), func(f *Fixture) { f.Shape = []int64{2, -3} }), want{err: ErrShape}},
		{"negative dim with zero dim", with(m23(true, Float32, 4), func(f *Fixture) { f.Shape = []int64{0, -3} }), want{err: ErrShape}},
		{"overflowing dims", with(m23(true, Float32, 4), func(f *Fixture) { f.Shape, f.Strides = []int64{1 << 40, 1 << 40}, nil }), want{err: ErrShape}},
		{"huge dim", with(m23(true, Float32, 4), func(f *Fixture) { f.Shape = []int64{math.MaxInt64, 3} }), want{err: ErrShape}},
		{"huge dims with a zero dim", with(m23(true, Float32, 4), func(f *Fixture) {
			f.NDim, f.Shape, f.Strides = 3, []int64{0, 1 << 30, 1 << 30}, nil
		}), want{err: ErrShape}},
		{"overflowing stride", with(m23(true, Float32, 4), func(f *Fixture) { f.Strides = []int64{math.MaxInt64, 1} }), want{err: ErrShape}},
		{"extent just over MaxBytes", with(m23(true, Float32, 4), func(f *Fixture) { f.Strides = []int64{MaxBytes / 4, 1} }), want{err: ErrShape}},
		{"negative stride", with(m23(true, Float32, 4), func(f *Fixture) { f.Strides = []int64{3, -1} }), want{err: ErrLayout}},
		{"NULL data with elements", with(m23(true, Float32, 4), func(f *Fixture) { f.Data = nil }), want{err: ErrNull}},
		{"misaligned byte_offset", with(m23(true, Float32, 4), func(f *Fixture) { f.ByteOffset, f.Data = 2, make([]byte, 32) }), want{err: ErrAlign}},
		{"misaligned float64 offset 4", with(m23(false, Float64, 8), func(f *Fixture) { f.ByteOffset, f.Data = 4, make([]byte, 64) }), want{err: ErrAlign}},
		{"misaligned fake data", with(m23(true, Float16, 2), func(f *Fixture) { f.Data, f.FakeData = nil, 0x1001 }), want{err: ErrAlign}},
		{"byte_offset wraps", with(m23(true, Float32, 4), func(f *Fixture) { f.ByteOffset = math.MaxUint64 - 3 }), want{err: ErrShape}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tn, err := parseFixture(t, c.f)
			if c.want.err != nil {
				if !errors.Is(err, c.want.err) {
					t.Fatalf("err = %v, want %v", err, c.want.err)
				}
				if !strings.HasPrefix(err.Error(), "dlpack: ") {
					t.Errorf("message %q lacks the dlpack: prefix", err)
				}
				if tn != nil {
					t.Errorf("tensor %+v returned with an error", tn)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !slices.Equal(tn.Shape, c.want.shape) || !slices.Equal(tn.Strides, c.want.strides) {
				t.Errorf("shape %v strides %v, want %v %v", tn.Shape, tn.Strides, c.want.shape, c.want.strides)
			}
			if tn.Extent() != c.want.extent {
				t.Errorf("extent %d, want %d", tn.Extent(), c.want.extent)
			}
			if tn.ReadOnly != c.want.ro {
				t.Errorf("ReadOnly %v, want %v", tn.ReadOnly, c.want.ro)
			}
			if tn.Major != c.want.major || tn.Minor != c.want.minor {
				t.Errorf("version %d.%d, want %d.%d", tn.Major, tn.Minor, c.want.major, c.want.minor)
			}
			if tn.Device != cpu || tn.DType != c.f.DType {
				t.Errorf("device %v dtype %v, want %v %v", tn.Device, tn.DType, cpu, c.f.DType)
			}
			if err := tn.Writable(); (err != nil) != c.want.ro || (err != nil && !errors.Is(err, ErrReadOnly)) {
				t.Errorf("Writable() = %v with ReadOnly %v", err, c.want.ro)
			}
		})
	}
}

// TestParseDevices: only kDLCPU (1) is read. Every other device type is
// refused with ErrDevice and a message that names it, among them those
// whose memory a CPU pointer can reach (CUDA host 3, ROCm host 11, CUDA
// managed 13: the producer's device may still be writing it), the
// unassigned codes 5 and 6, and types dlpack.h does not have.
func TestParseDevices(t *testing.T) {
	for _, c := range []struct {
		dev  Device
		name string // in the message
	}{
		{Device{2, 0}, "cuda:0"},
		{Device{3, 0}, "cuda_host:0"},
		{Device{4, 1}, "opencl:1"},
		{Device{5, 0}, "device(type=5,id=0)"},
		{Device{6, 0}, "device(type=6,id=0)"},
		{Device{7, 0}, "vulkan:0"},
		{Device{8, 0}, "metal:0"},
		{Device{9, 0}, "vpi:0"},
		{Device{10, 1}, "rocm:1"},
		{Device{11, 0}, "rocm_host:0"},
		{Device{12, 0}, "ext_dev:0"},
		{Device{13, 0}, "cuda_managed:0"},
		{Device{14, 0}, "oneapi:0"},
		{Device{15, 0}, "webgpu:0"},
		{Device{16, 0}, "hexagon:0"},
		{Device{17, 0}, "maia:0"},
		{Device{18, 0}, "device(type=18,id=0)"},
		{Device{0, 0}, "device(type=0,id=0)"},
		{Device{-1, 0}, "device(type=-1,id=0)"},
		{Device{1 << 30, 0}, "device(type=1073741824,id=0)"},
		{Device{math.MinInt32, 0}, "device(type=-2147483648,id=0)"},
		{Device{1 + 1<<8, 0}, "device(type=257,id=0)"}, // CPU in the low byte only
	} {
		for _, versioned := range []bool{true, false} {
			tn, err := parseFixture(t, Fixture{Versioned: versioned, Major: 1, Device: c.dev, NDim: 2, DType: Float32,
				Shape: []int64{2, 3}, Data: make([]byte, 24)})
			if !errors.Is(err, ErrDevice) || tn != nil || !strings.Contains(err.Error(), "tensor is on "+c.name+",") ||
				!strings.Contains(err.Error(), ".cpu()") {
				t.Errorf("device %v, versioned %v: Parse = %v, %v; want ErrDevice naming %s", c.dev, versioned, tn, err, c.name)
			}
		}
	}
	for _, id := range []int32{0, 3, -1} {
		if _, err := parseFixture(t, Fixture{Versioned: true, Major: 1, Device: Device{DeviceCPU, id}, NDim: 1, DType: Float32,
			Shape: []int64{2}, Data: make([]byte, 8)}); err != nil {
			t.Errorf("cpu device id %d: %v", id, err)
		}
	}
}

func TestParseAddrZero(t *testing.T) {
	for _, v := range []bool{false, true} {
		if _, err := Parse(0, v); !errors.Is(err, ErrNull) {
			t.Errorf("Parse(0, %v) = %v, want ErrNull", v, err)
		}
	}
}

// TestParseVersionReadsOnlyVersion points Parse at an 8-byte C buffer that
// holds only a DLPackVersion {2, 0}. Parse must stop after the version;
// under `go test -asan` any further read is reported.
func TestParseVersionReadsOnlyVersion(t *testing.T) {
	addr, free := NewFixture(Fixture{Data: []byte{2, 0, 0, 0, 5, 0, 0, 0}})
	defer free()
	tn, err := Parse(FixtureData(addr), true)
	if !errors.Is(err, ErrVersion) || tn != nil {
		t.Fatalf("Parse = %v, %v; want ErrVersion", tn, err)
	}
	if !strings.Contains(err.Error(), "2.5") {
		t.Errorf("message %q does not name version 2.5", err)
	}
}

func TestErrorMessages(t *testing.T) {
	_, err := parseFixture(t, Fixture{Versioned: true, Major: 1, Device: Device{DeviceCUDA, 0}, DType: Float32})
	if err == nil || !strings.Contains(err.Error(), "cuda:0") || !strings.Contains(err.Error(), ".cpu()") {
		t.Errorf("device error %q should name cuda:0 and .cpu()", err)
	}
	tn, err := parseFixture(t, Fixture{Versioned: true, Major: 1, Device: cpu, DType: Float32, NDim: 2,
		Shape: []int64{3, 4}, Strides: []int64{1, 2}, Data: make([]byte, 64)})
	if err != nil {
		t.Fatal(err)
	}
	_, _, _, _, err = tn.Matrix()
	if !errors.Is(err, ErrLayout) || !strings.Contains(err.Error(), "[3 4]") || !strings.Contains(err.Error(), "[1 2]") || !strings.Contains(err.Error(), ".contiguous()") {
		t.Errorf("layout error %q should name shape, strides and .contiguous()", err)
	}
}

// TestLayoutAgainstC decodes the fixture's raw bytes at the offsets of
// docs/toolchain.md and compares them field by field with Parse.
func TestLayoutAgainstC(t *testing.T) {
	ne := binary.NativeEndian
	for _, versioned := range []bool{false, true} {
		f := Fixture{Versioned: versioned, Major: 1, Minor: 3, Flags: 1, Device: Device{DeviceCPU, 5},
			NDim: 3, DType: Float64, Shape: []int64{2, 1, 3}, Strides: []int64{3, 9, 1},
			ByteOffset: 16, Data: make([]byte, 16+6*8)}
		addr, free := NewFixture(f)
		tn, err := Parse(addr, versioned)
		if err != nil {
			free()
			t.Fatal(err)
		}
		var raw []byte
		base := 0
		if versioned {
			raw = FixtureBytes(addr, 32+48)
			base = 32
			if ne.Uint32(raw[0:]) != tn.Major || ne.Uint32(raw[4:]) != tn.Minor {
				t.Errorf("version bytes %d.%d, Parse %d.%d", ne.Uint32(raw[0:]), ne.Uint32(raw[4:]), tn.Major, tn.Minor)
			}
			if uintptr(ne.Uint64(raw[8:])) != addr || ne.Uint64(raw[16:]) == 0 {
				t.Errorf("manager_ctx/deleter at 8/16 wrong")
			}
			if (ne.Uint64(raw[24:])&1 != 0) != tn.ReadOnly {
				t.Errorf("flags at 24 = %#x, ReadOnly %v", ne.Uint64(raw[24:]), tn.ReadOnly)
			}
		} else {
			raw = FixtureBytes(addr, 64)
			if uintptr(ne.Uint64(raw[48:])) != addr || ne.Uint64(raw[56:]) == 0 {
				t.Errorf("manager_ctx/deleter at 48/56 wrong")
			}
		}
		d := raw[base:]
		if uintptr(ne.Uint64(d[0:])) != FixtureData(addr) {
			t.Errorf("data at 0 = %#x, fixture data %#x", ne.Uint64(d[0:]), FixtureData(addr))
		}
		if got := (Device{int32(ne.Uint32(d[8:])), int32(ne.Uint32(d[12:]))}); got != tn.Device {
			t.Errorf("device bytes %v, Parse %v", got, tn.Device)
		}
		if int(ne.Uint32(d[16:])) != len(tn.Shape) {
			t.Errorf("ndim bytes %d, Parse %d", ne.Uint32(d[16:]), len(tn.Shape))
		}
		if got := (DType{d[20], d[21], ne.Uint16(d[22:])}); got != tn.DType {
			t.Errorf("dtype bytes %v, Parse %v", got, tn.DType)
		}
		readI64 := func(p uint64) []int64 {
			b := FixtureBytes(uintptr(p), 8*len(tn.Shape))
			v := make([]int64, len(tn.Shape))
			for i := range v {
				v[i] = int64(ne.Uint64(b[8*i:]))
			}
			return v
		}
		if got := readI64(ne.Uint64(d[24:])); !slices.Equal(got, tn.Shape) {
			t.Errorf("shape bytes %v, Parse %v", got, tn.Shape)
		}
		if got := readI64(ne.Uint64(d[32:])); !slices.Equal(got, tn.Strides) {
			t.Errorf("strides bytes %v, Parse %v", got, tn.Strides)
		}
		if ne.Uint64(d[40:]) != f.ByteOffset {
			t.Errorf("byte_offset bytes %d, want %d", ne.Uint64(d[40:]), f.ByteOffset)
		}
		if FixtureDeleterCalls(addr) != 0 {
			t.Errorf("deleter called by Parse")
		}
		FixtureCallDeleter(addr)
		if FixtureDeleterCalls(addr) != 1 {
			t.Errorf("deleter trampoline did not run")
		}
		free()
	}
}

func TestMatrix(t *testing.T) {
	cases := []struct {
		name           string
		shape, strides []int64
		rows, cols     int
		stride         int
		trans          bool
		err            error
	}{
		{"row-major", []int64{2, 3}, []int64{3, 1}, 2, 3, 3, false, nil},
		{"row stride > cols", []int64{2, 3}, []int64{5, 1}, 2, 3, 5, false, nil},
		{"column-major", []int64{2, 3}, []int64{1, 2}, 2, 3, 2, true, nil},
		{"column stride > rows", []int64{2, 3}, []int64{1, 4}, 2, 3, 4, true, nil},
		{"1x1 any strides", []int64{1, 1}, []int64{99, 42}, 1, 1, 1, false, nil},
		{"single row", []int64{1, 4}, []int64{0, 1}, 1, 4, 4, false, nil},
		{"single column", []int64{4, 1}, []int64{1, 0}, 4, 1, 1, false, nil},
		{"single column col-major", []int64{4, 1}, []int64{1, 7}, 4, 1, 1, false, nil},
		{"single column strided", []int64{4, 1}, []int64{2, 1}, 4, 1, 2, false, nil},
		{"single row strided", []int64{1, 4}, []int64{1, 2}, 1, 4, 2, true, nil},
		{"empty", []int64{0, 4}, []int64{4, 1}, 0, 4, 4, false, nil},
		{"overlapping rows", []int64{3, 4}, []int64{2, 1}, 0, 0, 0, false, ErrLayout},
		{"non-contiguous both", []int64{3, 4}, []int64{8, 2}, 0, 0, 0, false, ErrLayout},
		{"broadcast", []int64{3, 4}, []int64{0, 1}, 0, 0, 0, false, ErrLayout},
		{"transposed slice", []int64{3, 4}, []int64{1, 2}, 0, 0, 0, false, ErrLayout},
		{"ndim 1", []int64{6}, []int64{1}, 0, 0, 0, false, ErrShape},
		{"ndim 3", []int64{1, 2, 3}, []int64{6, 3, 1}, 0, 0, 0, false, ErrShape},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tn, err := parseFixture(t, Fixture{Versioned: true, Major: 1, Device: cpu, NDim: int32(len(c.shape)),
				DType: Float32, Shape: c.shape, Strides: c.strides, Data: make([]byte, 4*64)})
			if err != nil {
				t.Fatal(err)
			}
			r, cl, s, tr, err := tn.Matrix()
			if c.err != nil {
				if !errors.Is(err, c.err) {
					t.Fatalf("err = %v, want %v", err, c.err)
				}
				return
			}
			if err != nil || r != c.rows || cl != c.cols || s != c.stride || tr != c.trans {
				t.Fatalf("Matrix() = %d,%d,%d,%v,%v; want %d,%d,%d,%v", r, cl, s, tr, err, c.rows, c.cols, c.stride, c.trans)
			}
		})
	}
}

func TestVector(t *testing.T) {
	cases := []struct {
		shape, strides []int64
		n              int
		err            error
	}{
		{[]int64{5}, []int64{1}, 5, nil},
		{[]int64{5}, nil, 5, nil},
		{[]int64{1}, []int64{3}, 1, nil},
		{[]int64{0}, []int64{0}, 0, nil},
		{[]int64{5}, []int64{2}, 0, ErrLayout},
		{[]int64{5}, []int64{0}, 0, ErrLayout},
		{[]int64{1, 5}, []int64{5, 1}, 0, ErrShape},
		{[]int64{}, []int64{}, 0, ErrShape},
	}
	for _, c := range cases {
		tn, err := parseFixture(t, Fixture{Versioned: false, Device: cpu, NDim: int32(len(c.shape)),
			DType: Float32, Shape: c.shape, Strides: c.strides, Data: make([]byte, 64)})
		if err != nil {
			t.Fatal(err)
		}
		n, err := tn.Vector()
		if !errors.Is(err, c.err) || (c.err == nil && (err != nil || n != c.n)) {
			t.Errorf("shape %v strides %v: Vector() = %d, %v; want %d, %v", c.shape, c.strides, n, err, c.n, c.err)
		}
	}
}

func TestViews(t *testing.T) {
	t.Run("float32 row-major with byte_offset", func(t *testing.T) {
		vals := seq32(7) // element 0 is skipped by byte_offset
		tn, err := parseFixture(t, Fixture{Versioned: true, Major: 1, Device: cpu, NDim: 2, DType: Float32,
			Shape: []int64{2, 3}, Strides: []int64{3, 1}, ByteOffset: 4, Data: f32bytes(vals...)})
		if err != nil {
			t.Fatal(err)
		}
		x, err := tn.Float32s()
		if err != nil || !slices.Equal(x, vals[1:]) {
			t.Fatalf("Float32s() = %v, %v; want %v", x, err, vals[1:])
		}
		if _, err := tn.Float64s(); !errors.Is(err, ErrDType) {
			t.Errorf("Float64s on float32: %v", err)
		}
		if _, err := tn.Halfs(); !errors.Is(err, ErrDType) {
			t.Errorf("Halfs on float32: %v", err)
		}
	})
	t.Run("float32 column-major and padded rows", func(t *testing.T) {
		vals := seq32(8)
		for _, c := range []struct {
			strides []int64
			at      func(i, j int) int
		}{
			{[]int64{1, 2}, func(i, j int) int { return j*2 + i }},
			{[]int64{5, 1}, func(i, j int) int { return i*5 + j }},
		} {
			tn, err := parseFixture(t, Fixture{Versioned: false, Device: cpu, NDim: 2, DType: Float32,
				Shape: []int64{2, 3}, Strides: c.strides, Data: f32bytes(vals...)})
			if err != nil {
				t.Fatal(err)
			}
			rows, cols, stride, trans, err := tn.Matrix()
			if err != nil {
				t.Fatal(err)
			}
			x, _ := tn.Float32s()
			for i := range rows {
				for j := range cols {
					k := i*stride + j
					if trans {
						k = j*stride + i
					}
					if x[k] != vals[c.at(i, j)] {
						t.Errorf("strides %v: (%d,%d) = %v, want %v", c.strides, i, j, x[k], vals[c.at(i, j)])
					}
				}
			}
		}
	})
	t.Run("float64", func(t *testing.T) {
		tn, err := parseFixture(t, Fixture{Versioned: true, Major: 1, Device: cpu, NDim: 1, DType: Float64,
			Shape: []int64{3}, Data: f64bytes(1.25, -2, math.Pi)})
		if err != nil {
			t.Fatal(err)
		}
		x, err := tn.Float64s()
		if err != nil || !slices.Equal(x, []float64{1.25, -2, math.Pi}) {
			t.Fatalf("Float64s() = %v, %v", x, err)
		}
		if _, err := tn.Float32s(); !errors.Is(err, ErrDType) {
			t.Errorf("Float32s on float64: %v", err)
		}
	})
	for _, dt := range []DType{Float16, BFloat16} {
		t.Run(dt.String(), func(t *testing.T) {
			raw := []uint16{0x3c00, 0xc000, 0x7bff, 0x3f80}
			tn, err := parseFixture(t, Fixture{Versioned: false, Device: cpu, NDim: 2, DType: dt,
				Shape: []int64{2, 2}, Data: u16bytes(raw...)})
			if err != nil {
				t.Fatal(err)
			}
			x, err := tn.Halfs()
			if err != nil || !slices.Equal(x, raw) {
				t.Fatalf("Halfs() = %v, %v", x, err)
			}
		})
	}
	t.Run("int64 rejected by every view", func(t *testing.T) {
		tn, err := parseFixture(t, Fixture{Versioned: false, Device: cpu, NDim: 1, DType: DType{0, 64, 1},
			Shape: []int64{1}, Data: make([]byte, 8)})
		if err != nil {
			t.Fatal(err)
		}
		_, e1 := tn.Float32s()
		_, e2 := tn.Float64s()
		_, e3 := tn.Halfs()
		for _, e := range []error{e1, e2, e3} {
			if !errors.Is(e, ErrDType) || !strings.Contains(e.Error(), "int64") {
				t.Errorf("view on int64: %v", e)
			}
		}
	})
	t.Run("empty", func(t *testing.T) {
		tn, err := parseFixture(t, Fixture{Versioned: true, Major: 1, Device: cpu, NDim: 2, DType: Float32, Shape: []int64{3, 0}})
		if err != nil {
			t.Fatal(err)
		}
		if x, err := tn.Float32s(); x != nil || err != nil {
			t.Errorf("Float32s() on empty = %v, %v", x, err)
		}
	})
	t.Run("writes reach C memory", func(t *testing.T) {
		addr, free := NewFixture(Fixture{Versioned: true, Major: 1, Device: cpu, NDim: 1, DType: Float32,
			Shape: []int64{2}, Data: f32bytes(0, 0)})
		defer free()
		tn, err := Parse(addr, true)
		if err != nil {
			t.Fatal(err)
		}
		if err := tn.Writable(); err != nil {
			t.Fatal(err)
		}
		x, _ := tn.Float32s()
		x[0], x[1] = 3, 4
		if got := FixtureBytes(FixtureData(addr), 8); !slices.Equal(got, f32bytes(3, 4)) {
			t.Errorf("C memory = %v", got)
		}
	})
}

func TestStrings(t *testing.T) {
	for _, c := range []struct {
		got, want string
	}{
		{Float32.String(), "float32"},
		{Float64.String(), "float64"},
		{Float16.String(), "float16"},
		{BFloat16.String(), "bfloat16"},
		{DType{0, 64, 1}.String(), "int64"},
		{DType{1, 8, 1}.String(), "uint8"},
		{DType{5, 64, 1}.String(), "complex64"},
		{DType{6, 8, 1}.String(), "bool"},
		{DType{2, 32, 4}.String(), "dtype(code=2,bits=32,lanes=4)"},
		{DType{99, 8, 1}.String(), "dtype(code=99,bits=8,lanes=1)"},
		{Device{1, 0}.String(), "cpu"},
		{Device{1, 2}.String(), "cpu:2"},
		{Device{2, 0}.String(), "cuda:0"},
		{Device{10, 1}.String(), "rocm:1"},
		{Device{5, 3}.String(), "device(type=5,id=3)"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}
