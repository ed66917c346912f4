//go:build cgo

package fastblas

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>

// CBLAS row-major gemm with 64-bit (ILP64) or 32-bit (LP64) integers. The
// enums (order, transposes) are C ints in both flavours.
typedef void (*sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float,
	const float*, int64_t, const float*, int64_t, float, float*, int64_t);
typedef void (*dgemm64_t)(int, int, int, int64_t, int64_t, int64_t, double,
	const double*, int64_t, const double*, int64_t, double, double*, int64_t);
typedef void (*sgemm32_t)(int, int, int, int32_t, int32_t, int32_t, float,
	const float*, int32_t, const float*, int32_t, float, float*, int32_t);
typedef void (*dgemm32_t)(int, int, int, int32_t, int32_t, int32_t, double,
	const double*, int32_t, const double*, int32_t, double, double*, int32_t);
// openblas_set_num_threads takes a C int in every build, ILP64 included.
typedef void (*setthreads_t)(int);
// openblas_get_num_threads returns a C int in every build, ILP64 included.
typedef int (*getthreads_t)(void);
typedef char* (*getconfig_t)(void);
// LAPACKE_dgesdd (row-major C interface; LAPACKE allocates its own work).
typedef int64_t (*dgesdd64_t)(int, char, int64_t, int64_t, double*, int64_t,
	double*, double*, int64_t, double*, int64_t);
typedef int32_t (*dgesdd32_t)(int, char, int32_t, int32_t, double*, int32_t,
	double*, double*, int32_t, double*, int32_t);
// LAPACKE_dsyevd (row-major C interface).
typedef int64_t (*dsyevd64_t)(int, char, char, int64_t, double*, int64_t, double*);
typedef int32_t (*dsyevd32_t)(int, char, char, int32_t, double*, int32_t, double*);

static void fb_sgemm(void* f, int ilp64, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha,
	const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
	if (ilp64) {
		((sgemm64_t)f)(101, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
	} else {
		((sgemm32_t)f)(101, ta, tb, (int32_t)m, (int32_t)n, (int32_t)k, alpha, a, (int32_t)lda, b, (int32_t)ldb, beta, c, (int32_t)ldc);
	}
}

static void fb_dgemm(void* f, int ilp64, int ta, int tb, int64_t m, int64_t n, int64_t k, double alpha,
	const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
	if (ilp64) {
		((dgemm64_t)f)(101, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
	} else {
		((dgemm32_t)f)(101, ta, tb, (int32_t)m, (int32_t)n, (int32_t)k, alpha, a, (int32_t)lda, b, (int32_t)ldb, beta, c, (int32_t)ldc);
	}
}

static int64_t fb_dgesdd(void* f, int ilp64, char jobz, int64_t m, int64_t n, double* a, int64_t lda,
	double* s, double* u, int64_t ldu, double* vt, int64_t ldvt) {
	if (ilp64) {
		return ((dgesdd64_t)f)(101, jobz, m, n, a, lda, s, u, ldu, vt, ldvt);
	}
	return ((dgesdd32_t)f)(101, jobz, (int32_t)m, (int32_t)n, a, (int32_t)lda, s, u, (int32_t)ldu, vt, (int32_t)ldvt);
}

static int64_t fb_dsyevd(void* f, int ilp64, int64_t n, double* a, int64_t lda, double* w) {
	if (ilp64) {
		return ((dsyevd64_t)f)(101, 'V', 'U', n, a, lda, w);
	}
	return ((dsyevd32_t)f)(101, 'V', 'U', (int32_t)n, a, (int32_t)lda, w);
}

static void fb_set_threads(void* f, int n) {
	((setthreads_t)f)(n);
}

static int fb_get_threads(void* f) {
	return ((getthreads_t)f)();
}

static const char* fb_get_config(void* f) {
	return ((getconfig_t)f)();
}
*/
import "C"

import (
	"unsafe"
)

// The CBLAS transpose codes.
const (
	cblasNoTrans = 111
	cblasTrans   = 112
)

const haveCgo = true

// dlOpen loads the shared library at path (RTLD_NOW|RTLD_LOCAL). A library
// that is already loaded, for example by numpy, is shared, not loaded twice.
func dlOpen(path string) (handle unsafe.Pointer, err string) {
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	C.dlerror()
	h := C.dlopen(cs, C.RTLD_NOW|C.RTLD_LOCAL)
	if h == nil {
		return nil, C.GoString(C.dlerror())
	}
	return h, ""
}

// dlSym returns the address of the symbol name in handle, or nil.
func dlSym(handle unsafe.Pointer, name string) unsafe.Pointer {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	C.dlerror()
	return C.dlsym(handle, cs)
}

func cTrans(t bool) C.int {
	if t {
		return cblasTrans
	}
	return cblasNoTrans
}

func cBool(b bool) C.int {
	if b {
		return 1
	}
	return 0
}

// callSgemm calls the row-major CBLAS sgemm at f. The slices are only read
// (c is written) during the call; C keeps no pointer.
func callSgemm(f unsafe.Pointer, ilp64 bool, tA, tB bool, m, n, k int, alpha float32,
	a *float32, lda int, b *float32, ldb int, beta float32, c *float32, ldc int) {
	C.fb_sgemm(f, cBool(ilp64), cTrans(tA), cTrans(tB), C.int64_t(m), C.int64_t(n), C.int64_t(k), C.float(alpha),
		(*C.float)(unsafe.Pointer(a)), C.int64_t(lda), (*C.float)(unsafe.Pointer(b)), C.int64_t(ldb),
		C.float(beta), (*C.float)(unsafe.Pointer(c)), C.int64_t(ldc))
}

// callDgemm calls the row-major CBLAS dgemm at f.
func callDgemm(f unsafe.Pointer, ilp64 bool, tA, tB bool, m, n, k int, alpha float64,
	a *float64, lda int, b *float64, ldb int, beta float64, c *float64, ldc int) {
	C.fb_dgemm(f, cBool(ilp64), cTrans(tA), cTrans(tB), C.int64_t(m), C.int64_t(n), C.int64_t(k), C.double(alpha),
		(*C.double)(unsafe.Pointer(a)), C.int64_t(lda), (*C.double)(unsafe.Pointer(b)), C.int64_t(ldb),
		C.double(beta), (*C.double)(unsafe.Pointer(c)), C.int64_t(ldc))
}

// callDgesdd calls the row-major LAPACKE dgesdd at f with jobz 'S' (thin
// factors) and returns its info (0 on success).
func callDgesdd(f unsafe.Pointer, ilp64 bool, m, n int, a *float64, lda int,
	s, u *float64, ldu int, vt *float64, ldvt int) int {
	return int(C.fb_dgesdd(f, cBool(ilp64), 'S', C.int64_t(m), C.int64_t(n), (*C.double)(unsafe.Pointer(a)), C.int64_t(lda),
		(*C.double)(unsafe.Pointer(s)), (*C.double)(unsafe.Pointer(u)), C.int64_t(ldu),
		(*C.double)(unsafe.Pointer(vt)), C.int64_t(ldvt)))
}

// callDsyevd calls the row-major LAPACKE dsyevd at f with jobz 'V' (the
// eigenvectors too) and uplo 'U', and returns its info (0 on success).
func callDsyevd(f unsafe.Pointer, ilp64 bool, n int, a *float64, lda int, w *float64) int {
	return int(C.fb_dsyevd(f, cBool(ilp64), C.int64_t(n), (*C.double)(unsafe.Pointer(a)), C.int64_t(lda),
		(*C.double)(unsafe.Pointer(w))))
}

func callSetThreads(f unsafe.Pointer, n int) {
	C.fb_set_threads(f, C.int(n))
}

func callGetThreads(f unsafe.Pointer) int {
	return int(C.fb_get_threads(f))
}

func callGetConfig(f unsafe.Pointer) string {
	p := C.fb_get_config(f)
	if p == nil {
		return ""
	}
	return C.GoString(p)
}
