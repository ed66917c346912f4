package gradcache

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/DataDog/zstd"
)

// FormatVersion is the version this package writes and the only one it reads.
const FormatVersion = "1"

// FormatName is the value of the "format" metadata key.
const FormatName = "peft-loraone-gradcache"

// Reserved metadata keys.
const (
	MetaFormat  = "format"
	MetaVersion = "format_version"
	MetaCRC     = "crc32c." // prefix: one key per tensor
)

// MaxHeaderBytes bounds the JSON header a reader accepts (safetensors' own
// limit is 100 MB).
const MaxHeaderBytes = 100 << 20

// DefaultLevel is the zstd level of [Write] when WriteOptions.Level is 0:
// level 1, because float gradients barely compress (ratio ~1.08 for float32,
// ~1.29 for bfloat16) and higher levels cost time for little gain.
const DefaultLevel = 1

// chunk is the size of the conversion and checksum buffers.
const chunk = 1 << 20

// Errors that reading wraps; test them with errors.Is.
var (
	// ErrCorrupt: the file is empty, truncated, not zstd, or its bytes do not
	// match its header or checksums.
	ErrCorrupt = errors.New("gradcache: corrupt cache file")
	// ErrForeign: a valid safetensors file that is not a gradient cache.
	ErrForeign = errors.New("gradcache: not a peft-loraone gradient cache")
	// ErrVersion: a gradient cache of another format version.
	ErrVersion = errors.New("gradcache: unsupported format version")
	// ErrMismatch: a destination whose dtype or size does not fit the tensor.
	ErrMismatch = errors.New("gradcache: destination does not match the cached tensor")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// DType is a safetensors dtype name.
type DType string

// The dtypes the cache stores.
const (
	F64  DType = "F64"
	F32  DType = "F32"
	F16  DType = "F16"
	BF16 DType = "BF16"
)

// Size returns the bytes of one element, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case F64:
		return 8
	case F32:
		return 4
	case F16, BF16:
		return 2
	}
	return 0
}

// Tensor is one tensor to write: its name, its shape, the row-major
// little-endian bytes of its elements in dtype DType (len = product of Shape
// times DType.Size()), and the dtype to store it in (Store; empty means
// DType). The only conversion is F32 to BF16 (round to nearest even, as
// torch's .to(torch.bfloat16)).
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
	Store DType
}

func (t Tensor) stored() DType {
	if t.Store == "" {
		return t.DType
	}
	return t.Store
}

// Info describes one tensor of a cache file.
type Info struct {
	Name    string
	DType   DType
	Shape   []int
	Begin   int64 // data_offsets, relative to the start of the data
	End     int64
	CRC     uint32
	numel   int64
	present bool
}

// Numel returns the number of elements.
func (i Info) Numel() int64 { return i.numel }

// WriteOptions are the settings of [Write].
type WriteOptions struct {
	// Level is the zstd compression level (1 to 22; 0 means DefaultLevel).
	Level int
}

func numel(shape []int) (int64, error) {
	n := int64(1)
	for _, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("negative dimension in shape %v", shape)
		}
		if d > 0 && n > math.MaxInt64/int64(d)/8 {
			return 0, fmt.Errorf("shape %v is too large", shape)
		}
		n *= int64(d)
	}
	return n, nil
}

type headerEntry struct {
	DType       DType    `json:"dtype"`
	Shape       []int    `json:"shape"`
	DataOffsets [2]int64 `json:"data_offsets"`
}

// Write stores tensors and meta at path as a zstd-compressed safetensors file,
// atomically (temporary file in path's directory, fsync, rename, fsync of the
// directory). Tensor names must be unique, non-empty and not "__metadata__";
// meta keys must not be the reserved ones. The tensors are read in place and
// must not change during the call.
func Write(path string, tensors []Tensor, meta map[string]string, opt WriteOptions) (err error) {
	level := opt.Level
	if level == 0 {
		level = DefaultLevel
	}
	if level < 1 || level > 22 {
		return fmt.Errorf("gradcache: write %s: zstd level %d is outside 1..22", path, level)
	}
	sorted := slices.Clone(tensors)
	slices.SortFunc(sorted, func(a, b Tensor) int { return strings.Compare(a.Name, b.Name) })
	header := map[string]any{}
	md := map[string]string{}
	for k, v := range meta {
		if k == MetaFormat || k == MetaVersion || strings.HasPrefix(k, MetaCRC) {
			return fmt.Errorf("gradcache: write %s: metadata key %q is reserved", path, k)
		}
		md[k] = v
	}
	md[MetaFormat] = FormatName
	md[MetaVersion] = FormatVersion
	var offset int64
	for i, t := range sorted {
		if t.Name == "" || t.Name == "__metadata__" {
			return fmt.Errorf("gradcache: write %s: invalid tensor name %q", path, t.Name)
		}
		if i > 0 && sorted[i-1].Name == t.Name {
			return fmt.Errorf("gradcache: write %s: tensor name %q appears twice", path, t.Name)
		}
		n, err := numel(t.Shape)
		if err != nil {
			return fmt.Errorf("gradcache: write %s: tensor %q: %v", path, t.Name, err)
		}
		if t.DType.Size() == 0 {
			return fmt.Errorf("gradcache: write %s: tensor %q: unsupported dtype %q", path, t.Name, t.DType)
		}
		if t.stored() != t.DType && !(t.DType == F32 && t.stored() == BF16) {
			return fmt.Errorf("gradcache: write %s: tensor %q: cannot store %s as %s (only F32 as BF16)", path, t.Name, t.DType, t.stored())
		}
		if int64(len(t.Data)) != n*int64(t.DType.Size()) {
			return fmt.Errorf("gradcache: write %s: tensor %q of shape %v and dtype %s needs %d bytes, got %d",
				path, t.Name, t.Shape, t.DType, n*int64(t.DType.Size()), len(t.Data))
		}
		size := n * int64(t.stored().Size())
		header[t.Name] = headerEntry{DType: t.stored(), Shape: nonNil(t.Shape), DataOffsets: [2]int64{offset, offset + size}}
		offset += size
		md[MetaCRC+t.Name] = fmt.Sprintf("%08x", checksum(t))
	}
	header["__metadata__"] = md
	js, err := json.Marshal(header)
	if err != nil {
		return fmt.Errorf("gradcache: write %s: header: %w", path, err)
	}
	for len(js)%8 != 0 { // safetensors pads the header with spaces to 8 bytes
		js = append(js, ' ')
	}

	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("gradcache: write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	bw := bufio.NewWriterSize(f, chunk)
	zw := zstd.NewWriterLevel(bw, level)
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(js)))
	if _, err = zw.Write(lenBuf[:]); err == nil {
		_, err = zw.Write(js)
	}
	var buf []byte
	for _, t := range sorted {
		if err != nil {
			break
		}
		if t.stored() == t.DType {
			_, err = zw.Write(t.Data)
			continue
		}
		if buf == nil {
			buf = make([]byte, chunk)
		}
		for off := 0; off < len(t.Data) && err == nil; off += 2 * chunk {
			src := t.Data[off:min(off+2*chunk, len(t.Data))]
			out := f32ToBF16(buf, src)
			_, err = zw.Write(out)
		}
	}
	if err != nil {
		zw.Close()
		return fmt.Errorf("gradcache: write %s: compress: %w", path, err)
	}
	if err = zw.Close(); err != nil {
		return fmt.Errorf("gradcache: write %s: compress: %w", path, err)
	}
	if err = bw.Flush(); err != nil {
		return fmt.Errorf("gradcache: write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("gradcache: write %s: fsync: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("gradcache: write %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("gradcache: write %s: %w", path, err)
	}
	if d, derr := os.Open(dir); derr == nil { // make the rename durable; best effort
		d.Sync()
		d.Close()
	}
	return nil
}

func nonNil(s []int) []int {
	if s == nil {
		return []int{}
	}
	return s
}

// checksum returns the CRC-32C of t's stored bytes.
func checksum(t Tensor) uint32 {
	if t.stored() == t.DType {
		return crc32.Checksum(t.Data, castagnoli)
	}
	buf := make([]byte, chunk)
	var c uint32
	for off := 0; off < len(t.Data); off += 2 * chunk {
		c = crc32.Update(c, castagnoli, f32ToBF16(buf, t.Data[off:min(off+2*chunk, len(t.Data))]))
	}
	return c
}

// f32ToBF16 converts the little-endian float32 values in src to bfloat16
// (round to nearest even; NaN stays NaN) into dst and returns dst[:len(src)/2].
func f32ToBF16(dst, src []byte) []byte {
	n := len(src) / 4
	for i := 0; i < n; i++ {
		b := binary.LittleEndian.Uint32(src[4*i:])
		var h uint16
		if b&0x7fffffff > 0x7f800000 { // NaN: keep it quiet and a NaN
			h = uint16(b>>16) | 0x40
		} else {
			h = uint16((b + 0x7fff + (b>>16)&1) >> 16)
		}
		binary.LittleEndian.PutUint16(dst[2*i:], h)
	}
	return dst[:2*n]
}

// bf16ToF32 widens the little-endian bfloat16 values in src into dst (exact).
func bf16ToF32(dst, src []byte) {
	for i := 0; i < len(src)/2; i++ {
		binary.LittleEndian.PutUint32(dst[4*i:], uint32(binary.LittleEndian.Uint16(src[2*i:]))<<16)
	}
}

// Reader reads one cache file: [Open] parses and checks its header, then
// [Reader.ReadInto] streams the tensors into caller memory.
type Reader struct {
	path    string
	f       *os.File
	z       io.ReadCloser
	meta    map[string]string
	tensors []Info // in data order
	size    int64  // bytes of data
	used    bool
}

// Open opens the cache file at path and reads its header (only the header is
// decompressed). The caller must Close the Reader.
func Open(path string) (*Reader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("gradcache: open %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("gradcache: open %s: %w", path, err)
	}
	if st.Size() == 0 {
		f.Close()
		return nil, fmt.Errorf("gradcache: %s is empty (0 bytes): %w", path, ErrCorrupt)
	}
	r := &Reader{path: path, f: f, z: zstd.NewReader(bufio.NewReaderSize(f, chunk))}
	if err := r.readHeader(); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func (r *Reader) corrupt(format string, args ...any) error {
	return fmt.Errorf("gradcache: %s: %s: %w", r.path, fmt.Sprintf(format, args...), ErrCorrupt)
}

// readFull reads exactly len(p) decompressed bytes, naming what it read on error.
func (r *Reader) readFull(p []byte, what string) error {
	if _, err := io.ReadFull(r.z, p); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return r.corrupt("truncated: the stream ends inside %s", what)
		}
		return r.corrupt("reading %s: %v (not a zstd stream, or damaged)", what, err)
	}
	return nil
}

func (r *Reader) readHeader() error {
	var lenBuf [8]byte
	if err := r.readFull(lenBuf[:], "the header length"); err != nil {
		return err
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n < 2 || n > MaxHeaderBytes {
		return r.corrupt("header length %d is outside [2, %d]: not a safetensors stream", n, MaxHeaderBytes)
	}
	js := make([]byte, n)
	if err := r.readFull(js, "the header"); err != nil {
		return err
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(js, &raw); err != nil {
		return r.corrupt("header is not valid JSON: %v", err)
	}
	if m, ok := raw["__metadata__"]; ok {
		if err := json.Unmarshal(m, &r.meta); err != nil {
			return r.corrupt("__metadata__ is not a string map: %v", err)
		}
	}
	if r.meta[MetaFormat] != FormatName {
		return fmt.Errorf("gradcache: %s: metadata format is %q, not %q: %w", r.path, r.meta[MetaFormat], FormatName, ErrForeign)
	}
	if v := r.meta[MetaVersion]; v != FormatVersion {
		return fmt.Errorf("gradcache: %s: format version %q, this build reads %q (delete the file to rebuild the cache): %w",
			r.path, v, FormatVersion, ErrVersion)
	}
	for name, m := range raw {
		if name == "__metadata__" {
			continue
		}
		var e headerEntry
		if err := json.Unmarshal(m, &e); err != nil {
			return r.corrupt("tensor %q: bad header entry: %v", name, err)
		}
		n, err := numel(e.Shape)
		if err != nil || e.DType.Size() == 0 {
			return r.corrupt("tensor %q: bad dtype %q or shape %v", name, e.DType, e.Shape)
		}
		c, ok := r.meta[MetaCRC+name]
		crc, perr := strconv.ParseUint(c, 16, 32)
		if !ok || perr != nil || len(c) != 8 {
			return r.corrupt("tensor %q has no valid %s%s checksum", name, MetaCRC, name)
		}
		r.tensors = append(r.tensors, Info{Name: name, DType: e.DType, Shape: e.Shape, Begin: e.DataOffsets[0],
			End: e.DataOffsets[1], CRC: uint32(crc), numel: n})
	}
	slices.SortFunc(r.tensors, func(a, b Info) int { return int(a.Begin - b.Begin) })
	var off int64
	for _, t := range r.tensors {
		if t.Begin != off || t.End-t.Begin != t.numel*int64(t.DType.Size()) {
			return r.corrupt("tensor %q: data_offsets [%d, %d] do not follow the previous tensor at %d with %d bytes",
				t.Name, t.Begin, t.End, off, t.numel*int64(t.DType.Size()))
		}
		off = t.End
	}
	r.size = off
	return nil
}

// Meta returns the header's metadata (the reserved keys included).
func (r *Reader) Meta() map[string]string { return r.meta }

// Tensors returns the tensors of the file, in data order.
func (r *Reader) Tensors() []Info { return slices.Clone(r.tensors) }

// Dest is where [Reader.ReadInto] puts one tensor: the bytes of a row-major
// array of dtype DType with the tensor's number of elements. DType is the
// stored dtype, or F32 for a tensor stored as BF16 (widened exactly).
type Dest struct {
	DType DType
	Data  []byte
}

// ReadInto decompresses every tensor of the file, in data order, into
// dst[name] (tensors without a destination are read, checked and dropped),
// verifying each tensor's CRC-32C and that the stream ends right after the
// last tensor. A Reader reads once. On error the destinations hold
// unspecified bytes; the error wraps ErrCorrupt (or ErrMismatch for a
// destination that does not fit).
func (r *Reader) ReadInto(dst map[string]Dest) error {
	if r.used {
		return fmt.Errorf("gradcache: %s: ReadInto called twice", r.path)
	}
	r.used = true
	known := map[string]Info{}
	for _, t := range r.tensors {
		known[t.Name] = t
	}
	for name, d := range dst {
		t, ok := known[name]
		if !ok {
			return fmt.Errorf("gradcache: %s has no tensor %q: %w", r.path, name, ErrMismatch)
		}
		if !(d.DType == t.DType || (t.DType == BF16 && d.DType == F32)) {
			return fmt.Errorf("gradcache: %s: tensor %q is %s, destination is %s: %w", r.path, name, t.DType, d.DType, ErrMismatch)
		}
		if want := t.numel * int64(d.DType.Size()); int64(len(d.Data)) != want {
			return fmt.Errorf("gradcache: %s: tensor %q of shape %v needs %d destination bytes, got %d: %w",
				r.path, name, t.Shape, want, len(d.Data), ErrMismatch)
		}
	}
	var buf []byte
	for _, t := range r.tensors {
		d, ok := dst[t.Name]
		what := fmt.Sprintf("tensor %q", t.Name)
		var c uint32
		if ok && d.DType == t.DType {
			if err := r.readFull(d.Data, what); err != nil {
				return err
			}
			c = crc32.Checksum(d.Data, castagnoli)
		} else {
			if buf == nil {
				buf = make([]byte, chunk)
			}
			for off := int64(0); off < t.End-t.Begin; off += chunk {
				p := buf[:min(chunk, t.End-t.Begin-off)]
				if err := r.readFull(p, what); err != nil {
					return err
				}
				c = crc32.Update(c, castagnoli, p)
				if ok { // BF16 -> F32
					bf16ToF32(d.Data[2*off:], p)
				}
			}
		}
		if c != t.CRC {
			return r.corrupt("tensor %q: checksum %08x, header says %08x (the file was modified or damaged)", t.Name, c, t.CRC)
		}
	}
	var one [1]byte
	if n, err := r.z.Read(one[:]); n > 0 || (err != nil && !errors.Is(err, io.EOF)) {
		if n > 0 {
			return r.corrupt("bytes after the last tensor")
		}
		return r.corrupt("after the last tensor: %v", err)
	}
	return nil
}

// Close releases the file and the decompressor.
func (r *Reader) Close() error {
	var err error
	if r.z != nil {
		err = r.z.Close()
		r.z = nil
	}
	if r.f != nil {
		if cerr := r.f.Close(); err == nil {
			err = cerr
		}
		r.f = nil
	}
	if errors.Is(err, os.ErrClosed) {
		err = nil
	}
	return err
}
