package loraone

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"gonum.org/v1/gonum/mat"
)

// gaussian returns an r×c matrix of N(0, 1) entries.
func gaussian(rng *rand.Rand, r, c int) *mat.Dense {
	d := mat.NewDense(r, c, nil)
	for i := range d.RawMatrix().Data {
		d.RawMatrix().Data[i] = rng.NormFloat64()
	}
	return d
}

// sketchSpec says how sketchOf stores a sketch.
type sketchSpec struct {
	k, l, t int  // l = 0: 2k+1
	two     bool // two-pass: Y = orth(G·Ω), W = Qᵀ·G
	dt      DType
	trans   bool // column-major views
	pad     int  // row padding (NaN)
}

// sketchOf accumulates the sketch of g the way Python does (Gaussian test
// matrices from seed), stored in the spec's dtype and layout. In two-pass
// mode X = Qᵀ·G is formed from the stored (rounded) Q.
func sketchOf(t *testing.T, g mat.Matrix, sp sketchSpec, seed uint64) Sketch {
	t.Helper()
	m, n := g.Dims()
	l := sp.l
	if l == 0 {
		l = 2*sp.k + 1
	}
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	om, psi, omt := gaussian(rng, n, sp.k), gaussian(rng, l, m), gaussian(rng, n, sp.t)
	store := func(x mat.Matrix) Matrix {
		v, _ := layout(x, sp.dt, sp.trans, sp.pad)
		return v
	}
	var y, z mat.Dense
	y.Mul(g, om)
	z.Mul(g, omt)
	sk := Sketch{Y: store(&y), Z: store(&z), OmegaT: store(omt), TwoPass: sp.two}
	if sp.two {
		yd := Dense{Rows: m, Cols: sp.k, Stride: sk.Y.Stride, Trans: sp.trans, F32: sk.Y.F32, F64: sk.Y.F64}
		if _, err := Orthonormalize(yd); err != nil {
			t.Fatal(err)
		}
		q := mat.NewDense(m, sp.k, readGeneral(sk.Y, false).Data)
		var x mat.Dense
		x.Mul(q.T(), g)
		sk.W = store(&x)
	} else {
		var w mat.Dense
		w.Mul(psi, g)
		sk.W, sk.Psi = store(&w), store(psi)
	}
	return sk
}

// exactInit returns the exact LoRA-One B·A = [−G]_r/(γ·σ₁) from gonum's SVD.
func exactInit(t *testing.T, g mat.Matrix, r int, gamma float64) *mat.Dense {
	u, v, s := exact(t, g)
	want := lowRank(u, s, v, r)
	want.Scale(-1/(gamma*s[0]), want)
	return want
}

func baOf(b, a Dense) *mat.Dense {
	var ba mat.Dense
	ba.Mul(b.toMat(), a.toMat())
	return &ba
}

func TestOrthonormalize(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	graded := func(m, k int, kappa float64) *mat.Dense {
		s := make([]float64, k)
		for i := range s {
			s[i] = math.Pow(kappa, -float64(i)/float64(k-1))
		}
		return synth(5, m, k, s)
	}
	rank2 := func(m, k int) *mat.Dense {
		var y mat.Dense
		y.Mul(gaussian(rng, m, 2), gaussian(rng, 2, k))
		return &y
	}
	tests := []struct {
		name     string
		y        *mat.Dense
		dt       DType
		trans    bool
		pad      int
		rank     int
		tol      float64 // orthonormality and span
		hugeTiny float64 // scale the input by this
	}{
		{"gaussian f64", gaussian(rng, 30, 7), Float64, false, 0, 7, 1e-13, 1},
		{"gaussian f32 col-major padded", gaussian(rng, 30, 7), Float32, true, 3, 7, 1e-6, 1},
		{"square f64", gaussian(rng, 6, 6), Float64, false, 1, 6, 1e-13, 1},
		{"graded 1e12 f64", graded(40, 6, 1e12), Float64, false, 0, 6, 1e-12, 1},
		{"graded 1e12 f32", graded(40, 6, 1e12), Float32, false, 0, 3, 1e-6, 1}, // σ_i = 10^(−2.4i): those < 40·2⁻²³ are dropped
		{"rank 2 of 6 f64", rank2(25, 6), Float64, true, 2, 2, 1e-13, 1},
		{"huge f64", gaussian(rng, 12, 4), Float64, false, 0, 4, 1e-13, 1e300},
		{"tiny f64", gaussian(rng, 12, 4), Float64, false, 0, 4, 1e-13, 1e-300},
		{"one column f32", gaussian(rng, 9, 1), Float32, false, 0, 1, 1e-6, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			y := mat.DenseCopyOf(tc.y)
			y.Scale(tc.hugeTiny, y)
			v, vals := layout(y, tc.dt, tc.trans, tc.pad)
			d := Dense{Rows: v.Rows, Cols: v.Cols, Stride: v.Stride, Trans: v.Trans, F32: v.F32, F64: v.F64}
			rank, err := Orthonormalize(d)
			if err != nil {
				t.Fatal(err)
			}
			if rank != tc.rank {
				t.Errorf("rank = %d, want %d", rank, tc.rank)
			}
			q := d.toMat()
			if e := orthoErr(q); e > tc.tol {
				t.Errorf("|QᵀQ − I| = %g > %g", e, tc.tol)
			}
			// range(Y) ⊂ range(Q): ‖Y − Q·Qᵀ·Y‖ / ‖Y‖
			var qty, p mat.Dense
			qty.Mul(q.T(), vals)
			p.Mul(q, &qty)
			if e := relDiff(&p, vals); e > 10*tc.tol {
				t.Errorf("‖Y − QQᵀY‖/‖Y‖ = %g", e)
			}
			for i, x := range v.F64 { // padding never written
				if r, c := i/v.Stride, i%v.Stride; c >= v.Stride-tc.pad && !math.IsNaN(x) {
					t.Fatalf("padding (%d, %d) written", r, c)
				}
			}
		})
	}
}

func TestOrthonormalizeErrors(t *testing.T) {
	nan := func(d Dense) Dense { d.F64[7] = math.NaN(); return d }
	tests := []struct {
		name string
		y    Dense
		want error
	}{
		{"wide", Dense{Rows: 3, Cols: 4, Stride: 4, F64: make([]float64, 12)}, ErrShape},
		{"short slice", Dense{Rows: 4, Cols: 3, Stride: 3, F64: make([]float64, 11)}, ErrShape},
		{"no data", Dense{Rows: 4, Cols: 3, Stride: 3}, ErrDType},
		{"zero", Dense{Rows: 4, Cols: 3, Stride: 3, F32: make([]float32, 12)}, ErrZero},
		{"nan", nan(Dense{Rows: 4, Cols: 3, Stride: 3, F64: []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}}), ErrNonFinite},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := slices.Clone(tc.y.F64)
			_, err := Orthonormalize(tc.y)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			for i := range before {
				if before[i] != tc.y.F64[i] && !math.IsNaN(before[i]) {
					t.Fatal("y written on error")
				}
			}
		})
	}
}

// TestLoRAOneSketchExact: a G of rank <= k is captured whole, so the
// sketch path must give LoRAOne's init (and the exact one) to rounding, in
// every dtype, layout and mode, with the sign of −G.
func TestLoRAOneSketchExact(t *testing.T) {
	const m, n, gamma = 40, 70, 16.0
	g := synth(11, m, n, []float64{3, 2, 1.5, 1, 0.25})
	for _, dt := range []DType{Float64, Float32} {
		for _, two := range []bool{false, true} {
			for _, r := range []int{1, 3, 5} {
				sp := sketchSpec{k: 7, t: 6, two: two, dt: dt, trans: r == 3, pad: r % 2}
				name := fmt.Sprintf("%v/two=%v/r=%d", dt, two, r)
				sk := sketchOf(t, g, sp, uint64(r))
				b := denseOut(m, r, dt == Float32, r == 1, 1)
				a := denseOut(r, n, false, r == 5, 0)
				var nsvd atomic.Int64
				opt := DefaultOptions(r)
				if r == 3 {
					opt.Gesdd = countingGesdd(&nsvd)
				}
				res, err := LoRAOneSketch(b, a, sk, gamma, opt)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				tol := 1e-12
				if dt == Float32 {
					tol = 2e-6
				}
				want := exactInit(t, g, r, gamma)
				if e := relDiff(baOf(b, a), want); e > tol || e > 2*res.Accuracy {
					t.Errorf("%s: relative error %g (tol %g, Accuracy %g)", name, e, tol, res.Accuracy)
				}
				if res.Accuracy > 50*tol {
					t.Errorf("%s: Accuracy %g on an exact sketch", name, res.Accuracy)
				}
				if res.Rank != 5 || res.K != 7 || len(res.S) != r || res.Sigma1 != res.S[0] {
					t.Errorf("%s: rank %d K %d S %v", name, res.Rank, res.K, res.S)
				}
				if math.Abs(res.S[0]-3) > 3*tol {
					t.Errorf("%s: sigma1 %v, want 3", name, res.S[0])
				}
				if r == 3 && nsvd.Load() != 1 {
					t.Errorf("%s: injected Gesdd called %d times, want 1", name, nsvd.Load())
				}
				// The dense path agrees (same formulas, same sign).
				bd, ad := denseOut(m, r, false, false, 0), denseOut(r, n, false, false, 0)
				gv, _ := layout(g, Float64, false, 0)
				if _, err := LoRAOne(bd, ad, gv, gamma, DefaultOptions(r)); err != nil {
					t.Fatal(err)
				}
				if e := relDiff(baOf(b, a), baOf(bd, ad)); e > 2*tol {
					t.Errorf("%s: differs from LoRAOne by %g", name, e)
				}
			}
		}
	}
}

// sketchSpectra are the test spectra of the honesty checks, for an m×n G.
func sketchSpectra(m, n int) []struct {
	name string
	s    []float64
	good bool // a spectrum on which a sketch of k >= 4r is good
} {
	p := min(m, n)
	fn := func(f func(i int) float64) []float64 {
		s := make([]float64, p)
		for i := range s {
			s[i] = f(i)
		}
		return s
	}
	return []struct {
		name string
		s    []float64
		good bool
	}{
		{"fast decay 0.5", geometric(p, 1, 0.5), true},
		{"gradient-like 0.9", geometric(p, 1, 0.9), false},
		{"power law 1/i", fn(func(i int) float64 { return 1 / float64(i+1) }), false},
		{"flat", fn(func(i int) float64 { return 1 + 0.01*float64(p-i)/float64(p) }), false},
		{"clusters of 4", fn(func(i int) float64 { return math.Pow(0.5, float64(i/4)) * (1 - 1e-3*float64(i%4)) }), false},
		{"decay to a floor", fn(func(i int) float64 { return math.Max(math.Pow(0.8, float64(i)), 0.05) }), false},
	}
}

// TestLoRAOneSketchHonest: on every test spectrum, mode and dtype the true
// error of s·B·A (against gonum's exact SVD) is at most 2·Accuracy, and
// Residual is within 2× of the true ‖G − [Ĝ]_r‖/‖G‖. Where the sketch is
// good, Accuracy is not absurdly pessimistic.
func TestLoRAOneSketchHonest(t *testing.T) {
	const m, n, gamma = 48, 120, 64.0
	var ratios []float64
	for _, sc := range sketchSpectra(m, n) {
		g := synth(7, m, n, sc.s)
		for _, r := range []int{4, 6} {
			want := exactInit(t, g, r, gamma)
			for _, k := range []int{2*r + 1, 4 * r} {
				for _, two := range []bool{false, true} {
					for _, dt := range []DType{Float64, Float32} {
						name := fmt.Sprintf("%s/r=%d/k=%d/two=%v/%v", sc.name, r, k, two, dt)
						sk := sketchOf(t, g, sketchSpec{k: k, t: 10, two: two, dt: dt}, uint64(k))
						b, a := denseOut(m, r, false, false, 0), denseOut(r, n, false, false, 0)
						res, err := LoRAOneSketch(b, a, sk, gamma, DefaultOptions(r))
						if err != nil {
							t.Fatalf("%s: %v", name, err)
						}
						e := relDiff(baOf(b, a), want)
						ratios = append(ratios, e/res.Accuracy)
						if e > 2*res.Accuracy {
							t.Errorf("%s: true error %.3g > 2·Accuracy %.3g", name, e, res.Accuracy)
						}
						if sc.good && k >= 4*r && res.Accuracy > 10*e+1e-5 {
							t.Errorf("%s: Accuracy %.3g is more than 10× the true error %.3g", name, res.Accuracy, e)
						}
						// True residual ‖G − [Ĝ]_r‖/‖G‖ with [Ĝ]_r = −γσ̂₁·B·A.
						gh := baOf(b, a)
						gh.Scale(-gamma*res.Sigma1, gh)
						var d mat.Dense
						d.Sub(g, gh)
						tr := mat.Norm(&d, 2) / mat.Norm(g, 2)
						if q := res.Residual / tr; q < 1.0/3 || q > 3 { // t = 10 test vectors
							t.Errorf("%s: Residual %.3g, true %.3g", name, res.Residual, tr)
						}
					}
				}
			}
		}
	}
	slices.Sort(ratios)
	t.Logf("true/Accuracy over %d cases: min %.3f median %.3f max %.3f", len(ratios), ratios[0], ratios[len(ratios)/2], ratios[len(ratios)-1])
}

// TestLoRAOneSketchErrors: every refusal wraps its sentinel and leaves
// both outputs untouched.
func TestLoRAOneSketchErrors(t *testing.T) {
	const m, n, r = 12, 20, 2
	g := synth(1, m, n, []float64{2, 1, 0.5, 0.25})
	good := func(two bool) Sketch { return sketchOf(t, g, sketchSpec{k: 5, t: 3, two: two, dt: Float64}, 1) }
	zero := func(v Matrix) Matrix { v.F64 = make([]float64, len(v.F64)); return v }
	poison := func(v Matrix, x float64) Matrix { v.F64 = slices.Clone(v.F64); v.F64[len(v.F64)/2] = x; return v }
	tests := []struct {
		name   string
		two    bool
		modify func(sk *Sketch, opt *Options, gamma *float64)
		want   error
		msg    string
	}{
		{"gamma 0", false, func(sk *Sketch, opt *Options, gamma *float64) { *gamma = 0 }, ErrArgument, "gamma"},
		{"rank 0", false, func(sk *Sketch, opt *Options, gamma *float64) { opt.Rank = 0 }, ErrRank, "rank 0"},
		{"rank > k", false, func(sk *Sketch, opt *Options, gamma *float64) { opt.Rank = 6 }, ErrRank, "k = 5"},
		{"k > min(m, n)", false, func(sk *Sketch, opt *Options, gamma *float64) {
			*sk = sketchOf(t, g, sketchSpec{k: 13, l: 13, t: 3, dt: Float64}, 1) // rows of Y must be >= k for Orthonormalize; single pass here
		}, ErrRank, "min(m, n)"},
		{"l < k", false, func(sk *Sketch, opt *Options, gamma *float64) {
			*sk = sketchOf(t, g, sketchSpec{k: 5, l: 4, t: 3, dt: Float64}, 1)
		}, ErrShape, "l = 4"},
		{"Psi shape", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Psi.Rows-- }, ErrShape, "Psi"},
		{"Psi absent", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Psi = Matrix{} }, ErrShape, "Psi"},
		{"Z rows", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Z.Rows-- }, ErrShape, "Z"},
		{"OmegaT cols", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.OmegaT.Cols-- }, ErrShape, "OmegaT"},
		{"two-pass X rows", true, func(sk *Sketch, opt *Options, gamma *float64) { sk.W.Rows-- }, ErrShape, "two-pass"},
		{"Y dtype", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Y.DType = 9 }, ErrDType, "sketch Y"},
		{"NaN in Y", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Y = poison(sk.Y, math.NaN()) }, ErrNonFinite, "sketch Y element"},
		{"Inf in W", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.W = poison(sk.W, math.Inf(1)) }, ErrNonFinite, "sketch W element"},
		{"NaN in Psi", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Psi = poison(sk.Psi, math.NaN()) }, ErrNonFinite, "Psi"},
		{"NaN in Z", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Z = poison(sk.Z, math.NaN()) }, ErrNonFinite, "Z"},
		{"NaN in OmegaT", true, func(sk *Sketch, opt *Options, gamma *float64) { sk.OmegaT = poison(sk.OmegaT, math.NaN()) }, ErrNonFinite, "OmegaT"},
		{"zero Y", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Y = zero(sk.Y) }, ErrZero, "Y"},
		{"zero W", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.W = zero(sk.W) }, ErrZero, "W"},
		{"zero X", true, func(sk *Sketch, opt *Options, gamma *float64) { sk.W = zero(sk.W) }, ErrZero, "W"},
		{"zero Z", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Z = zero(sk.Z) }, ErrArgument, "test vectors"},
		{"singular Psi", false, func(sk *Sketch, opt *Options, gamma *float64) { sk.Psi = zero(sk.Psi) }, ErrArgument, "singular"},
		{"two-pass Y not orthonormal", true, func(sk *Sketch, opt *Options, gamma *float64) {
			sk.Y = good(false).Y
		}, ErrArgument, "orth"},
		{"overflow", false, func(sk *Sketch, opt *Options, gamma *float64) {
			// X = (Ψ·Q)⁺·W ~ 1e310
			sk.W.F64, sk.Psi.F64 = slices.Clone(sk.W.F64), slices.Clone(sk.Psi.F64)
			for i := range sk.W.F64 {
				sk.W.F64[i] *= 1e5
			}
			for i := range sk.Psi.F64 {
				sk.Psi.F64[i] *= 1e-305
			}
		}, ErrNonFinite, "overflow"},
		{"factors overflow float32", false, func(sk *Sketch, opt *Options, gamma *float64) { *gamma = 1e-90 }, ErrNonFinite, "gamma"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sk, opt, gamma := good(tc.two), DefaultOptions(r), 1.0
			tc.modify(&sk, &opt, &gamma)
			rb := max(opt.Rank, 1)
			b, a := denseOut(m, rb, true, false, 1), denseOut(rb, n, true, true, 0)
			_, err := LoRAOneSketch(b, a, sk, gamma, opt)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %v containing %q", err, tc.want, tc.msg)
			}
			for _, x := range append(slices.Clone(b.F32), a.F32...) {
				if !math.IsNaN(float64(x)) {
					t.Fatal("an output was written")
				}
			}
		})
	}
}

// TestLoRAOneSketchSweep (LORAONE_SKETCH_SWEEP=1, about a minute per seed)
// prints the ratio true error / Accuracy over a wide sweep: 9 spectra,
// r = 4, 8, 16, k = 2r+1, 4r, 8r, both modes, on 150×450.
func TestLoRAOneSketchSweep(t *testing.T) {
	if os.Getenv("LORAONE_SKETCH_SWEEP") == "" {
		t.Skip("set LORAONE_SKETCH_SWEEP=1 (and LORAONE_SKETCH_SEEDS, default 3)")
	}
	const m, n, gamma = 150, 450, 1.0
	seeds := 3
	fmt.Sscan(os.Getenv("LORAONE_SKETCH_SEEDS"), &seeds)
	spectra := sketchSpectra(m, n)
	spectra = append(spectra, struct {
		name string
		s    []float64
		good bool
	}{"geometric 0.8", geometric(min(m, n), 1, 0.8), true}, struct {
		name string
		s    []float64
		good bool
	}{"geometric 0.95", geometric(min(m, n), 1, 0.95), false}, struct {
		name string
		s    []float64
		good bool
	}{"rank 5", geometric(5, 1, 0.7), true})
	ratios, above := map[bool][]float64{}, map[bool][]float64{}
	for _, sc := range spectra {
		for seed := range seeds {
			g := synth(uint64(100+seed), m, n, sc.s)
			for _, r := range []int{4, 8, 16} {
				want := exactInit(t, g, r, gamma)
				for _, k := range []int{2*r + 1, 4 * r, 8 * r} {
					for _, two := range []bool{false, true} {
						sk := sketchOf(t, g, sketchSpec{k: k, t: 10, two: two, dt: Float64}, uint64(seed))
						b, a := denseOut(m, r, false, false, 0), denseOut(r, n, false, false, 0)
						res, err := LoRAOneSketch(b, a, sk, gamma, DefaultOptions(r))
						if err != nil {
							t.Fatal(err)
						}
						e := relDiff(baOf(b, a), want)
						ratios[two] = append(ratios[two], e/res.Accuracy)
						if e > 1e-12 { // above float64 rounding, where Accuracy is its floor
							above[two] = append(above[two], e/res.Accuracy)
						}
						if seed == 0 || e > res.Accuracy {
							t.Logf("%-18s r=%2d k=%3d two=%-5v true %.3g Accuracy %.3g ratio %.3f", sc.name, r, k, two, e, res.Accuracy, e/res.Accuracy)
						}
					}
				}
			}
		}
	}
	for _, two := range []bool{false, true} {
		for what, v := range map[string][]float64{"all": ratios[two], "true error > 1e-12": above[two]} {
			slices.Sort(v)
			t.Logf("two-pass=%v, %s: true/Accuracy over %d cases: min %.3f p10 %.3f median %.3f p90 %.3f max %.3f",
				two, what, len(v), v[0], v[len(v)/10], v[len(v)/2], v[len(v)*9/10], v[len(v)-1])
		}
	}
}

// TestLoRAOneSketchMeasure (LORAONE_SKETCH_MEASURE=1, about 15 s) prints
// the markdown table of the report: gradient-like 384×1536 and 1024×4096
// matrices with σ_{i+1}/σ_i = 0.9 (and with a floor at 1e-2), float32
// sketches as Python accumulates them, r = 8 and 16: the relative error of
// s·B·A against the exact init, Accuracy and the reconstruction's time.
func TestLoRAOneSketchMeasure(t *testing.T) {
	if os.Getenv("LORAONE_SKETCH_MEASURE") == "" {
		t.Skip("set LORAONE_SKETCH_MEASURE=1")
	}
	fmt.Println("| G | spectrum | r | mode | k | l | true error | Accuracy | true/Accuracy | Residual | time ms |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|")
	for _, shape := range [][2]int{{384, 1536}, {1024, 4096}} {
		m, n := shape[0], shape[1]
		for _, floor := range []float64{0, 1e-2} {
			p := min(m, n)
			if floor == 0 {
				p = min(p, 400) // 0.9^400 ≈ 5e-19: the rest is 0 in float64
			}
			s := make([]float64, p)
			for i := range s {
				s[i] = math.Max(math.Pow(0.9, float64(i)), floor)
			}
			rng := rand.New(rand.NewPCG(1, 2))
			u, v := orthonormal(rng, m, p), orthonormal(rng, n, p)
			us := mat.NewDense(m, p, nil)
			us.Apply(func(i, j int, x float64) float64 { return x * s[j] }, u)
			// times returns a·(vᵀ·c) (G·c without forming G).
			times := func(a mat.Matrix, c mat.Matrix) *mat.Dense {
				var t1, t2 mat.Dense
				t1.Mul(v.T(), c)
				t2.Mul(a, &t1)
				return &t2
			}
			for _, r := range []int{8, 16} {
				for _, c := range []struct {
					k   int
					two bool
				}{{2*r + 1, false}, {4 * r, false}, {8 * r, false}, {2*r + 1, true}, {4 * r, true}} {
					k, l := c.k, 2*c.k+1
					om, omt, psi := gaussian(rng, n, k), gaussian(rng, n, 10), gaussian(rng, l, m)
					f32 := func(x mat.Matrix) Matrix { w, _ := layout(x, Float32, false, 0); return w }
					sk := Sketch{Y: f32(times(us, om)), Z: f32(times(us, omt)), OmegaT: f32(omt), TwoPass: c.two}
					if c.two {
						yd := Dense{Rows: m, Cols: k, Stride: k, F32: sk.Y.F32}
						if _, err := Orthonormalize(yd); err != nil {
							t.Fatal(err)
						}
						var qus, x mat.Dense
						qus.Mul(mat.NewDense(m, k, readGeneral(sk.Y, false).Data).T(), us)
						x.Mul(&qus, v.T())
						sk.W = f32(&x)
						l = 0
					} else {
						var pus, w mat.Dense
						pus.Mul(psi, us)
						w.Mul(&pus, v.T())
						sk.W, sk.Psi = f32(&w), f32(psi)
					}
					b, a := denseOut(m, r, true, false, 0), denseOut(r, n, true, false, 0)
					t0 := time.Now()
					res, err := LoRAOneSketch(b, a, sk, 1, DefaultOptions(r))
					el := time.Since(t0)
					if err != nil {
						t.Fatal(err)
					}
					// ‖B·A − E‖², E = −U_r·S_r·V_rᵀ/σ₁, from r×r products.
					bm, am := b.toMat(), a.toMat()
					var btb, aat, btu, vta mat.Dense
					btb.Mul(bm.T(), bm)
					aat.Mul(am, am.T())
					btu.Mul(bm.T(), u.Slice(0, m, 0, r))
					vta.Mul(v.Slice(0, n, 0, r).T(), am.T())
					var ba2, cross, e2 float64
					for i := 0; i < r; i++ {
						for j := 0; j < r; j++ {
							ba2 += btb.At(i, j) * aat.At(j, i)
							cross -= btu.At(i, j) * s[j] / s[0] * vta.At(j, i)
						}
						e2 += s[i] * s[i] / (s[0] * s[0])
					}
					e := math.Sqrt(max(ba2+e2-2*cross, 0) / e2)
					spec, mode := "0.9", "single"
					if floor > 0 {
						spec = "0.9, floor 1e-2"
					}
					if c.two {
						mode = "two"
					}
					fmt.Printf("| %d×%d | %s | %d | %s | %d | %d | %.3g | %.3g | %.2f | %.3f | %.0f |\n",
						m, n, spec, r, mode, k, l, e, res.Accuracy, e/res.Accuracy, res.Residual, float64(el.Microseconds())/1000)
				}
			}
		}
	}
}
