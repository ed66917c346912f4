package loraone

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	"gonum.org/v1/gonum/mat"
)

func TestErrors(t *testing.T) {
	g := synth(3, 12, 10, geometric(10, 1, 0.5))
	good := view64(g, 0)
	opt := DefaultOptions(2)
	outB := func() Dense { return denseOut(12, 2, false, false, 0) }
	outA := func() Dense { return denseOut(2, 10, false, false, 0) }
	with := func(f func(*Matrix)) Matrix { v := view64(g, 0); f(&v); return v }
	withOpt := func(f func(*Options)) Options { o := opt; f(&o); return o }
	nonFinite := func(dt DType, bits uint16, x float64) Matrix {
		v, _ := layout(g, dt, dt == Float16, 1)
		p := 4*v.Stride + 7 // element (4, 7), or (7, 4) stored transposed
		switch dt {
		case Float64:
			v.F64[p] = x
		case Float32:
			v.F32[p] = float32(x)
		default:
			v.Half[p] = bits
		}
		return v
	}
	lora := func(v Matrix, o Options) error {
		_, err := LoRAOne(outB(), outA(), v, 16, o)
		return err
	}
	cases := []struct {
		name    string
		err     error
		want    error
		contain string
	}{
		{"zero rows", with(func(v *Matrix) { v.Rows = 0 }).Validate(), ErrShape, ""},
		{"negative cols", with(func(v *Matrix) { v.Cols = -1 }).Validate(), ErrShape, ""},
		{"row-major stride < cols", with(func(v *Matrix) { v.Stride = 9 }).Validate(), ErrShape, "stride"},
		{"col-major stride < rows", with(func(v *Matrix) { v.Trans = true; v.Stride = 11 }).Validate(), ErrShape, "stride"},
		{"short slice", with(func(v *Matrix) { v.F64 = v.F64[:119] }).Validate(), ErrShape, "needs 120"},
		{"overflow", with(func(v *Matrix) { v.Rows = math.MaxInt / 2; v.Stride = 1 << 40 }).Validate(), ErrShape, "overflow"},
		{"unknown dtype", with(func(v *Matrix) { v.DType = 9 }).Validate(), ErrDType, "DType(9)"},
		{"zero dtype", with(func(v *Matrix) { v.DType = 0 }).Validate(), ErrDType, ""},
		{"dtype/slice mismatch", with(func(v *Matrix) { v.DType = Float32 }).Validate(), ErrDType, ""},
		{"half dtype without Half", with(func(v *Matrix) { v.DType = BFloat16 }).Validate(), ErrDType, ""},
		{"two slices", with(func(v *Matrix) { v.F32 = make([]float32, 120) }).Validate(), ErrDType, ""},
		{"RandSVD bad view", func() error { _, err := RandSVD(Matrix{}, opt); return err }(), ErrShape, ""},
		{"rank 0", func() error { _, err := RandSVD(good, Options{}); return err }(), ErrRank, ""},
		{"rank > min", func() error { _, err := RandSVD(good, Options{Rank: 11}); return err }(), ErrRank, ""},
		{"LoRAOne rank 0", lora(good, withOpt(func(o *Options) { o.Rank = 0 })), ErrRank, ""},
		{"LoRAGA 2r > min", func() error {
			_, err := LoRAGA(denseOut(12, 6, false, false, 0), denseOut(6, 10, false, false, 0), good, 16, withOpt(func(o *Options) { o.Rank = 6 }))
			return err
		}(), ErrRank, "LoRA-GA"},
		{"negative oversampling", lora(good, withOpt(func(o *Options) { o.Oversampling = -1 })), ErrArgument, "Oversampling"},
		{"negative MaxIters", lora(good, withOpt(func(o *Options) { o.MaxIters = -1 })), ErrArgument, "MaxIters"},
		{"negative Tol", lora(good, withOpt(func(o *Options) { o.Tol = -1 })), ErrArgument, "Tol"},
		{"NaN Tol", lora(good, withOpt(func(o *Options) { o.Tol = math.NaN() })), ErrArgument, "Tol"},
		{"gamma 0", func() error { _, err := LoRAOne(outB(), outA(), good, 0, opt); return err }(), ErrArgument, "gamma"},
		{"gamma < 0", func() error { _, err := LoRAGA(outB(), outA(), good, -1, opt); return err }(), ErrArgument, "gamma"},
		{"gamma NaN", func() error { _, err := LoRAOne(outB(), outA(), good, math.NaN(), opt); return err }(), ErrArgument, "gamma"},
		{"gamma Inf", func() error { _, err := LoRAOne(outB(), outA(), good, math.Inf(1), opt); return err }(), ErrArgument, "gamma"},
		{"scaling 0", func() error { _, err := PiSSA(outB(), outA(), good, 0, opt); return err }(), ErrArgument, "scaling"},
		{"b wrong shape", func() error { _, err := LoRAOne(denseOut(12, 3, false, false, 0), outA(), good, 16, opt); return err }(), ErrShape, "output b"},
		{"a wrong shape", func() error { _, err := PiSSA(outB(), denseOut(2, 9, false, false, 0), good, 1, opt); return err }(), ErrShape, "output a"},
		{"a short slice", func() error {
			a := outA()
			a.F64 = a.F64[:5]
			_, err := LoRAOne(outB(), a, good, 16, opt)
			return err
		}(), ErrShape, "output a"},
		{"b bad stride", func() error {
			b := outB()
			b.Stride = 1
			_, err := LoRAOne(b, outA(), good, 16, opt)
			return err
		}(), ErrShape, "output b"},
		{"b no slice", func() error {
			_, err := LoRAOne(Dense{Rows: 12, Cols: 2, Stride: 2}, outA(), good, 16, opt)
			return err
		}(), ErrDType, "output b"},
		{"b two slices", func() error {
			b := outB()
			b.F32 = make([]float32, 24)
			_, err := LoRAOne(b, outA(), good, 16, opt)
			return err
		}(), ErrDType, "output b"},
		{"NaN float64", lora(nonFinite(Float64, 0, math.NaN()), opt), ErrNonFinite, "row 4, col 7"},
		{"+Inf float32", lora(nonFinite(Float32, 0, math.Inf(1)), opt), ErrNonFinite, "row 4, col 7"},
		{"NaN float16 (trans)", lora(nonFinite(Float16, 0x7e00, 0), opt), ErrNonFinite, "row 7, col 4"},
		{"-Inf bfloat16", lora(nonFinite(BFloat16, 0xff80, 0), opt), ErrNonFinite, "row 4, col 7"},
		{"NaN PiSSA", func() error { _, err := PiSSA(outB(), outA(), nonFinite(Float64, 0, math.NaN()), 2, opt); return err }(), ErrNonFinite, "row 4, col 7"},
		{"overflow float64", func() error {
			v := view64(g, 0)
			for i := range v.F64 {
				v.F64[i] = 1e308 // σ₁ = 1e308·√120 overflows, wherever it shows first
			}
			return lora(v, opt)
		}(), ErrNonFinite, "overflow"},
		{"huge but representable float64", func() error {
			v := view64(g, 0)
			for i := range v.F64 {
				v.F64[i] *= 1e300 // σ₁ ≈ 1e300: must work (panels are rescaled)
			}
			res, err := RandSVD(v, opt)
			if err == nil && math.Abs(res.S[0]/1e300-1) > 1e-9 {
				return errors.New("wrong sigma1")
			}
			// The stop rule must work at this scale too: as many passes as unscaled, ±1.
			if ref, rerr := RandSVD(view64(g, 0), opt); err == nil && (rerr != nil || !res.Converged || res.Passes > ref.Passes+1) {
				return fmt.Errorf("stop rule at scale 1e300: converged=%v passes=%d (unscaled %d)", res.Converged, res.Passes, ref.Passes)
			}
			return err
		}(), nil, ""},
		{"huge Oversampling, MaxIters at the limit", func() error {
			_, err := RandSVD(good, Options{Rank: 2, Oversampling: math.MaxInt, MaxIters: MaxPowerIters, Tol: 1e-6})
			return err
		}(), nil, ""},
		{"MaxIters above the limit", lora(good, withOpt(func(o *Options) { o.MaxIters = MaxPowerIters + 1 })), ErrArgument, "MaxPowerIters = 1000"},
		{"MaxIters MaxInt", func() error {
			_, err := RandSVD(good, Options{Rank: 2, MaxIters: math.MaxInt, Krylov: true})
			return err
		}(), ErrArgument, "is above the limit MaxPowerIters"},
		{"tiny float64", func() error {
			v := view64(g, 0)
			for i := range v.F64 {
				v.F64[i] *= 1e-300 // σ₁ ≈ 1e-300: must work
			}
			res, err := RandSVD(v, opt)
			if err == nil && math.Abs(res.S[0]/1e-300-1) > 1e-9 {
				return errors.New("wrong sigma1")
			}
			// The stop rule must work at this scale too: as many passes as unscaled, ±1.
			if ref, rerr := RandSVD(view64(g, 0), opt); err == nil && (rerr != nil || !res.Converged || res.Passes > ref.Passes+1) {
				return fmt.Errorf("stop rule at scale 1e-300: converged=%v passes=%d (unscaled %d)", res.Converged, res.Passes, ref.Passes)
			}
			return err
		}(), nil, ""},
		{"overflow float32", func() error {
			v, _ := layout(g, Float32, false, 0)
			for i := range v.F32 {
				v.F32[i] = 3e38
			}
			_, err := RandSVD(v, opt)
			return err
		}(), ErrNonFinite, "overflowed"},
		{"zero", lora(view64(mat.NewDense(12, 10, nil), 0), opt), ErrZero, "all-zero"},
		{"zero LoRAGA", func() error {
			_, err := LoRAGA(outB(), outA(), view64(mat.NewDense(12, 10, nil), 0), 16, opt)
			return err
		}(), ErrZero, ""},
		{"zero PiSSA half", func() error {
			v, _ := layout(mat.NewDense(12, 10, nil), Float16, true, 0)
			_, err := PiSSA(outB(), outA(), v, 1, opt)
			return err
		}(), ErrZero, ""},
	}
	for _, c := range cases {
		if c.want == nil {
			if c.err != nil {
				t.Errorf("%s: unexpected error %v", c.name, c.err)
			}
			continue
		}
		if !errors.Is(c.err, c.want) {
			t.Errorf("%s: err = %v, want %v", c.name, c.err, c.want)
			continue
		}
		if !strings.HasPrefix(c.err.Error(), "loraone: ") || !strings.Contains(c.err.Error(), c.contain) {
			t.Errorf("%s: message %q lacks prefix or %q", c.name, c.err, c.contain)
		}
	}
}

// TestOutputsUntouchedOnError: a failed call writes nothing.
func TestOutputsUntouchedOnError(t *testing.T) {
	g := view64(synth(2, 12, 10, geometric(10, 1, 0.5)), 0)
	g.F64[5] = math.Inf(-1)
	for _, f := range []func(b, a Dense, g Matrix, x float64, o Options) (Result, error){LoRAOne, LoRAGA, PiSSA} {
		b, a := denseOut(12, 2, true, false, 0), denseOut(2, 10, false, true, 0)
		for i := range b.F32 {
			b.F32[i] = 7
		}
		for i := range a.F64 {
			a.F64[i] = 7
		}
		if _, err := f(b, a, g, 1, DefaultOptions(2)); !errors.Is(err, ErrNonFinite) {
			t.Fatalf("err = %v", err)
		}
		for _, x := range b.F32 {
			if x != 7 {
				t.Fatal("b written on error")
			}
		}
		for _, x := range a.F64 {
			if x != 7 {
				t.Fatal("a written on error")
			}
		}
	}
}

func TestDTypeString(t *testing.T) {
	for d, want := range map[DType]string{Float32: "float32", Float64: "float64", Float16: "float16", BFloat16: "bfloat16", 0: "DType(0)"} {
		if d.String() != want {
			t.Errorf("%d: %q", d, d.String())
		}
	}
}
