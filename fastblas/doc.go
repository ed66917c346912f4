// Package fastblas loads an optimized CBLAS (OpenBLAS) at run time with
// dlopen and exposes its single- and double-precision matrix multiply with
// gonum's row-major Sgemm/Dgemm contract.
//
// # Overview
//
// No library is linked at build time: Open takes the path of a shared
// library that some other component found, typically the OpenBLAS that
// numpy bundles (numpy.libs/libscipy_openblas64_*.so, ILP64, symbols
// scipy_cblas_sgemm64_ …) or the one of the scipy-openblas32 wheel. A
// pure-Go build (CGO_ENABLED=0) compiles, and Open then reports
// ErrUnavailable, so callers fall back to gonum.
//
// The package is the only one besides dlpack that uses cgo, and only
// dl_cgo.go imports "C": it holds dlopen/dlsym and C trampolines, because Go
// cannot call a C function pointer directly.
//
// # Invariants
//
// Lib.Sgemm and Lib.Dgemm check every dimension, leading dimension and
// slice length and panic on misuse before calling C, so the library never
// reads or writes outside the slices it is given. C keeps no pointer after
// a call returns. The library's thread count is process-wide (numpy shares
// it when it is numpy's copy).
package fastblas // import "github.com/peft-loraone/peft-loraone/fastblas"
