package dlpack

import "fmt"

// DType is a DLPack DLDataType: a type code, the number of bits of one lane
// and the number of lanes.
//
// Codes (dlpack.h): 0 int, 1 uint, 2 float, 3 opaque handle, 4 bfloat,
// 5 complex, 6 bool; later codes are the float8/6/4 formats.
type DType struct {
	Code  uint8
	Bits  uint8
	Lanes uint16
}

// The floating-point element types the engine reads.
var (
	Float32  = DType{Code: 2, Bits: 32, Lanes: 1}
	Float64  = DType{Code: 2, Bits: 64, Lanes: 1}
	Float16  = DType{Code: 2, Bits: 16, Lanes: 1}
	BFloat16 = DType{Code: 4, Bits: 16, Lanes: 1}
)

// String returns the numpy/torch style name ("float32", "bfloat16",
// "int64", "uint8", "complex64", "bool"), or
// "dtype(code=C,bits=B,lanes=L)" for anything else.
func (d DType) String() string {
	if d.Lanes == 1 {
		var base string
		switch d.Code {
		case 0:
			base = "int"
		case 1:
			base = "uint"
		case 2:
			base = "float"
		case 4:
			base = "bfloat"
		case 5:
			base = "complex"
		case 6:
			if d.Bits == 8 {
				return "bool"
			}
		}
		if base != "" && d.Bits != 0 {
			return fmt.Sprintf("%s%d", base, d.Bits)
		}
	}
	return fmt.Sprintf("dtype(code=%d,bits=%d,lanes=%d)", d.Code, d.Bits, d.Lanes)
}

// Device is a DLPack DLDevice: a device type and an ordinal.
type Device struct {
	Type int32
	ID   int32
}

// Device types from dlpack.h that this package names.
const (
	DeviceCPU  int32 = 1
	DeviceCUDA int32 = 2
)

var deviceNames = map[int32]string{
	1:  "cpu",
	2:  "cuda",
	3:  "cuda_host",
	4:  "opencl",
	7:  "vulkan",
	8:  "metal",
	9:  "vpi",
	10: "rocm",
	11: "rocm_host",
	12: "ext_dev",
	13: "cuda_managed",
	14: "oneapi",
	15: "webgpu",
	16: "hexagon",
	17: "maia",
}

// String returns a torch-style name: "cpu" (or "cpu:N" for a non-zero
// ordinal), "cuda:0", "rocm:1", ..., or "device(type=T,id=I)" for an
// unknown type.
func (d Device) String() string {
	name, ok := deviceNames[d.Type]
	if !ok {
		return fmt.Sprintf("device(type=%d,id=%d)", d.Type, d.ID)
	}
	if d.Type == DeviceCPU && d.ID == 0 {
		return name
	}
	return fmt.Sprintf("%s:%d", name, d.ID)
}
