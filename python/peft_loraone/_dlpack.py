"""Borrowing DLPack capsules: Python keeps the capsule (and its producer) alive and
unrenamed while Go reads the managed tensor at the capsule's address. The producer's
own capsule destructor frees it afterwards; nothing is ever consumed or copied.

:func:`describe` reads the header a capsule claims (data pointer, shape, strides,
element size) without touching the data, so the engine layer can check the claimed
memory against what the producer really owns before Go reads or writes it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError, ReadOnlyOutputError, UnsupportedDeviceError

_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]

_VERSIONED = b"dltensor_versioned"
_LEGACY = b"dltensor"

DEVICE_CPU = 1
# DLPack DLDeviceType codes, for messages.
DEVICE_NAMES = {
    1: "CPU", 2: "CUDA", 3: "CUDA host (pinned)", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI",
    10: "ROCm", 11: "ROCm host (pinned)", 12: "ExtDev", 13: "CUDA managed", 14: "oneAPI", 15: "WebGPU",
    16: "Hexagon", 17: "MAIA",
}


def is_capsule(obj: Any) -> bool:
    """True for a raw ``PyCapsule`` (for example what ``tensor.__dlpack__()`` returns)."""
    return type(obj).__name__ == "PyCapsule"


@dataclass(frozen=True)
class View:
    """What a capsule's DLTensor claims (read from its header; the data is not touched)."""

    data: int  # data pointer + byte_offset: the address of element [0, 0]
    device_type: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements (row-major filled in when the capsule has none)
    itemsize: int  # bytes per element (bits * lanes / 8)
    dtype: tuple[int, int, int]  # (code, bits, lanes)

    def extent(self) -> tuple[int, int] | None:
        """The byte range [lo, hi) the tensor's elements span; None for an empty tensor."""
        if any(d == 0 for d in self.shape):
            return None
        lo = hi = 0
        for d, s in zip(self.shape, self.strides):
            span = (d - 1) * s
            if span < 0:
                lo += span
            else:
                hi += span
        return self.data + lo * self.itemsize, self.data + (hi + 1) * self.itemsize


@dataclass
class Borrowed:
    """A capsule whose managed tensor Go may read while this object is alive."""

    owner: Any  # the producer, kept alive with the capsule
    capsule: Any
    address: int
    versioned: bool

    def view(self) -> View | None:
        return describe(self.address, self.versioned)


def _read(addr: int, ctype: Any) -> Any:
    return ctype.from_address(addr).value


def describe(address: int, versioned: bool) -> View | None:
    """The header of the managed tensor at ``address``; None when this layer cannot read it (an unknown
    DLPack major version, ndim outside 1..2, a NULL shape, a sub-byte dtype): the Go reader then reports
    the problem itself. Reads only the header memory that the Go reader reads too."""
    if versioned:
        if _read(address, ctypes.c_uint32) != 1:  # DLManagedTensorVersioned.version.major
            return None
        t = address + 32  # dl_tensor
    else:
        t = address
    data = _read(t, ctypes.c_void_p) or 0
    device_type = _read(t + 8, ctypes.c_int32)
    ndim = _read(t + 16, ctypes.c_int32)
    code, bits, lanes = _read(t + 20, ctypes.c_uint8), _read(t + 21, ctypes.c_uint8), _read(t + 22, ctypes.c_uint16)
    shape_p = _read(t + 24, ctypes.c_void_p)
    strides_p = _read(t + 32, ctypes.c_void_p)
    byte_offset = _read(t + 40, ctypes.c_uint64)
    if ndim not in (1, 2) or not shape_p or bits % 8 or lanes < 1:
        return None
    shape = tuple((ctypes.c_int64 * ndim).from_address(shape_p))
    if any(d < 0 for d in shape):
        return None
    if strides_p:
        strides = tuple((ctypes.c_int64 * ndim).from_address(strides_p))
    else:
        strides = (shape[1], 1) if ndim == 2 else (1,)
    return View(data + byte_offset, device_type, shape, strides, bits * lanes // 8, (code, bits, lanes))


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


def describe_memory(owner: Any, data: int, shape: tuple[int, ...], strides: tuple[int, ...],
                    dtype: tuple[int, int, int]) -> Borrowed:
    """A DLPack 1.0 managed tensor (no deleter) describing CPU memory at ``data``, built here rather than
    exported by the producer: how torch tensors are handed to Go (see engine._Call). ``owner`` keeps the
    memory alive; the returned Borrowed keeps the struct alive."""
    ndim = len(shape)
    shp = (ctypes.c_int64 * max(ndim, 1))(*shape)
    std = (ctypes.c_int64 * max(ndim, 1))(*strides)
    t = _DLTensor(data, _DLDevice(DEVICE_CPU, 0), ndim, _DLDataType(*dtype), shp, std, 0)
    managed = _DLManagedTensorVersioned(1, 0, None, None, 0, t)
    return Borrowed(owner=(owner, shp, std, managed), capsule=None, address=ctypes.addressof(managed), versioned=True)


def _export(obj: Any, name: str) -> Any:
    try:
        return obj.__dlpack__(max_version=(1, 0))
    except TypeError:
        # Producers older than the versioned protocol take no max_version.
        pass
    except BufferError as exc:
        raise _buffer_error(exc, name) from None
    except Exception as exc:  # noqa: BLE001 - the producer's own error, named and wrapped
        raise InvalidArgumentError(f"peft_loraone: {name}.__dlpack__() failed: {type(exc).__name__}: {exc}") from exc
    try:
        return obj.__dlpack__()
    except BufferError as exc:
        raise _buffer_error(exc, name) from None
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgumentError(f"peft_loraone: {name}.__dlpack__() failed: {type(exc).__name__}: {exc}") from exc


def _buffer_error(exc: BufferError, name: str) -> Exception:
    text = str(exc)
    if "read" in text.lower() and "only" in text.lower():
        return ReadOnlyOutputError(f"peft_loraone: {name} is read-only ({text}); pass a writable array, e.g. a copy")
    return InvalidArgumentError(f"peft_loraone: {name} cannot be exported over DLPack: {text}")


def check_device(obj: Any, name: str) -> None:
    """Refuse a producer that says (``.device`` or ``__dlpack_device__()``) it is not in CPU memory."""
    device = getattr(obj, "device", None)
    device_type = getattr(device, "type", None)
    if isinstance(device_type, str) and device_type != "cpu":
        raise UnsupportedDeviceError(
            f"peft_loraone: {name} is on {device}; the engine reads CPU memory only: move it with .cpu()"
        )
    if device_type is None and hasattr(obj, "__dlpack_device__"):
        try:
            dev = obj.__dlpack_device__()
            code = int(dev[0])
        except Exception:  # noqa: BLE001 - a broken producer: let the export report it
            return
        if code != DEVICE_CPU:
            raise UnsupportedDeviceError(
                f"peft_loraone: {name} is in {DEVICE_NAMES.get(code, f'DLPack device type {code}')} memory; the "
                "engine reads CPU memory only: copy it to the host first"
            )


def borrow(obj: Any, name: str) -> Borrowed:
    """Export ``obj`` (a DLPack producer or a capsule) and borrow its managed tensor.

    Torch tensors that require grad are detached (a view, no copy); tensors on a
    non-CPU device are refused with a message that says to move them.
    """
    owner = obj
    if is_capsule(obj):
        capsule = obj
    else:
        if not hasattr(obj, "__dlpack__"):
            raise InvalidArgumentError(
                f"peft_loraone: {name} must be a torch tensor, a numpy array or another DLPack producer, "
                f"got {type(obj).__name__}"
            )
        check_device(obj, name)
        if getattr(obj, "requires_grad", False):
            obj = obj.detach()
            owner = obj
        capsule = _export(obj, name)
        if not is_capsule(capsule):
            raise InvalidArgumentError(
                f"peft_loraone: {name}.__dlpack__() returned {type(capsule).__name__!r}, not a DLPack capsule "
                "(PyCapsule): the producer is broken; pass a torch tensor or a numpy array instead"
            )
    cname = _get_name(capsule)
    if cname not in (_VERSIONED, _LEGACY):
        raise InvalidArgumentError(
            f"peft_loraone: {name} is a capsule named {cname!r}; expected an unconsumed 'dltensor' or "
            "'dltensor_versioned' capsule (a capsule can be used only once: export the tensor again)"
        )
    address = _get_pointer(capsule, cname)
    if not address:
        raise InvalidArgumentError(f"peft_loraone: {name} capsule holds a NULL pointer")
    return Borrowed(owner=owner, capsule=capsule, address=address, versioned=cname == _VERSIONED)
