package bridge

import (
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/peft-loraone/peft-loraone/loraone"
)

// numpyOpenBLAS returns numpy's bundled OpenBLAS ($FASTBLAS_LIB first), or "".
func numpyOpenBLAS() string {
	if p := os.Getenv("FASTBLAS_LIB"); p != "" {
		return p
	}
	for _, py := range []string{"python3", "python"} {
		exe, err := exec.LookPath(py)
		if err != nil {
			continue
		}
		out, err := exec.Command(exe, "-c",
			"import numpy, os; print(os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), 'numpy.libs'))").Output()
		if err != nil {
			continue
		}
		if m, _ := filepath.Glob(filepath.Join(strings.TrimSpace(string(out)), "libscipy_openblas*.so")); len(m) > 0 {
			return m[0]
		}
	}
	return ""
}

// TestUseBLAS covers the switch: a bad path keeps the current kernels, a good
// one is injected into later requests' options, UseGonum switches back. Not
// parallel: it changes the bridge's process-wide kernel setting.
func TestUseBLAS(t *testing.T) {
	t.Cleanup(func() { UseGonum() })
	if d, err := BLASInfo(); err != nil || d != gonumDescription {
		t.Fatalf("BLASInfo() = %q, %v", d, err)
	}
	if _, err := UseBLAS("/nonexistent/libopenblas.so", 1); err == nil ||
		!strings.HasPrefix(err.Error(), kindInvalid+": ") || !strings.Contains(err.Error(), "fast BLAS unavailable") {
		t.Fatalf("UseBLAS(bad path) error = %v", err)
	}
	if d, _ := BLASInfo(); d != gonumDescription {
		t.Fatalf("after a failed UseBLAS, BLASInfo() = %q", d)
	}
	var opt loraone.Options
	withBLAS(&opt)
	if opt.Sgemm != nil || opt.Dgemm != nil {
		t.Fatal("withBLAS injected kernels without a library")
	}
	if opt.Threads != runtime.GOMAXPROCS(0) {
		t.Errorf("without a BLAS, simd threads = %d, want GOMAXPROCS %d", opt.Threads, runtime.GOMAXPROCS(0))
	}
	if _, err := SetBLASThreads(0); err == nil {
		t.Error("SetBLASThreads(0) accepted")
	}

	path := numpyOpenBLAS()
	if path == "" {
		t.Skip("no OpenBLAS found (set FASTBLAS_LIB)")
	}
	desc, err := UseBLAS(path, 1)
	if err != nil {
		t.Skipf("UseBLAS(%s): %v (built without cgo?)", path, err)
	}
	if !strings.Contains(desc, "1 threads") || !strings.Contains(desc, path) {
		t.Errorf("UseBLAS description %q", desc)
	}
	if d, _ := BLASInfo(); d != desc {
		t.Errorf("BLASInfo() = %q, want %q", d, desc)
	}
	if d, err := SetBLASThreads(2); err != nil || !strings.Contains(d, "2 threads") {
		t.Errorf("SetBLASThreads(2) = %q, %v", d, err)
	}
	if withBLAS(&opt); opt.Threads != 2 {
		t.Errorf("with a 2-thread BLAS, simd threads = %d, want 2", opt.Threads)
	}

	// The injected kernels give the same factors as gonum's, to float32 rounding.
	const m, n, r = 300, 200, 5
	rng := rand.New(rand.NewPCG(3, 4))
	g := make([]float32, m*n)
	for t := 0; t < 20; t++ {
		u, v := make([]float32, m), make([]float32, n)
		for i := range u {
			u[i] = float32(rng.NormFloat64())
		}
		for i := range v {
			v[i] = float32(rng.NormFloat64())
		}
		w := float32(math.Pow(0.7, float64(t)))
		for i := 0; i < m; i++ {
			for j := 0; j < n; j++ {
				g[i*n+j] += w * u[i] * v[j]
			}
		}
	}
	in := loraone.Matrix{Rows: m, Cols: n, Stride: n, DType: loraone.Float32, F32: g}
	run := func(opt loraone.Options) []float64 {
		b := loraone.Dense{Rows: m, Cols: r, Stride: r, F64: make([]float64, m*r)}
		a := loraone.Dense{Rows: r, Cols: n, Stride: n, F64: make([]float64, r*n)}
		if _, err := loraone.LoRAOne(b, a, in, 1, opt); err != nil {
			t.Fatal(err)
		}
		x := make([]float64, m*n)
		for i := 0; i < m; i++ {
			for l := 0; l < r; l++ {
				for j := 0; j < n; j++ {
					x[i*n+j] += b.F64[i*r+l] * a.F64[l*n+j]
				}
			}
		}
		return x
	}
	opt = loraone.DefaultOptions(r)
	opt.Tol = 1e-7
	want := run(opt)
	withBLAS(&opt)
	if opt.Sgemm == nil || opt.Dgemm == nil {
		t.Fatal("withBLAS did not inject the loaded library")
	}
	got := run(opt)
	var num, den float64
	for i := range want {
		num += (got[i] - want[i]) * (got[i] - want[i])
		den += want[i] * want[i]
	}
	if d := math.Sqrt(num / den); d > 1e-5 {
		t.Errorf("OpenBLAS and gonum factors differ by %g (relative Frobenius)", d)
	}

	if d, _ := UseGonum(); d != gonumDescription {
		t.Errorf("UseGonum() = %q", d)
	}
	opt = loraone.DefaultOptions(r)
	withBLAS(&opt)
	if opt.Sgemm != nil {
		t.Error("kernels still injected after UseGonum")
	}
}
