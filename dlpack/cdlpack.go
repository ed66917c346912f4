package dlpack

// This is the only file of the package that imports "C". It holds
//
//   - a private copy of the three DLPack structs (dlpack.h v1.x), laid out
//     as documented in docs/toolchain.md and pinned by static assertions;
//   - static C helpers that read those structs at an integer address;
//   - the test fixtures' C side (allocation, field writes, deleter);
//   - thin Go wrappers, named c*, which the rest of the package calls.
//
// No C type appears in the package's exported API.
//
// The one place where an integer address becomes a pointer that Go may
// dereference is cPointer (C's peft_dl_pointer). The header readers also
// cast addr to a struct pointer, but in C, where go vet does not look.

/*
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef struct { int32_t device_type; int32_t device_id; } peft_DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } peft_DLDataType;
typedef struct {
	void *data;
	peft_DLDevice device;
	int32_t ndim;
	peft_DLDataType dtype;
	int64_t *shape;
	int64_t *strides;
	uint64_t byte_offset;
} peft_DLTensor;
typedef struct peft_DLManagedTensor {
	peft_DLTensor dl_tensor;
	void *manager_ctx;
	void (*deleter)(struct peft_DLManagedTensor *self);
} peft_DLManagedTensor;
typedef struct { uint32_t major; uint32_t minor; } peft_DLPackVersion;
typedef struct peft_DLManagedTensorVersioned {
	peft_DLPackVersion version;
	void *manager_ctx;
	void (*deleter)(struct peft_DLManagedTensorVersioned *self);
	uint64_t flags;
	peft_DLTensor dl_tensor;
} peft_DLManagedTensorVersioned;

#if UINTPTR_MAX == 0xFFFFFFFFFFFFFFFFu
_Static_assert(sizeof(peft_DLTensor) == 48, "DLTensor is 48 bytes");
_Static_assert(offsetof(peft_DLTensor, device) == 8, "DLTensor.device at 8");
_Static_assert(offsetof(peft_DLTensor, ndim) == 16, "DLTensor.ndim at 16");
_Static_assert(offsetof(peft_DLTensor, dtype) == 20, "DLTensor.dtype at 20");
_Static_assert(offsetof(peft_DLTensor, shape) == 24, "DLTensor.shape at 24");
_Static_assert(offsetof(peft_DLTensor, strides) == 32, "DLTensor.strides at 32");
_Static_assert(offsetof(peft_DLTensor, byte_offset) == 40, "DLTensor.byte_offset at 40");
_Static_assert(offsetof(peft_DLManagedTensor, manager_ctx) == 48, "DLManagedTensor.manager_ctx at 48");
_Static_assert(offsetof(peft_DLManagedTensor, deleter) == 56, "DLManagedTensor.deleter at 56");
_Static_assert(offsetof(peft_DLManagedTensorVersioned, manager_ctx) == 8, "versioned manager_ctx at 8");
_Static_assert(offsetof(peft_DLManagedTensorVersioned, deleter) == 16, "versioned deleter at 16");
_Static_assert(offsetof(peft_DLManagedTensorVersioned, flags) == 24, "versioned flags at 24");
_Static_assert(offsetof(peft_DLManagedTensorVersioned, dl_tensor) == 32, "versioned dl_tensor at 32");
#endif

// ---- readers ----

// peft_dl_version reads only the version field of a DLManagedTensorVersioned.
static peft_DLPackVersion peft_dl_version(uintptr_t addr) {
	return ((const peft_DLManagedTensorVersioned *)addr)->version;
}

// Every DLTensor field as integers, plus the flags of the versioned struct.
typedef struct {
	uint64_t flags;
	int32_t device_type, device_id, ndim;
	uint8_t code, bits;
	uint16_t lanes;
	uintptr_t data, shape, strides;
	uint64_t byte_offset;
} peft_dl_header;

// peft_dl_tensor reads the DLTensor (and, for versioned, the flags). The
// caller has already checked the major version.
static peft_dl_header peft_dl_tensor(uintptr_t addr, int versioned) {
	peft_dl_header h;
	const peft_DLTensor *t;
	memset(&h, 0, sizeof h);
	if (versioned) {
		const peft_DLManagedTensorVersioned *m = (const peft_DLManagedTensorVersioned *)addr;
		h.flags = m->flags;
		t = &m->dl_tensor;
	} else {
		t = &((const peft_DLManagedTensor *)addr)->dl_tensor;
	}
	h.device_type = t->device.device_type;
	h.device_id = t->device.device_id;
	h.ndim = t->ndim;
	h.code = t->dtype.code;
	h.bits = t->dtype.bits;
	h.lanes = t->dtype.lanes;
	h.data = (uintptr_t)t->data;
	h.shape = (uintptr_t)t->shape;
	h.strides = (uintptr_t)t->strides;
	h.byte_offset = t->byte_offset;
	return h;
}

// peft_dl_copy_i64 copies n int64 values (shape or strides) into dst.
// memcpy because producers need not align these arrays.
static void peft_dl_copy_i64(int64_t *dst, uintptr_t src, int32_t n) {
	if (n > 0) memcpy(dst, (const void *)src, (size_t)n * sizeof(int64_t));
}

// peft_dl_pointer is the package's single integer-to-pointer conversion.
static void *peft_dl_pointer(uintptr_t addr) { return (void *)addr; }

// ---- test fixtures (see fixture.go) ----

typedef struct {
	union { peft_DLManagedTensor v0; peft_DLManagedTensorVersioned v1; } m; // at offset 0
	void *shape, *strides, *data;
	int32_t versioned;
	int32_t deleter_calls;
} peft_fixture;

typedef struct {
	int32_t versioned;
	uint32_t major, minor;
	uint64_t flags;
	int32_t device_type, device_id, ndim;
	uint8_t code, bits;
	uint16_t lanes;
	uint64_t byte_offset;
	int32_t nshape, nstrides;   // -1: NULL pointer, else array length
	int64_t ndata;              // -1: NULL or fake pointer, else buffer length
	uintptr_t fake_data;
} peft_fixture_params;

static void peft_fixture_deleter0(peft_DLManagedTensor *self) {
	__atomic_fetch_add(&((peft_fixture *)self)->deleter_calls, 1, __ATOMIC_SEQ_CST);
}
static void peft_fixture_deleter1(peft_DLManagedTensorVersioned *self) {
	__atomic_fetch_add(&((peft_fixture *)self)->deleter_calls, 1, __ATOMIC_SEQ_CST);
}

static void *peft_fixture_dup(const void *src, size_t n) {
	// malloc(0) may return NULL; allocate one byte so that a present pointer
	// is never NULL, while sanitizers still flag any read past n.
	void *p = malloc(n > 0 ? n : 1);
	if (p != NULL && n > 0) memcpy(p, src, n);
	return p;
}

static void peft_fixture_free(uintptr_t addr) {
	peft_fixture *f = (peft_fixture *)addr;
	if (f == NULL) return;
	free(f->shape);
	free(f->strides);
	free(f->data);
	free(f);
}

static uintptr_t peft_fixture_new(const peft_fixture_params *p,
		const int64_t *shape, const int64_t *strides, const void *data) {
	peft_fixture *f = (peft_fixture *)calloc(1, sizeof(peft_fixture));
	peft_DLTensor *t;
	if (f == NULL) return 0;
	f->versioned = p->versioned;
	if (p->nshape >= 0 && (f->shape = peft_fixture_dup(shape, (size_t)p->nshape * 8)) == NULL) goto fail;
	if (p->nstrides >= 0 && (f->strides = peft_fixture_dup(strides, (size_t)p->nstrides * 8)) == NULL) goto fail;
	if (p->ndata >= 0 && (f->data = peft_fixture_dup(data, (size_t)p->ndata)) == NULL) goto fail;
	if (p->versioned) {
		f->m.v1.version.major = p->major;
		f->m.v1.version.minor = p->minor;
		f->m.v1.manager_ctx = f;
		f->m.v1.deleter = peft_fixture_deleter1;
		f->m.v1.flags = p->flags;
		t = &f->m.v1.dl_tensor;
	} else {
		f->m.v0.manager_ctx = f;
		f->m.v0.deleter = peft_fixture_deleter0;
		t = &f->m.v0.dl_tensor;
	}
	t->data = p->ndata >= 0 ? f->data : (void *)p->fake_data;
	t->device.device_type = p->device_type;
	t->device.device_id = p->device_id;
	t->ndim = p->ndim;
	t->dtype.code = p->code;
	t->dtype.bits = p->bits;
	t->dtype.lanes = p->lanes;
	t->shape = (int64_t *)f->shape;
	t->strides = (int64_t *)f->strides;
	t->byte_offset = p->byte_offset;
	return (uintptr_t)f;
fail:
	peft_fixture_free((uintptr_t)f);
	return 0;
}

// peft_fixture_delete calls the producer's deleter through a C trampoline,
// as a capsule destructor would.
static void peft_fixture_delete(uintptr_t addr) {
	peft_fixture *f = (peft_fixture *)addr;
	if (f->versioned) f->m.v1.deleter(&f->m.v1);
	else f->m.v0.deleter(&f->m.v0);
}

static int32_t peft_fixture_deleter_calls(uintptr_t addr) {
	return __atomic_load_n(&((peft_fixture *)addr)->deleter_calls, __ATOMIC_SEQ_CST);
}

static uintptr_t peft_fixture_data(uintptr_t addr) {
	return (uintptr_t)((peft_fixture *)addr)->data;
}
*/
import "C"

import "unsafe"

// header holds every field Parse needs, read by C from a DLTensor.
type header struct {
	flags              uint64
	devType, devID     int32
	ndim               int32
	code, bits         uint8
	lanes              uint16
	data, shape, strds uintptr
	byteOffset         uint64
}

// cVersion reads the version of the DLManagedTensorVersioned at addr, and
// nothing else.
func cVersion(addr uintptr) (major, minor uint32) {
	v := C.peft_dl_version(C.uintptr_t(addr))
	return uint32(v.major), uint32(v.minor)
}

// cHeader reads the DLTensor fields (and flags when versioned) at addr.
func cHeader(addr uintptr, versioned bool) header {
	v := C.int(0)
	if versioned {
		v = 1
	}
	h := C.peft_dl_tensor(C.uintptr_t(addr), v)
	return header{
		flags:      uint64(h.flags),
		devType:    int32(h.device_type),
		devID:      int32(h.device_id),
		ndim:       int32(h.ndim),
		code:       uint8(h.code),
		bits:       uint8(h.bits),
		lanes:      uint16(h.lanes),
		data:       uintptr(h.data),
		shape:      uintptr(h.shape),
		strds:      uintptr(h.strides),
		byteOffset: uint64(h.byte_offset),
	}
}

// cCopyInt64 copies len(dst) int64 values from the C array at src.
func cCopyInt64(dst []int64, src uintptr) {
	if len(dst) == 0 {
		return
	}
	C.peft_dl_copy_i64((*C.int64_t)(unsafe.Pointer(&dst[0])), C.uintptr_t(src), C.int32_t(len(dst)))
}

// cPointer converts a validated foreign address to a pointer. It is the
// package's only integer-to-pointer conversion; call it only on addresses
// that Parse has checked (non-NULL, aligned, extent without overflow), or
// on fixture memory (cBytes).
func cPointer(addr uintptr) unsafe.Pointer {
	return C.peft_dl_pointer(C.uintptr_t(addr))
}

// fixtureParams mirrors peft_fixture_params on the Go side.
type fixtureParams struct {
	versioned            bool
	major, minor         uint32
	flags                uint64
	devType, devID, ndim int32
	code, bits           uint8
	lanes                uint16
	byteOffset           uint64
	shape, strides       []int64 // nil: NULL pointer
	data                 []byte  // nil: NULL (or fake) pointer
	fakeData             uintptr
}

func cFixtureNew(p fixtureParams) uintptr {
	cp := C.peft_fixture_params{
		major:       C.uint32_t(p.major),
		minor:       C.uint32_t(p.minor),
		flags:       C.uint64_t(p.flags),
		device_type: C.int32_t(p.devType),
		device_id:   C.int32_t(p.devID),
		ndim:        C.int32_t(p.ndim),
		code:        C.uint8_t(p.code),
		bits:        C.uint8_t(p.bits),
		lanes:       C.uint16_t(p.lanes),
		byte_offset: C.uint64_t(p.byteOffset),
		nshape:      -1,
		nstrides:    -1,
		ndata:       -1,
		fake_data:   C.uintptr_t(p.fakeData),
	}
	if p.versioned {
		cp.versioned = 1
	}
	var shape, strides *C.int64_t
	var data unsafe.Pointer
	if p.shape != nil {
		cp.nshape = C.int32_t(len(p.shape))
		if len(p.shape) > 0 {
			shape = (*C.int64_t)(unsafe.Pointer(&p.shape[0]))
		}
	}
	if p.strides != nil {
		cp.nstrides = C.int32_t(len(p.strides))
		if len(p.strides) > 0 {
			strides = (*C.int64_t)(unsafe.Pointer(&p.strides[0]))
		}
	}
	if p.data != nil {
		cp.ndata = C.int64_t(len(p.data))
		if len(p.data) > 0 {
			data = unsafe.Pointer(&p.data[0])
		}
	}
	return uintptr(C.peft_fixture_new(&cp, shape, strides, data))
}

func cFixtureDelete(addr uintptr) { C.peft_fixture_delete(C.uintptr_t(addr)) }
func cFixtureFree(addr uintptr)   { C.peft_fixture_free(C.uintptr_t(addr)) }
func cFixtureDeleterCalls(addr uintptr) int {
	return int(C.peft_fixture_deleter_calls(C.uintptr_t(addr)))
}
func cFixtureData(addr uintptr) uintptr { return uintptr(C.peft_fixture_data(C.uintptr_t(addr))) }

// cBytes copies n bytes of fixture memory into Go (test fixtures only).
func cBytes(addr uintptr, n int) []byte { return C.GoBytes(cPointer(addr), C.int(n)) }
