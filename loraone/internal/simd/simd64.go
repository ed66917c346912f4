package simd

// Width64 is the panel width of the float64 kernels: the b of MulNN64,
// MulNNSub64 and MulTN64 must be a multiple of it.
const Width64 = 8

// MulNN64 sets y = a·x for the row-major float64 a (m×n, row stride lda),
// x (n×b, ldx) and y (m×b, ldy), b a multiple of Width64, on up to
// threads goroutines (each a share of the rows): MulNN in float64, eight
// rows of a at a time against panels of 8 columns.
func MulNN64(threads, m, n, b int, a []float64, lda int, x []float64, ldx int, y []float64, ldy int) {
	mulNN64Par(0, "MulNN64", threads, m, n, b, a, lda, x, ldx, y, ldy)
}

// MulNNSub64 is MulNN64 that subtracts a·x from y: y −= a·x (the update
// of a projection, w −= Q·(Qᵀ·w)).
func MulNNSub64(threads, m, n, b int, a []float64, lda int, x []float64, ldx int, y []float64, ldy int) {
	mulNN64Par(1, "MulNNSub64", threads, m, n, b, a, lda, x, ldx, y, ldy)
}

func mulNN64Par(sub int, op string, threads, m, n, b int, a []float64, lda int, x []float64, ldx int, y []float64, ldy int) {
	check(op, Width64, b,
		[2]int{len(a), need(m, n, lda)},
		[2]int{len(x), need(n, b, ldx)},
		[2]int{len(y), need(m, b, ldy)})
	if m == 0 || b == 0 {
		return
	}
	split(threads, m, 8, float64(m)*float64(n)*float64(b), func(lo, hi int) {
		mulNN64(sub, hi-lo, n, b, a[lo*lda:], lda, x, ldx, y[lo*ldy:], ldy)
	})
}

func mulNN64(sub, m, n, b int, a []float64, lda int, x []float64, ldx int, y []float64, ldy int) {
	if n == 0 {
		if sub == 0 {
			for i := 0; i < m; i++ {
				clear(y[i*ldy : i*ldy+b])
			}
		}
		return
	}
	i := 0
	for ; i+8 <= m; i += 8 {
		for j := 0; j < b; j += Width64 {
			dmul8x8(&a[i*lda], lda, &x[j], ldx, n, &y[i*ldy+j], ldy, sub)
		}
	}
	for ; i < m; i++ {
		for j := 0; j < b; j += Width64 {
			dmul1x8(&a[i*lda], &x[j], ldx, n, &y[i*ldy+j], sub)
		}
	}
}

// MulTN64 sets z = aᵀ·y for the row-major float64 a (m×n, row stride
// lda), y (m×b, ldy) and z (n×b, ldz), b a multiple of Width64: MulTN in
// float64 (the coefficients Qᵀ·w of a projection), on up to threads
// goroutines, each a share of the columns of a.
func MulTN64(threads, m, n, b int, a []float64, lda int, y []float64, ldy int, z []float64, ldz int) {
	check("MulTN64", Width64, b,
		[2]int{len(a), need(m, n, lda)},
		[2]int{len(y), need(m, b, ldy)},
		[2]int{len(z), need(n, b, ldz)})
	if n == 0 || b == 0 {
		return
	}
	split(threads, n, Width64, float64(m)*float64(n)*float64(b), func(lo, hi int) {
		mulTN64(m, hi-lo, b, a[lo:], lda, y, ldy, z[lo*ldz:], ldz)
	})
}

func mulTN64(m, n, b int, a []float64, lda int, y []float64, ldy int, z []float64, ldz int) {
	for k := 0; k < n; k++ {
		clear(z[k*ldz : k*ldz+b])
	}
	i := 0
	for ; i+8 <= m; i += 8 {
		for j := 0; j < b; j += Width64 {
			dmulT8x8(&a[i*lda], lda, &y[i*ldy+j], ldy, n, &z[j], ldz)
		}
	}
	for ; i < m; i++ {
		for j := 0; j < b; j += Width64 {
			dmulT1x8(&a[i*lda], &y[i*ldy+j], n, &z[j], ldz)
		}
	}
}
