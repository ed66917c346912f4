package bridge

import (
	"context"
	"math"
	"runtime"
	"sync"
	"time"

	"github.com/peft-loraone/peft-loraone/loraone"
)

// Pool runs computations asynchronously, so that Python can queue many
// modules and let Go compute them concurrently without holding the GIL.
//
// Submit validates the tensors and queues the job for one of the pool's
// workers (at most Workers jobs from Submit run at once); Run validates and
// starts the job at once, without waiting for a worker. Either returns a
// job id, which a job keeps until it is reported done:
//
//	Wait(id)              blocks until the job is done, forgets it, and
//	                      returns what Compute would have returned
//	Poll(id, timeoutMs)   waits at most timeoutMs; once the job is done,
//	                      forgets it and returns (true, its error)
//	Cancel(id)            asks the job to stop at its next pass
//
// Python must keep every tensor of a job (and the storage behind it) alive
// until Poll or Wait has reported the job done, also after Cancel: until
// then Go may still read the input and write the outputs. Each job must be
// reported done once (by Wait or Poll); a job that never is stays in the
// pool's table. A Pool is safe for use from several goroutines (Python
// threads) at once.
type Pool struct {
	slots chan struct{}

	mu   sync.Mutex
	next int64
	jobs map[int64]*pending
}

type pending struct {
	done   chan struct{}      // closed when acc and err are final
	cancel context.CancelFunc // cancels the job's loraone.Options.Context
	acc    float64
	err    error
}

// NewPool returns a pool that runs at most workers jobs from Submit at once;
// workers <= 0 means GOMAXPROCS.
func NewPool(workers int) *Pool {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	return &Pool{slots: make(chan struct{}, workers), jobs: make(map[int64]*pending)}
}

// Workers returns the number of jobs from Submit the pool runs at once.
func (p *Pool) Workers() int { return cap(p.slots) }

// Pending returns the number of jobs (running, queued, or done) that have
// not been reported done by Wait or Poll.
func (p *Pool) Pending() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.jobs)
}

// Submit validates a computation (same arguments as Compute) and queues it
// for a worker. It returns a job id for Wait, Poll and Cancel. A validation
// error is returned at once and queues nothing.
func (p *Pool) Submit(method int, g uintptr, gVersioned bool, b uintptr, bVersioned bool,
	a uintptr, aVersioned bool, s uintptr, sVersioned bool, info uintptr, infoVersioned bool,
	rank int, scale float64, oversampling int, maxIters int, tol float64, seed int64, algorithm int) (id int64, err error) {
	defer recoverError(&err)
	req, err := newRequest(method, g, gVersioned, b, bVersioned, a, aVersioned, s, sVersioned,
		info, infoVersioned, rank, scale, oversampling, maxIters, tol, seed, algorithm)
	if err != nil {
		return 0, err
	}
	return p.start(req, true), nil
}

// Run is Submit for a job that starts at once on its own goroutine, without
// waiting for one of the pool's workers (nor occupying one). It is how a
// synchronous call that Python waits for interruptibly (Poll in a loop,
// Cancel on Ctrl-C) is made.
func (p *Pool) Run(method int, g uintptr, gVersioned bool, b uintptr, bVersioned bool,
	a uintptr, aVersioned bool, s uintptr, sVersioned bool, info uintptr, infoVersioned bool,
	rank int, scale float64, oversampling int, maxIters int, tol float64, seed int64, algorithm int) (id int64, err error) {
	defer recoverError(&err)
	req, err := newRequest(method, g, gVersioned, b, bVersioned, a, aVersioned, s, sVersioned,
		info, infoVersioned, rank, scale, oversampling, maxIters, tol, seed, algorithm)
	if err != nil {
		return 0, err
	}
	return p.start(req, false), nil
}

// start registers a job for req, with a context Cancel can cancel, and
// starts its goroutine; queue makes it wait for a worker slot.
func (p *Pool) start(req *request, queue bool) int64 {
	ctx, cancel := context.WithCancel(context.Background())
	req.opt.Context = ctx
	job := &pending{done: make(chan struct{}), cancel: cancel}
	p.mu.Lock()
	p.next++
	id := p.next
	p.jobs[id] = job
	p.mu.Unlock()
	go p.work(job, req, queue)
	return id
}

// work runs one job; with queue set, once a worker slot is free (a job
// cancelled while it waits ends without running).
func (p *Pool) work(job *pending, req *request, queue bool) {
	defer close(job.done)
	defer job.cancel() // releases the context
	defer recoverError(&job.err)
	if queue {
		select {
		case p.slots <- struct{}{}:
			defer func() { <-p.slots }()
		case <-req.opt.Context.Done():
			job.err = kindf(kindCancel, "the job was cancelled while it waited for a worker: %w", loraone.ErrCancelled)
			return
		}
	}
	job.acc, job.err = req.run()
}

// lookup returns the job with id, or nil.
func (p *Pool) lookup(id int64) *pending {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.jobs[id]
}

// forget removes the job with id.
func (p *Pool) forget(id int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.jobs, id)
}

// Wait blocks until job id is done, forgets it, and returns its accuracy
// estimate or its error. The GIL is released while it waits.
func (p *Pool) Wait(id int64) (acc float64, err error) {
	defer recoverError(&err)
	p.mu.Lock()
	job, ok := p.jobs[id]
	delete(p.jobs, id)
	p.mu.Unlock()
	if !ok {
		return 0, kindf(kindInvalid, "no pending job with id %d (already waited for?)", id)
	}
	<-job.done
	return job.acc, job.err
}

// Poll waits at most timeoutMs milliseconds for job id (0: does not wait;
// negative: waits until it is done). If the job is done, Poll forgets it
// and returns true with the job's error (nil, or one with a kind prefix as
// Compute's; "cancelled:" after Cancel); the accuracy is in the job's info
// output. If not, it returns (false, nil). An id that is not pending
// (unknown, or already reported done) is an "invalid-argument:" error.
//
// Several goroutines may poll one job at once: all that found it pending
// get its result when it is done, and a Poll that comes after the job was
// forgotten gets the invalid-argument error. The GIL is released while it
// waits, so Python can poll in short slices and stay responsive to Ctrl-C.
func (p *Pool) Poll(id int64, timeoutMs int) (done bool, err error) {
	defer recoverError(&err)
	job := p.lookup(id)
	if job == nil {
		return false, kindf(kindInvalid, "no pending job with id %d (already reported done?)", id)
	}
	switch {
	case timeoutMs < 0:
		<-job.done
	case timeoutMs == 0:
		select {
		case <-job.done:
		default:
			return false, nil
		}
	default:
		d := time.Duration(math.MaxInt64) // about 292 years: forever
		if int64(timeoutMs) < math.MaxInt64/int64(time.Millisecond) {
			d = time.Duration(timeoutMs) * time.Millisecond
		}
		timer := time.NewTimer(d)
		defer timer.Stop()
		select {
		case <-job.done:
		case <-timer.C:
			return false, nil
		}
	}
	p.forget(id)
	return true, job.err
}

// Cancel asks job id to stop: a running job stops before its next pass over
// the input (within one product of G with a block) and a queued one before
// it starts, and it then finishes with a "cancelled:" error and writes no
// output. found reports whether the job was still running or queued; an
// unknown id, or a job already done, gives (false, nil). A job past its last
// check (writing its outputs) completes normally. Python must still keep the
// tensors alive and call Poll or Wait until the job is reported done.
func (p *Pool) Cancel(id int64) (found bool, err error) {
	defer recoverError(&err)
	job := p.lookup(id)
	if job == nil {
		return false, nil
	}
	select {
	case <-job.done:
		return false, nil
	default:
	}
	job.cancel()
	return true, nil
}
