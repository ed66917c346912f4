package dlpack_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/peft-loraone/peft-loraone/dlpack"
)

func ExampleParse() {
	// A 2×3 float32 matrix, stored column-major, as a v1 capsule would hand
	// it over. In production the address comes from PyCapsule_GetPointer.
	data := make([]byte, 4*6)
	for i := range 6 {
		binary.NativeEndian.PutUint32(data[4*i:], math.Float32bits(float32(i)))
	}
	addr, free := dlpack.NewFixture(dlpack.Fixture{
		Versioned: true, Major: 1, Minor: 1,
		Device: dlpack.Device{Type: dlpack.DeviceCPU},
		NDim:   2, DType: dlpack.Float32,
		Shape: []int64{2, 3}, Strides: []int64{1, 2},
		Data: data,
	})
	defer free()

	t, err := dlpack.Parse(addr, true)
	if err != nil {
		fmt.Println(err)
		return
	}
	rows, cols, stride, trans, err := t.Matrix()
	if err != nil {
		fmt.Println(err)
		return
	}
	x, _ := t.Float32s() // valid only while Python holds the capsule
	fmt.Println(t.Device, t.DType, t.Shape, t.Strides)
	fmt.Println(rows, cols, stride, trans)
	fmt.Println("a[1][2] =", x[2*stride+1])
	// Output:
	// cpu float32 [2 3] [1 2]
	// 2 3 2 true
	// a[1][2] = 5
}

func ExampleParse_errors() {
	addr, free := dlpack.NewFixture(dlpack.Fixture{
		Versioned: true, Major: 1,
		Device: dlpack.Device{Type: dlpack.DeviceCUDA, ID: 0},
		NDim:   1, DType: dlpack.BFloat16, Shape: []int64{4},
	})
	defer free()

	_, err := dlpack.Parse(addr, true)
	fmt.Println(errors.Is(err, dlpack.ErrDevice))
	fmt.Println(err)
	// Output:
	// true
	// dlpack: tensor is on cuda:0, the engine reads CPU memory only; move it with .cpu(): dlpack: unsupported device
}
