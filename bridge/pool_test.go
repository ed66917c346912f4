package bridge

import (
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peft-loraone/peft-loraone/dlpack"
)

// gaussian returns m×n standard normal values (a flat spectrum: with tol = 0
// and maxIters = MaxPowerIters a call makes 2002 passes, seconds on 600×500).
func gaussian(m, n int, seed uint64) []float64 {
	rnd := rand.New(rand.NewPCG(seed, 2))
	g := make([]float64, m*n)
	for i := range g {
		g[i] = rnd.NormFloat64()
	}
	return g
}

// longCall returns a call that runs for seconds unless cancelled.
func longCall(t *testing.T) call { return newCall(t, 600, 500, 4, gaussian(600, 500, 1)) }

// run starts c on p (Run, or Submit when queue is set) with tol and maxIters.
func (c call) start(t *testing.T, p *Pool, queue bool, maxIters int, tol float64) int64 {
	t.Helper()
	start := p.Run
	if queue {
		start = p.Submit
	}
	id, err := start(MethodLoRAOne, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true,
		c.info.addr, true, c.rank, 16, -1, maxIters, tol, 1, AlgorithmDefault)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// waitFor polls cond every millisecond for up to 10 s, failing the test
// with what it waited for when cond never holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for %s", what)
		}
	}
}

// unwritten reports whether the outputs of c are still all zero.
func (c call) unwritten() bool {
	for _, tt := range []*tensor{c.b, c.a, c.s, c.info} {
		for _, x := range tt.float64s() {
			if x != 0 {
				return false
			}
		}
	}
	return true
}

// TestRunPollCancel: a job from Run reports not done (at once and after a
// timeout), stops after Cancel with a "cancelled:" error and untouched
// outputs, and is then forgotten; unknown ids are handled.
func TestRunPollCancel(t *testing.T) {
	p := NewPool(1)
	c := longCall(t)
	id := c.start(t, p, false, MaxPowerIters, 0)
	if done, err := p.Poll(id, 0); done || err != nil {
		t.Fatalf("Poll(id, 0) on a running job = %v, %v", done, err)
	}
	start := time.Now()
	if done, err := p.Poll(id, 30); done || err != nil || time.Since(start) < 30*time.Millisecond {
		t.Fatalf("Poll(id, 30) on a running job = %v, %v after %v", done, err, time.Since(start))
	}
	if found, err := p.Cancel(id); !found || err != nil {
		t.Fatalf("Cancel(running) = %v, %v", found, err)
	}
	done, err := p.Poll(id, -1)
	if !done || err == nil || !strings.HasPrefix(err.Error(), "cancelled: loraone: stopped after ") {
		t.Fatalf("Poll(id, -1) after Cancel = %v, %v", done, err)
	}
	if !c.unwritten() {
		t.Error("a cancelled job wrote its outputs")
	}
	if done, err := p.Poll(id, 0); done || err == nil || !strings.HasPrefix(err.Error(), "invalid-argument: no pending job") {
		t.Errorf("Poll of a reported job = %v, %v", done, err)
	}
	if found, err := p.Cancel(id); found || err != nil {
		t.Errorf("Cancel of a reported job = %v, %v", found, err)
	}
	if found, err := p.Cancel(12345); found || err != nil {
		t.Errorf("Cancel(unknown) = %v, %v", found, err)
	}
	if done, err := p.Poll(12345, -1); done || err == nil || !strings.HasPrefix(err.Error(), "invalid-argument:") {
		t.Errorf("Poll(unknown) = %v, %v", done, err)
	}
	if p.Pending() != 0 {
		t.Errorf("pending = %d", p.Pending())
	}
}

// TestRunSkipsQueue: with the only worker busy and a job queued behind it,
// a job from Run completes (with Compute's result); cancelling the queued
// job ends it without running, cancelling the busy one stops it.
func TestRunSkipsQueue(t *testing.T) {
	p := NewPool(1)
	busy, queued := longCall(t), longCall(t)
	idBusy := busy.start(t, p, true, MaxPowerIters, 0)
	// Each job takes the worker slot on its own goroutine: submit the second
	// only once the first holds it (else either may run first; seen on CI).
	waitFor(t, "the first job to take the worker", func() bool { return len(p.slots) == 1 })
	idQueued := queued.start(t, p, true, MaxPowerIters, 0)

	g := lowRank(40, 30, 5, 3)
	fast, ref := newCall(t, 40, 30, 3, g), newCall(t, 40, 30, 3, g)
	idFast := fast.start(t, p, false, -1, 1e-10)
	if done, err := p.Poll(idFast, -1); !done || err != nil {
		t.Fatalf("Poll(run job) = %v, %v", done, err)
	}
	if _, err := Compute(MethodLoRAOne, ref.g.addr, false, ref.b.addr, true, ref.a.addr, true, ref.s.addr, true,
		ref.info.addr, true, 3, 16, -1, -1, 1e-10, 1, AlgorithmDefault); err != nil {
		t.Fatal(err)
	}
	for i, pair := range [][2]*tensor{{fast.b, ref.b}, {fast.a, ref.a}, {fast.s, ref.s}, {fast.info, ref.info}} {
		if !slices.Equal(pair[0].float64s(), pair[1].float64s()) {
			t.Errorf("output %d of Run differs from Compute", i)
		}
	}

	if done, err := p.Poll(idBusy, 0); done || err != nil {
		t.Fatalf("busy job done early: %v, %v", done, err)
	}
	if found, err := p.Cancel(idQueued); !found || err != nil {
		t.Fatalf("Cancel(queued) = %v, %v", found, err)
	}
	if done, err := p.Poll(idQueued, -1); !done || err == nil ||
		err.Error() != "cancelled: the job was cancelled while it waited for a worker: loraone: cancelled" {
		t.Errorf("queued job after Cancel: %v, %v", done, err)
	}
	if found, err := p.Cancel(idBusy); !found || err != nil {
		t.Fatalf("Cancel(busy) = %v, %v", found, err)
	}
	if _, err := p.Wait(idBusy); err == nil || !strings.HasPrefix(err.Error(), "cancelled: ") {
		t.Errorf("Wait(busy) after Cancel: %v", err)
	}
	if !busy.unwritten() || !queued.unwritten() {
		t.Error("a cancelled job wrote its outputs")
	}
}

// TestPollConcurrent: several goroutines poll one job, and others cancel a
// second one, at once: every poller that found the job gets its result,
// later ones the invalid-argument error, and the cancelled job reports
// "cancelled:" exactly once. Run under -race.
func TestPollConcurrent(t *testing.T) {
	p := NewPool(2)
	c := newCall(t, 200, 150, 4, gaussian(200, 150, 2))
	id := c.start(t, p, false, 6, 0)
	long := longCall(t)
	idLong := long.start(t, p, true, MaxPowerIters, 0)
	var (
		wg                 sync.WaitGroup
		mu                 sync.Mutex
		got, gone, stopped int
	)
	for w := 0; w < 6; w++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for {
				done, err := p.Poll(id, 5)
				mu.Lock()
				switch {
				case done && err == nil:
					got++
				case !done && err != nil && strings.HasPrefix(err.Error(), "invalid-argument: no pending job"):
					gone++
				case !done && err == nil:
					mu.Unlock()
					continue
				default:
					t.Errorf("Poll = %v, %v", done, err)
				}
				mu.Unlock()
				return
			}
		}()
		go func() {
			defer wg.Done()
			if _, err := p.Cancel(idLong); err != nil {
				t.Error(err)
			}
			done, err := p.Poll(idLong, -1)
			mu.Lock()
			defer mu.Unlock()
			if done && err != nil && strings.HasPrefix(err.Error(), "cancelled: ") {
				stopped++
			} else if done || err == nil || !strings.HasPrefix(err.Error(), "invalid-argument: ") {
				t.Errorf("Poll(cancelled job) = %v, %v", done, err)
			}
		}()
	}
	wg.Wait()
	if got < 1 || got+gone != 6 || stopped < 1 {
		t.Errorf("pollers: %d got the result, %d found it gone; %d saw the cancellation", got, gone, stopped)
	}
	if c.unwritten() || !long.unwritten() {
		t.Error("outputs: the finished job wrote nothing, or the cancelled one wrote")
	}
	if p.Pending() != 0 {
		t.Errorf("pending = %d", p.Pending())
	}
}

// TestCancelFinished: Cancel on a job that is done but not yet reported
// returns false and does not change its result.
func TestCancelFinished(t *testing.T) {
	p := NewPool(1)
	c := newCall(t, 40, 30, 3, lowRank(40, 30, 5, 4))
	id := c.start(t, p, false, -1, 1e-10)
	<-p.lookup(id).done
	if found, err := p.Cancel(id); found || err != nil {
		t.Errorf("Cancel(done job) = %v, %v", found, err)
	}
	if done, err := p.Poll(id, 0); !done || err != nil {
		t.Errorf("Poll(done job) = %v, %v", done, err)
	}
}

// TestLimits: maxIters above MaxPowerIters is refused as an invalid argument
// naming the limit, and a gamma that makes the float32 factors overflow is a
// "non-finite:" error; neither writes an output.
func TestLimits(t *testing.T) {
	const m, n, r = 12, 10, 2
	g := lowRank(m, n, 4, 5)
	c := newCall(t, m, n, r, g)
	_, err := Compute(MethodLoRAOne, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true,
		c.info.addr, true, r, 16, -1, MaxPowerIters+1, 0, 1, AlgorithmDefault)
	if err == nil || !strings.HasPrefix(err.Error(), "invalid-argument: power_iters (maxIters) = 1001 is above the limit MaxPowerIters = 1000") {
		t.Errorf("maxIters %d: %v", MaxPowerIters+1, err)
	}
	pool := NewPool(1)
	if _, err := pool.Run(MethodLoRAOne, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true,
		c.info.addr, true, r, 16, -1, 1<<62, 0, 1, AlgorithmDefault); err == nil || !strings.HasPrefix(err.Error(), "invalid-argument: ") {
		t.Errorf("Run with maxIters 2^62: %v", err)
	}
	if pool.Pending() != 0 {
		t.Errorf("a refused Run left %d jobs", pool.Pending())
	}
	if !c.unwritten() {
		t.Error("a refused call wrote its outputs")
	}

	for _, method := range []int{MethodLoRAOne, MethodLoRAGA, MethodPiSSA} {
		c := newCall(t, m, n, r, g)
		c.s = vector64(t, 2*r)
		c.b = newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Device: dlpack.Device{Type: 1}, NDim: 2,
			DType: dlpack.Float32, Shape: []int64{m, r}, Data: make([]byte, 4*m*r)})
		_, err := Compute(method, c.g.addr, false, c.b.addr, true, c.a.addr, true, c.s.addr, true,
			c.info.addr, true, r, 1e-300, -1, -1, -1, 1, AlgorithmDefault)
		want := "non-finite: loraone: gamma = 1e-300 makes the factors overflow"
		if method == MethodPiSSA {
			want = "non-finite: loraone: scaling = 1e-300 makes the factors overflow"
		}
		if err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("method %d: err = %v, want prefix %q", method, err, want)
		}
		raw := dlpack.FixtureBytes(dlpack.FixtureData(c.b.addr), 4*m*r)
		rest := call{b: c.a, a: c.s, s: c.info, info: c.info} // the float64 outputs
		if slices.ContainsFunc(raw, func(x byte) bool { return x != 0 }) || !rest.unwritten() {
			t.Errorf("method %d: outputs written", method)
		}
	}
}
