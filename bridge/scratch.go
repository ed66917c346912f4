package bridge

import (
	"runtime"
	"runtime/debug"

	"github.com/peft-loraone/peft-loraone/loraone"
)

// scratch is the free list of engine workspaces (loraone.Workspace) that
// Compute and every Pool share: a computation takes one, or a new one when
// none is free, and gives it back when it is done. A run of calls (one per
// module of a model) then reuses the memory of the previous calls instead
// of faulting fresh pages in: on 4096×11008 at r = 64 that was 17–72 MB
// per call and the slowest calls. At most GOMAXPROCS workspaces are kept;
// ReleaseMemory drops them.
var scratch = make(chan *loraone.Workspace, runtime.GOMAXPROCS(0))

// takeWorkspace returns a free workspace, or a new one.
func takeWorkspace() *loraone.Workspace {
	select {
	case w := <-scratch:
		return w
	default:
		return new(loraone.Workspace)
	}
}

// giveWorkspace puts w back on the free list (or drops it when the list is
// full).
func giveWorkspace(w *loraone.Workspace) {
	select {
	case scratch <- w:
	default:
	}
}

// ReleaseMemory drops the workspaces kept for reuse and returns the Go
// heap's free memory to the operating system. It returns how many
// workspaces it dropped. Computations still running keep theirs until
// they finish (and then put them back).
func ReleaseMemory() (n int, err error) {
	defer recoverError(&err)
	for {
		select {
		case <-scratch:
			n++
		default:
			debug.FreeOSMemory()
			return n, nil
		}
	}
}
