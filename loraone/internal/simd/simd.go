package simd

import (
	"fmt"
	"sync"
)

// Available reports whether the kernels can run on this machine (AVX-512F
// on amd64, with the ZMM state enabled by the operating system).
func Available() bool { return available }

// Width is the panel width the kernels work in: the b of MulNN and MulTN
// must be a multiple of it.
const Width = 16

// check panics unless the kernels are available and each operand's
// length is at least what its shape and stride need ({len, need} pairs).
func check(op string, width, b int, lens ...[2]int) {
	if !available {
		panic("simd: " + op + ": AVX-512F is not available")
	}
	if b%width != 0 {
		panic(fmt.Sprintf("simd: %s: panel width %d is not a multiple of %d", op, b, width))
	}
	for _, l := range lens {
		if l[0] < l[1] {
			panic(fmt.Sprintf("simd: %s: operand too short (%d elements, need %d)", op, l[0], l[1]))
		}
	}
}

// need is the number of elements a row-major rows×cols operand with row
// stride ld spans.
func need(rows, cols, ld int) int {
	if rows == 0 || cols == 0 {
		return 0
	}
	return (rows-1)*ld + cols
}

// minParallel is the number of multiply-adds (m·n·b) below which a
// product runs on one goroutine whatever the thread count: smaller ones
// take well under a millisecond.
const minParallel = 1 << 24

// split runs f on [0, total) cut into at most threads contiguous parts of
// a multiple of unit, in parallel, when the work (m·n·b multiply-adds)
// is large enough to pay for the goroutines.
func split(threads, total, unit int, work float64, f func(lo, hi int)) {
	parts := min(threads, total/unit)
	if parts <= 1 || work < minParallel {
		f(0, total)
		return
	}
	per := (total/parts + unit - 1) / unit * unit
	var wg sync.WaitGroup
	for lo := 0; lo < total; lo += per {
		hi := min(lo+per, total)
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(lo, hi)
		}()
	}
	wg.Wait()
}

// MulNN sets y = a·x for the row-major a (m×n, row stride lda), x (n×b,
// ldx) and y (m×b, ldy), b a multiple of Width, on up to threads
// goroutines (each a share of the rows). Each block of eight rows of a is
// read from memory once and kept in cache while the panels of 16 columns
// pass over it.
func MulNN(threads, m, n, b int, a []float32, lda int, x []float32, ldx int, y []float32, ldy int) {
	check("MulNN", Width, b,
		[2]int{len(a), need(m, n, lda)},
		[2]int{len(x), need(n, b, ldx)},
		[2]int{len(y), need(m, b, ldy)})
	if m == 0 || b == 0 {
		return
	}
	split(threads, m, 8, float64(m)*float64(n)*float64(b), func(lo, hi int) {
		mulNN(hi-lo, n, b, a[lo*lda:], lda, x, ldx, y[lo*ldy:], ldy)
	})
}

func mulNN(m, n, b int, a []float32, lda int, x []float32, ldx int, y []float32, ldy int) {
	if n == 0 {
		for i := 0; i < m; i++ {
			clear(y[i*ldy : i*ldy+b])
		}
		return
	}
	i := 0
	for ; i+8 <= m; i += 8 {
		for j := 0; j < b; j += Width {
			mul8x16(&a[i*lda], lda, &x[j], ldx, n, &y[i*ldy+j], ldy)
		}
	}
	for ; i < m; i++ {
		for j := 0; j < b; j += Width {
			mul1x16(&a[i*lda], &x[j], ldx, n, &y[i*ldy+j])
		}
	}
}

// MulTN sets z = aᵀ·y for the row-major a (m×n, row stride lda), y (m×b,
// ldy) and z (n×b, ldz), b a multiple of Width: z accumulates the rank-8
// updates of eight rows of a at a time, each row read from memory once.
// Up to threads goroutines share the work, each a share of the columns of
// a (rows of z).
func MulTN(threads, m, n, b int, a []float32, lda int, y []float32, ldy int, z []float32, ldz int) {
	mulTNPar(false, threads, m, n, b, a, lda, y, ldy, z, ldz)
}

// MulTNAdd is MulTN that adds aᵀ·y to z instead of overwriting it.
func MulTNAdd(threads, m, n, b int, a []float32, lda int, y []float32, ldy int, z []float32, ldz int) {
	mulTNPar(true, threads, m, n, b, a, lda, y, ldy, z, ldz)
}

func mulTNPar(add bool, threads, m, n, b int, a []float32, lda int, y []float32, ldy int, z []float32, ldz int) {
	check("MulTN", Width, b,
		[2]int{len(a), need(m, n, lda)},
		[2]int{len(y), need(m, b, ldy)},
		[2]int{len(z), need(n, b, ldz)})
	if n == 0 || b == 0 {
		return
	}
	split(threads, n, Width, float64(m)*float64(n)*float64(b), func(lo, hi int) {
		mulTN(add, m, hi-lo, b, a[lo:], lda, y, ldy, z[lo*ldz:], ldz)
	})
}

func mulTN(add bool, m, n, b int, a []float32, lda int, y []float32, ldy int, z []float32, ldz int) {
	if !add {
		for k := 0; k < n; k++ {
			clear(z[k*ldz : k*ldz+b])
		}
	}
	i := 0
	for ; i+8 <= m; i += 8 {
		for j := 0; j < b; j += Width {
			mulT8x16(&a[i*lda], lda, &y[i*ldy+j], ldy, n, &z[j], ldz)
		}
	}
	for ; i < m; i++ {
		for j := 0; j < b; j += Width {
			mulT1x16(&a[i*lda], &y[i*ldy+j], n, &z[j], ldz)
		}
	}
}

// HalfToFloat32 converts the longest prefix of src whose length is a
// multiple of Width from IEEE binary16 bits to float32 in dst (exactly;
// a signaling NaN comes back quiet) and returns its length: the caller
// converts the remaining len(src)−done values itself.
func HalfToFloat32(dst []float32, src []uint16) (done int) {
	return convert(cvtHalf, "HalfToFloat32", dst, src)
}

// BFloat16ToFloat32 is HalfToFloat32 for bfloat16 bits (a shift, exact).
func BFloat16ToFloat32(dst []float32, src []uint16) (done int) {
	return convert(cvtBFloat16, "BFloat16ToFloat32", dst, src)
}

func convert(kern func(*float32, *uint16, int), op string, dst []float32, src []uint16) int {
	check(op, Width, 0, [2]int{len(dst), len(src)})
	n := len(src) / Width * Width
	if n > 0 {
		kern(&dst[0], &src[0], n)
	}
	return n
}
