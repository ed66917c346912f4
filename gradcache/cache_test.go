package gradcache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func randF32(rng *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(rng.NormFloat64())
	}
	return v
}

// bf16Round is an independent oracle of float32 -> bfloat16 -> float32
// (round to nearest even) through float64 arithmetic.
func bf16Round(x float32) float32 {
	if x == 0 || math.IsInf(float64(x), 0) {
		return x
	}
	f := float64(x)
	exp := math.Floor(math.Log2(math.Abs(f)))
	ulp := math.Ldexp(1, int(exp)-7) // bfloat16 keeps 8 significant bits
	q := f / ulp
	r := math.RoundToEven(q)
	return float32(r * ulp)
}

func writeTmp(t *testing.T, tensors []Tensor, meta map[string]string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.safetensors.zst")
	if err := Write(path, tensors, meta, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	for _, tc := range []struct {
		name  string
		shape []int
		store DType
	}{
		{"f32", []int{37, 53}, ""},
		{"f32-as-bf16", []int{37, 53}, BF16},
		{"large-bf16", []int{700, 1000}, BF16}, // > one conversion chunk
		{"vector", []int{5}, ""},
		{"empty", []int{0, 4}, ""},
		{"scalar", []int{}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := 1
			for _, d := range tc.shape {
				n *= d
			}
			src := randF32(rng, n)
			other := randF32(rng, 7)
			path := writeTmp(t, []Tensor{
				{Name: "g", DType: F32, Shape: tc.shape, Data: f32Bytes(src), Store: tc.store},
				{Name: "a.other", DType: F32, Shape: []int{7}, Data: f32Bytes(other)},
			}, map[string]string{"key": "value"})
			r, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Meta()["key"] != "value" || r.Meta()[MetaVersion] != FormatVersion {
				t.Fatalf("metadata %v", r.Meta())
			}
			got := make([]byte, 4*n)
			if err := r.ReadInto(map[string]Dest{"g": {DType: F32, Data: got}}); err != nil {
				t.Fatal(err)
			}
			for i, x := range src {
				want := x
				if tc.store == BF16 {
					want = bf16Round(x)
				}
				if g := math.Float32frombits(binary.LittleEndian.Uint32(got[4*i:])); g != want {
					t.Fatalf("element %d: got %v, want %v (from %v)", i, g, want, x)
				}
			}
		})
	}
}

func TestZstdCLIAndSafetensorsLayout(t *testing.T) {
	zstdBin, err := exec.LookPath("zstd")
	if err != nil {
		t.Skip("zstd command not installed")
	}
	v := []float32{1, -2, 3.5, 4}
	path := writeTmp(t, []Tensor{{Name: "w", DType: F32, Shape: []int{2, 2}, Data: f32Bytes(v)}}, nil)
	out, err := exec.Command(zstdBin, "-d", "-c", path).Output()
	if err != nil {
		t.Fatalf("zstd -d: %v", err)
	}
	n := binary.LittleEndian.Uint64(out)
	if n%8 != 0 || !strings.Contains(string(out[8:8+n]), `"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}`) {
		t.Fatalf("header %q", out[8:8+n])
	}
	if !bytes.Equal(out[8+n:], f32Bytes(v)) {
		t.Fatalf("data %x", out[8+n:])
	}
}

// corrupt rewrites the file at path with f applied to its bytes.
func corrupt(t *testing.T, path string, f func([]byte) []byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, f(b), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestDamagedFiles(t *testing.T) {
	rng := rand.New(rand.NewPCG(2, 2))
	src := f32Bytes(randF32(rng, 64*64))
	good := []Tensor{{Name: "g", DType: F32, Shape: []int{64, 64}, Data: src}}
	for _, tc := range []struct {
		name string
		edit func(path string)
		want error
	}{
		{"empty", func(p string) { corrupt(t, p, func([]byte) []byte { return nil }) }, ErrCorrupt},
		{"truncated-half", func(p string) { corrupt(t, p, func(b []byte) []byte { return b[:len(b)/2] }) }, ErrCorrupt},
		{"truncated-10", func(p string) { corrupt(t, p, func(b []byte) []byte { return b[:10] }) }, ErrCorrupt},
		{"not-zstd", func(p string) { corrupt(t, p, func([]byte) []byte { return []byte("hello, world: not a cache") }) }, ErrCorrupt},
		{"foreign-safetensors", func(p string) {
			var buf bytes.Buffer
			js := `{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`
			binary.Write(&buf, binary.LittleEndian, uint64(len(js)))
			buf.WriteString(js)
			buf.Write([]byte{0, 0, 128, 63})
			os.WriteFile(p+".raw", buf.Bytes(), 0o644)
			out, err := exec.Command("zstd", "-q", "-f", "-o", p, p+".raw").CombinedOutput()
			if err != nil {
				t.Skipf("zstd: %v %s", err, out)
			}
		}, ErrForeign},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeTmp(t, good, nil)
			tc.edit(path)
			r, err := Open(path)
			if err == nil {
				err = r.ReadInto(map[string]Dest{"g": {DType: F32, Data: make([]byte, len(src))}})
				r.Close()
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error %q does not name the file", err)
			}
		})
	}
}

// TestBitFlips flips every bit of a small file's data region in turn, one
// at a time: each must be detected (or, if zstd's decoder ignores the bit,
// yield the exact original tensor), never silently give other values.
func TestBitFlips(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	src := f32Bytes(randF32(rng, 4*4))
	path := writeTmp(t, []Tensor{{Name: "g", DType: F32, Shape: []int{4, 4}, Data: src}}, nil)
	orig, _ := os.ReadFile(path)
	detected := 0
	for bit := 0; bit < 8*len(orig); bit++ {
		b := bytes.Clone(orig)
		b[bit/8] ^= 1 << (bit % 8)
		os.WriteFile(path, b, 0o644)
		got := make([]byte, len(src))
		r, err := Open(path)
		if err == nil {
			err = r.ReadInto(map[string]Dest{"g": {DType: F32, Data: got}})
			r.Close()
		}
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrForeign) && !errors.Is(err, ErrVersion) {
				t.Fatalf("bit %d: error %v wraps none of the sentinels", bit, err)
			}
			detected++
			continue
		}
		if !bytes.Equal(got, src) {
			t.Fatalf("bit %d: read succeeded with different values", bit)
		}
	}
	if detected < 8*len(orig)*9/10 {
		t.Fatalf("only %d of %d bit flips detected", detected, 8*len(orig))
	}
}

func TestWriteErrors(t *testing.T) {
	dir := t.TempDir()
	d4 := make([]byte, 16)
	for _, tc := range []struct {
		name    string
		tensors []Tensor
		meta    map[string]string
		want    string
	}{
		{"short data", []Tensor{{Name: "g", DType: F32, Shape: []int{2, 3}, Data: d4}}, nil, "needs 24 bytes"},
		{"duplicate", []Tensor{{Name: "g", DType: F32, Shape: []int{4}, Data: d4}, {Name: "g", DType: F32, Shape: []int{4}, Data: d4}}, nil, "twice"},
		{"reserved meta", []Tensor{{Name: "g", DType: F32, Shape: []int{4}, Data: d4}}, map[string]string{"format": "x"}, "reserved"},
		{"bad store", []Tensor{{Name: "g", DType: F64, Shape: []int{2}, Data: d4, Store: BF16}}, nil, "only F32 as BF16"},
		{"bad name", []Tensor{{Name: "__metadata__", DType: F32, Shape: []int{4}, Data: d4}}, nil, "invalid tensor name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "x.zst")
			err := Write(path, tc.tensors, tc.meta, WriteOptions{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if _, serr := os.Stat(path); !os.IsNotExist(serr) {
				t.Fatalf("a failed write left %s", path)
			}
			if left, _ := filepath.Glob(filepath.Join(dir, ".*tmp*")); len(left) > 0 {
				t.Fatalf("a failed write left %v", left)
			}
		})
	}
}

func TestReadIntoMismatch(t *testing.T) {
	path := writeTmp(t, []Tensor{{Name: "g", DType: F32, Shape: []int{4}, Data: make([]byte, 16)}}, nil)
	for _, tc := range []struct {
		name string
		dst  map[string]Dest
	}{
		{"unknown", map[string]Dest{"h": {DType: F32, Data: make([]byte, 16)}}},
		{"dtype", map[string]Dest{"g": {DType: F64, Data: make([]byte, 32)}}},
		{"size", map[string]Dest{"g": {DType: F32, Data: make([]byte, 12)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if err := r.ReadInto(tc.dst); !errors.Is(err, ErrMismatch) {
				t.Fatalf("got %v, want ErrMismatch", err)
			}
		})
	}
}

func TestBF16NaNInf(t *testing.T) {
	v := []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1)), math.MaxFloat32, float32(math.Copysign(0, -1)), 1e-40}
	buf := make([]byte, 2*len(v))
	out := f32ToBF16(buf, f32Bytes(v))
	back := make([]byte, 4*len(v))
	bf16ToF32(back, out)
	got := func(i int) float32 { return math.Float32frombits(binary.LittleEndian.Uint32(back[4*i:])) }
	if !math.IsNaN(float64(got(0))) || !math.IsInf(float64(got(1)), 1) || !math.IsInf(float64(got(2)), -1) {
		t.Fatalf("specials: %v %v %v", got(0), got(1), got(2))
	}
	if !math.IsInf(float64(got(3)), 1) { // MaxFloat32 rounds up to +Inf in bfloat16, as in torch
		t.Fatalf("MaxFloat32 -> %v", got(3))
	}
	if got(4) != 0 || !math.Signbit(float64(got(4))) {
		t.Fatalf("-0 -> %v", got(4))
	}
}
