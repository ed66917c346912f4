package loraone

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"gonum.org/v1/gonum/mat"
)

// krylovImpl is RandSVD with Options.Krylov set.
func krylovImpl(g Matrix, opt Options) (*SVD, error) {
	opt.Krylov = true
	return RandSVD(g, opt)
}

// TestKrylovSuite runs the shared SVD suite (decaying, flat, exactly low
// rank, rank deficient, tall, wide, 1×n, n×1, 1×1, zero, NaN) on the
// block Krylov variant.
func TestKrylovSuite(t *testing.T) {
	svdSuite(t, krylovImpl)
}

// TestKrylovDTypes: every dtype and storage order gives the exact [G]_r of
// the values the view holds, with the float32 products on Sgemm and (where
// the CPU has them) on the simd kernels. 120×90 with a padded stride: the
// transposed views have a row count that is not a multiple of 8, and the
// half-precision views convert 64-row blocks (the kernels' accumulating
// path).
func TestKrylovDTypes(t *testing.T) {
	g := gapped()
	const r = 6
	for _, dt := range []DType{Float64, Float32, Float16, BFloat16} {
		for _, trans := range []bool{false, true} {
			for _, useSIMD := range []bool{false, true} {
				opt := Options{Rank: r, MaxIters: 10, Tol: 1e-10, Seed: 3, Krylov: true, SIMD: useSIMD}
				name := fmt.Sprintf("dtype=%v,trans=%v,simd=%v", dt, trans, useSIMD)
				v, vals := layout(g, dt, trans, 3)
				got, err := RandSVD(v, opt)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				checkSVDShape(t, name, got, 120, 90, r)
				// As TestDTypesAndLayouts: float32 products carry ~1e-7
				// rounding, amplified by σ₁/(σ_r−σ_{r+1}) ≈ 30.
				tol := 1e-5
				if dt == Float64 {
					tol = 1e-9
				}
				if d := relDiff(lowRank(got.U, got.S, got.V, r), truncate(t, vals, r)); d > tol {
					t.Errorf("%s: off the exact [G]_r by %g > %g (passes %d)", name, d, tol, got.Passes)
				}
			}
		}
	}
}

// TestKrylovRestart forces thick restarts (r = 2: block 16, basis cap 128)
// on a slowly decaying spectrum and checks the result against the exact
// SVD, for a tall and a wide matrix: float64 input, and float32 input with
// the simd kernels (where the CPU has them) running the products on two
// goroutines and CholeskyQR2 keeping one round for well-conditioned
// blocks. The gap at r (σ₂/σ₃ = 1.005) amplifies float32 rounding ~200×,
// hence 1e-4 there, against the exact [G]_r of the float32 values.
func TestKrylovRestart(t *testing.T) {
	for _, c := range []struct {
		dt  DType
		tol float64
	}{{Float64, 1e-6}, {Float32, 1e-4}} {
		for _, sz := range [][2]int{{400, 300}, {300, 400}} {
			m, n := sz[0], sz[1]
			g := synth(21, m, n, geometric(300, 1, 0.995))
			const r = 2
			opt := Options{Rank: r, MaxIters: 60, Tol: 1e-9, Krylov: true, SIMD: true, Threads: 2}
			v, vals := layout(g, c.dt, false, 0)
			res, err := RandSVD(v, opt)
			if err != nil {
				t.Fatal(err)
			}
			prefix := fmt.Sprintf("%v %d×%d", c.dt, m, n)
			checkSVDShape(t, prefix, res, m, n, r)
			if b := krylovBlock(r, m, n, opt); res.Passes <= 2*krylovCap(b)/b {
				t.Errorf("%s: %d passes: no restart exercised", prefix, res.Passes)
			}
			if d := relDiff(lowRank(res.U, res.S, res.V, r), truncate(t, vals, r)); d > c.tol || (c.dt == Float64 && !res.Converged) {
				t.Errorf("%s: off the exact [G]_r by %g (converged %v)", prefix, d, res.Converged)
			}
			t.Logf("%s: passes=%d accuracy=%.2g", prefix, res.Passes, res.Accuracy)
		}
	}
}

// TestKrylovLoRAOne: LoRA-One factors with the Krylov option, full rank
// and rank deficient.
func TestKrylovLoRAOne(t *testing.T) {
	g := gapped()
	const r, gamma = 6, 128.0
	_, _, es := exact(t, g)
	var neg mat.Dense
	neg.Scale(-1/(gamma*es[0]), g)
	want := truncate(t, &neg, r)
	opt := DefaultOptions(r)
	opt.Tol, opt.Krylov = 1e-7, true
	for _, f32 := range []bool{false, true} {
		b := denseOut(120, r, f32, false, 2)
		a := denseOut(r, 90, f32, true, 1)
		res, err := LoRAOne(b, a, view64(g, 0), gamma, opt)
		if err != nil {
			t.Fatal(err)
		}
		var ba mat.Dense
		ba.Mul(b.toMat(), a.toMat())
		if d := relDiff(&ba, want); d > 1e-6 {
			t.Errorf("f32=%v: ‖BA − [−G]_r/(γσ₁)‖/‖·‖ = %g", f32, d)
		}
		if math.Abs(res.Sigma1-es[0]) > 1e-10*es[0] {
			t.Errorf("Sigma1 = %v, want %v", res.Sigma1, es[0])
		}
	}
	// rank(G) = 2 < r = 5
	g2 := synth(9, 60, 40, []float64{4, 1})
	b, a := denseOut(60, 5, false, false, 0), denseOut(5, 40, false, false, 0)
	opt = DefaultOptions(5)
	opt.Krylov = true
	if _, err := LoRAOne(b, a, view64(g2, 0), 16, opt); err != nil {
		t.Fatal(err)
	}
	var ba, w mat.Dense
	ba.Mul(b.toMat(), a.toMat())
	w.Scale(-1/(16*4.0), g2)
	if d := relDiff(&ba, &w); d > 1e-12 || math.IsNaN(d) {
		t.Errorf("rank deficient: error %g", d)
	}
}

// TestKrylovDeterminism: equal seeds give bit-identical results.
func TestKrylovDeterminism(t *testing.T) {
	g := view64(synth(4, 80, 70, geometric(70, 1, 0.9)), 0)
	opt := Options{Rank: 4, MaxIters: 10, Tol: 1e-6, Seed: 9, Krylov: true}
	x, err := RandSVD(g, opt)
	if err != nil {
		t.Fatal(err)
	}
	y, err := RandSVD(g, opt)
	if err != nil {
		t.Fatal(err)
	}
	if !mat.Equal(x.U, y.U) || !mat.Equal(x.V, y.V) || x.Passes != y.Passes || x.Accuracy != y.Accuracy {
		t.Error("same seed, different results")
	}
	for i := range x.S {
		if x.S[i] != y.S[i] {
			t.Error("same seed, different S")
		}
	}
}

// TestKrylovVsSubspace logs passes-to-converge, time and true error of
// block Krylov and subspace iteration (pure-Go gonum kernels) at
// Tol = 1e-4 on 600×400 matrices, and checks both stay accurate.
func TestKrylovVsSubspace(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	flat := make([]float64, 400)
	for i := range flat {
		flat[i] = 1 - 0.4*float64(i)/400
	}
	for _, c := range []struct {
		name string
		s    []float64
	}{{"decaying", geometric(400, 1, 0.95)}, {"flat", flat}} {
		// G = U·diag(s)·Vᵀ built here (as synth does) so that [G]_r is
		// known without an exact SVD of G.
		rng := rand.New(rand.NewPCG(31, 7))
		eu, ev, es := orthonormal(rng, 600, 400), orthonormal(rng, 400, 400), c.s
		g := lowRank(eu, es, ev, 400)
		v := view64(g, 0)
		for _, r := range []int{16} {
			best := lowRank(eu, es, ev, r)
			var tail float64
			for _, x := range es[r:] {
				tail += x * x
			}
			for _, kry := range []bool{false, true} {
				opt := DefaultOptions(r)
				opt.Krylov = kry
				t0 := time.Now()
				res, err := RandSVD(v, opt)
				el := time.Since(t0)
				if err != nil {
					t.Fatal(err)
				}
				x := lowRank(res.U, res.S, res.V, r)
				errR := relDiff(x, best)
				var d mat.Dense
				d.Sub(g, x)
				excess := mat.Norm(&d, 2)/math.Sqrt(tail) - 1
				block := r
				if !kry {
					block = min(r+opt.Oversampling, 400)
				}
				name := "subspace"
				if kry {
					name = "krylov  "
				}
				t.Logf("%-8s r=%2d %s: passes=%2d col-passes=%4d time=%6.1fms acc=%.1e conv=%v ‖X−[G]_r‖/‖[G]_r‖=%.1e residual excess=%.1e",
					c.name, r, name, res.Passes, res.Passes*block, float64(el.Microseconds())/1e3, res.Accuracy, res.Converged, errR, excess)
				if c.name == "decaying" && errR > 1e-3 {
					t.Errorf("%s r=%d krylov=%v: error %g", c.name, r, kry, errR)
				}
				if excess > 1e-3 {
					t.Errorf("%s r=%d krylov=%v: residual excess %g", c.name, r, kry, excess)
				}
			}
		}
	}
}

// TestKrylovScale: σ₁ ≈ 1e±300 converges as at σ₁ ≈ 1 (the change
// estimate is computed on rescaled singular values), and an all-overflow
// input is ErrNonFinite.
func TestKrylovScale(t *testing.T) {
	g := gapped()
	_, _, es := exact(t, g)
	opt := DefaultOptions(6)
	opt.Krylov = true
	for _, f := range []float64{1e300, 1, 1e-300} {
		v := view64(g, 0)
		for i := range v.F64 {
			v.F64[i] *= f
		}
		res, err := RandSVD(v, opt)
		if err != nil {
			t.Fatalf("scale %g: %v", f, err)
		}
		if d := math.Abs(res.S[0]/f/es[0] - 1); d > 1e-9 || !res.Converged || math.IsNaN(res.Accuracy) {
			t.Errorf("scale %g: σ₁ off by %g, converged %v, accuracy %v", f, d, res.Converged, res.Accuracy)
		}
	}
	v := view64(g, 0)
	for i := range v.F64 {
		v.F64[i] = 1e308
	}
	if _, err := RandSVD(v, opt); !errors.Is(err, ErrNonFinite) {
		t.Errorf("overflow: err = %v", err)
	}
}

// TestKrylovEstimateValues: krylovEstimate on hand-computed cases, among
// them the pass-5 changes of a 4096×11008 matrix whose spectrum is
// clustered in fours (r = 64 at a cluster edge, Ritz gap 0.85).
func TestKrylovEstimateValues(t *testing.T) {
	for _, c := range []struct {
		name           string
		c, c1, c2, gap float64
		want           float64
	}{
		{"first change", 0.9, 0, 0, 0.5, 0.9},
		{"second change (errorEstimate)", 0.1, 0.5, 0, 0.5, 0.05},
		{"zero change", 0, 0.1, 0.2, 0.5, 0},
		{"clear gap, no floor", 3.94e-3, 7.77e-2, 0.146, 0.85,
			3.94e-3 * math.Sqrt(3.94e-3/0.146) / (1 - math.Sqrt(3.94e-3/0.146))},
		{"small gap keeps c/2", 3.94e-3, 7.77e-2, 0.146, 0.99, 3.94e-3 / 2},
		{"one-step rate larger", 0.01, 0.02, 0.5, 0.5, 0.01},
		{"slow progress", 0.1, 0.105, 0.11, 0.5, 0.9},
		{"no θ_r (gap 1)", 1e-3, 0.1, 0.2, 1, 5e-4},
	} {
		if got := krylovEstimate(c.c, c.c1, c.c2, c.gap); math.Abs(got-c.want) > 1e-12*math.Max(1, c.want) {
			t.Errorf("%s: krylovEstimate(%g, %g, %g, %g) = %g, want %g", c.name, c.c, c.c1, c.c2, c.gap, got, c.want)
		}
	}
}

// TestKrylovEstimateHolds: on spectra with a clear gap at r (clusters of
// four, r at a cluster edge; geometric) and with almost none (power law,
// σ_r/σ_{r+1} ≈ 1.02), the iteration asked for tol stops with a true
// error (against the exact [G]_r) of at most 2·tol, and its Accuracy
// understates that error by at most 3×.
func TestKrylovEstimateHolds(t *testing.T) {
	const m, n, r = 500, 400, 16
	clustered := make([]float64, n)
	power := make([]float64, n)
	for i := range clustered {
		clustered[i] = math.Pow(0.85, float64(i/4))
		power[i] = 1 / math.Sqrt(1+float64(i))
	}
	for _, c := range []struct {
		name string
		s    []float64
	}{{"clustered", clustered}, {"geometric", geometric(n, 1, 0.9)}, {"power", power}} {
		rng := rand.New(rand.NewPCG(41, 3))
		eu, ev := orthonormal(rng, m, n), orthonormal(rng, n, n)
		g := lowRank(eu, c.s, ev, n)
		best := lowRank(eu, c.s, ev, r)
		for _, tol := range []float64{1e-2, 1e-3, 1e-5} {
			opt := Options{Rank: r, MaxIters: 60, Tol: tol, Seed: 5, Krylov: true}
			res, err := RandSVD(view64(g, 0), opt)
			if err != nil {
				t.Fatal(err)
			}
			e := relDiff(lowRank(res.U, res.S, res.V, r), best)
			t.Logf("%-9s tol=%.0e: passes=%2d accuracy=%.2e true=%.2e", c.name, tol, res.Passes, res.Accuracy, e)
			if !res.Converged || e > 2*tol || e > 3*res.Accuracy {
				t.Errorf("%s tol=%g: converged=%v after %d passes, accuracy %.3g, true error %.3g",
					c.name, tol, res.Converged, res.Passes, res.Accuracy, e)
			}
		}
	}
}
