package loraone

import (
	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas32"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack"
	"gonum.org/v1/gonum/lapack/lapack64"

	"github.com/peft-loraone/peft-loraone/loraone/internal/simd"
)

// kernels holds the matrix multiplies of one call: the injected
// Options.Sgemm/Dgemm, or gonum's implementation where they are nil.
type kernels struct {
	s       Gemm32
	d       Gemm64
	svd     Gesdd
	eig     Syevd
	simd    bool       // Options.SIMD on a CPU that has the kernels
	threads int        // Options.Threads, at least 1
	ws      *Workspace // Options.Workspace (nil: allocate)
}

func newKernels(opt Options) kernels {
	return kernels{s: opt.Sgemm, d: opt.Dgemm, svd: opt.Gesdd, eig: opt.Syevd, simd: opt.SIMD && simd.Available(),
		threads: max(opt.Threads, 1), ws: opt.Workspace}
}

// thin reports whether the float32 product with a k-column panel runs on
// the simd kernels.
func (kn kernels) thin(k int) bool {
	return kn.simd && k%simd.Width == 0
}

// thinSVD factors the m×n matrix a (destroyed) as u·diag(s)·vt with the
// injected Gesdd, or gonum's Dgesvd (SVDStore: thin factors). u needs
// m×min(m,n) and vt min(m,n)×n; work is gonum's scratch, grown as needed.
func (kn kernels) thinSVD(a blas64.General, s []float64, u, vt blas64.General, work *[]float64) bool {
	if kn.svd != nil {
		return kn.svd(a.Rows, a.Cols, a.Data, a.Stride, s, u.Data, u.Stride, vt.Data, vt.Stride)
	}
	q := []float64{0}
	lapack64.Gesvd(lapack.SVDStore, lapack.SVDStore, a, u, vt, s, q, -1)
	if len(*work) < int(q[0]) {
		*work = make([]float64, max(int(q[0]), 1))
	}
	return lapack64.Gesvd(lapack.SVDStore, lapack.SVDStore, a, u, vt, s, *work, len(*work))
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

// gemm64 is blas64.Gemm through the injected Dgemm, or through the simd
// float64 kernels (twice OpenBLAS's rate on these shapes) for the products
// of a basis with a thin panel that the Krylov orthogonalization is made
// of: c = a·b, c −= a·b and c = aᵀ·b, with c of 8k columns.
func (kn kernels) gemm64(tA, tB blas.Transpose, alpha float64, a, b blas64.General, beta float64, c blas64.General) {
	if kn.simd && tB == blas.NoTrans && c.Cols%simd.Width64 == 0 {
		switch {
		case tA == blas.NoTrans && alpha == 1 && beta == 0:
			simd.MulNN64(kn.threads, c.Rows, a.Cols, c.Cols, a.Data, a.Stride, b.Data, b.Stride, c.Data, c.Stride)
			return
		case tA == blas.NoTrans && alpha == -1 && beta == 1:
			simd.MulNNSub64(kn.threads, c.Rows, a.Cols, c.Cols, a.Data, a.Stride, b.Data, b.Stride, c.Data, c.Stride)
			return
		case tA == blas.Trans && alpha == 1 && beta == 0:
			simd.MulTN64(kn.threads, a.Rows, a.Cols, c.Cols, a.Data, a.Stride, b.Data, b.Stride, c.Data, c.Stride)
			return
		}
	}
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

// SIMDInfo describes what Options.SIMD selects on this machine.
func SIMDInfo() string {
	if simd.Available() {
		return "AVX-512 kernels (loraone/internal/simd) for float32 products with panels of 16k columns, float64 basis projections with panels of 8k columns, and f16/bf16 decoding"
	}
	return "none: this CPU lacks AVX-512F, every product goes to the BLAS"
}
