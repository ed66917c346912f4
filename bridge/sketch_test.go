package bridge

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"gonum.org/v1/gonum/mat"

	"github.com/peft-loraone/peft-loraone/dlpack"
)

// sketchCall holds the tensors of one SketchLoRAOne call.
type sketchCall struct {
	y, w, psi, z, omegaT, b, a, s, info *tensor
	rank                                int
	gamma                               float64
	two                                 bool
}

func (c sketchCall) run() (float64, error) {
	var psi uintptr
	if c.psi != nil {
		psi = c.psi.addr
	}
	return SketchLoRAOne(c.y.addr, false, c.w.addr, true, psi, false, c.z.addr, true, c.omegaT.addr, false,
		c.b.addr, true, c.a.addr, true, c.s.addr, true, c.info.addr, true, c.rank, c.gamma, c.two)
}

func gaussData(rng *rand.Rand, r, c int) *mat.Dense {
	d := mat.NewDense(r, c, nil)
	for i := range d.RawMatrix().Data {
		d.RawMatrix().Data[i] = rng.NormFloat64()
	}
	return d
}

// newSketchCall accumulates the sketches of the row-major m×n g as Python
// would (k columns, l = 2k+1, t = 4 test vectors); in two-pass mode it
// orthonormalizes Y through the bridge and forms X = Qᵀ·G from the result.
func newSketchCall(t *testing.T, m, n, k, r int, g []float64, two bool) sketchCall {
	t.Helper()
	l, nt := 2*k+1, 4
	rng := rand.New(rand.NewPCG(uint64(k), 5))
	gm := mat.NewDense(m, n, g)
	om, psi, omt := gaussData(rng, n, k), gaussData(rng, l, m), gaussData(rng, n, nt)
	var y, z mat.Dense
	y.Mul(gm, om)
	z.Mul(gm, omt)
	c := sketchCall{
		y: matrix64(t, m, k, y.RawMatrix().Data, false), z: matrix64(t, m, nt, z.RawMatrix().Data, true),
		omegaT: matrix64(t, n, nt, omt.RawMatrix().Data, false),
		b:      matrix64(t, m, r, nil, true), a: matrix64(t, r, n, nil, true), s: vector64(t, r), info: vector64(t, 4),
		rank: r, gamma: 64, two: two,
	}
	if two {
		if _, err := Orthonormalize(c.y.addr, false); err != nil {
			t.Fatal(err)
		}
		var x mat.Dense
		x.Mul(mat.NewDense(m, k, c.y.float64s()).T(), gm)
		c.w = matrix64(t, k, n, x.RawMatrix().Data, true)
	} else {
		var w mat.Dense
		w.Mul(psi, gm)
		c.w, c.psi = matrix64(t, l, n, w.RawMatrix().Data, true), matrix64(t, l, m, psi.RawMatrix().Data, false)
	}
	return c
}

// TestSketchLoRAOne: for a G of rank 3 <= k the sketch is exact in both
// modes, so B·A is [−G]_r/(gamma·sigma1) from gonum's exact SVD, and S and
// info are filled as documented.
func TestSketchLoRAOne(t *testing.T) {
	const m, n, k = 30, 45, 7
	g := lowRank(m, n, 3, 9)
	var svd mat.SVD
	if !svd.Factorize(mat.NewDense(m, n, g), mat.SVDThin) {
		t.Fatal("exact SVD failed")
	}
	sv := svd.Values(nil)
	for _, two := range []bool{false, true} {
		for _, r := range []int{1, 3} {
			c := newSketchCall(t, m, n, k, r, g, two)
			acc, err := c.run()
			if err != nil {
				t.Fatalf("two=%v r=%d: %v", two, r, err)
			}
			var u, v mat.Dense
			svd.UTo(&u)
			svd.VTo(&v)
			want := mat.NewDense(m, n, nil)
			for j := 0; j < r; j++ {
				var outer mat.Dense
				outer.Outer(-sv[j]/(c.gamma*sv[0]), u.ColView(j), v.ColView(j))
				want.Add(want, &outer)
			}
			var ba, diff mat.Dense
			ba.Mul(mat.NewDense(m, r, c.b.float64s()), mat.NewDense(r, n, c.a.float64s()))
			diff.Sub(&ba, want)
			if e := mat.Norm(&diff, 2) / mat.Norm(want, 2); e > 1e-10 || e > 2*acc {
				t.Errorf("two=%v r=%d: relative error %g, Accuracy %g", two, r, e, acc)
			}
			info := c.info.float64s()
			if info[0] != acc || !(acc < 1e-9) || info[2] != k || info[3] != 3 {
				t.Errorf("two=%v r=%d: info = %v, acc = %g", two, r, info, acc)
			}
			if r == 3 && !(info[1] < 1e-9) { // rank-3 G: [Ĝ]_3 = G
				t.Errorf("two=%v: Residual %g", two, info[1])
			}
			for j, x := range c.s.float64s() {
				if math.Abs(x-sv[j]) > 1e-10*sv[0] {
					t.Errorf("two=%v r=%d: S[%d] = %v, want %v", two, r, j, x, sv[j])
				}
			}
		}
	}
}

func TestOrthonormalizeBridge(t *testing.T) {
	const m, k = 9, 3
	y := matrix64(t, m, k, lowRank(m, k, 2, 4), true) // rank 2
	rank, err := Orthonormalize(y.addr, true)
	if err != nil || rank != 2 {
		t.Fatalf("rank %d, err %v", rank, err)
	}
	q := mat.NewDense(m, k, y.float64s())
	var qtq mat.Dense
	qtq.Mul(q.T(), q)
	if !mat.EqualApprox(&qtq, eye(k), 1e-13) {
		t.Errorf("QᵀQ = %v", mat.Formatted(&qtq))
	}
}

func eye(k int) *mat.Dense {
	d := mat.NewDense(k, k, nil)
	for i := 0; i < k; i++ {
		d.Set(i, i, 1)
	}
	return d
}

func TestSketchErrorKinds(t *testing.T) {
	const m, n, k, r = 12, 16, 5, 2
	g := lowRank(m, n, 4, 2)
	tests := []struct {
		name   string
		two    bool
		modify func(c *sketchCall)
		kind   string
	}{
		{"zero sketch", false, func(c *sketchCall) { c.y = matrix64(t, m, k, nil, false) }, "zero-gradient:"},
		{"nan", false, func(c *sketchCall) {
			w := c.w.float64s()
			w[3] = math.NaN()
			c.w = matrix64(t, 2*k+1, n, w, true)
		}, "non-finite: loraone: sketch W element"},
		{"rank > k", false, func(c *sketchCall) {
			c.rank = 6
			c.b, c.a, c.s = matrix64(t, m, 6, nil, true), matrix64(t, 6, n, nil, true), vector64(t, 6)
		}, "invalid-argument:"},
		{"shape mismatch", false, func(c *sketchCall) { c.z = matrix64(t, m+1, 4, nil, true) }, "invalid-argument: loraone: sketch Z"},
		{"no psi single pass", false, func(c *sketchCall) { c.psi = nil }, "invalid-argument: Psi is required"},
		{"bad gamma", false, func(c *sketchCall) { c.gamma = math.Inf(1) }, "invalid-argument: gamma"},
		{"short info", false, func(c *sketchCall) { c.info = vector64(t, 3) }, "invalid-argument: info must hold 4"},
		{"short S", false, func(c *sketchCall) { c.s = vector64(t, 1) }, "invalid-argument: S must hold 2"},
		{"two-pass Y not orthonormal", true, func(c *sketchCall) {
			c.y = matrix64(t, m, k, lowRank(m, k, k, 3), false)
		}, "invalid-argument:"},
		{"int Y", false, func(c *sketchCall) {
			c.y = newTensor(t, dlpack.Fixture{Device: dlpack.Device{Type: 1}, NDim: 2, DType: dlpack.DType{Code: 0, Bits: 32, Lanes: 1},
				Shape: []int64{m, k}, Data: make([]byte, 4*m*k)})
		}, "unsupported-dtype: Y has dtype int32"},
		{"cuda W", true, func(c *sketchCall) {
			c.w = newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Device: dlpack.Device{Type: 2}, NDim: 2, DType: dlpack.Float32,
				Shape: []int64{k, n}, Data: make([]byte, 4*k*n)})
		}, "unsupported-device:"},
		{"read-only output", false, func(c *sketchCall) {
			c.a = newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Flags: 1, Device: dlpack.Device{Type: 1}, NDim: 2,
				DType: dlpack.Float64, Shape: []int64{r, n}, Data: make([]byte, 8*r*n)})
		}, "read-only: out_a"},
		{"null address", false, func(c *sketchCall) { c.omegaT = &tensor{} }, "invalid-argument: OmegaT"},
		{"forced panic", false, func(c *sketchCall) { c.rank = sketchPanicRank }, "internal: Go panic"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newSketchCall(t, m, n, k, r, g, tc.two)
			tc.modify(&c)
			_, err := c.run()
			if err == nil || !strings.HasPrefix(err.Error(), tc.kind) {
				t.Fatalf("error = %v, want prefix %q", err, tc.kind)
			}
			if tc.name == "forced panic" {
				return
			}
			for _, x := range append(c.b.float64s(), c.info.float64s()...) {
				if x != 0 {
					t.Fatal("a refused call wrote an output")
				}
			}
		})
	}
}

func TestOrthonormalizeErrorKinds(t *testing.T) {
	tests := []struct {
		name string
		y    func() *tensor
		kind string
	}{
		{"zero", func() *tensor { return matrix64(t, 5, 2, nil, true) }, "zero-gradient:"},
		{"wide", func() *tensor { return matrix64(t, 2, 5, lowRank(2, 5, 2, 1), true) }, "invalid-argument:"},
		{"read-only", func() *tensor {
			return newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Flags: 1, Device: dlpack.Device{Type: 1}, NDim: 2,
				DType: dlpack.Float64, Shape: []int64{5, 2}, Data: make([]byte, 80)})
		}, "read-only: Y"},
		{"half", func() *tensor {
			return newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Device: dlpack.Device{Type: 1}, NDim: 2,
				DType: dlpack.Float16, Shape: []int64{5, 2}, Data: make([]byte, 20)})
		}, "unsupported-dtype: Y"},
		{"nan", func() *tensor {
			v := lowRank(5, 2, 2, 1)
			v[4] = math.NaN()
			return matrix64(t, 5, 2, v, true)
		}, "non-finite:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			y := tc.y()
			if _, err := Orthonormalize(y.addr, true); err == nil || !strings.HasPrefix(err.Error(), tc.kind) {
				t.Fatalf("error = %v, want prefix %q", err, tc.kind)
			}
		})
	}
}
