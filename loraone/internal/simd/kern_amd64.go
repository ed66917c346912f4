package simd

//go:noescape
func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)

//go:noescape
func xgetbv() (eax, edx uint32)

//go:noescape
func mul8x16(a *float32, lda int, x *float32, ldx int, n int, y *float32, ldy int)

//go:noescape
func mul1x16(a *float32, x *float32, ldx int, n int, y *float32)

//go:noescape
func mulT8x16(a *float32, lda int, y *float32, ldy int, n int, z *float32, ldz int)

//go:noescape
func mulT1x16(a *float32, y *float32, n int, z *float32, ldz int)

//go:noescape
func dmul8x8(a *float64, lda int, x *float64, ldx int, n int, y *float64, ldy int, sub int)

//go:noescape
func dmul1x8(a *float64, x *float64, ldx int, n int, y *float64, sub int)

//go:noescape
func dmulT8x8(a *float64, lda int, y *float64, ldy int, n int, z *float64, ldz int)

//go:noescape
func dmulT1x8(a *float64, y *float64, n int, z *float64, ldz int)

// hasAVX512 reports AVX-512F support by the CPU (CPUID leaf 7) and the
// operating system (OSXSAVE, and XCR0 enabling the SSE, AVX, opmask and
// ZMM states).
func hasAVX512() bool {
	maxID, _, _, _ := cpuid(0, 0)
	if maxID < 7 {
		return false
	}
	_, _, ecx1, _ := cpuid(1, 0)
	if ecx1&(1<<27) == 0 { // OSXSAVE
		return false
	}
	_, ebx7, _, _ := cpuid(7, 0)
	if ebx7&(1<<16) == 0 { // AVX512F
		return false
	}
	xcr0, _ := xgetbv()
	const want = 1<<1 | 1<<2 | 1<<5 | 1<<6 | 1<<7
	return xcr0&want == want
}

var available = hasAVX512()

//go:noescape
func cvtHalf(dst *float32, src *uint16, n int)

//go:noescape
func cvtBFloat16(dst *float32, src *uint16, n int)
