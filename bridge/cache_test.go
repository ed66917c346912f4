package bridge

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/peft-loraone/peft-loraone/dlpack"
)

func TestCacheRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.safetensors.zst")
	src := []float64{1, -2, 3.5, 4, 5, 6}
	in := matrix64(t, 2, 3, src, true)
	w := NewCacheWriter(path, `{"k": "v"}`, 0)
	if err := w.Add("g", in.addr, true, false); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	r := NewCacheReader(path)
	defer r.Close()
	js, err := r.Header()
	if err != nil || !strings.Contains(js, `"k":"v"`) || !strings.Contains(js, `{"name":"g","dtype":"F64","shape":[2,3]}`) {
		t.Fatalf("header %s, %v", js, err)
	}
	out := matrix64(t, 2, 3, nil, true)
	if err := r.Into("g", out.addr, true); err != nil {
		t.Fatal(err)
	}
	if err := r.Read(); err != nil {
		t.Fatal(err)
	}
	for i, x := range out.float64s() {
		if x != src[i] {
			t.Fatalf("element %d: %v, want %v", i, x, src[i])
		}
	}
}

func TestCacheErrors(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.zst")
	w := NewCacheWriter(good, "", 0)
	if err := w.Add("g", matrix64(t, 2, 2, nil, true).addr, true, false); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty.zst")
	os.WriteFile(empty, nil, 0o644)
	transposed := newTensor(t, dlpack.Fixture{Versioned: true, Major: 1, Device: dlpack.Device{Type: 1}, NDim: 2,
		DType: dlpack.Float64, Shape: []int64{2, 3}, Strides: []int64{1, 2}, Data: make([]byte, 48)})
	for _, tc := range []struct {
		name string
		run  func() error
		want string
	}{
		{"bad meta", func() error { return NewCacheWriter(good, "[1]", 0).Commit() }, "invalid-argument:"},
		{"not contiguous", func() error { return NewCacheWriter(good, "", 0).Add("x", transposed.addr, true, false) }, "invalid-argument:"},
		{"bf16 of f64", func() error {
			return NewCacheWriter(good, "", 0).Add("x", matrix64(t, 1, 1, nil, true).addr, true, true)
		}, "unsupported-dtype:"},
		{"empty file", func() error { _, err := NewCacheReader(empty).Header(); return err }, "cache-invalid:"},
		{"wrong size", func() error {
			r := NewCacheReader(good)
			defer r.Close()
			if err := r.Into("g", matrix64(t, 1, 3, nil, true).addr, true); err != nil {
				return err
			}
			return r.Read()
		}, "invalid-argument:"},
		{"closed", func() error { r := NewCacheReader(good); r.Close(); return r.Read() }, "invalid-argument:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("got %v, want prefix %q", err, tc.want)
			}
		})
	}
}
