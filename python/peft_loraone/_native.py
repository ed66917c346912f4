"""The only module that imports the gopy-built extension.

It maps the engine's error kinds (the ``kind:`` prefix of every message the Go
bridge returns) to exception classes, and owns the process-wide job pool.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, NoReturn

from .errors import (
    EngineInternalError,
    InvalidArgumentError,
    LoraOneError,
    NonFiniteError,
    ReadOnlyOutputError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
    ZeroGradientError,
)

try:
    from ._engine import bridge as _bridge
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "peft_loraone: the Go engine extension (peft_loraone._engine) is not built or was built for another "
        f"Python ({exc}). Reinstall with this interpreter: `{os.path.basename(os.sys.executable)} -m pip install .` "
        "(needs Go >= 1.26 and gcc; see 'Common issues' in README.md)."
    ) from exc

METHOD_LORA_ONE = 0
METHOD_LORA_GA = 1
METHOD_PISSA = 2
METHOD_PANIC = 99  # tests only: forces a panic inside the Go computation

_KINDS: dict[str, type[LoraOneError]] = {
    "invalid-argument": InvalidArgumentError,
    "unsupported-dtype": UnsupportedDTypeError,
    "unsupported-device": UnsupportedDeviceError,
    "read-only": ReadOnlyOutputError,
    "non-finite": NonFiniteError,
    "zero-gradient": ZeroGradientError,
    "internal": EngineInternalError,
}


def raise_engine_error(exc: BaseException) -> NoReturn:
    """Re-raise a gopy ``RuntimeError`` as the exception class its kind prefix names."""
    msg = str(exc)
    kind, sep, rest = msg.partition(": ")
    cls = _KINDS.get(kind) if sep else None
    if cls is None:
        raise EngineInternalError(f"peft_loraone engine: {msg}") from None
    raise cls(f"peft_loraone engine: {rest}") from None


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a bridge function, mapping its error to the right exception class."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        raise_engine_error(exc)


def compute(*args: Any) -> float:
    """``bridge.Compute`` with mapped errors (see bridge/bridge.go for the arguments)."""
    return call(_bridge.Compute, *args)


def force_panic(msg: str) -> int:
    """Make the bridge panic; the panic must come back as :class:`EngineInternalError`."""
    return call(_bridge.ForcePanic, msg)


_pool = None
_pool_lock = threading.Lock()


def pool() -> Any:
    """The process-wide Go job pool (created on first use, ``GOMAXPROCS`` workers).

    Set ``PEFT_LORAONE_WORKERS`` to bound how many matrices Go computes at once.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _bridge.NewPool(int(os.environ.get("PEFT_LORAONE_WORKERS", "0") or 0))
        return _pool
