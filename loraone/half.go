package loraone

import "math"

// halfToFloat32 converts an IEEE 754 binary16 value, given by its bits, to
// float32. The conversion is exact for every input: normals, subnormals,
// ±0, ±Inf, and NaN (the payload is kept, shifted into the top of the
// float32 mantissa, so a quiet NaN stays quiet).
func halfToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch exp {
	case 0:
		if mant == 0 {
			return math.Float32frombits(sign) // ±0
		}
		// Subnormal: value = mant · 2^-24. Normalize the mantissa so that
		// its leading one becomes the implicit bit of a float32 normal.
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		mant &= 0x3ff
		return math.Float32frombits(sign | e<<23 | mant<<13)
	case 0x1f:
		// ±Inf (mant == 0) or NaN (payload kept).
		return math.Float32frombits(sign | 0xff<<23 | mant<<13)
	default:
		return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
	}
}

// bfloat16ToFloat32 converts a bfloat16 value, given by its bits, to
// float32. bfloat16 is the top half of a float32, so the conversion is a
// shift and exact for every input, NaN payloads included.
func bfloat16ToFloat32(h uint16) float32 {
	return math.Float32frombits(uint32(h) << 16)
}

// float32ToHalf converts f to IEEE binary16 bits with round-to-nearest-even.
// Values beyond the half range become ±Inf, NaN stays NaN (quiet).
// It is the inverse used by the tests and by callers that build fixtures.
func float32ToHalf(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant == 0 {
			return sign | 0x7c00
		}
		return sign | 0x7e00 | uint16(mant>>13)
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		// Subnormal half (or zero): shift the full mantissa (with the
		// implicit bit) right, rounding to nearest even.
		if e < -10 {
			return sign
		}
		m := mant | 0x800000
		shift := uint32(14 - e)
		half := uint32(1) << (shift - 1)
		rest := m & (1<<shift - 1)
		r := m >> shift
		if rest > half || (rest == half && r&1 == 1) {
			r++
		}
		return sign | uint16(r)
	}
	r := uint32(e)<<10 | mant>>13
	rest := mant & 0x1fff
	if rest > 0x1000 || (rest == 0x1000 && r&1 == 1) {
		r++ // may carry into the exponent, up to Inf: correct
	}
	return sign | uint16(r)
}

// float32ToBFloat16 converts f to bfloat16 bits with round-to-nearest-even;
// NaN stays NaN (quiet).
func float32ToBFloat16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}
