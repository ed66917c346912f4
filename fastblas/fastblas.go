package fastblas

import (
	"errors"
	"fmt"
	"strings"
	"unsafe"

	"gonum.org/v1/gonum/blas"
)

// ErrUnavailable is wrapped by every error of Open: the library could not be
// loaded, lacks the symbols, or this build has no cgo.
var ErrUnavailable = errors.New("fast BLAS unavailable")

// flavour is one naming scheme of the CBLAS entry points.
type flavour struct {
	name                   string // what String reports
	sgemm, dgemm           string
	setThreads, getThreads string
	config                 string
	gesdd                  string // LAPACKE_dgesdd, optional
	syevd                  string // LAPACKE_dsyevd, optional
	ilp64                  bool
}

// flavours lists the naming schemes tried, in order: numpy's bundled ILP64
// OpenBLAS (scipy-openblas64), the scipy-openblas32 wheel, a system OpenBLAS
// (LP64) and an OpenBLAS built with INTERFACE64 and the 64_ suffix.
var flavours = []flavour{
	{"scipy-openblas64 (ILP64)", "scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_",
		"scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_", "scipy_openblas_get_config64_", "scipy_LAPACKE_dgesdd64_", "scipy_LAPACKE_dsyevd64_", true},
	{"scipy-openblas32 (LP64)", "scipy_cblas_sgemm", "scipy_cblas_dgemm",
		"scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads", "scipy_openblas_get_config", "scipy_LAPACKE_dgesdd", "scipy_LAPACKE_dsyevd", false},
	{"OpenBLAS (LP64)", "cblas_sgemm", "cblas_dgemm",
		"openblas_set_num_threads", "openblas_get_num_threads", "openblas_get_config", "LAPACKE_dgesdd", "LAPACKE_dsyevd", false},
	{"OpenBLAS (ILP64, 64_ suffix)", "cblas_sgemm64_", "cblas_dgemm64_",
		"openblas_set_num_threads64_", "openblas_get_num_threads64_", "openblas_get_config64_", "LAPACKE_dgesdd64_", "LAPACKE_dsyevd64_", true},
}

// Lib is a loaded CBLAS library. Its methods are safe for concurrent use
// (OpenBLAS serializes what it must). A Lib is never unloaded.
type Lib struct {
	path                   string
	flavour                flavour
	sgemm, dgemm           unsafe.Pointer
	setThreads, getThreads unsafe.Pointer
	gesdd                  unsafe.Pointer // nil: the library has no LAPACKE
	syevd                  unsafe.Pointer // nil: the library has no LAPACKE
	config                 string
}

// Open loads the shared library at path with dlopen and looks up its CBLAS
// sgemm and dgemm under the naming schemes of numpy's bundled OpenBLAS
// (scipy_cblas_sgemm64_, ILP64), the scipy-openblas32 wheel
// (scipy_cblas_sgemm), and a plain OpenBLAS (cblas_sgemm, or cblas_sgemm64_).
// A library that the process already loaded (numpy's) is shared, so its
// thread setting is shared too.
//
// Errors wrap ErrUnavailable: no cgo in this build, dlopen failed, or no
// known pair of gemm symbols was found.
func Open(path string) (*Lib, error) {
	if !haveCgo {
		return nil, fmt.Errorf("fastblas: %s: built without cgo: %w", path, ErrUnavailable)
	}
	if path == "" {
		return nil, fmt.Errorf("fastblas: empty library path: %w", ErrUnavailable)
	}
	h, msg := dlOpen(path)
	if h == nil {
		return nil, fmt.Errorf("fastblas: dlopen %s: %s: %w", path, msg, ErrUnavailable)
	}
	for _, f := range flavours {
		s, d := dlSym(h, f.sgemm), dlSym(h, f.dgemm)
		if s == nil || d == nil {
			continue
		}
		l := &Lib{path: path, flavour: f, sgemm: s, dgemm: d,
			setThreads: dlSym(h, f.setThreads), getThreads: dlSym(h, f.getThreads),
			gesdd: dlSym(h, f.gesdd), syevd: dlSym(h, f.syevd)}
		if c := dlSym(h, f.config); c != nil {
			l.config = strings.TrimSpace(callGetConfig(c))
		}
		return l, nil
	}
	names := make([]string, len(flavours))
	for i, f := range flavours {
		names[i] = f.sgemm
	}
	return nil, fmt.Errorf("fastblas: %s has none of the symbols %s: %w", path, strings.Join(names, ", "), ErrUnavailable)
}

// Warm runs one moderate single- and one double-precision product so that
// the library allocates and touches its internal work buffers (and starts
// its threads) now rather than inside the first real computation: a caller
// can then measure its own memory and time without that one-time cost.
func (l *Lib) Warm() {
	// Shaped like the engine's products (a tall matrix times a thin panel,
	// and its transpose), which use the most buffer per thread.
	const m, n, k = 64, 48, 8192
	a32, b32, c32 := make([]float32, m*k), make([]float32, k*n), make([]float32, m*n)
	l.Sgemm(blas.Trans, blas.NoTrans, k, n, m, 1, a32, k, c32, n, 0, b32, n)
	l.Sgemm(blas.NoTrans, blas.NoTrans, m, n, k, 1, a32, k, b32, n, 0, c32, n)
	a64, b64, c64 := make([]float64, m*k), make([]float64, k*n), make([]float64, m*n)
	l.Dgemm(blas.Trans, blas.NoTrans, k, n, m, 1, a64, k, c64, n, 0, b64, n)
	l.Dgemm(blas.NoTrans, blas.NoTrans, m, n, k, 1, a64, k, b64, n, 0, c64, n)
}

// Path returns the path the library was opened from.
func (l *Lib) Path() string { return l.path }

// String describes the library: flavour, OpenBLAS build configuration,
// thread count and path.
func (l *Lib) String() string {
	cfg := l.config
	if cfg == "" {
		cfg = "unknown build"
	}
	return fmt.Sprintf("%s [%s], %d threads, %s", l.flavour.name, cfg, l.Threads(), l.path)
}

// SetThreads sets the library's thread count (process-wide for that
// library: numpy shares it). n < 1 is ignored. It returns false if the
// library has no thread setter.
func (l *Lib) SetThreads(n int) bool {
	if l.setThreads == nil || n < 1 {
		return false
	}
	callSetThreads(l.setThreads, min(n, 1<<20))
	return true
}

// Threads returns the library's thread count, or 0 if unknown.
func (l *Lib) Threads() int {
	if l.getThreads == nil {
		return 0
	}
	return callGetThreads(l.getThreads)
}

// Sgemm computes
//
//	C = alpha·op(A)·op(B) + beta·C
//
// for row-major float32 matrices, with op(A) m×k, op(B) k×n and C m×n, the
// contract of gonum's blas.Float32Level3.Sgemm. It panics (with a
// "fastblas: " message, before calling C) on a bad transpose, negative
// dimension, too small leading dimension or too short slice, so the library
// never reads or writes outside the slices.
func (l *Lib) Sgemm(tA, tB blas.Transpose, m, n, k int, alpha float32, a []float32, lda int,
	b []float32, ldb int, beta float32, c []float32, ldc int) {
	checkGemm(l.flavour.ilp64, tA, tB, m, n, k, len(a), lda, len(b), ldb, len(c), ldc)
	if m == 0 || n == 0 {
		return
	}
	if k == 0 || alpha == 0 {
		scale32(m, n, beta, c, ldc)
		return
	}
	callSgemm(l.sgemm, l.flavour.ilp64, tA != blas.NoTrans, tB != blas.NoTrans, m, n, k, alpha,
		&a[0], lda, &b[0], ldb, beta, &c[0], ldc)
}

// Dgemm is Sgemm for float64 (gonum's blas.Float64Level3.Dgemm contract).
func (l *Lib) Dgemm(tA, tB blas.Transpose, m, n, k int, alpha float64, a []float64, lda int,
	b []float64, ldb int, beta float64, c []float64, ldc int) {
	checkGemm(l.flavour.ilp64, tA, tB, m, n, k, len(a), lda, len(b), ldb, len(c), ldc)
	if m == 0 || n == 0 {
		return
	}
	if k == 0 || alpha == 0 {
		scale64(m, n, beta, c, ldc)
		return
	}
	callDgemm(l.dgemm, l.flavour.ilp64, tA != blas.NoTrans, tB != blas.NoTrans, m, n, k, alpha,
		&a[0], lda, &b[0], ldb, beta, &c[0], ldc)
}

// HasDgesdd reports whether the library exports LAPACKE_dgesdd (every
// OpenBLAS build with LAPACK does, numpy's included).
func (l *Lib) HasDgesdd() bool { return l.gesdd != nil }

// Dgesdd computes the thin SVD of the row-major m×n matrix a (destroyed):
//
//	a = u · diag(s) · vt,   u m×q, s q, vt q×n,   q = min(m, n)
//
// with LAPACK's divide-and-conquer dgesdd (jobz 'S'), writing s (descending),
// the first q columns of u (row stride ldu >= q) and the first q rows of vt
// (row stride ldvt >= n). It reports false when the library has no dgesdd or
// the iteration failed to converge; a and the outputs are then undefined.
// It panics on short slices or strides, before calling C. Its contract is
// loraone.Gesdd's.
func (l *Lib) Dgesdd(m, n int, a []float64, lda int, s, u []float64, ldu int, vt []float64, ldvt int) bool {
	q := min(m, n)
	if m < 0 || n < 0 || lda < max(1, n) || ldu < max(1, q) || ldvt < max(1, n) {
		panic("fastblas: bad Dgesdd dimension or stride")
	}
	if !l.flavour.ilp64 && (m > maxInt32 || n > maxInt32 || lda > maxInt32 || ldu > maxInt32 || ldvt > maxInt32) {
		panic("fastblas: dimension exceeds the 32-bit integers of this library")
	}
	if q == 0 {
		return true
	}
	if len(a) < (m-1)*lda+n || len(s) < q || len(u) < (m-1)*ldu+q || len(vt) < (q-1)*ldvt+n {
		panic("fastblas: short Dgesdd slice")
	}
	if l.gesdd == nil {
		return false
	}
	return callDgesdd(l.gesdd, l.flavour.ilp64, m, n, &a[0], lda, &s[0], &u[0], ldu, &vt[0], ldvt) == 0
}

// HasDsyevd reports whether the library exports LAPACKE_dsyevd.
func (l *Lib) HasDsyevd() bool { return l.syevd != nil }

// Dsyevd computes all eigenvalues and eigenvectors of the symmetric n×n
// row-major matrix a (its upper triangle is read) with LAPACK's
// divide-and-conquer dsyevd (jobz 'V'): w gets the eigenvalues in
// ascending order, and a is overwritten with the orthonormal eigenvectors,
// column j (a[i*lda+j], i < n) belonging to w[j]. It reports false when the
// library has no dsyevd or the iteration failed to converge; a and w are
// then undefined. It panics on short slices or strides, before calling C.
// Its contract is loraone.Syevd's.
func (l *Lib) Dsyevd(n int, a []float64, lda int, w []float64) bool {
	if n < 0 || lda < max(1, n) {
		panic("fastblas: bad Dsyevd dimension or stride")
	}
	if !l.flavour.ilp64 && (n > maxInt32 || lda > maxInt32) {
		panic("fastblas: dimension exceeds the 32-bit integers of this library")
	}
	if n == 0 {
		return true
	}
	if len(a) < (n-1)*lda+n || len(w) < n {
		panic("fastblas: short Dsyevd slice")
	}
	if l.syevd == nil {
		return false
	}
	return callDsyevd(l.syevd, l.flavour.ilp64, n, &a[0], lda, &w[0]) == 0
}

func scale32(m, n int, beta float32, c []float32, ldc int) {
	for i := 0; i < m; i++ {
		row := c[i*ldc : i*ldc+n]
		for j := range row {
			if beta == 0 {
				row[j] = 0
			} else {
				row[j] *= beta
			}
		}
	}
}

func scale64(m, n int, beta float64, c []float64, ldc int) {
	for i := 0; i < m; i++ {
		row := c[i*ldc : i*ldc+n]
		for j := range row {
			if beta == 0 {
				row[j] = 0
			} else {
				row[j] *= beta
			}
		}
	}
}

const maxInt32 = 1<<31 - 1

// checkGemm panics on misuse, like gonum's Sgemm/Dgemm, so that C never
// touches memory outside the slices.
func checkGemm(ilp64 bool, tA, tB blas.Transpose, m, n, k, la, lda, lb, ldb, lc, ldc int) {
	okT := func(t blas.Transpose) bool {
		return t == blas.NoTrans || t == blas.Trans || t == blas.ConjTrans
	}
	if !okT(tA) || !okT(tB) {
		panic("fastblas: bad transpose")
	}
	if m < 0 || n < 0 || k < 0 {
		panic("fastblas: negative dimension")
	}
	// Stored shapes (row-major): A is m×k or k×m, B is k×n or n×k.
	ar, ac := m, k
	if tA != blas.NoTrans {
		ar, ac = k, m
	}
	br, bc := k, n
	if tB != blas.NoTrans {
		br, bc = n, k
	}
	if lda < max(1, ac) || ldb < max(1, bc) || ldc < max(1, n) {
		panic("fastblas: bad leading dimension")
	}
	if !ilp64 && (m > maxInt32 || n > maxInt32 || k > maxInt32 || lda > maxInt32 || ldb > maxInt32 || ldc > maxInt32) {
		panic("fastblas: dimension exceeds the 32-bit integers of this library")
	}
	need := func(r, c, ld int) int {
		if r == 0 || c == 0 {
			return 0
		}
		return (r-1)*ld + c
	}
	if m > 0 && n > 0 && k > 0 && (la < need(ar, ac, lda) || lb < need(br, bc, ldb)) {
		panic("fastblas: short input slice")
	}
	if lc < need(m, n, ldc) {
		panic("fastblas: short output slice")
	}
}
