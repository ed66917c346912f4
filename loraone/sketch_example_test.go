package loraone_test

import (
	"fmt"
	"math"

	"github.com/peft-loraone/peft-loraone/loraone"
)

// mul returns the row-major product a·b of an r×q and a q×c matrix.
func mul(a, b []float64, r, q, c int) []float64 {
	out := make([]float64, r*c)
	for i := 0; i < r; i++ {
		for j := 0; j < c; j++ {
			for p := 0; p < q; p++ {
				out[i*c+j] += a[i*q+p] * b[p*c+j]
			}
		}
	}
	return out
}

// A 4×3 gradient of rank 1 is never formed by the caller: only its
// single-pass sketches (k = 2, l = 5, t = 2 test vectors) reach the
// engine, which recovers LoRA-One's init exactly.
func ExampleLoRAOneSketch() {
	g := []float64{ // G = (1, 2, 0, 2)ᵀ·(2, 0, 1), σ₁ = 3·√5; here only to make the sketches
		2, 0, 1,
		4, 0, 2,
		0, 0, 0,
		4, 0, 2,
	}
	omega := []float64{1, 0, 0, 1, 1, 1}   // Ω, 3×2
	omegaT := []float64{1, -1, 0, 2, 2, 1} // Ω_t, 3×2
	// Ψ, 5×4
	psi := []float64{
		1, 0, 2, -1,
		0, 1, -1, 3,
		2, 1, 0, 1,
		-1, 2, 1, 0,
		1, -2, 1, 1,
	}
	view := func(rows, cols int, v []float64) loraone.Matrix {
		return loraone.Matrix{Rows: rows, Cols: cols, Stride: cols, DType: loraone.Float64, F64: v}
	}
	sk := loraone.Sketch{
		Y:      view(4, 2, mul(g, omega, 4, 3, 2)), // G·Ω
		W:      view(5, 3, mul(psi, g, 5, 4, 3)),   // Ψ·G
		Psi:    view(5, 4, psi),
		Z:      view(4, 2, mul(g, omegaT, 4, 3, 2)), // G·Ω_t
		OmegaT: view(3, 2, omegaT),
	}
	b := loraone.Dense{Rows: 4, Cols: 1, Stride: 1, F64: make([]float64, 4)} // lora_B, m×r
	a := loraone.Dense{Rows: 1, Cols: 3, Stride: 3, F64: make([]float64, 3)} // lora_A, r×n
	res, err := loraone.LoRAOneSketch(b, a, sk, 1, loraone.DefaultOptions(1))
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("sigma1 = %.4f (3·√5 = %.4f), rank %d of k = %d, Accuracy < 1e-9: %v\n",
		res.Sigma1, 3*math.Sqrt(5), res.Rank, res.K, res.Accuracy < 1e-9)
	// B·A = [−G]_1/(γ·σ₁) = −G/σ₁
	round := func(x float64) float64 { return math.Round(x*1e4)/1e4 + 0 }
	for i := 0; i < 4; i++ {
		fmt.Printf("% .4f % .4f % .4f\n", round(b.F64[i]*a.F64[0]), round(b.F64[i]*a.F64[1]), round(b.F64[i]*a.F64[2]))
	}
	// Output:
	// sigma1 = 6.7082 (3·√5 = 6.7082), rank 1 of k = 2, Accuracy < 1e-9: true
	// -0.2981  0.0000 -0.1491
	// -0.5963  0.0000 -0.2981
	//  0.0000  0.0000  0.0000
	// -0.5963  0.0000 -0.2981
}

// Orthonormalize is the first step of the two-pass sketch: Q = orth(G·Ω)
// in place, and the numerical rank of G·Ω.
func ExampleOrthonormalize() {
	y := loraone.Dense{Rows: 3, Cols: 2, Stride: 2, F32: []float32{
		3, 6,
		0, 0,
		4, 8, // column 2 = 2·column 1: rank 1
	}}
	rank, err := loraone.Orthonormalize(y)
	if err != nil {
		fmt.Println(err)
		return
	}
	q0 := []float32{y.F32[0], y.F32[2], y.F32[4]}
	fmt.Printf("rank %d, |first column| = (%.1f %.1f %.1f)\n", rank, math.Abs(float64(q0[0])), math.Abs(float64(q0[1])), math.Abs(float64(q0[2])))
	// Output:
	// rank 1, |first column| = (0.6 0.0 0.8)
}
