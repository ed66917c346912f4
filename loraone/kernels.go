package loraone

import (
	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas32"
	"gonum.org/v1/gonum/blas/blas64"
)

// kernels holds the matrix multiplies of one call: the injected
// Options.Sgemm/Dgemm, or gonum's implementation where they are nil.
type kernels struct {
	s Gemm32
	d Gemm64
}

func newKernels(opt Options) kernels {
	return kernels{s: opt.Sgemm, d: opt.Dgemm}
}

// gemm32 is blas32.Gemm through the injected Sgemm:
// c = alpha·op(a)·op(b) + beta·c.
func (kn kernels) gemm32(tA, tB blas.Transpose, alpha float32, a, b blas32.General, beta float32, c blas32.General) {
	k := a.Cols
	if tA != blas.NoTrans {
		k = a.Rows
	}
	if kn.s == nil {
		blas32.Gemm(tA, tB, alpha, a, b, beta, c)
		return
	}
	kn.s(tA, tB, c.Rows, c.Cols, k, alpha, a.Data, a.Stride, b.Data, b.Stride, beta, c.Data, c.Stride)
}

// gemm64 is blas64.Gemm through the injected Dgemm.
func (kn kernels) gemm64(tA, tB blas.Transpose, alpha float64, a, b blas64.General, beta float64, c blas64.General) {
	k := a.Cols
	if tA != blas.NoTrans {
		k = a.Rows
	}
	if kn.d == nil {
		blas64.Gemm(tA, tB, alpha, a, b, beta, c)
		return
	}
	kn.d(tA, tB, c.Rows, c.Cols, k, alpha, a.Data, a.Stride, b.Data, b.Stride, beta, c.Data, c.Stride)
}
