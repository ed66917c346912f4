package simd

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// TestMul64 checks MulNN64, MulNNSub64 and MulTN64 against a plain
// float64 loop (summing in another order: agreement to ~1e-13) on row
// counts that are and are not multiples of 8, strided operands, panels of
// 8 to 64 columns and the parallel path.
func TestMul64(t *testing.T) {
	if !Available() {
		t.Skip("AVX-512F not available")
	}
	rng := rand.New(rand.NewPCG(5, 6))
	randF := func(n int) []float64 {
		s := make([]float64, n)
		for i := range s {
			s[i] = rng.NormFloat64()
		}
		return s
	}
	for _, c := range []struct{ m, n, b, pad int }{
		{1, 1, 8, 0}, {8, 5, 8, 0}, {13, 37, 16, 3}, {64, 100, 64, 0}, {67, 9, 24, 5}, {3, 200, 8, 1},
		{4099, 260, 64, 2}, // above minParallel: split over goroutines
	} {
		for _, op := range []string{"NN", "NNSub", "TN"} {
			name := fmt.Sprintf("%s m=%d,n=%d,b=%d,pad=%d", op, c.m, c.n, c.b, c.pad)
			lda := c.n + c.pad
			a := randF(need(c.m, c.n, lda))
			in, out := c.n, c.m
			if op == "TN" {
				in, out = c.m, c.n
			}
			ldx, ldy := c.b+c.pad, c.b+2*c.pad
			x := randF(need(in, c.b, ldx))
			y := randF(need(out, c.b, ldy))
			y0 := append([]float64(nil), y...)
			switch op {
			case "NN":
				MulNN64(3, c.m, c.n, c.b, a, lda, x, ldx, y, ldy)
			case "NNSub":
				MulNNSub64(3, c.m, c.n, c.b, a, lda, x, ldx, y, ldy)
			case "TN":
				MulTN64(3, c.m, c.n, c.b, a, lda, x, ldx, y, ldy)
			}
			for i := 0; i < out; i++ {
				for j := 0; j < c.b; j++ {
					var want, scale float64
					for k := 0; k < in; k++ {
						var av float64
						if op == "TN" {
							av = a[k*lda+i]
						} else {
							av = a[i*lda+k]
						}
						want += av * x[k*ldx+j]
						scale += math.Abs(av * x[k*ldx+j])
					}
					if op == "NNSub" {
						want = y0[i*ldy+j] - want
						scale += math.Abs(y0[i*ldy+j])
					}
					if d := math.Abs(y[i*ldy+j] - want); d > 1e-14*scale+1e-300 {
						t.Fatalf("%s: [%d,%d] = %v, want %v", name, i, j, y[i*ldy+j], want)
					}
				}
				for j := c.b; j < ldy && i*ldy+j < len(y); j++ {
					if y[i*ldy+j] != y0[i*ldy+j] {
						t.Fatalf("%s: padding [%d,%d] overwritten", name, i, j)
					}
				}
			}
		}
	}
}

// TestMul64Panics: widths that are not a multiple of Width64 and short
// operands panic (the callers check shapes; this is the last guard).
func TestMul64Panics(t *testing.T) {
	if !Available() {
		t.Skip("AVX-512F not available")
	}
	for name, f := range map[string]func(){
		"width": func() { MulTN64(1, 8, 8, 12, make([]float64, 64), 8, make([]float64, 96), 12, make([]float64, 96), 12) },
		"short": func() { MulNNSub64(1, 8, 8, 8, make([]float64, 63), 8, make([]float64, 64), 8, make([]float64, 64), 8) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", name)
				}
			}()
			f()
		}()
	}
}

func benchMul64(bm *testing.B, trans bool, m, n, b int) {
	if !Available() {
		bm.Skip("AVX-512F not available")
	}
	rng := rand.New(rand.NewPCG(1, 1))
	a := make([]float64, m*n)
	for i := range a {
		a[i] = rng.NormFloat64()
	}
	in, out := n, m
	if trans {
		in, out = m, n
	}
	x, y := make([]float64, in*b), make([]float64, out*b)
	bm.SetBytes(0)
	bm.ResetTimer()
	for bm.Loop() {
		if trans {
			MulTN64(1, m, n, b, a, n, x, b, y, b)
		} else {
			MulNNSub64(1, m, n, b, a, n, x, b, y, b)
		}
	}
	bm.ReportMetric(2*float64(m)*float64(n)*float64(b)*float64(bm.N)/bm.Elapsed().Seconds()/1e9, "GFLOP/s")
}

// The projection shapes of the Krylov bases: a 4096- or 11008-row basis
// of 256 columns against a block of 64.
func BenchmarkMulTN64Basis4096(b *testing.B)  { benchMul64(b, true, 4096, 256, 64) }
func BenchmarkMulNN64Basis4096(b *testing.B)  { benchMul64(b, false, 4096, 256, 64) }
func BenchmarkMulTN64Basis11008(b *testing.B) { benchMul64(b, true, 11008, 256, 64) }
func BenchmarkMulNN64Basis11008(b *testing.B) { benchMul64(b, false, 11008, 256, 64) }
