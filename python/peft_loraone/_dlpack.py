"""Borrowing DLPack capsules: Python keeps the capsule (and its producer) alive and
unrenamed while Go reads the managed tensor at the capsule's address. The producer's
own capsule destructor frees it afterwards; nothing is ever consumed or copied.
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


def is_capsule(obj: Any) -> bool:
    """True for a raw ``PyCapsule`` (for example what ``tensor.__dlpack__()`` returns)."""
    return type(obj).__name__ == "PyCapsule"


@dataclass
class Borrowed:
    """A capsule whose managed tensor Go may read while this object is alive."""

    owner: Any  # the producer, kept alive with the capsule
    capsule: Any
    address: int
    versioned: bool


def _export(obj: Any, name: str) -> Any:
    try:
        return obj.__dlpack__(max_version=(1, 0))
    except TypeError:
        # Producers older than the versioned protocol take no max_version.
        pass
    except BufferError as exc:
        raise _buffer_error(exc, name) from None
    try:
        return obj.__dlpack__()
    except BufferError as exc:
        raise _buffer_error(exc, name) from None


def _buffer_error(exc: BufferError, name: str) -> Exception:
    text = str(exc)
    if "read" in text.lower() and "only" in text.lower():
        return ReadOnlyOutputError(f"peft_loraone: {name} is read-only ({text}); pass a writable array, e.g. a copy")
    return InvalidArgumentError(f"peft_loraone: {name} cannot be exported over DLPack: {text}")


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
        device = getattr(obj, "device", None)
        device_type = getattr(device, "type", None)
        if device_type is not None and device_type != "cpu":
            raise UnsupportedDeviceError(
                f"peft_loraone: {name} is on {device}; the engine reads CPU memory only: move it with .cpu()"
            )
        if getattr(obj, "requires_grad", False):
            obj = obj.detach()
            owner = obj
        capsule = _export(obj, name)
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
