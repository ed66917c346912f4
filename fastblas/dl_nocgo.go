//go:build !cgo

package fastblas

import "unsafe"

const haveCgo = false

func dlOpen(path string) (unsafe.Pointer, string) {
	return nil, "fastblas was built without cgo (CGO_ENABLED=0)"
}

func dlSym(unsafe.Pointer, string) unsafe.Pointer { return nil }

func callSgemm(unsafe.Pointer, bool, bool, bool, int, int, int, float32,
	*float32, int, *float32, int, float32, *float32, int) {
	panic("fastblas: no cgo")
}

func callDgemm(unsafe.Pointer, bool, bool, bool, int, int, int, float64,
	*float64, int, *float64, int, float64, *float64, int) {
	panic("fastblas: no cgo")
}

func callDgesdd(unsafe.Pointer, bool, int, int, *float64, int, *float64, *float64, int, *float64, int) int {
	panic("fastblas: no cgo")
}

func callDsyevd(unsafe.Pointer, bool, int, *float64, int, *float64) int {
	panic("fastblas: no cgo")
}

func callSetThreads(unsafe.Pointer, int) { panic("fastblas: no cgo") }

func callGetThreads(unsafe.Pointer) int { panic("fastblas: no cgo") }

func callGetConfig(unsafe.Pointer) string { panic("fastblas: no cgo") }
