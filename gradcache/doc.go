// Package gradcache writes and reads the gradient cache of peft-loraone: the
// tensors one gradient pass captured (dense gradients G, or the sketches of
// G), stored so that a later initialization with another rank, gamma, seed or
// SVD tolerance reads them back instead of running the batches again.
//
// # Format
//
// A cache file is a standard safetensors file inside one standard zstd frame:
//
//	zstd -d cache.safetensors.zst   # gives cache.safetensors, which the
//	                                # safetensors package opens
//
// The safetensors header (an 8-byte little-endian length, then JSON) lists
// each tensor's dtype, shape and data_offsets; tensors are stored row-major,
// little-endian, in the order of their names. Its "__metadata__" map holds:
//
//	format          "peft-loraone-gradcache"
//	format_version  FormatVersion ("1"); another version is refused
//	crc32c.<name>   CRC-32C (Castagnoli) of the stored bytes of tensor <name>,
//	                8 lowercase hex digits
//
// and whatever metadata the caller adds (the Python side puts its cache key,
// fingerprints and capture settings there). No byte-plane shuffle is applied
// before compression: it would gain 13% in size on bfloat16 gradients (ratio
// 1.46 against 1.29) and less on float32, and lose the property that standard
// tools read the file (bench/RESULTS.md, "Gradient cache").
//
// # Streaming
//
// [Write] reads each tensor's memory in place twice (once for its checksum,
// which the header carries, once to compress it) and never copies a whole
// tensor: the only buffers are zstd's and, for a float32 tensor stored as
// bfloat16, one 1 MiB conversion chunk. [Reader.ReadInto] decompresses each
// tensor straight into the caller's destination memory (through the same kind
// of chunk when it converts bfloat16 back to float32), verifying its checksum
// as it goes.
//
// # Integrity
//
// Writes are atomic: the file is written to a temporary file in the same
// directory, synced, and renamed over the final name (then the directory is
// synced), so a process killed mid-write leaves at most a stray temporary
// file, never a partial cache under the final name. Reading detects an empty
// file, a file that is not zstd, a truncated file (the decompressed stream
// ends early or the frame is incomplete), a foreign safetensors file (no
// format marker), another format version, a header whose offsets do not tile
// the data exactly, bytes after the last tensor, and any change to a tensor's
// stored bytes (its CRC-32C). Every such error wraps [ErrCorrupt] (or
// [ErrVersion] for a version mismatch, [ErrForeign] for a file that is not a
// gradient cache) and names the file.
//
// The package holds no global state and imports no Python, no DLPack and no
// numerics: it sees tensors as typed byte slices ([Tensor], [Dest]). The
// bridge package makes those slices from DLPack tensors.
package gradcache // import "github.com/peft-loraone/peft-loraone/gradcache"
