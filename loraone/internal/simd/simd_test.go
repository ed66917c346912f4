package simd

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// naive is the float64 reference a·x (or aᵀ·x when trans).
func naive(trans bool, m, n, b int, a []float32, lda int, x []float32, ldx int) []float64 {
	rows, inner := m, n
	if trans {
		rows, inner = n, m
	}
	out := make([]float64, rows*b)
	for i := 0; i < rows; i++ {
		for k := 0; k < inner; k++ {
			var av float64
			if trans {
				av = float64(a[k*lda+i])
			} else {
				av = float64(a[i*lda+k])
			}
			for j := 0; j < b; j++ {
				out[i*b+j] += av * float64(x[k*ldx+j])
			}
		}
	}
	return out
}

func randSlice(rng *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(rng.NormFloat64())
	}
	return s
}

// TestMul checks both products against a float64 reference on shapes
// with row counts that are and are not multiples of 8, strided operands
// and panels of 16 to 48 columns.
func TestMul(t *testing.T) {
	if !Available() {
		t.Skip("AVX-512F not available")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct{ m, n, b, pad int }{
		{1, 1, 16, 0}, {8, 5, 16, 0}, {13, 37, 16, 3}, {64, 100, 32, 0}, {67, 9, 48, 5}, {3, 200, 16, 1},
		{523, 2100, 16, 1}, // above minParallel: three goroutines
	} {
		for _, trans := range []bool{false, true} {
			name := fmt.Sprintf("m=%d,n=%d,b=%d,pad=%d,trans=%v", c.m, c.n, c.b, c.pad, trans)
			lda := c.n + c.pad
			a := randSlice(rng, need(c.m, c.n, lda))
			in, out := c.n, c.m // x rows, y rows
			if trans {
				in, out = c.m, c.n
			}
			ldx, ldy := c.b+c.pad, c.b+2*c.pad
			x := randSlice(rng, need(in, c.b, ldx))
			y := randSlice(rng, need(out, c.b, ldy)) // garbage: must be overwritten
			if trans {
				MulTN(3, c.m, c.n, c.b, a, lda, x, ldx, y, ldy)
			} else {
				MulNN(3, c.m, c.n, c.b, a, lda, x, ldx, y, ldy)
			}
			want := naive(trans, c.m, c.n, c.b, a, lda, x, ldx)
			compare := func(what string, times float64) {
				for i := 0; i < out; i++ {
					for j := 0; j < c.b; j++ {
						got, w := float64(y[i*ldy+j]), times*want[i*c.b+j]
						if math.Abs(got-w) > 1e-5*float64(max(c.m, c.n))*(1+math.Abs(w)) {
							t.Fatalf("%s %s: [%d,%d] = %g, want %g", name, what, i, j, got, w)
						}
					}
				}
			}
			compare("", 1)
			if trans { // MulTNAdd adds the product once more
				MulTNAdd(3, c.m, c.n, c.b, a, lda, x, ldx, y, ldy)
				compare("MulTNAdd", 2)
			}
		}
	}
}

// TestMulPanics: a width that is not a multiple of 16 or a short operand
// panics with a message instead of reading out of bounds.
func TestMulPanics(t *testing.T) {
	if !Available() {
		t.Skip("AVX-512F not available")
	}
	for _, c := range []struct {
		name string
		f    func()
	}{
		{"width", func() { MulNN(1, 2, 2, 8, make([]float32, 4), 2, make([]float32, 16), 8, make([]float32, 16), 8) }},
		{"short a", func() { MulNN(1, 2, 2, 16, make([]float32, 3), 2, make([]float32, 32), 16, make([]float32, 32), 16) }},
		{"short z", func() { MulTN(1, 2, 2, 16, make([]float32, 4), 2, make([]float32, 32), 16, make([]float32, 31), 16) }},
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", c.name)
				}
			}()
			c.f()
		}()
	}
}

func benchMul(bm *testing.B, trans bool, m, n, b int) { benchMulThreads(bm, 1, trans, m, n, b) }

func benchMulThreads(bm *testing.B, threads int, trans bool, m, n, b int) {
	if !Available() {
		bm.Skip("AVX-512F not available")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	a := randSlice(rng, m*n)
	in, out := n, m
	if trans {
		in, out = m, n
	}
	x, y := randSlice(rng, in*b), make([]float32, out*b)
	bm.SetBytes(int64(4 * m * n))
	bm.ResetTimer()
	for range bm.N {
		if trans {
			MulTN(threads, m, n, b, a, n, x, b, y, b)
		} else {
			MulNN(threads, m, n, b, a, n, x, b, y, b)
		}
	}
	bm.ReportMetric(2*float64(m)*float64(n)*float64(b)*float64(bm.N)/bm.Elapsed().Seconds()/1e9, "GFLOP/s")
}

func BenchmarkMulNN4096x16(b *testing.B) { benchMul(b, false, 4096, 4096, 16) }
func BenchmarkMulTN4096x16(b *testing.B) { benchMul(b, true, 4096, 4096, 16) }
func BenchmarkMulNN4096x64(b *testing.B) { benchMul(b, false, 4096, 4096, 64) }
func BenchmarkMulTN4096x64(b *testing.B) { benchMul(b, true, 4096, 4096, 64) }

func BenchmarkMulNNWide64(b *testing.B) { benchMul(b, false, 4096, 11008, 64) }
func BenchmarkMulTNWide64(b *testing.B) { benchMul(b, true, 4096, 11008, 64) }
func BenchmarkMulNNTall64(b *testing.B) { benchMul(b, false, 11008, 4096, 64) }
func BenchmarkMulTNTall64(b *testing.B) { benchMul(b, true, 11008, 4096, 64) }
func BenchmarkMulNNWide16(b *testing.B) { benchMul(b, false, 4096, 11008, 16) }
func BenchmarkMulTNWide16(b *testing.B) { benchMul(b, true, 4096, 11008, 16) }

// TestConvert checks the half and bfloat16 conversions against the
// definition (sign, exponent, mantissa arithmetic in float64) on every
// 16-bit pattern, and that a tail shorter than Width is left alone.
func TestConvert(t *testing.T) {
	if !Available() {
		t.Skip("AVX-512F not available")
	}
	src := make([]uint16, 1<<16+5)
	for i := range src {
		src[i] = uint16(i)
	}
	for _, half := range []bool{true, false} {
		dst := make([]float32, len(src))
		for i := range dst {
			dst[i] = -7
		}
		var done int
		if half {
			done = HalfToFloat32(dst, src)
		} else {
			done = BFloat16ToFloat32(dst, src)
		}
		if done != 1<<16 {
			t.Fatalf("half=%v: converted %d values, want %d", half, done, 1<<16)
		}
		for i, h := range src[:done] {
			want := refValue(h, half)
			got := float64(dst[i])
			if math.IsNaN(want) {
				if !math.IsNaN(got) || math.Signbit(got) != math.Signbit(want) {
					t.Fatalf("half=%v: %#04x -> %v, want NaN of the same sign", half, h, got)
				}
				continue
			}
			if got != want || math.Signbit(got) != math.Signbit(want) {
				t.Fatalf("half=%v: %#04x -> %v, want %v", half, h, got, want)
			}
		}
		for i := done; i < len(dst); i++ {
			if dst[i] != -7 {
				t.Fatalf("half=%v: tail element %d overwritten", half, i)
			}
		}
	}
}

// refValue decodes 16-bit half (or bfloat16) bits by the format's formula.
func refValue(h uint16, half bool) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	ebits, mbits, bias := 5, 10, 15
	if !half {
		ebits, mbits, bias = 8, 7, 127
	}
	e := int(h>>mbits) & (1<<ebits - 1)
	m := float64(int(h) & (1<<mbits - 1))
	switch e {
	case 0:
		return sign * math.Ldexp(m, 1-bias-mbits)
	case 1<<ebits - 1:
		if m == 0 {
			return math.Inf(int(sign))
		}
		return math.Copysign(math.NaN(), sign)
	}
	return sign * math.Ldexp(1+m/float64(int(1)<<mbits), e-bias)
}

func benchConvert(b *testing.B, f func([]float32, []uint16) int) {
	if !Available() {
		b.Skip("AVX-512F not available")
	}
	src, dst := make([]uint16, 1<<22), make([]float32, 1<<22) // 8 MiB in, 16 MiB out
	b.SetBytes(2 << 22)                                       // MB/s of 16-bit input read
	for range b.N {
		f(dst, src)
	}
}

func BenchmarkHalfToFloat32(b *testing.B)     { benchConvert(b, HalfToFloat32) }
func BenchmarkBFloat16ToFloat32(b *testing.B) { benchConvert(b, BFloat16ToFloat32) }

func BenchmarkMulNN4096x16Threads2(b *testing.B) { benchMulThreads(b, 2, false, 4096, 4096, 16) }
func BenchmarkMulTN4096x16Threads2(b *testing.B) { benchMulThreads(b, 2, true, 4096, 4096, 16) }
