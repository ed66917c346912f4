package loraone

import (
	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas32"
	"gonum.org/v1/gonum/blas/blas64"

	"github.com/peft-loraone/peft-loraone/loraone/internal/simd"
)

// halfBlockRows is the number of stored rows of a Float16/BFloat16 matrix
// converted to float32 at a time; the conversion buffer holds
// halfBlockRows×(stored row length) float32 values, never the whole matrix.
const halfBlockRows = 64

// fastHalfBlockElems bounds the conversion buffer (in float32 elements,
// 4 MiB) when an injected Sgemm is used: blocks of halfBlockRows rows are
// too small a product for a threaded BLAS, so the block then holds as many
// whole rows as fit, at least halfBlockRows.
const fastHalfBlockElems = 1 << 20

// product multiplies the read-only view g (or its transpose) by small
// float64 panels. It owns the per-call float32 scratch; it is not safe for
// concurrent use, but each RandSVD call has its own.
//
// The backing memory is seen as a row-major stored matrix S of shape
// sr×sc: S = G if !g.Trans, S = Gᵀ if g.Trans. Products with G are then
// products with S or Sᵀ, and the view is read in place.
type product struct {
	g       Matrix
	sr, sc  int
	x32     []float32 // panel converted to float32
	r32     []float32 // float32 result panel
	blk     []float32 // Float16/BFloat16 row-block buffer
	blkRows int       // stored rows per Float16/BFloat16 block
	kn      kernels
}

func newProduct(g Matrix, k int, kn kernels) *product {
	p := &product{g: g, kn: kn}
	p.sr, p.sc = storedShape(g.Rows, g.Cols, g.Trans)
	if g.DType != Float64 {
		n := max(g.Rows, g.Cols) * k
		// to32 and the products write them before they are read
		p.x32 = kn.ws.float32sDirty(n)
		p.r32 = kn.ws.float32sDirty(n)
	}
	if g.DType == Float16 || g.DType == BFloat16 {
		p.blkRows = halfBlockRows
		if kn.s != nil {
			p.blkRows = max(halfBlockRows, fastHalfBlockElems/p.sc)
		}
		p.blkRows = min(p.blkRows, p.sr)
		p.blk = kn.ws.float32sDirty(p.blkRows * p.sc) // each block is decoded into it first
	}
	return p
}

// mulG sets y (m×k) = G · x (x n×k).
func (p *product) mulG(y, x blas64.General) {
	if p.g.Trans {
		p.mulST(y, x)
	} else {
		p.mulS(y, x)
	}
}

// mulGT sets z (n×k) = Gᵀ · x (x m×k).
func (p *product) mulGT(z, x blas64.General) {
	if p.g.Trans {
		p.mulS(z, x)
	} else {
		p.mulST(z, x)
	}
}

// mulS sets res (sr×k) = S · x (x sc×k).
func (p *product) mulS(res, x blas64.General) {
	p.mul(blas.NoTrans, res, x)
}

// mulST sets res (sc×k) = Sᵀ · x (x sr×k).
func (p *product) mulST(res, x blas64.General) {
	p.mul(blas.Trans, res, x)
}

func (p *product) mul(t blas.Transpose, res, x blas64.General) {
	g := p.g
	switch g.DType {
	case Float64:
		s := blas64.General{Rows: p.sr, Cols: p.sc, Stride: g.Stride, Data: g.F64}
		p.kn.gemm64(t, blas.NoTrans, 1, s, x, 0, res)
		return
	case Float32:
		x32 := p.to32(p.x32, x)
		r32 := blas32.General{Rows: res.Rows, Cols: res.Cols, Stride: res.Cols, Data: p.r32[:res.Rows*res.Cols]}
		switch {
		case !p.kn.thin(x.Cols):
			s := blas32.General{Rows: p.sr, Cols: p.sc, Stride: g.Stride, Data: g.F32}
			p.kn.gemm32(t, blas.NoTrans, 1, s, x32, 0, r32)
		case t == blas.NoTrans:
			simd.MulNN(p.kn.threads, p.sr, p.sc, x.Cols, g.F32, g.Stride, x32.Data, x.Cols, r32.Data, x.Cols)
		default:
			simd.MulTN(p.kn.threads, p.sr, p.sc, x.Cols, g.F32, g.Stride, x32.Data, x.Cols, r32.Data, x.Cols)
		}
		from32(res, r32)
		return
	}
	// Float16 / BFloat16: convert p.blkRows stored rows at a time.
	x32 := p.to32(p.x32, x)
	k := x.Cols
	r32 := blas32.General{Rows: res.Rows, Cols: k, Stride: k, Data: p.r32[:res.Rows*k]}
	for b0 := 0; b0 < p.sr; b0 += p.blkRows {
		b1 := min(b0+p.blkRows, p.sr)
		nb := b1 - b0
		blk := p.blk[:nb*p.sc]
		for i := 0; i < nb; i++ {
			src := g.Half[(b0+i)*g.Stride : (b0+i)*g.Stride+p.sc]
			dst := blk[i*p.sc : (i+1)*p.sc]
			done := 0 // converted by the simd kernels
			if g.DType == BFloat16 {
				if p.kn.simd {
					done = simd.BFloat16ToFloat32(dst, src)
				}
				for j, h := range src[done:] {
					dst[done+j] = bfloat16ToFloat32(h)
				}
			} else {
				if p.kn.simd {
					done = simd.HalfToFloat32(dst, src)
				}
				for j, h := range src[done:] {
					dst[done+j] = halfToFloat32(h)
				}
			}
		}
		sb := blas32.General{Rows: nb, Cols: p.sc, Stride: p.sc, Data: blk}
		if p.kn.thin(k) {
			if t == blas.NoTrans {
				simd.MulNN(p.kn.threads, nb, p.sc, k, blk, p.sc, x32.Data, k, r32.Data[b0*k:b1*k], k)
			} else if b0 == 0 {
				simd.MulTN(p.kn.threads, nb, p.sc, k, blk, p.sc, x32.Data[b0*k:b1*k], k, r32.Data, k)
			} else {
				simd.MulTNAdd(p.kn.threads, nb, p.sc, k, blk, p.sc, x32.Data[b0*k:b1*k], k, r32.Data, k)
			}
			continue
		}
		if t == blas.NoTrans {
			// Rows b0:b1 of S·x.
			out := blas32.General{Rows: nb, Cols: k, Stride: k, Data: r32.Data[b0*k : b1*k]}
			p.kn.gemm32(blas.NoTrans, blas.NoTrans, 1, sb, x32, 0, out)
		} else {
			// Sᵀ·x accumulates S[b0:b1]ᵀ · x[b0:b1].
			xb := blas32.General{Rows: nb, Cols: k, Stride: k, Data: x32.Data[b0*k : b1*k]}
			beta := float32(1)
			if b0 == 0 {
				beta = 0
			}
			p.kn.gemm32(blas.Trans, blas.NoTrans, 1, sb, xb, beta, r32)
		}
	}
	from32(res, r32)
}

// to32 converts the row-major panel x into buf (contiguous, stride x.Cols).
func (p *product) to32(buf []float32, x blas64.General) blas32.General {
	out := blas32.General{Rows: x.Rows, Cols: x.Cols, Stride: x.Cols, Data: buf[:x.Rows*x.Cols]}
	for i := 0; i < x.Rows; i++ {
		src := x.Data[i*x.Stride : i*x.Stride+x.Cols]
		dst := out.Data[i*x.Cols : (i+1)*x.Cols]
		for j, v := range src {
			dst[j] = float32(v)
		}
	}
	return out
}

// from32 converts the contiguous float32 panel r into res.
func from32(res blas64.General, r blas32.General) {
	for i := 0; i < res.Rows; i++ {
		src := r.Data[i*r.Stride : i*r.Stride+r.Cols]
		dst := res.Data[i*res.Stride : i*res.Stride+res.Cols]
		for j, v := range src {
			dst[j] = float64(v)
		}
	}
}
