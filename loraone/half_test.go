package loraone

import (
	"math"
	"testing"
)

// refHalf decodes binary16 bits from the definition, independently of
// halfToFloat32's bit manipulation.
func refHalf(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	e := int(h>>10) & 0x1f
	f := float64(h & 0x3ff)
	switch e {
	case 0:
		return sign * math.Ldexp(f, -24)
	case 0x1f:
		if f == 0 {
			return math.Inf(int(sign))
		}
		return math.NaN()
	}
	return sign * math.Ldexp(1024+f, e-25)
}

func TestHalfToFloat32(t *testing.T) {
	for _, c := range []struct {
		h    uint16
		want float32
		neg  bool // want −0
	}{
		{0x0000, 0, false},
		{0x8000, 0, true},
		{0x0001, float32(math.Ldexp(1, -24)), false}, // smallest subnormal
		{0x8001, -float32(math.Ldexp(1, -24)), false},
		{0x03ff, float32(math.Ldexp(1023, -24)), false}, // largest subnormal
		{0x0200, float32(math.Ldexp(1, -15)), false},
		{0x0400, float32(math.Ldexp(1, -14)), false}, // smallest normal
		{0x3c00, 1, false},
		{0x3c01, 1 + 1.0/1024, false},
		{0xbc00, -1, false},
		{0xc000, -2, false},
		{0x3555, 0.333251953125, false},
		{0x7bff, 65504, false}, // largest finite
		{0xfbff, -65504, false},
		{0x7c00, float32(math.Inf(1)), false},
		{0xfc00, float32(math.Inf(-1)), false},
	} {
		got := halfToFloat32(c.h)
		if got != c.want || math.Signbit(float64(got)) != (c.neg || c.want < 0) {
			t.Errorf("halfToFloat32(%#04x) = %v, want %v", c.h, got, c.want)
		}
	}
	for _, h := range []uint16{0x7e00, 0x7c01, 0xfe00, 0x7fff, 0xfc01} {
		got := halfToFloat32(h)
		if !math.IsNaN(float64(got)) {
			t.Errorf("halfToFloat32(%#04x) = %v, want NaN", h, got)
		}
		// Quietness and payload are kept in the top mantissa bits.
		if b := math.Float32bits(got); uint16(b>>13)&0x3ff != h&0x3ff || (b>>31 == 1) != (h>>15 == 1) {
			t.Errorf("halfToFloat32(%#04x): NaN bits %#08x lose payload or sign", h, b)
		}
	}
	// Exhaustive: every bit pattern against the definition, and the
	// round trip through float32ToHalf.
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		got, want := float64(halfToFloat32(h)), refHalf(h)
		if math.IsNaN(want) {
			if !math.IsNaN(got) {
				t.Fatalf("%#04x: got %v, want NaN", h, got)
			}
			continue
		}
		if got != want || math.Signbit(got) != math.Signbit(want) {
			t.Fatalf("%#04x: got %v, want %v", h, got, want)
		}
		if back := float32ToHalf(float32(got)); back != h {
			t.Fatalf("round trip %#04x -> %v -> %#04x", h, got, back)
		}
	}
}

func TestFloat32ToHalfRounding(t *testing.T) {
	for _, c := range []struct {
		f    float32
		want uint16
	}{
		{1 + 1.0/2048, 0x3c00},           // tie, even stays
		{1 + 3.0/2048, 0x3c02},           // tie, odd rounds up
		{65520, 0x7c00},                  // rounds to Inf
		{65519, 0x7bff},                  // largest finite
		{float32(math.Ldexp(1, -25)), 0}, // tie to even: 0
		{float32(math.Ldexp(3, -26)), 1}, // above the tie
		{float32(math.Ldexp(1, -30)), 0}, // underflow
		{float32(math.Ldexp(1023, -24)), 0x03ff},
		{-0.0, 0},
		{float32(math.Inf(-1)), 0xfc00},
	} {
		if got := float32ToHalf(c.f); got != c.want {
			t.Errorf("float32ToHalf(%v) = %#04x, want %#04x", c.f, got, c.want)
		}
	}
	if h := float32ToHalf(float32(math.NaN())); h&0x7c00 != 0x7c00 || h&0x3ff == 0 {
		t.Errorf("float32ToHalf(NaN) = %#04x", h)
	}
}

func TestBFloat16ToFloat32(t *testing.T) {
	for _, c := range []struct {
		h    uint16
		want float32
	}{
		{0x0000, 0},
		{0x3f80, 1},
		{0xbf80, -1},
		{0xc000, -2},
		{0x3f81, 1 + 1.0/128},
		{0x0001, float32(math.Ldexp(1, -133))}, // smallest subnormal
		{0x0080, float32(math.Ldexp(1, -126))}, // smallest normal
		{0x7f7f, math.Float32frombits(0x7f7f0000)},
		{0x7f80, float32(math.Inf(1))},
		{0xff80, float32(math.Inf(-1))},
	} {
		if got := bfloat16ToFloat32(c.h); got != c.want {
			t.Errorf("bfloat16ToFloat32(%#04x) = %v, want %v", c.h, got, c.want)
		}
	}
	if got := bfloat16ToFloat32(0x8000); got != 0 || !math.Signbit(float64(got)) {
		t.Errorf("bfloat16ToFloat32(0x8000) = %v, want -0", got)
	}
	for _, h := range []uint16{0x7fc0, 0x7f81, 0xffc0} {
		if got := bfloat16ToFloat32(h); !math.IsNaN(float64(got)) {
			t.Errorf("bfloat16ToFloat32(%#04x) = %v, want NaN", h, got)
		}
	}
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		f := bfloat16ToFloat32(h)
		if math.IsNaN(float64(f)) {
			continue
		}
		if back := float32ToBFloat16(f); back != h {
			t.Fatalf("round trip %#04x -> %v -> %#04x", h, f, back)
		}
	}
	// Rounding: ties to even.
	if got := float32ToBFloat16(math.Float32frombits(0x3f808000)); got != 0x3f80 {
		t.Errorf("tie even: %#04x", got)
	}
	if got := float32ToBFloat16(math.Float32frombits(0x3f818000)); got != 0x3f82 {
		t.Errorf("tie odd: %#04x", got)
	}
	if got := float32ToBFloat16(float32(math.NaN())); got&0x7f80 != 0x7f80 || got&0x7f == 0 {
		t.Errorf("NaN: %#04x", got)
	}
}
