package fastblas

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/gonum"
	"gonum.org/v1/gonum/mat"

	"github.com/peft-loraone/peft-loraone/loraone"
)

var (
	libOnce sync.Once
	libPath string
)

// findLib returns the OpenBLAS to test: $FASTBLAS_LIB, else numpy's bundled
// copy (asked from python3), else "" (tests that need it skip).
func findLib() string {
	libOnce.Do(func() {
		if p := os.Getenv("FASTBLAS_LIB"); p != "" {
			libPath = p
			return
		}
		for _, py := range []string{"python3", "python"} {
			exe, err := exec.LookPath(py)
			if err != nil {
				continue
			}
			out, err := exec.Command(exe, "-c",
				"import numpy, os; print(os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), 'numpy.libs'))").Output()
			if err != nil {
				continue
			}
			m, _ := filepath.Glob(filepath.Join(strings.TrimSpace(string(out)), "libscipy_openblas*.so"))
			if len(m) > 0 {
				libPath = m[0]
				return
			}
		}
	})
	return libPath
}

func openOrSkip(t testing.TB) *Lib {
	t.Helper()
	if !haveCgo {
		t.Skip("built without cgo")
	}
	p := findLib()
	if p == "" {
		t.Skip("no OpenBLAS found (set FASTBLAS_LIB)")
	}
	l, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestOpenErrors(t *testing.T) {
	for _, p := range []string{"", "/nonexistent/libnothing.so"} {
		_, err := Open(p)
		if !errors.Is(err, ErrUnavailable) {
			t.Errorf("Open(%q) = %v, want ErrUnavailable", p, err)
		}
	}
	if !haveCgo {
		return
	}
	// A real library without CBLAS symbols.
	libc, _ := filepath.Glob("/lib/x86_64-linux-gnu/libm.so.6")
	if len(libc) > 0 {
		if _, err := Open(libc[0]); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "none of the symbols") {
			t.Errorf("Open(libm) = %v", err)
		}
	}
}

// TestGemm compares Sgemm and Dgemm with gonum's on every transpose pair,
// odd sizes, padded leading dimensions and the alpha/beta special cases.
func TestGemm(t *testing.T) {
	l := openOrSkip(t)
	t.Log(l)
	ref := gonum.Implementation{}
	rng := rand.New(rand.NewPCG(1, 1))
	fill := func(n int) ([]float64, []float32) {
		d := make([]float64, n)
		s := make([]float32, n)
		for i := range d {
			s[i] = float32(rng.NormFloat64())
			d[i] = float64(s[i])
		}
		return d, s
	}
	for _, sz := range [][3]int{{1, 1, 1}, {3, 5, 7}, {64, 33, 17}, {130, 70, 260}, {0, 4, 3}, {4, 0, 3}, {4, 3, 0}} {
		m, n, k := sz[0], sz[1], sz[2]
		for _, tA := range []blas.Transpose{blas.NoTrans, blas.Trans} {
			for _, tB := range []blas.Transpose{blas.NoTrans, blas.Trans} {
				for _, ab := range [][2]float64{{1, 0}, {-0.5, 2}, {0, 3}} {
					alpha, beta := ab[0], ab[1]
					ar, ac := m, k
					if tA == blas.Trans {
						ar, ac = k, m
					}
					br, bc := k, n
					if tB == blas.Trans {
						br, bc = n, k
					}
					lda, ldb, ldc := ac+3, bc+1, n+2
					a64, a32 := fill(max(ar*lda, 1))
					b64, b32 := fill(max(br*ldb, 1))
					c64, c32 := fill(max(m*ldc, 1))
					want64 := append([]float64(nil), c64...)
					ref.Dgemm(tA, tB, m, n, k, alpha, a64, lda, b64, ldb, beta, want64, ldc)
					l.Dgemm(tA, tB, m, n, k, alpha, a64, lda, b64, ldb, beta, c64, ldc)
					want32 := append([]float32(nil), c32...)
					ref.Sgemm(tA, tB, m, n, k, float32(alpha), a32, lda, b32, ldb, float32(beta), want32, ldc)
					l.Sgemm(tA, tB, m, n, k, float32(alpha), a32, lda, b32, ldb, float32(beta), c32, ldc)
					prefix := fmt.Sprintf("m=%d,n=%d,k=%d,tA=%c,tB=%c,alpha=%v,beta=%v", m, n, k, tA, tB, alpha, beta)
					for i := range want64 {
						if math.Abs(c64[i]-want64[i]) > 1e-12*float64(k+1)*(1+math.Abs(want64[i])) {
							t.Fatalf("%s: Dgemm[%d] = %v, want %v", prefix, i, c64[i], want64[i])
						}
						if math.Abs(float64(c32[i]-want32[i])) > 1e-5*float64(k+1)*(1+math.Abs(float64(want32[i]))) {
							t.Fatalf("%s: Sgemm[%d] = %v, want %v", prefix, i, c32[i], want32[i])
						}
					}
				}
			}
		}
	}
}

func TestGemmPanics(t *testing.T) {
	l := openOrSkip(t)
	a := make([]float32, 12)
	cases := []struct {
		name string
		f    func()
		msg  string
	}{
		{"negative", func() { l.Sgemm(blas.NoTrans, blas.NoTrans, -1, 2, 2, 1, a, 2, a, 2, 0, a, 2) }, "fastblas: negative dimension"},
		{"lda", func() { l.Sgemm(blas.NoTrans, blas.NoTrans, 2, 2, 3, 1, a, 2, a, 2, 0, a, 2) }, "fastblas: bad leading dimension"},
		{"short a", func() { l.Sgemm(blas.NoTrans, blas.NoTrans, 5, 2, 3, 1, a, 3, a, 2, 0, make([]float32, 10), 2) }, "fastblas: short input slice"},
		{"short c", func() { l.Sgemm(blas.NoTrans, blas.NoTrans, 2, 2, 2, 1, a, 2, a, 2, 0, a[:3], 2) }, "fastblas: short output slice"},
		{"trans", func() { l.Sgemm('x', blas.NoTrans, 2, 2, 2, 1, a, 2, a, 2, 0, a, 2) }, "fastblas: bad transpose"},
	}
	for _, c := range cases {
		func() {
			defer func() {
				if r := recover(); r != c.msg {
					t.Errorf("%s: panic %v, want %q", c.name, r, c.msg)
				}
			}()
			c.f()
		}()
	}
}

func TestConcurrent(t *testing.T) {
	l := openOrSkip(t)
	const n = 96
	a := make([]float32, n*n)
	for i := range a {
		a[i] = float32(i%7) - 3
	}
	want := make([]float32, n*n)
	gonum.Implementation{}.Sgemm(blas.NoTrans, blas.Trans, n, n, n, 1, a, n, a, n, 0, want, n)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := make([]float32, n*n)
			for it := 0; it < 20; it++ {
				l.Sgemm(blas.NoTrans, blas.Trans, n, n, n, 1, a, n, a, n, 0, c, n)
				for i := range c {
					if c[i] != want[i] {
						t.Errorf("concurrent Sgemm differs at %d", i)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
}

func TestThreads(t *testing.T) {
	l := openOrSkip(t)
	old := l.Threads()
	if !l.SetThreads(1) || l.Threads() != 1 {
		t.Errorf("SetThreads(1): Threads() = %d", l.Threads())
	}
	l.SetThreads(old)
}

// BenchmarkSgemm reports GFLOP/s of a 2048³ Sgemm for this library and for
// gonum (pure Go), the product shapes of RandSVD (m×n times n×k, k = 48 and
// 192) included.
func BenchmarkSgemm(b *testing.B) {
	for _, sz := range [][3]int{{2048, 2048, 2048}, {4096, 48, 4096}, {4096, 192, 11008}} {
		m, n, k := sz[0], sz[1], sz[2]
		a := make([]float32, m*k)
		x := make([]float32, k*n)
		c := make([]float32, m*n)
		for i := range a {
			a[i] = float32(i%13) * 0.1
		}
		for i := range x {
			x[i] = float32(i%5) * 0.1
		}
		impls := []struct {
			name string
			f    func(blas.Transpose, blas.Transpose, int, int, int, float32, []float32, int, []float32, int, float32, []float32, int)
		}{{"gonum", gonum.Implementation{}.Sgemm}}
		if p := findLib(); p != "" && haveCgo {
			if l, err := Open(p); err == nil {
				impls = append(impls, struct {
					name string
					f    func(blas.Transpose, blas.Transpose, int, int, int, float32, []float32, int, []float32, int, float32, []float32, int)
				}{"openblas", l.Sgemm})
			}
		}
		for _, im := range impls {
			b.Run(fmt.Sprintf("%s/%dx%dx%d", im.name, m, n, k), func(b *testing.B) {
				for b.Loop() {
					im.f(blas.NoTrans, blas.NoTrans, m, n, k, 1, a, k, x, n, 0, c, n)
				}
				b.ReportMetric(2*float64(m)*float64(n)*float64(k)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
			})
		}
	}
}

// BenchmarkRandSVD: loraone.RandSVD on a 2048×2048 float32 matrix with a
// geometric spectrum, r = 16, default options, with gonum's kernels and with
// this library's injected.
func BenchmarkRandSVD(b *testing.B) {
	const n, r = 2048, 16
	rng := rand.New(rand.NewPCG(5, 6))
	g := make([]float32, n*n)
	for t := 0; t < 48; t++ {
		u, v := make([]float32, n), make([]float32, n)
		for i := range u {
			u[i], v[i] = float32(rng.NormFloat64()), float32(rng.NormFloat64())
		}
		w := float32(math.Pow(0.9, float64(t)))
		for i := 0; i < n; i++ {
			row := g[i*n : (i+1)*n]
			for j := range row {
				row[j] += w * u[i] * v[j]
			}
		}
	}
	m := loraone.Matrix{Rows: n, Cols: n, Stride: n, DType: loraone.Float32, F32: g}
	opts := map[string]loraone.Options{"gonum": loraone.DefaultOptions(r)}
	if p := findLib(); p != "" && haveCgo {
		if l, err := Open(p); err == nil {
			o := loraone.DefaultOptions(r)
			o.Sgemm, o.Dgemm = l.Sgemm, l.Dgemm
			opts["openblas"] = o
		}
	}
	for _, name := range []string{"gonum", "openblas"} {
		opt, ok := opts[name]
		if !ok {
			continue
		}
		b.Run(name, func(b *testing.B) {
			var passes int
			for b.Loop() {
				s, err := loraone.RandSVD(m, opt)
				if err != nil {
					b.Fatal(err)
				}
				passes = s.Passes
			}
			b.ReportMetric(float64(passes), "passes")
		})
	}
}

// TestDgesdd checks the thin SVD against gonum's on tall, wide and square
// matrices with padded strides: equal singular values, and U·diag(S)·Vᵀ
// reproduces the input.
func TestDgesdd(t *testing.T) {
	l := openOrSkip(t)
	if !l.HasDgesdd() {
		t.Skip("library without LAPACKE_dgesdd")
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, c := range []struct{ m, n int }{{1, 1}, {7, 3}, {3, 7}, {40, 40}, {150, 60}} {
		q := min(c.m, c.n)
		lda, ldu, ldvt := c.n+2, q+1, c.n+3
		a := make([]float64, c.m*lda)
		for i := range a {
			a[i] = rng.NormFloat64()
		}
		orig := append([]float64(nil), a...)
		s, u, vt := make([]float64, q), make([]float64, c.m*ldu), make([]float64, q*ldvt)
		if !l.Dgesdd(c.m, c.n, a, lda, s, u, ldu, vt, ldvt) {
			t.Fatalf("%dx%d: Dgesdd failed", c.m, c.n)
		}
		var ref mat.SVD
		if !ref.Factorize(mat.NewDense(c.m, c.n, denseOf(orig, c.m, c.n, lda)), mat.SVDThin) {
			t.Fatal("gonum SVD failed")
		}
		for i, want := range ref.Values(nil) {
			if math.Abs(s[i]-want) > 1e-12*want+1e-13 {
				t.Errorf("%dx%d: s[%d] = %v, want %v", c.m, c.n, i, s[i], want)
			}
		}
		for i := 0; i < c.m; i++ {
			for j := 0; j < c.n; j++ {
				var x float64
				for p := 0; p < q; p++ {
					x += u[i*ldu+p] * s[p] * vt[p*ldvt+j]
				}
				if d := math.Abs(x - orig[i*lda+j]); d > 1e-12*float64(c.m+c.n) {
					t.Fatalf("%dx%d: (U S Vᵀ)[%d,%d] off by %g", c.m, c.n, i, j, d)
				}
			}
		}
	}
	defer func() {
		if r := recover(); r != "fastblas: short Dgesdd slice" {
			t.Errorf("short slice: panic %v", r)
		}
	}()
	l.Dgesdd(3, 3, make([]float64, 8), 3, make([]float64, 3), make([]float64, 9), 3, make([]float64, 9), 3)
}

// TestDsyevd checks the symmetric eigendecomposition against gonum's on
// matrices of several sizes with padded strides, only the upper triangle
// set (the lower one holds NaN, which dsyevd must not read): equal
// eigenvalues (ascending), orthonormal eigenvectors, and A·v = λ·v.
func TestDsyevd(t *testing.T) {
	l := openOrSkip(t)
	if !l.HasDsyevd() {
		t.Skip("library without LAPACKE_dsyevd")
	}
	rng := rand.New(rand.NewPCG(5, 6))
	for _, n := range []int{1, 2, 7, 40, 130} {
		lda := n + 3
		sym := mat.NewSymDense(n, nil)
		a := make([]float64, (n-1)*lda+n)
		for i := 0; i < n; i++ {
			for j := 0; j < n; j++ {
				switch {
				case j >= i:
					x := rng.NormFloat64()
					sym.SetSym(i, j, x)
					a[i*lda+j] = x
				default:
					a[i*lda+j] = math.NaN()
				}
			}
		}
		w := make([]float64, n)
		if !l.Dsyevd(n, a, lda, w) {
			t.Fatalf("n=%d: Dsyevd failed", n)
		}
		var ref mat.EigenSym
		if !ref.Factorize(sym, false) {
			t.Fatal("gonum EigenSym failed")
		}
		for i, want := range ref.Values(nil) {
			if math.Abs(w[i]-want) > 1e-12*float64(n) {
				t.Errorf("n=%d: w[%d] = %v, want %v", n, i, w[i], want)
			}
		}
		for j := 0; j < n; j++ {
			for k := 0; k <= j; k++ {
				var d float64
				for i := 0; i < n; i++ {
					d += a[i*lda+j] * a[i*lda+k]
				}
				if k == j {
					d--
				}
				if math.Abs(d) > 1e-12*float64(n) {
					t.Fatalf("n=%d: eigenvectors %d, %d: vᵀv off by %g", n, j, k, d)
				}
			}
			for i := 0; i < n; i++ {
				var x float64
				for p := 0; p < n; p++ {
					x += sym.At(i, p) * a[p*lda+j]
				}
				if d := math.Abs(x - w[j]*a[i*lda+j]); d > 1e-11*float64(n) {
					t.Fatalf("n=%d: (A v - λ v)[%d] of %d off by %g", n, i, j, d)
				}
			}
		}
	}
	defer func() {
		if r := recover(); r != "fastblas: short Dsyevd slice" {
			t.Errorf("short slice: panic %v", r)
		}
	}()
	l.Dsyevd(3, make([]float64, 8), 3, make([]float64, 3))
}

// denseOf copies the m×n matrix stored with row stride ld.
func denseOf(a []float64, m, n, ld int) []float64 {
	out := make([]float64, 0, m*n)
	for i := 0; i < m; i++ {
		out = append(out, a[i*ld:i*ld+n]...)
	}
	return out
}
