package bridge

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"

	"gonum.org/v1/gonum/mat"

	"github.com/peft-loraone/peft-loraone/dlpack"
)

// tensor is a fixture-backed DLPack tensor for the bridge tests.
type tensor struct {
	addr uintptr
	free func()
	n    int // elements
	size int // bytes per element
}

func newTensor(t *testing.T, f dlpack.Fixture) *tensor {
	t.Helper()
	addr, free := dlpack.NewFixture(f)
	t.Cleanup(free)
	n := 1
	for _, d := range f.Shape {
		n *= int(d)
	}
	return &tensor{addr: addr, free: free, n: n, size: int(f.DType.Bits) / 8}
}

func f64Bytes(v []float64) []byte {
	b := make([]byte, 8*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint64(b[8*i:], math.Float64bits(x))
	}
	return b
}

func (tt *tensor) float64s() []float64 {
	raw := dlpack.FixtureBytes(dlpack.FixtureData(tt.addr), 8*tt.n)
	v := make([]float64, tt.n)
	for i := range v {
		v[i] = math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:]))
	}
	return v
}

func matrix64(t *testing.T, rows, cols int, data []float64, versioned bool) *tensor {
	if data == nil {
		data = make([]float64, rows*cols)
	}
	return newTensor(t, dlpack.Fixture{Versioned: versioned, Major: 1, Device: dlpack.Device{Type: 1},
		NDim: 2, DType: dlpack.Float64, Shape: []int64{int64(rows), int64(cols)}, Data: f64Bytes(data)})
}

func vector64(t *testing.T, n int) *tensor {
	return newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Device: dlpack.Device{Type: 1},
		NDim: 1, DType: dlpack.Float64, Shape: []int64{int64(n)}, Data: make([]byte, 8*n)})
}

// lowRank returns an m×n row-major matrix of rank k with singular values 1, 1/2, 1/4, ...
func lowRank(m, n, k int, seed uint64) []float64 {
	rnd := rand.New(rand.NewPCG(seed, 1))
	g := mat.NewDense(m, n, nil)
	for c := 0; c < k; c++ {
		u := mat.NewVecDense(m, nil)
		v := mat.NewVecDense(n, nil)
		for i := 0; i < m; i++ {
			u.SetVec(i, rnd.NormFloat64())
		}
		for j := 0; j < n; j++ {
			v.SetVec(j, rnd.NormFloat64())
		}
		u.ScaleVec(1/mat.Norm(u, 2), u)
		v.ScaleVec(math.Pow(0.5, float64(c))/mat.Norm(v, 2), v)
		var outer mat.Dense
		outer.Outer(1, u, v)
		g.Add(g, &outer)
	}
	return g.RawMatrix().Data
}

type call struct {
	g, b, a, s, info *tensor
	rank             int
}

func newCall(t *testing.T, m, n, r int, g []float64) call {
	return call{
		g: matrix64(t, m, n, g, false), b: matrix64(t, m, r, nil, true), a: matrix64(t, r, n, nil, true),
		s: vector64(t, r), info: vector64(t, 3), rank: r,
	}
}

func (c call) compute(method int, scale float64) (float64, error) {
	return Compute(method, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true, c.info.addr, true,
		c.rank, scale, -1, -1, 1e-10, 1, AlgorithmDefault)
}

// TestAlgorithms: both truncated-SVD algorithms reach the exact top-r
// singular values of a full-rank matrix with a gap after r, and an unknown
// algorithm code is refused before any output is written.
func TestAlgorithms(t *testing.T) {
	const m, n, r = 40, 30, 4
	g := make([]float64, m*n)
	var svd mat.SVD
	for i := range g {
		g[i] = math.Sin(float64(i*i%97)) + float64(i%7)
	}
	if !svd.Factorize(mat.NewDense(m, n, g), mat.SVDNone) {
		t.Fatal("exact SVD failed")
	}
	want := svd.Values(nil)[:r]
	for _, alg := range []int{AlgorithmDefault, AlgorithmSubspace, AlgorithmKrylov} {
		c := newCall(t, m, n, r, g)
		if _, err := Compute(MethodLoRAOne, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true,
			c.info.addr, true, r, 128, -1, 60, 1e-12, 1, alg); err != nil {
			t.Fatalf("algorithm %d: %v", alg, err)
		}
		for i, s := range c.s.float64s()[:r] {
			if math.Abs(s-want[i]) > 1e-9*want[0] {
				t.Errorf("algorithm %d: S[%d] = %v, want %v", alg, i, s, want[i])
			}
		}
	}
	c := newCall(t, m, n, r, g)
	_, err := Compute(MethodLoRAOne, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true,
		c.info.addr, true, r, 128, -1, -1, -1, 1, 5)
	if err == nil || !strings.HasPrefix(err.Error(), "invalid-argument: unknown algorithm code 5") {
		t.Errorf("algorithm 5: err = %v", err)
	}
	for _, x := range c.b.float64s() {
		if x != 0 {
			t.Fatal("refused call wrote out_b")
		}
	}
}

// TestComputeLoRAOne checks B·A against [-G]_r/(gamma·sigma1) from gonum's exact SVD.
func TestComputeLoRAOne(t *testing.T) {
	const m, n, r, gamma = 30, 20, 3, 128.0
	g := lowRank(m, n, r, 7) // rank r: [-G]_r = -G
	c := newCall(t, m, n, r, g)
	acc, err := c.compute(MethodLoRAOne, gamma)
	if err != nil {
		t.Fatal(err)
	}
	var svd mat.SVD
	if !svd.Factorize(mat.NewDense(m, n, g), mat.SVDNone) {
		t.Fatal("exact SVD failed")
	}
	sigma1 := svd.Values(nil)[0]
	var ba mat.Dense
	ba.Mul(mat.NewDense(m, r, c.b.float64s()), mat.NewDense(r, n, c.a.float64s()))
	want := mat.NewDense(m, n, nil)
	want.Scale(-1/(gamma*sigma1), mat.NewDense(m, n, g))
	var diff mat.Dense
	diff.Sub(&ba, want)
	// Tolerance: exact rank-r input, so the randomized SVD is exact up to rounding.
	if e := mat.Norm(&diff, 2) / mat.Norm(want, 2); e > 1e-10 {
		t.Errorf("relative error %g", e)
	}
	info := c.info.float64s()
	if info[0] != acc || info[1] < 1 || info[2] != 1 {
		t.Errorf("info = %v, accuracy %g", info, acc)
	}
	if s := c.s.float64s(); math.Abs(s[0]-sigma1) > 1e-12 {
		t.Errorf("S[0] = %g, want %g", s[0], sigma1)
	}
}

func TestErrorKinds(t *testing.T) {
	const m, n, r = 6, 5, 2
	tests := []struct {
		name   string
		modify func(c *call) (method int, scale float64)
		kind   string
	}{
		{"zero gradient", func(c *call) (int, float64) { c.g = matrix64(t, m, n, nil, false); return MethodLoRAOne, 1 }, "zero-gradient:"},
		{"nan", func(c *call) (int, float64) {
			g := lowRank(m, n, 2, 1)
			g[7] = math.NaN()
			c.g = matrix64(t, m, n, g, false)
			return MethodLoRAOne, 1
		}, "non-finite:"},
		{"rank too large", func(c *call) (int, float64) {
			c.rank = 6
			c.b, c.a, c.s = matrix64(t, m, 6, nil, true), matrix64(t, 6, n, nil, true), vector64(t, 6)
			return MethodLoRAOne, 1
		}, "invalid-argument:"},
		{"bad gamma", func(c *call) (int, float64) { return MethodLoRAOne, -1 }, "invalid-argument: gamma"},
		{"bad scaling", func(c *call) (int, float64) { return MethodPiSSA, math.NaN() }, "invalid-argument: scaling"},
		{"unknown method", func(c *call) (int, float64) { return 7, 1 }, "invalid-argument: unknown method"},
		{"cuda input", func(c *call) (int, float64) {
			c.g = newTensor(t, dlpack.Fixture{Device: dlpack.Device{Type: 2}, NDim: 2, DType: dlpack.Float32,
				Shape: []int64{m, n}, Data: make([]byte, 4*m*n)})
			return MethodLoRAOne, 1
		}, "unsupported-device:"},
		{"int input", func(c *call) (int, float64) {
			c.g = newTensor(t, dlpack.Fixture{Device: dlpack.Device{Type: 1}, NDim: 2, DType: dlpack.DType{Code: 0, Bits: 32, Lanes: 1},
				Shape: []int64{m, n}, Data: make([]byte, 4*m*n)})
			return MethodLoRAOne, 1
		}, "unsupported-dtype: grad has dtype int32"},
		{"half output", func(c *call) (int, float64) {
			c.b = newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Device: dlpack.Device{Type: 1}, NDim: 2, DType: dlpack.Float16,
				Shape: []int64{m, r}, Data: make([]byte, 2*m*r)})
			return MethodLoRAOne, 1
		}, "unsupported-dtype: out_b"},
		{"read-only output", func(c *call) (int, float64) {
			c.a = newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Flags: 1, Device: dlpack.Device{Type: 1}, NDim: 2,
				DType: dlpack.Float64, Shape: []int64{r, n}, Data: make([]byte, 8*r*n)})
			return MethodLoRAOne, 1
		}, "read-only: out_a"},
		{"short info", func(c *call) (int, float64) { c.info = vector64(t, 2); return MethodLoRAOne, 1 }, "invalid-argument: info"},
		{"short S for LoRA-GA", func(c *call) (int, float64) { return MethodLoRAGA, 1 }, "invalid-argument: S must hold 4"},
		{"null address", func(c *call) (int, float64) { c.g = &tensor{}; return MethodLoRAOne, 1 }, "invalid-argument: grad"},
		{"forced panic", func(c *call) (int, float64) { return methodPanic, 1 }, "internal: Go panic"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newCall(t, m, n, r, lowRank(m, n, 2, 3))
			method, scale := tc.modify(&c)
			_, err := c.compute(method, scale)
			if err == nil || !strings.HasPrefix(err.Error(), tc.kind) {
				t.Fatalf("error = %v, want prefix %q", err, tc.kind)
			}
		})
	}
}

func TestForcePanic(t *testing.T) {
	_, err := ForcePanic("boom")
	if err == nil || !strings.Contains(err.Error(), "internal: Go panic: boom") {
		t.Fatalf("err = %v", err)
	}
}

// TestPool runs jobs concurrently from several goroutines and compares them with Compute.
func TestPool(t *testing.T) {
	const m, n, r = 40, 30, 3
	p := NewPool(2)
	if p.Workers() != 2 || NewPool(0).Workers() < 1 {
		t.Fatal("worker count")
	}
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			g := lowRank(m, n, 5, uint64(w))
			async, sync := newCall(t, m, n, r, g), newCall(t, m, n, r, g)
			id, err := p.Submit(MethodLoRAOne, async.g.addr, false, async.b.addr, true, async.a.addr, true,
				async.s.addr, true, async.info.addr, true, r, 64, -1, -1, 1e-10, 1, AlgorithmDefault)
			if err != nil {
				t.Error(err)
				return
			}
			if _, err := sync.compute(MethodLoRAOne, 64); err != nil {
				t.Error(err)
			}
			if _, err := p.Wait(id); err != nil {
				t.Error(err)
			}
			ab, sb := async.b.float64s(), sync.b.float64s()
			for i := range ab {
				if ab[i] != sb[i] {
					t.Errorf("worker %d: B differs at %d", w, i)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	if p.Pending() != 0 {
		t.Errorf("pending = %d", p.Pending())
	}
	if _, err := p.Wait(12345); err == nil || !strings.HasPrefix(err.Error(), "invalid-argument: no pending job") {
		t.Errorf("unknown id: %v", err)
	}
}

// TestPoolRecoversPanics: a panic inside a worker goroutine must come back from Wait.
func TestPoolRecoversPanics(t *testing.T) {
	c := newCall(t, 6, 5, 2, lowRank(6, 5, 2, 1))
	p := NewPool(1)
	id, err := p.Submit(methodPanic, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true, c.info.addr, true,
		2, 1, -1, -1, -1, 0, AlgorithmDefault)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wait(id); err == nil || !strings.HasPrefix(err.Error(), "internal: Go panic") {
		t.Fatalf("err = %v", err)
	}
}

func TestSubmitValidationErrorQueuesNothing(t *testing.T) {
	c := newCall(t, 6, 5, 2, nil) // zero data parses fine; bad gamma fails validation
	p := NewPool(1)
	if _, err := p.Submit(MethodLoRAOne, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true,
		c.info.addr, true, 2, 0, -1, -1, -1, 0, AlgorithmDefault); err == nil {
		t.Fatal("want error")
	}
	if p.Pending() != 0 {
		t.Fatalf("pending = %d", p.Pending())
	}
}

// TestWorkspacesReleased: a computation leaves its workspace on the free
// list for the next one, the next computation gives the same result, and
// ReleaseMemory drops what is kept.
func TestWorkspacesReleased(t *testing.T) {
	const m, n, r = 40, 30, 4
	g := lowRank(m, n, 6, 11)
	ReleaseMemory() // whatever earlier tests left
	first := newCall(t, m, n, r, g)
	if _, err := first.compute(MethodLoRAOne, 16); err != nil {
		t.Fatal(err)
	}
	if len(scratch) != 1 {
		t.Fatalf("%d workspaces kept after one computation, want 1", len(scratch))
	}
	second := newCall(t, m, n, r, g)
	if _, err := second.compute(MethodLoRAOne, 16); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(first.b.float64s(), second.b.float64s()) || !slices.Equal(first.a.float64s(), second.a.float64s()) {
		t.Errorf("the reused workspace changed the factors")
	}
	if n, err := ReleaseMemory(); n != 1 || err != nil {
		t.Errorf("ReleaseMemory() = %d, %v; want 1, nil", n, err)
	}
	if n, _ := ReleaseMemory(); n != 0 {
		t.Errorf("second ReleaseMemory() = %d, want 0", n)
	}
}
