package loraone

import (
	"math"

	"gonum.org/v1/gonum/blas/blas64"
)

// Workspace is scratch memory that block Krylov calls (Options.Krylov)
// reuse: the bases, the projected matrix, the product panels and the
// orthogonalization scratch. A call with Options.Workspace set takes its
// large buffers from it and leaves them there for the next call, so that
// a run of calls (one per module of a model) stops asking the operating
// system for fresh pages once the Workspace has grown to the largest
// call. On 4096×11008 at r = 64 a call without one faulted in 17–72 MB
// and took 0.21–0.29 s, the slow calls being the ones that faulted most.
//
// A Workspace keeps what the previous call used and drops the rest when
// the next call begins. Results never alias it. The zero value is ready
// to use; a Workspace must not be used by two calls at once.
type Workspace struct {
	f64 scratch[float64]
	f32 scratch[float32]
}

// begin starts a call: every buffer the last call used is free again.
func (w *Workspace) begin() {
	if w != nil {
		w.f64.begin()
		w.f32.begin()
	}
}

// float64s returns a zeroed slice of length n (fresh memory when w is nil).
func (w *Workspace) float64s(n int) []float64 {
	if w == nil {
		return make([]float64, n)
	}
	return w.f64.get(n, true)
}

// float32s is float64s for float32.
func (w *Workspace) float32s(n int) []float32 {
	if w == nil {
		return make([]float32, n)
	}
	return w.f32.get(n, true)
}

// float32sDirty is float32s for buffers the caller overwrites before it
// reads them: from a Workspace they keep the last call's values.
func (w *Workspace) float32sDirty(n int) []float32 {
	if w == nil {
		return make([]float32, n)
	}
	return w.f32.get(n, false)
}

// float64sDirty is float64s for buffers the caller overwrites before it
// reads them: from a Workspace they keep the last call's values.
func (w *Workspace) float64sDirty(n int) []float64 {
	if w == nil {
		return make([]float64, n)
	}
	return w.f64.get(n, false)
}

// generalDirty is general for matrices the caller overwrites before it
// reads them (see float64sDirty).
func (w *Workspace) generalDirty(r, c int) blas64.General {
	return blas64.General{Rows: r, Cols: c, Stride: c, Data: w.float64sDirty(r * c)}
}

// general returns a zeroed r×c matrix (fresh memory when w is nil).
func (w *Workspace) general(r, c int) blas64.General {
	return blas64.General{Rows: r, Cols: c, Stride: c, Data: w.float64s(r * c)}
}

// scratch is a set of reusable buffers of one element type.
type scratch[T float32 | float64] struct {
	bufs   []buffer[T]
	poison bool // tests: fill reused buffers that are not zeroed with NaN
}

type buffer[T float32 | float64] struct {
	data []T
	used bool
}

// begin drops the buffers the last call did not use and frees the others.
func (s *scratch[T]) begin() {
	kept := s.bufs[:0]
	for _, b := range s.bufs {
		if b.used {
			kept = append(kept, buffer[T]{data: b.data})
		}
	}
	clear(s.bufs[len(kept):])
	s.bufs = kept
}

// get returns a slice of length n from the smallest free buffer that
// holds it (zeroed when zero is set), or from a new buffer.
func (s *scratch[T]) get(n int, zero bool) []T {
	best := -1
	for i, b := range s.bufs {
		if !b.used && cap(b.data) >= n && (best < 0 || cap(b.data) < cap(s.bufs[best].data)) {
			best = i
		}
	}
	if best < 0 {
		s.bufs = append(s.bufs, buffer[T]{data: make([]T, n)})
		best = len(s.bufs) - 1
	}
	s.bufs[best].used = true
	d := s.bufs[best].data[:n]
	switch {
	case zero:
		clear(d)
	case s.poison:
		nan := T(math.NaN())
		for i := range d {
			d[i] = nan
		}
	}
	return d
}
