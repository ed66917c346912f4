package loraone

import (
	"math/rand/v2"
	"testing"
)

// BenchmarkRandSVD: 1024×1024 float32, r = 16, default options, on a
// gradient-like matrix (geometric spectrum plus noise-free tail).
func BenchmarkRandSVD(b *testing.B) {
	const n = 1024
	rng := rand.New(rand.NewPCG(1, 2))
	// Sum of 64 rank-1 terms with decaying weights: a fast-to-build
	// matrix whose spectrum decays like 0.9^i.
	g := Matrix{Rows: n, Cols: n, Stride: n, DType: Float32, F32: make([]float32, n*n)}
	u, v := make([]float32, n), make([]float32, n)
	w := float32(1)
	for t := 0; t < 64; t++ {
		for i := range u {
			u[i], v[i] = float32(rng.NormFloat64()), float32(rng.NormFloat64())
		}
		for i := 0; i < n; i++ {
			row := g.F32[i*n : (i+1)*n]
			for j := range row {
				row[j] += w * u[i] * v[j]
			}
		}
		w *= 0.9
	}
	h := Matrix{Rows: n, Cols: n, Stride: n, DType: BFloat16, Half: make([]uint16, n*n)}
	d := Matrix{Rows: n, Cols: n, Stride: n, DType: Float64, F64: make([]float64, n*n)}
	for i, x := range g.F32 {
		h.Half[i] = float32ToBFloat16(x)
		d.F64[i] = float64(x)
	}
	for _, c := range []struct {
		name   string
		g      Matrix
		krylov bool
	}{{"float32", g, false}, {"bfloat16", h, false}, {"float64", d, false}, {"float32-krylov", g, true}} {
		opt := DefaultOptions(16)
		opt.Krylov = c.krylov
		b.Run(c.name, func(b *testing.B) {
			var passes int
			for b.Loop() {
				s, err := RandSVD(c.g, opt)
				if err != nil {
					b.Fatal(err)
				}
				passes = s.Passes
			}
			b.ReportMetric(float64(passes), "passes")
		})
	}
}
