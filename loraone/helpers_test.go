package loraone

import (
	"math"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack"
	"gonum.org/v1/gonum/lapack/lapack64"
	"gonum.org/v1/gonum/mat"
)

// orthonormal returns an m×r matrix with orthonormal columns (thin QR of a
// Gaussian block).
func orthonormal(rng *rand.Rand, m, r int) *mat.Dense {
	a := blas64.General{Rows: m, Cols: r, Stride: r, Data: make([]float64, m*r)}
	for i := range a.Data {
		a.Data[i] = rng.NormFloat64()
	}
	tau := make([]float64, r)
	work := make([]float64, 64*r+1)
	lapack64.Geqrf(a, tau, work, len(work))
	lapack64.Orgqr(a, tau, work, len(work))
	return mat.NewDense(m, r, a.Data)
}

// synth returns G = U·diag(s)·Vᵀ (m×n) with random orthonormal U, V; len(s)
// <= min(m, n).
func synth(seed uint64, m, n int, s []float64) *mat.Dense {
	rng := rand.New(rand.NewPCG(seed, 7))
	u := orthonormal(rng, m, len(s))
	v := orthonormal(rng, n, len(s))
	var us mat.Dense
	us.Apply(func(i, j int, x float64) float64 { return x * s[j] }, u)
	g := mat.NewDense(m, n, nil)
	g.Mul(&us, v.T())
	return g
}

func geometric(n int, s0, ratio float64) []float64 {
	s := make([]float64, n)
	for i := range s {
		s[i] = s0 * math.Pow(ratio, float64(i))
	}
	return s
}

// view64 returns a row-major float64 view of g (stride = Cols + pad).
func view64(g mat.Matrix, pad int) Matrix {
	m, n := g.Dims()
	st := n + pad
	d := make([]float64, (m-1)*st+n)
	for i := range d {
		d[i] = math.NaN() // padding must never be read
	}
	for i := 0; i < m; i++ {
		for j := 0; j < n; j++ {
			d[i*st+j] = g.At(i, j)
		}
	}
	return Matrix{Rows: m, Cols: n, Stride: st, DType: Float64, F64: d}
}

// layout builds a view of g with the given dtype, storage order and row
// padding, and returns it with the float64 matrix of the values it holds
// (after rounding to the dtype).
func layout(g mat.Matrix, dt DType, trans bool, pad int) (Matrix, *mat.Dense) {
	m, n := g.Dims()
	sr, sc := storedShape(m, n, trans)
	st := sc + pad
	size := (sr-1)*st + sc
	v := Matrix{Rows: m, Cols: n, Stride: st, Trans: trans, DType: dt}
	switch dt {
	case Float64:
		v.F64 = make([]float64, size)
	case Float32:
		v.F32 = make([]float32, size)
	default:
		v.Half = make([]uint16, size)
	}
	for p := 0; p < size; p++ { // NaN padding
		switch dt {
		case Float64:
			v.F64[p] = math.NaN()
		case Float32:
			v.F32[p] = float32(math.NaN())
		default:
			v.Half[p] = 0x7e00
		}
	}
	for i := 0; i < m; i++ {
		for j := 0; j < n; j++ {
			p := i*st + j
			if trans {
				p = j*st + i
			}
			x := g.At(i, j)
			switch dt {
			case Float64:
				v.F64[p] = x
			case Float32:
				v.F32[p] = float32(x)
			case Float16:
				v.Half[p] = float32ToHalf(float32(x))
			case BFloat16:
				v.Half[p] = float32ToBFloat16(float32(x))
			}
		}
	}
	vals := mat.NewDense(m, n, nil)
	for i := 0; i < m; i++ {
		for j := 0; j < n; j++ {
			vals.Set(i, j, v.at(i, j))
		}
	}
	return v, vals
}

// exact returns the thin SVD of g from gonum (Dgesvd).
func exact(t *testing.T, g mat.Matrix) (u, v *mat.Dense, s []float64) {
	t.Helper()
	var svd mat.SVD
	if !svd.Factorize(g, mat.SVDThin) {
		t.Fatal("mat.SVD failed")
	}
	u, v = new(mat.Dense), new(mat.Dense)
	svd.UTo(u)
	svd.VTo(v)
	return u, v, svd.Values(nil)
}

// truncate returns [G]_r = U_r diag(S_r) V_rᵀ from the exact SVD.
func truncate(t *testing.T, g mat.Matrix, r int) *mat.Dense {
	u, v, s := exact(t, g)
	return lowRank(u, s, v, r)
}

func lowRank(u mat.Matrix, s []float64, v mat.Matrix, r int) *mat.Dense {
	m, _ := u.Dims()
	n, _ := v.Dims()
	us := mat.NewDense(m, r, nil)
	for i := 0; i < m; i++ {
		for j := 0; j < r; j++ {
			us.Set(i, j, u.At(i, j)*s[j])
		}
	}
	x := mat.NewDense(m, n, nil)
	x.Mul(us, mat.DenseCopyOf(v).Slice(0, n, 0, r).T())
	return x
}

// relDiff returns ‖x − y‖_F / ‖y‖_F.
func relDiff(x, y mat.Matrix) float64 {
	var d mat.Dense
	d.Sub(x, y)
	return mat.Norm(&d, 2) / mat.Norm(y, 2)
}

// orthoErr returns max |QᵀQ − I|.
func orthoErr(q mat.Matrix) float64 {
	var p mat.Dense
	p.Mul(q.T(), q)
	r, _ := p.Dims()
	var e float64
	for i := 0; i < r; i++ {
		for j := 0; j < r; j++ {
			want := 0.0
			if i == j {
				want = 1
			}
			e = math.Max(e, math.Abs(p.At(i, j)-want))
		}
	}
	return e
}

// denseOut returns an output view (NaN-filled, padded) and a reader.
func denseOut(rows, cols int, f32, trans bool, pad int) Dense {
	sr, sc := storedShape(rows, cols, trans)
	st := sc + pad
	size := (sr-1)*st + sc
	d := Dense{Rows: rows, Cols: cols, Stride: st, Trans: trans}
	if f32 {
		d.F32 = make([]float32, size)
		for i := range d.F32 {
			d.F32[i] = float32(math.NaN())
		}
	} else {
		d.F64 = make([]float64, size)
		for i := range d.F64 {
			d.F64[i] = math.NaN()
		}
	}
	return d
}

func (d Dense) toMat() *mat.Dense {
	x := mat.NewDense(d.Rows, d.Cols, nil)
	for i := 0; i < d.Rows; i++ {
		for j := 0; j < d.Cols; j++ {
			p := i*d.Stride + j
			if d.Trans {
				p = j*d.Stride + i
			}
			if d.F64 != nil {
				x.Set(i, j, d.F64[p])
			} else {
				x.Set(i, j, float64(d.F32[p]))
			}
		}
	}
	return x
}

// gonumSyevd is a Syevd on gonum's Dsyev (the tests' stand-in for LAPACK's
// dsyevd, same contract), counting its successful calls in calls.
func gonumSyevd(calls *atomic.Int64) Syevd {
	return func(n int, a []float64, lda int, w []float64) bool {
		sym := blas64.Symmetric{N: n, Stride: lda, Uplo: blas.Upper, Data: a}
		q := []float64{0}
		lapack64.Syev(lapack.EVCompute, sym, w, q, -1)
		work := make([]float64, max(int(q[0]), 1))
		if !lapack64.Syev(lapack.EVCompute, sym, w, work, len(work)) {
			return false
		}
		calls.Add(1)
		return true
	}
}
