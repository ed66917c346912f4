package bridge

import (
	"runtime"
	"sync/atomic"

	"github.com/peft-loraone/peft-loraone/fastblas"
	"github.com/peft-loraone/peft-loraone/loraone"
)

// activeBLAS is the optimized BLAS every later computation uses, or nil for
// gonum's pure-Go kernels. It is the bridge's only process-wide setting:
// Python sets it once at import (UseBLAS) and may switch it back (UseGonum);
// a computation reads it once, when it is validated.
var activeBLAS atomic.Pointer[fastblas.Lib]

// gonumDescription is what BLASInfo reports without an optimized BLAS.
const gonumDescription = "gonum (pure Go)"

// UseBLAS loads the OpenBLAS shared library at path (numpy's bundled
// libscipy_openblas64_*.so, the scipy-openblas32 wheel's library, or a
// system libopenblas.so) and makes every later computation use its sgemm
// and dgemm for the products with the input. threads > 0 sets the
// library's thread count (process-wide for that library; numpy shares it
// when it is numpy's copy); threads <= 0 leaves it as it is.
//
// It returns a description of the library. On error ("invalid-argument:
// ... fast BLAS unavailable") the kernels in use do not change, so the
// engine keeps working with gonum's pure-Go kernels.
func UseBLAS(path string, threads int) (desc string, err error) {
	defer recoverError(&err)
	lib, err := fastblas.Open(path)
	if err != nil {
		return "", kindf(kindInvalid, "%v", err)
	}
	if threads > 0 {
		lib.SetThreads(threads)
	}
	lib.Warm() // its buffers and threads now, not inside the first computation
	activeBLAS.Store(lib)
	return lib.String(), nil
}

// UseGonum switches later computations back to gonum's pure-Go kernels and
// returns their description.
func UseGonum() (desc string, err error) {
	defer recoverError(&err)
	activeBLAS.Store(nil)
	return gonumDescription, nil
}

// BLASInfo describes the kernels that computations submitted now use: the
// loaded OpenBLAS (flavour, build, threads, path) or "gonum (pure Go)".
func BLASInfo() (desc string, err error) {
	defer recoverError(&err)
	if lib := activeBLAS.Load(); lib != nil {
		return lib.String(), nil
	}
	return gonumDescription, nil
}

// SetBLASThreads sets the thread count of the loaded OpenBLAS (n >= 1) and
// returns the description; without one it does nothing.
func SetBLASThreads(n int) (desc string, err error) {
	defer recoverError(&err)
	if n < 1 {
		return "", kindf(kindInvalid, "thread count must be >= 1, got %d", n)
	}
	lib := activeBLAS.Load()
	if lib == nil {
		return gonumDescription, nil
	}
	lib.SetThreads(n)
	return lib.String(), nil
}

// withBLAS injects the active BLAS into opt (nothing when none is loaded)
// and sets the simd kernels' thread count to match it.
// newRequest calls it, so a job keeps the kernels it was validated with.
func withBLAS(opt *loraone.Options) {
	// The simd kernels stand in for the BLAS on the thin float32 products:
	// as many goroutines as the BLAS has threads (gonum's kernels use
	// GOMAXPROCS).
	opt.Threads = runtime.GOMAXPROCS(0)
	if lib := activeBLAS.Load(); lib != nil {
		opt.Sgemm = lib.Sgemm
		opt.Dgemm = lib.Dgemm
		if lib.HasDgesdd() {
			opt.Gesdd = lib.Dgesdd
		}
		if lib.HasDsyevd() {
			opt.Syevd = lib.Dsyevd
		}
		opt.Threads = lib.Threads()
	}
}

// KernelInfo describes the engine's own SIMD kernels on this machine
// (loraone.SIMDInfo): with AVX-512 they run the thin float32 products of
// the SVD instead of the BLAS that BLASInfo reports.
func KernelInfo() (desc string, err error) {
	defer recoverError(&err)
	return loraone.SIMDInfo(), nil
}
