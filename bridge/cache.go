package bridge

import (
	"encoding/json"
	"errors"
	"fmt"
	"unsafe"

	"github.com/peft-loraone/peft-loraone/dlpack"
	"github.com/peft-loraone/peft-loraone/gradcache"
)

// The error kind of a cache file that cannot be used (empty, truncated,
// corrupted, foreign, another format version): Python maps it to
// CacheError and recomputes.
const kindCache = "cache-invalid"

// CacheWriter collects the tensors of one gradient cache file (package
// gradcache: a safetensors file in a zstd frame) and writes it with Commit.
//
// Python creates it with NewCacheWriter, calls Add once per tensor (the
// tensors are validated and viewed in place, not copied) and then Commit,
// which compresses them straight from their memory with the GIL released.
// Every tensor added must stay alive and unchanged until Commit returns.
type CacheWriter struct {
	path    string
	meta    map[string]string
	level   int
	tensors []gradcache.Tensor
	err     error
}

// NewCacheWriter starts a cache file at path with metadata metaJSON (a JSON
// object of strings; "" for none) and zstd level (0: gradcache.DefaultLevel).
// Errors in the arguments are reported by Commit.
func NewCacheWriter(path string, metaJSON string, level int) *CacheWriter {
	w := &CacheWriter{path: path, level: level, meta: map[string]string{}}
	if metaJSON != "" {
		if err := json.Unmarshal([]byte(metaJSON), &w.meta); err != nil {
			w.err = kindf(kindInvalid, "cache metadata must be a JSON object of strings: %v", err)
		}
	}
	return w
}

// Add adds the tensor at addr (a DLPack managed tensor: float32, float64,
// float16 or bfloat16, CPU, C-contiguous, any number of dimensions) under
// name; with bf16 true a float32 tensor is stored as bfloat16 (round to
// nearest even). Errors: "invalid-argument:", "unsupported-dtype:",
// "unsupported-device:".
func (w *CacheWriter) Add(name string, addr uintptr, versioned bool, bf16 bool) (err error) {
	defer recoverError(&err)
	if w.err != nil {
		return w.err
	}
	t, err := contiguousBytes(name, addr, versioned)
	if err != nil {
		return err
	}
	if bf16 {
		if t.DType != gradcache.F32 {
			return kindf(kindDType, "%s: only float32 tensors can be stored as bfloat16, got %s", name, t.DType)
		}
		t.Store = gradcache.BF16
	}
	w.tensors = append(w.tensors, t)
	return nil
}

// Commit writes the file atomically (temporary file, fsync, rename). The GIL
// is released during the call.
func (w *CacheWriter) Commit() (err error) {
	defer recoverError(&err)
	if w.err != nil {
		return w.err
	}
	defer func() { w.tensors = nil }() // drop the views of borrowed memory
	if err := gradcache.Write(w.path, w.tensors, w.meta, gradcache.WriteOptions{Level: w.level}); err != nil {
		return kindf(kindInvalid, "%v", err)
	}
	return nil
}

// CacheReader reads one gradient cache file: Header returns its metadata and
// tensor list, Into names the destination of a tensor, Read decompresses
// every tensor into its destination with the GIL released, and Close
// releases the file. Destinations must stay alive until Read returns.
type CacheReader struct {
	r       *gradcache.Reader
	dst     map[string]gradcache.Dest
	openErr error // Open's error, reported by Header (gopy binds one-value constructors)
}

// NewCacheReader opens the cache file at path and reads its header. A file
// that cannot be used gives a "cache-invalid:" error naming the problem
// (Header reports it).
func NewCacheReader(path string) *CacheReader {
	c := &CacheReader{dst: map[string]gradcache.Dest{}}
	r, err := gradcache.Open(path)
	if err != nil {
		c.openErr = err
		return c
	}
	c.r = r
	return c
}

// Header returns the file's header as JSON:
//
//	{"meta": {...}, "tensors": [{"name": ..., "dtype": "F32", "shape": [...]}, ...]}
func (c *CacheReader) Header() (js string, err error) {
	defer recoverError(&err)
	if c.r == nil {
		if c.openErr != nil {
			return "", cacheError(c.openErr)
		}
		return "", kindf(kindInvalid, "cache reader is closed")
	}
	type tensor struct {
		Name  string `json:"name"`
		DType string `json:"dtype"`
		Shape []int  `json:"shape"`
	}
	out := struct {
		Meta    map[string]string `json:"meta"`
		Tensors []tensor          `json:"tensors"`
	}{Meta: c.r.Meta()}
	for _, t := range c.r.Tensors() {
		out.Tensors = append(out.Tensors, tensor{t.Name, string(t.DType), t.Shape})
	}
	b, err := json.Marshal(out)
	return string(b), err
}

// Into sets the destination of tensor name: the writable, C-contiguous CPU
// tensor at addr, of the stored dtype (or float32 for a tensor stored as
// bfloat16) and the same number of elements.
func (c *CacheReader) Into(name string, addr uintptr, versioned bool) (err error) {
	defer recoverError(&err)
	if c.r == nil {
		return kindf(kindInvalid, "cache reader is closed or failed to open")
	}
	t, err := dlpack.Parse(addr, versioned)
	if err == nil {
		err = t.Writable()
	}
	if err != nil {
		return classify(fmt.Errorf("%s: %w", name, err))
	}
	v, err := contiguousBytes(name, addr, versioned)
	if err != nil {
		return err
	}
	c.dst[name] = gradcache.Dest{DType: v.DType, Data: v.Data}
	return nil
}

// Read decompresses every tensor into its destination (tensors without one
// are checked and dropped), verifying each checksum. Errors:
// "cache-invalid:" (the file is damaged: destinations hold unspecified
// bytes), "invalid-argument:" (a destination that does not fit).
func (c *CacheReader) Read() (err error) {
	defer recoverError(&err)
	if c.r == nil {
		return kindf(kindInvalid, "cache reader is closed or failed to open")
	}
	defer func() { c.dst = nil }()
	if err := c.r.ReadInto(c.dst); err != nil {
		return cacheError(err)
	}
	return nil
}

// Close releases the file; a closed reader refuses every other call.
func (c *CacheReader) Close() (err error) {
	defer recoverError(&err)
	if c.r != nil {
		c.r.Close()
		c.r = nil
	}
	c.dst = nil
	return nil
}

func cacheError(err error) error {
	if errors.Is(err, gradcache.ErrMismatch) {
		return kindf(kindInvalid, "%v", err)
	}
	return kindf(kindCache, "%v", err)
}

// contiguousBytes views the C-contiguous tensor at addr as gradcache bytes.
func contiguousBytes(name string, addr uintptr, versioned bool) (gradcache.Tensor, error) {
	t, err := dlpack.Parse(addr, versioned)
	if err != nil {
		return gradcache.Tensor{}, classify(fmt.Errorf("%s: %w", name, err))
	}
	stride := int64(1)
	for i := len(t.Shape) - 1; i >= 0; i-- {
		if t.Shape[i] > 1 && t.Strides[i] != stride {
			return gradcache.Tensor{}, kindf(kindInvalid, "%s of shape %v has strides %v: pass a contiguous tensor (.contiguous())", name, t.Shape, t.Strides)
		}
		stride *= max(t.Shape[i], 1)
	}
	shape := make([]int, len(t.Shape))
	for i, d := range t.Shape {
		shape[i] = int(d)
	}
	out := gradcache.Tensor{Name: name, Shape: shape}
	var p unsafe.Pointer
	var size int
	switch t.DType {
	case dlpack.Float32:
		v, err := t.Float32s()
		if err != nil {
			return out, classify(err)
		}
		out.DType, size = gradcache.F32, 4
		if len(v) > 0 {
			p = unsafe.Pointer(&v[0])
		}
	case dlpack.Float64:
		v, err := t.Float64s()
		if err != nil {
			return out, classify(err)
		}
		out.DType, size = gradcache.F64, 8
		if len(v) > 0 {
			p = unsafe.Pointer(&v[0])
		}
	case dlpack.Float16, dlpack.BFloat16:
		v, err := t.Halfs()
		if err != nil {
			return out, classify(err)
		}
		out.DType, size = gradcache.F16, 2
		if t.DType == dlpack.BFloat16 {
			out.DType = gradcache.BF16
		}
		if len(v) > 0 {
			p = unsafe.Pointer(&v[0])
		}
	default:
		return out, kindf(kindDType, "%s has dtype %s; the cache stores float32, float64, float16 or bfloat16", name, t.DType)
	}
	if p != nil {
		out.Data = unsafe.Slice((*byte)(p), int(t.Numel())*size)
	} else {
		out.Data = []byte{}
	}
	return out, nil
}
