"""The only module that imports the gopy-built extension.

It maps the engine's error kinds (the ``kind:`` prefix of every message the Go
bridge returns) to exception classes, and owns the process-wide job pool.
"""

from __future__ import annotations

import gc
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

# gopy's wrapper registers a gc callback that runs a full Go GC after every Python
# collection (about 3.8 ms each, measured in bench/). The engine hands Python no Go
# objects but the one Pool, so drop it: it would tax every allocation-heavy loop.
_GOPY_MODULES = (_bridge.__name__, _bridge.__name__.rpartition(".")[0] + ".go")
gc.callbacks[:] = [cb for cb in gc.callbacks if getattr(cb, "__module__", None) not in _GOPY_MODULES]

METHOD_LORA_ONE = 0
METHOD_LORA_GA = 1
METHOD_PISSA = 2
ALGORITHMS = {None: -1, "subspace": 0, "krylov": 1}  # bridge.Algorithm* codes
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
            workers = int(os.environ.get("PEFT_LORAONE_WORKERS", "0") or 0)
            if workers <= 0 and _blas_threads > 1:
                # Each job's products already use _blas_threads BLAS threads: don't oversubscribe.
                workers = max(1, (os.cpu_count() or 1) // _blas_threads)
            _pool = _bridge.NewPool(workers)
        return _pool


# ---------------------------------------------------------------------------
# Fast BLAS wiring
#
# At import, find an OpenBLAS shared library and hand its path to the Go
# bridge (bridge.UseBLAS), which loads it with dlopen and uses its sgemm/dgemm
# for the products with the input. Nothing is linked at build time: the library
# numpy bundles (numpy.libs/libscipy_openblas64_*.so) is always there, since
# numpy is a dependency. Without it (or with an extension built before
# bridge/blas.go) the engine keeps gonum's pure-Go kernels and says so in the
# log.
#
# Environment:
#   PEFT_LORAONE_BLAS          unset: auto (scipy-openblas32 wheel if installed,
#                              else numpy's bundled OpenBLAS); a path: that
#                              library; "gonum" / "0" / "off": pure Go.
#   PEFT_LORAONE_BLAS_THREADS  thread count for the BLAS; default: torch's
#                              torch.get_num_threads().
# ---------------------------------------------------------------------------
import glob as _glob
import logging as _logging

_blas_log = _logging.getLogger("peft_loraone")
_blas_description = "gonum (pure Go)"
_blas_threads = 1  # BLAS threads per engine job (0 from the caller means the library's default: counted as 1)


def find_openblas() -> str | None:
    """Path of an OpenBLAS shared library the engine can load, or None.

    Order: the ``scipy-openblas32`` wheel (if installed), then the OpenBLAS that numpy
    bundles (``numpy.libs/libscipy_openblas64_*.so``; numpy wheels for Linux ship it).
    """
    try:
        import scipy_openblas32  # type: ignore[import-not-found]

        lib_dir = scipy_openblas32.get_lib_dir()
        found = sorted(_glob.glob(os.path.join(lib_dir, "libscipy_openblas*.so*")))
        if found:
            return found[0]
    except Exception:  # noqa: BLE001 - optional package, any failure means "not there"
        pass
    try:
        import numpy

        site = os.path.dirname(os.path.dirname(numpy.__file__))
        found = sorted(_glob.glob(os.path.join(site, "numpy.libs", "libscipy_openblas*.so*")))
        if found:
            return found[0]
    except Exception:  # noqa: BLE001
        pass
    return None


def _default_blas_threads() -> int:
    env = os.environ.get("PEFT_LORAONE_BLAS_THREADS", "").strip()
    if env:
        try:
            return max(int(env), 0)
        except ValueError:
            _blas_log.warning("peft_loraone: ignoring PEFT_LORAONE_BLAS_THREADS=%r (not an integer)", env)
    try:  # torch is a dependency (and peft imports it anyway): match its thread count
        import torch
    except ImportError:
        return 0
    return int(torch.get_num_threads())


def use_blas(path: str | None = None, threads: int | None = None) -> str:
    """Make the engine use an OpenBLAS for its matrix products; return what it uses now.

    Args:
        path: the shared library (default: :func:`find_openblas`). ``"gonum"`` selects
            the pure-Go kernels.
        threads: BLAS thread count (default: torch's thread count if torch is imported,
            else the library's default). Process-wide for that library (numpy shares it).

    On failure the engine keeps its current kernels; the reason is logged and the
    description of the kernels in use is returned.
    """
    global _blas_description, _blas_threads
    if not hasattr(_bridge, "UseBLAS"):
        _blas_log.warning(
            "peft_loraone: the engine extension predates the fast BLAS hook; using gonum (pure Go). "
            "Rebuild with `pip install .`."
        )
        return _blas_description
    if path == "gonum":
        _blas_description = _bridge.UseGonum()
        return _blas_description
    if path is None:
        path = find_openblas()
    if path is None:
        _blas_log.warning(
            "peft_loraone: no OpenBLAS found (numpy.libs or scipy-openblas32); the engine uses gonum (pure Go, "
            "~5x slower matrix products). `pip install scipy-openblas32` or set PEFT_LORAONE_BLAS=/path/libopenblas.so."
        )
        return _blas_description
    if threads is None:
        threads = _default_blas_threads()
    try:
        _blas_description = _bridge.UseBLAS(path, int(threads))
        _blas_threads = int(threads) if threads else 1
    except RuntimeError as exc:
        _blas_log.warning("peft_loraone: could not load %s (%s); the engine uses %s", path, exc, _blas_description)
        return _blas_description
    _blas_log.info("peft_loraone: engine BLAS: %s", _blas_description)
    return _blas_description


def blas_info() -> str:
    """Describe the kernels the engine uses now (an OpenBLAS, or gonum's pure Go)."""
    if hasattr(_bridge, "BLASInfo"):
        return call(_bridge.BLASInfo)
    return _blas_description


def release_memory() -> int:
    """Drop the engine's scratch memory kept for reuse between calls (at most one workspace per core,
    each as large as the largest matrix's bases and panels: ~85 MB for 4096x11008 at r=64) and return the
    Go heap's free memory to the operating system. Returns how many workspaces were dropped;
    :func:`peft_loraone.initialize` calls it when it is done."""
    if hasattr(_bridge, "ReleaseMemory"):
        return int(call(_bridge.ReleaseMemory))
    return 0


def kernel_info() -> str:
    """Describe the engine's own SIMD kernels (AVX-512 float32 products and f16/bf16 decoding), if any."""
    if hasattr(_bridge, "KernelInfo"):
        return call(_bridge.KernelInfo)
    return "unknown (engine built before KernelInfo)"


def _init_blas() -> None:
    choice = os.environ.get("PEFT_LORAONE_BLAS", "").strip()
    if choice.lower() in ("gonum", "0", "off", "none", "false"):
        _blas_log.info("peft_loraone: PEFT_LORAONE_BLAS=%s: the engine uses gonum (pure Go)", choice)
        return
    use_blas(choice or None)


_init_blas()
# ---------------------------------------------------------------------------
