package loraone_test

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/peft-loraone/peft-loraone/loraone"
)

// A 3×2 gradient of rank 2; LoRA-One at rank 1 keeps its top direction.
func ExampleLoRAOne() {
	g := loraone.Matrix{Rows: 3, Cols: 2, Stride: 2, DType: loraone.Float32,
		F32: []float32{
			-4, 0,
			0, -1,
			0, 0,
		}}
	b := loraone.Dense{Rows: 3, Cols: 1, Stride: 1, F64: make([]float64, 3)} // lora_B, m×r
	a := loraone.Dense{Rows: 1, Cols: 2, Stride: 2, F64: make([]float64, 2)} // lora_A, r×n
	res, err := loraone.LoRAOne(b, a, g, 2, loraone.DefaultOptions(1))
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("sigma1 = %.4f\n", res.Sigma1)
	// B·A = [−G]_1 / (gamma·sigma1) = [[4 0] [0 0] [0 0]] / 8
	round := func(x float64) float64 { return math.Round(x*1e4)/1e4 + 0 } // +0 turns −0 into 0
	for i := 0; i < 3; i++ {
		fmt.Printf("% .4f % .4f\n", round(b.F64[i]*a.F64[0]), round(b.F64[i]*a.F64[1]))
	}
	// Output:
	// sigma1 = 4.0000
	//  0.5000  0.0000
	//  0.0000  0.0000
	//  0.0000  0.0000
}

// RandSVD reads a column-major (transposed) view in place.
func ExampleRandSVD() {
	// Logical G = diag(3, 2, 1) padded to 3×4, stored column by column.
	g := loraone.Matrix{Rows: 3, Cols: 4, Stride: 3, Trans: true, DType: loraone.Float64,
		F64: []float64{
			3, 0, 0, // column 0
			0, 2, 0, // column 1
			0, 0, 1, // column 2
			0, 0, 0, // column 3
		}}
	svd, err := loraone.RandSVD(g, loraone.DefaultOptions(2))
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("S = [%.4f %.4f], converged = %v\n", svd.S[0], svd.S[1], svd.Converged)
	// Output:
	// S = [3.0000 2.0000], converged = true
}

// Errors are wrapped sentinels: test the kind with errors.Is.
func ExampleErrZero() {
	g := loraone.Matrix{Rows: 2, Cols: 2, Stride: 2, DType: loraone.BFloat16, Half: make([]uint16, 4)}
	_, err := loraone.RandSVD(g, loraone.DefaultOptions(1))
	fmt.Println(errors.Is(err, loraone.ErrZero))
	fmt.Println(err)
	// Output:
	// true
	// loraone: all-zero input (2×2): loraone: zero matrix
}

// A done Options.Context stops a call before its next pass over G (here,
// before the first), and nothing is written to the outputs.
func ExampleErrCancelled() {
	g := loraone.Matrix{Rows: 3, Cols: 2, Stride: 2, DType: loraone.Float64, F64: []float64{-4, 0, 0, -1, 0, 0}}
	b := loraone.Dense{Rows: 3, Cols: 1, Stride: 1, F64: make([]float64, 3)}
	a := loraone.Dense{Rows: 1, Cols: 2, Stride: 2, F64: make([]float64, 2)}
	ctx, cancel := context.WithCancel(context.Background())
	opt := loraone.DefaultOptions(1)
	opt.Context = ctx
	cancel() // as another goroutine would on Ctrl-C
	_, err := loraone.LoRAOne(b, a, g, 2, opt)
	fmt.Println(errors.Is(err, loraone.ErrCancelled), errors.Is(err, context.Canceled), b.F64, a.F64)
	fmt.Println(err)
	// Output:
	// true true [0 0 0] [0 0]
	// loraone: stopped after 0 passes over G: loraone: cancelled (context canceled)
}

func ExampleDType_String() {
	fmt.Println(loraone.Float16, loraone.BFloat16)
	// Output: float16 bfloat16
}

// PiSSA splits the principal part of a weight off into the adapter.
func ExamplePiSSA() {
	w := loraone.Matrix{Rows: 2, Cols: 2, Stride: 2, DType: loraone.Float64, F64: []float64{2, 0, 0, 0.5}}
	b := loraone.Dense{Rows: 2, Cols: 1, Stride: 1, F64: make([]float64, 2)}
	a := loraone.Dense{Rows: 1, Cols: 2, Stride: 2, F64: make([]float64, 2)}
	const s = 2.0 // scaling
	if _, err := loraone.PiSSA(b, a, w, s, loraone.DefaultOptions(1)); err != nil {
		fmt.Println(err)
		return
	}
	// s·B·A = [W]_1; the caller then sets W0 ← W0 − s·B·A.
	fmt.Printf("%.4f\n", s*b.F64[0]*a.F64[0])
	// Output: 2.0000
}

// A transposed torch view: G (2×3) whose storage is column-major with
// padding (Stride 4 >= Rows 2). Validate checks every index first.
func ExampleMatrix_Validate() {
	storage := []float32{
		1, 4, 0, 0, // column 0 of G, padded
		2, 5, 0, 0, // column 1
		3, 6, // column 2 (the last stored row needs no padding)
	}
	g := loraone.Matrix{Rows: 2, Cols: 3, Stride: 4, Trans: true, DType: loraone.Float32, F32: storage}
	fmt.Println(g.Validate())
	g.Stride = 1 // shorter than a stored row
	err := g.Validate()
	fmt.Println(errors.Is(err, loraone.ErrShape))
	fmt.Println(err)
	// Output:
	// <nil>
	// true
	// loraone: matrix: column-major stride 1 < rows 2: loraone: bad shape
}
