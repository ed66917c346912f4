package loraone

import (
	"fmt"
	"sync/atomic"
	"testing"

	"gonum.org/v1/gonum/mat"
)

// TestWorkspaceReuse: a run of block Krylov calls through one Workspace
// (shapes, dtypes and ranks changing from call to call, gonum's and an
// injected Dgemm/Gesdd in turn, a thick restart,
// the buffers that are not zeroed filled with NaN when reused, so that a
// read before a write would show) gives bit-identical results to the same
// calls without one.
func TestWorkspaceReuse(t *testing.T) {
	ws := new(Workspace)
	ws.f64.poison, ws.f32.poison = true, true
	for i, c := range []struct {
		m, n, r int
		dt      DType
		decay   float64
		iters   int
	}{
		{120, 90, 6, Float64, 0.8, 10},
		{300, 400, 2, Float32, 0.995, 60}, // restarts (block 16, cap 128)
		{90, 120, 16, Float32, 0.9, 10},
		{400, 300, 2, Float16, 0.995, 60},
		{120, 90, 6, Float64, 0.8, 10}, // the first call again
		{64, 700, 8, BFloat16, 0.7, 10},
		{300, 400, 2, Float32, 0.995, 60},
	} {
		name := fmt.Sprintf("call %d: %d×%d r=%d %v", i, c.m, c.n, c.r, c.dt)
		g := synth(uint64(30+i), c.m, c.n, geometric(min(c.m, c.n), 1, c.decay))
		v, _ := layout(g, c.dt, false, 0)
		opt := Options{Rank: c.r, MaxIters: c.iters, Tol: 1e-9, Seed: 9, Krylov: true, SIMD: true, Threads: 2}
		if i%2 == 1 { // an injected Dgemm turns on CholeskyQR2 and the known T entries
			var n32, n64, nsvd atomic.Int64
			opt.Sgemm, opt.Dgemm = countingKernels(&n32, &n64)
			opt.Gesdd = countingGesdd(&nsvd)
		}
		want, err := RandSVD(v, opt)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		opt.Workspace = ws
		got, err := RandSVD(v, opt)
		if err != nil {
			t.Fatalf("%s with workspace: %v", name, err)
		}
		if !mat.Equal(got.U, want.U) || !mat.Equal(got.V, want.V) || got.Passes != want.Passes || got.Accuracy != want.Accuracy {
			t.Errorf("%s: the workspace changed the result (passes %d vs %d, accuracy %g vs %g)",
				name, got.Passes, want.Passes, got.Accuracy, want.Accuracy)
		}
	}
}

// TestScratch: buffers are handed out smallest-fit, zeroed on request,
// reused by the next call and dropped when a call does not use them.
func TestScratch(t *testing.T) {
	var s scratch[float64]
	a := s.get(100, true)
	b := s.get(10, true)
	a[0], b[0] = 1, 2
	s.begin()
	if got := s.get(10, false); &got[0] != &b[0] || got[0] != 2 {
		t.Errorf("get(10, dirty) did not reuse the 10-element buffer with its values")
	}
	if got := s.get(50, true); &got[0] != &a[0] || got[0] != 0 {
		t.Errorf("get(50, zero) did not reuse and clear the 100-element buffer")
	}
	if got := s.get(5, true); &got[0] == &a[0] || &got[0] == &b[0] {
		t.Errorf("a buffer in use was handed out twice")
	}
	s.begin()
	s.get(100, true)
	s.begin()
	if len(s.bufs) != 1 || cap(s.bufs[0].data) != 100 {
		t.Errorf("begin kept %d buffers, want the one the last call used", len(s.bufs))
	}
	var w *Workspace // nil: plain allocation
	if x := w.float64s(3); len(x) != 3 {
		t.Errorf("nil Workspace: len %d", len(x))
	}
}
