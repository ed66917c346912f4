// Package simd holds the kernels that the SVD's thin products spend their
// time in, written for AVX-512 in Go assembly: a row-major float32 matrix
// times a panel of 16 columns (G·X) and its transpose (Gᵀ·Y), reading the
// big matrix once per 16 columns; the same two products in float64 on
// panels of 8 columns, for the projections against the Krylov bases
// (Qᵀ·W and W − Q·C, where OpenBLAS's Dgemm runs at about half their
// rate); and the IEEE half to float32 conversion.
//
// An optimized BLAS runs these thin products (a 4096×4096 matrix times 16
// columns) at about half its peak: it is built for square blocks. The
// kernels here stream the matrix row by row with eight rows in flight
// and the panel in registers or in the L2 cache.
//
// Available reports whether the CPU and the operating system support
// AVX-512F (with the ZMM state enabled); every other function panics when
// it is false, so callers check it once and keep their own fallback. On
// other architectures Available is always false.
package simd
