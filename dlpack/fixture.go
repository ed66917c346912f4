package dlpack

// Test fixtures. They live in an ordinary file because _test.go files
// cannot use cgo ("use of cgo in test not supported"); the C side is in
// cdlpack.go. They are exported so that other packages' tests (bridge/) can
// build DLPack tensors without Python. Production code must not use them.

// Fixture describes a managed tensor for NewFixture to build in C memory,
// field by field, including malformed ones. It is a test fixture.
type Fixture struct {
	// Versioned selects DLManagedTensorVersioned (Major, Minor and Flags are
	// written) or the unversioned DLManagedTensor (they are ignored).
	Versioned    bool
	Major, Minor uint32
	Flags        uint64

	Device Device
	NDim   int32 // written as given, even when it disagrees with len(Shape)
	DType  DType

	// Shape and Strides: nil writes a NULL pointer; otherwise a C array of
	// exactly len(...) elements is allocated, so a reader that trusts a
	// malformed ndim reads out of bounds where sanitizers see it.
	Shape, Strides []int64
	ByteOffset     uint64

	// Data: nil writes a NULL data pointer (or FakeData); otherwise a C
	// buffer of exactly len(Data) bytes (malloc'd, so 16-byte aligned) is
	// allocated and filled with Data.
	Data []byte
	// FakeData, when Data is nil, is written as the data pointer without
	// allocating anything: only for tensors whose data is never read.
	FakeData uintptr
}

// NewFixture builds f in C memory and returns the address of the managed
// tensor (what PyCapsule_GetPointer would return) and a function that frees
// everything. It is a test fixture. It panics if C memory runs out.
func NewFixture(f Fixture) (addr uintptr, free func()) {
	addr = cFixtureNew(fixtureParams{
		versioned:  f.Versioned,
		major:      f.Major,
		minor:      f.Minor,
		flags:      f.Flags,
		devType:    f.Device.Type,
		devID:      f.Device.ID,
		ndim:       f.NDim,
		code:       f.DType.Code,
		bits:       f.DType.Bits,
		lanes:      f.DType.Lanes,
		byteOffset: f.ByteOffset,
		shape:      f.Shape,
		strides:    f.Strides,
		data:       f.Data,
		fakeData:   f.FakeData,
	})
	if addr == 0 {
		panic("dlpack: NewFixture: out of C memory")
	}
	return addr, func() { cFixtureFree(addr) }
}

// FixtureBytes copies n raw bytes starting at a fixture's address (or its
// data buffer), so that tests can decode the C structs at the documented
// offsets independently of Parse. It is a test fixture.
func FixtureBytes(addr uintptr, n int) []byte { return cBytes(addr, n) }

// FixtureData returns the address of a fixture's allocated data buffer
// (0 when none was allocated). It is a test fixture.
func FixtureData(addr uintptr) uintptr { return cFixtureData(addr) }

// FixtureDeleterCalls returns how often the fixture's deleter has run. It
// is a test fixture: the deleter only counts, and Parse must never call it.
func FixtureDeleterCalls(addr uintptr) int { return cFixtureDeleterCalls(addr) }

// FixtureCallDeleter calls the fixture's deleter through a C trampoline, as
// the capsule destructor does. It is a test fixture.
func FixtureCallDeleter(addr uintptr) { cFixtureDelete(addr) }
