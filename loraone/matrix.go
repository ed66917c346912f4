package loraone

import (
	"fmt"
	"math"
)

// DType is the element type of a Matrix.
type DType uint8

// The supported element types.
const (
	Float32  DType = iota + 1 // IEEE binary32, stored in Matrix.F32
	Float64                   // IEEE binary64, stored in Matrix.F64
	Float16                   // IEEE binary16, stored as uint16 bits in Matrix.Half
	BFloat16                  // bfloat16, stored as uint16 bits in Matrix.Half
)

// String returns the dtype's name as torch spells it ("float32", …), or
// "DType(N)" for an unknown value.
func (d DType) String() string {
	switch d {
	case Float32:
		return "float32"
	case Float64:
		return "float64"
	case Float16:
		return "float16"
	case BFloat16:
		return "bfloat16"
	}
	return fmt.Sprintf("DType(%d)", uint8(d))
}

// Matrix is a read-only m×n view (the logical matrix G, m = Rows, n = Cols)
// over memory owned elsewhere. It is never written and never copied whole.
//
// If !Trans, element (i, j) is at i*Stride + j with Stride >= Cols
// (row-major). If Trans, element (i, j) is at j*Stride + i with
// Stride >= Rows (column-major storage, e.g. a transposed torch view).
//
// Exactly one of F32, F64 and Half is set, matching DType (Half holds the
// bits of Float16 and BFloat16 elements). Its length must be at least
// (R-1)*Stride + C, where R×C is the stored shape (m×n if !Trans, n×m if
// Trans).
type Matrix struct {
	Rows, Cols, Stride int
	Trans              bool
	DType              DType
	F32                []float32
	F64                []float64
	Half               []uint16
}

// storedShape returns the row-major shape of the backing memory.
func storedShape(rows, cols int, trans bool) (r, c int) {
	if trans {
		return cols, rows
	}
	return rows, cols
}

// needLen returns (R-1)*stride + C for the stored shape, checking the
// dimensions and overflow.
func needLen(what string, rows, cols, stride int, trans bool) (int, error) {
	if rows <= 0 || cols <= 0 {
		return 0, fmt.Errorf("loraone: %s: dimensions %d×%d must be positive: %w", what, rows, cols, ErrShape)
	}
	r, c := storedShape(rows, cols, trans)
	if stride < c {
		if trans {
			return 0, fmt.Errorf("loraone: %s: column-major stride %d < rows %d: %w", what, stride, rows, ErrShape)
		}
		return 0, fmt.Errorf("loraone: %s: row-major stride %d < cols %d: %w", what, stride, cols, ErrShape)
	}
	if r-1 > (math.MaxInt-c)/stride {
		return 0, fmt.Errorf("loraone: %s: %d×%d with stride %d overflows int: %w", what, rows, cols, stride, ErrShape)
	}
	return (r-1)*stride + c, nil
}

// Validate checks that g is a consistent view: positive dimensions, a
// stride at least the stored row length, a known dtype whose backing slice
// (and only that one) is set, and a slice long enough for every element.
// It returns an error wrapping ErrShape or ErrDType, or nil.
func (g Matrix) Validate() error {
	need, err := needLen("matrix", g.Rows, g.Cols, g.Stride, g.Trans)
	if err != nil {
		return err
	}
	set := 0
	if g.F32 != nil {
		set++
	}
	if g.F64 != nil {
		set++
	}
	if g.Half != nil {
		set++
	}
	var have int
	switch g.DType {
	case Float32:
		have = len(g.F32)
		if g.F32 == nil || set != 1 {
			return fmt.Errorf("loraone: matrix: dtype %v needs F32 and only F32 set: %w", g.DType, ErrDType)
		}
	case Float64:
		have = len(g.F64)
		if g.F64 == nil || set != 1 {
			return fmt.Errorf("loraone: matrix: dtype %v needs F64 and only F64 set: %w", g.DType, ErrDType)
		}
	case Float16, BFloat16:
		have = len(g.Half)
		if g.Half == nil || set != 1 {
			return fmt.Errorf("loraone: matrix: dtype %v needs Half and only Half set: %w", g.DType, ErrDType)
		}
	default:
		return fmt.Errorf("loraone: matrix: unknown dtype %v: %w", g.DType, ErrDType)
	}
	if have < need {
		return fmt.Errorf("loraone: matrix: %d×%d (stride %d, trans %v) needs %d elements, slice has %d: %w",
			g.Rows, g.Cols, g.Stride, g.Trans, need, have, ErrShape)
	}
	return nil
}

// at returns element (i, j) of g as float64 (used only on error paths).
func (g Matrix) at(i, j int) float64 {
	p := i*g.Stride + j
	if g.Trans {
		p = j*g.Stride + i
	}
	switch g.DType {
	case Float32:
		return float64(g.F32[p])
	case Float64:
		return g.F64[p]
	case Float16:
		return float64(halfToFloat32(g.Half[p]))
	default:
		return float64(bfloat16ToFloat32(g.Half[p]))
	}
}

// findNonFinite scans g for a NaN or ±Inf and returns its position.
func (g Matrix) findNonFinite() (i, j int, v float64, ok bool) {
	for i := 0; i < g.Rows; i++ {
		for j := 0; j < g.Cols; j++ {
			v := g.at(i, j)
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return i, j, v, true
			}
		}
	}
	return 0, 0, 0, false
}

// frobeniusSq returns ‖g‖_F² / scale² (scale > 0), summed in float64
// with g's elements divided by scale, so that it overflows only where the
// quotient does.
func (g Matrix) frobeniusSq(scale float64) float64 {
	rows, cols := storedShape(g.Rows, g.Cols, g.Trans)
	inv := 1 / scale
	var s float64
	switch g.DType {
	case Float32:
		for i := 0; i < rows; i++ {
			var t float64
			for _, x := range g.F32[i*g.Stride : i*g.Stride+cols] {
				y := float64(x) * inv
				t += y * y
			}
			s += t
		}
	case Float64:
		for i := 0; i < rows; i++ {
			var t float64
			for _, x := range g.F64[i*g.Stride : i*g.Stride+cols] {
				y := x * inv
				t += y * y
			}
			s += t
		}
	default:
		for i := 0; i < g.Rows; i++ {
			for j := 0; j < g.Cols; j++ {
				y := g.at(i, j) * inv
				s += y * y
			}
		}
	}
	return s
}

// maxAbs returns max |g(i,j)| (used only on error paths).
func (g Matrix) maxAbs() float64 {
	var m float64
	for i := 0; i < g.Rows; i++ {
		for j := 0; j < g.Cols; j++ {
			m = math.Max(m, math.Abs(g.at(i, j)))
		}
	}
	return m
}

// Dense is a writable m×n output view with the same layout rules as Matrix
// (row-major if !Trans, column-major if Trans); exactly one of F32 and F64
// is set. Routines write only its m×n elements, never the padding between
// rows, and only after the whole computation succeeded.
type Dense struct {
	Rows, Cols, Stride int
	Trans              bool
	F32                []float32
	F64                []float64
}

// check validates d as an output of shape rows×cols.
func (d Dense) check(what string, rows, cols int) error {
	need, err := needLen(what, d.Rows, d.Cols, d.Stride, d.Trans)
	if err != nil {
		return err
	}
	if (d.F32 == nil) == (d.F64 == nil) {
		return fmt.Errorf("loraone: %s: exactly one of F32 and F64 must be set: %w", what, ErrDType)
	}
	if d.Rows != rows || d.Cols != cols {
		return fmt.Errorf("loraone: %s: shape %d×%d, want %d×%d: %w", what, d.Rows, d.Cols, rows, cols, ErrShape)
	}
	have := len(d.F64)
	if d.F32 != nil {
		have = len(d.F32)
	}
	if have < need {
		return fmt.Errorf("loraone: %s: %d×%d (stride %d, trans %v) needs %d elements, slice has %d: %w",
			what, d.Rows, d.Cols, d.Stride, d.Trans, need, have, ErrShape)
	}
	return nil
}

// set writes the rows×cols row-major float64 data src (stride cols) into d.
func (d Dense) set(src []float64) {
	for i := 0; i < d.Rows; i++ {
		row := src[i*d.Cols : (i+1)*d.Cols]
		for j, v := range row {
			p := i*d.Stride + j
			if d.Trans {
				p = j*d.Stride + i
			}
			if d.F64 != nil {
				d.F64[p] = v
			} else {
				d.F32[p] = float32(v)
			}
		}
	}
}
