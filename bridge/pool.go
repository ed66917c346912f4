package bridge

import (
	"runtime"
	"sync"
)

// Pool runs computations asynchronously on a bounded number of goroutines, so
// that Python can queue many modules and let Go compute them concurrently
// without holding the GIL.
//
// Submit validates the tensors and queues the job; Wait blocks until the job
// is done and returns what Compute would have returned. Python must keep
// every tensor of a job alive until Wait has returned for it, and must call
// Wait exactly once per job id.
type Pool struct {
	slots chan struct{}

	mu   sync.Mutex
	next int64
	jobs map[int64]*pending
}

type pending struct {
	done chan struct{}
	acc  float64
	err  error
}

// NewPool returns a pool that runs at most workers jobs at once; workers <= 0
// means GOMAXPROCS.
func NewPool(workers int) *Pool {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	return &Pool{slots: make(chan struct{}, workers), jobs: make(map[int64]*pending)}
}

// Workers returns the number of jobs the pool runs at once.
func (p *Pool) Workers() int { return cap(p.slots) }

// Pending returns the number of submitted jobs that have not been waited for.
func (p *Pool) Pending() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.jobs)
}

// Submit validates a computation (same arguments as Compute) and queues it.
// It returns a job id for Wait. A validation error is returned at once and
// queues nothing.
func (p *Pool) Submit(method int, g uintptr, gVersioned bool, b uintptr, bVersioned bool,
	a uintptr, aVersioned bool, s uintptr, sVersioned bool, info uintptr, infoVersioned bool,
	rank int, scale float64, oversampling int, maxIters int, tol float64, seed int64, algorithm int) (id int64, err error) {
	defer recoverError(&err)
	req, err := newRequest(method, g, gVersioned, b, bVersioned, a, aVersioned, s, sVersioned,
		info, infoVersioned, rank, scale, oversampling, maxIters, tol, seed, algorithm)
	if err != nil {
		return 0, err
	}
	job := &pending{done: make(chan struct{})}
	p.mu.Lock()
	p.next++
	id = p.next
	p.jobs[id] = job
	p.mu.Unlock()
	go p.work(job, req)
	return id, nil
}

// work runs one job in its own goroutine once a slot is free.
func (p *Pool) work(job *pending, req *request) {
	p.slots <- struct{}{}
	defer func() { <-p.slots }()
	defer close(job.done)
	defer recoverError(&job.err)
	job.acc, job.err = req.run()
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
