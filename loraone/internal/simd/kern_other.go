//go:build !amd64

package simd

const available = false

func mul8x16(a *float32, lda int, x *float32, ldx int, n int, y *float32, ldy int) {
	panic("simd: unreachable")
}
func mul1x16(a *float32, x *float32, ldx int, n int, y *float32) { panic("simd: unreachable") }
func mulT8x16(a *float32, lda int, y *float32, ldy int, n int, z *float32, ldz int) {
	panic("simd: unreachable")
}
func mulT1x16(a *float32, y *float32, n int, z *float32, ldz int) { panic("simd: unreachable") }

func dmul8x8(a *float64, lda int, x *float64, ldx int, n int, y *float64, ldy int, sub int) {
	panic("simd: unreachable")
}
func dmul1x8(a *float64, x *float64, ldx int, n int, y *float64, sub int) { panic("simd: unreachable") }
func dmulT8x8(a *float64, lda int, y *float64, ldy int, n int, z *float64, ldz int) {
	panic("simd: unreachable")
}
func dmulT1x8(a *float64, y *float64, n int, z *float64, ldz int) { panic("simd: unreachable") }

func cvtHalf(dst *float32, src *uint16, n int)     { panic("simd: unreachable") }
func cvtBFloat16(dst *float32, src *uint16, n int) { panic("simd: unreachable") }
