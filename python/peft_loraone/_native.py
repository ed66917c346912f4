"""The only module that imports the gopy-built extension.

The extension (and so the Go runtime) is loaded on first use, not at ``import peft_loraone``:
a process that forks after only importing the package gives its children a clean slate, and
DataLoader workers never start a Go runtime. After the extension is loaded, a forked child
cannot use it (the Go runtime's threads do not survive ``fork()``): every entry point then
raises :class:`~peft_loraone.errors.ForkedProcessError` at once instead of hanging.

This module maps the engine's error kinds (the ``kind:`` prefix of every message the Go
bridge returns) to exception classes, and owns the process-wide job pool.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading
import weakref
from typing import Any, Callable, NoReturn

from .errors import (
    CancelledError,
    EngineInternalError,
    EngineLoadError,
    ForkedProcessError,
    InvalidArgumentError,
    LoraOneError,
    NonFiniteError,
    ReadOnlyOutputError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
    ZeroGradientError,
)

METHOD_LORA_ONE = 0
METHOD_LORA_GA = 1
METHOD_PISSA = 2
ALGORITHMS = {None: -1, "subspace": 0, "krylov": 1}  # bridge.Algorithm* codes
METHOD_PANIC = 99  # tests only: forces a panic inside the Go computation

# The largest power_iters the engine accepts: mirrors loraone.MaxPowerIters (loraone/rsvd.go;
# tests/test_engine_boundary.py checks the two agree). At most 2 + 2*MAX_POWER_ITERS passes over G.
MAX_POWER_ITERS = 1000

_KINDS: dict[str, type[LoraOneError]] = {
    "invalid-argument": InvalidArgumentError,
    "unsupported-dtype": UnsupportedDTypeError,
    "unsupported-device": UnsupportedDeviceError,
    "read-only": ReadOnlyOutputError,
    "non-finite": NonFiniteError,
    "zero-gradient": ZeroGradientError,
    "cancelled": CancelledError,
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


# ---------------------------------------------------------------------------
# Loading on first use, and fork detection
# ---------------------------------------------------------------------------

_bridge: Any = None  # the gopy module peft_loraone._engine.bridge, once loaded
_loaded_pid: int | None = None  # the process that loaded it
_forked = False  # set in a child forked after the extension was loaded
_load_lock = threading.RLock()

FORK_MESSAGE = (
    "peft_loraone: this process is a fork() of a process that had already used the Go engine "
    "(os.fork, or multiprocessing's default 'fork' start method on Linux); the Go runtime does not "
    "survive fork(), so the engine cannot run in this process (it would hang). Start the processes that "
    "use the engine with multiprocessing.get_context('spawn') or get_context('forkserver') (for "
    "DataLoader: multiprocessing_context='spawn'), or fork before the parent first uses the engine."
)


def forked() -> bool:
    """True in a process forked after its parent loaded the engine (where the engine cannot run)."""
    global _forked
    if not _forked and _bridge is not None and os.getpid() != _loaded_pid:
        _forked = True  # a fork that bypassed os.register_at_fork (a C-level fork())
    return _forked


def check_fork() -> None:
    """Raise :class:`ForkedProcessError` in a child forked after the engine was loaded."""
    if forked():
        raise ForkedProcessError(FORK_MESSAGE)


def loaded() -> bool:
    """Whether this process has loaded the Go engine extension (and so started a Go runtime)."""
    return _bridge is not None


def bridge() -> Any:
    """The gopy module of the Go bridge, loaded (and the BLAS wired) on first use."""
    if _bridge is not None:
        check_fork()
        return _bridge
    with _load_lock:
        if _bridge is None:
            _load()
    return _bridge


def _load() -> None:
    global _bridge, _loaded_pid
    try:
        from ._engine import bridge as mod
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise EngineLoadError(
            "peft_loraone: the Go engine extension (peft_loraone._engine) is not built or was built for another "
            f"Python ({exc}). Reinstall with this interpreter: `{os.path.basename(sys.executable)} -m pip install .` "
            "(needs Go >= 1.26 and gcc; see 'Common issues' in README.md)."
        ) from exc
    # gopy's wrapper registers a gc callback that runs a full Go GC after every Python
    # collection (about 3.8 ms each, measured in bench/). The engine hands Python no Go
    # objects but the one Pool, so drop it: it would tax every allocation-heavy loop.
    gopy_modules = (mod.__name__, mod.__name__.rpartition(".")[0] + ".go")
    gc.callbacks[:] = [cb for cb in gc.callbacks if getattr(cb, "__module__", None) not in gopy_modules]
    _loaded_pid = os.getpid()
    _bridge = mod
    atexit.register(_at_exit)
    _init_blas()


# Jobs that may still run in Go (engine.Job registers itself): at exit they are cancelled and waited for,
# so interpreter teardown never frees a tensor Go still reads or writes.
live_jobs: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _at_exit() -> None:
    if forked():
        return
    for job in list(live_jobs):
        try:
            job._stop_at_exit()
        except Exception:  # noqa: BLE001 - never raise at exit
            pass
    if _pool is not None:
        # Module teardown may clear gopy's module before this Pool: its __del__ would then fail noisily.
        _pool.__class__ = type("ClosedPool", (type(_pool),), {"__del__": lambda self: None})


def _after_fork_in_child() -> None:
    global _forked, _load_lock, _pool_lock
    # A thread of the parent may have held these at fork time: the child gets fresh ones.
    _load_lock = threading.RLock()
    _pool_lock = threading.Lock()
    if _bridge is None:
        return  # the engine was never loaded: the child loads its own on first use
    _forked = True
    if _pool is not None:
        # gopy's Pool.__del__ calls into Go (DecRef), which would hang at this child's exit.
        _pool.__class__ = type("ForkedPool", (type(_pool),), {"__del__": lambda self: None})


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a bridge function, mapping its error to the right exception class."""
    check_fork()
    try:
        return fn(*args)
    except RuntimeError as exc:
        raise_engine_error(exc)


def compute(*args: Any) -> float:
    """``bridge.Compute`` with mapped errors (see bridge/bridge.go for the arguments)."""
    return call(bridge().Compute, *args)


def force_panic(msg: str) -> int:
    """Make the bridge panic; the panic must come back as :class:`EngineInternalError`."""
    return call(bridge().ForcePanic, msg)


# ---------------------------------------------------------------------------
# The job pool
# ---------------------------------------------------------------------------

_pool = None
_pool_lock = threading.Lock()
_MAX_WORKERS = 2**31 - 1


def workers_from_env() -> int:
    """``PEFT_LORAONE_WORKERS`` as an int; 0 (the default: one per core) when unset, empty or invalid.

    An invalid value (not an integer, or above 2**31 - 1) is reported once, as a warning logged when the
    pool is created (the one time this is read), and the default is used.
    """
    raw = os.environ.get("PEFT_LORAONE_WORKERS", "").strip()
    if not raw:
        return 0
    try:
        workers = int(raw)
    except ValueError:
        workers = None
    if workers is None or workers > _MAX_WORKERS:
        _blas_log.warning(
            "peft_loraone: ignoring PEFT_LORAONE_WORKERS=%r (expected an integer: the number of matrices the "
            "engine computes at once; 0 or unset: one per core); using the default",
            raw,
        )
        return 0
    return workers


def pool() -> Any:
    """The process-wide Go job pool (created on first use, ``GOMAXPROCS`` workers).

    Set ``PEFT_LORAONE_WORKERS`` to bound how many matrices Go computes at once.
    """
    global _pool
    mod = bridge()  # loads the engine (and wires the BLAS, which sets _blas_threads) or raises in a fork
    with _pool_lock:
        if _pool is None:
            workers = workers_from_env()
            if workers <= 0 and _blas_threads > 1:
                # Each job's products already use _blas_threads BLAS threads: don't oversubscribe.
                workers = max(1, (os.cpu_count() or 1) // _blas_threads)
            _pool = call(mod.NewPool, workers)
        return _pool


# ---------------------------------------------------------------------------
# Ctrl-C while waiting for Go
# ---------------------------------------------------------------------------


class DeferredInterrupt:
    """Hold back SIGINT's Python handler while the main thread waits for the engine in short slices.

    The default handler raises KeyboardInterrupt at whatever bytecode runs next, which could drop a
    job's completion that Go just reported (Poll forgets a finished job). Inside this context the handler
    only records the signal; the waiting loop checks :attr:`pending` after each slice (<= 50 ms) and calls
    :meth:`deliver`, which runs the previous handler (so the KeyboardInterrupt is raised where nothing is
    lost). Off the main thread, or when SIGINT's handler is not a Python callable (SIG_IGN, SIG_DFL),
    nothing changes.
    """

    def __init__(self) -> None:
        self.pending: tuple[int, Any] | None = None
        self._prev: Any = None

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            prev = signal.getsignal(signal.SIGINT)
            if callable(prev):
                signal.signal(signal.SIGINT, self._record)
                self._prev = prev
        except (ValueError, OSError):  # not the main interpreter, or signals unavailable
            self._prev = None
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.pending = (signum, frame)

    def deliver(self) -> None:
        """Run the previous handler for the recorded signal (the default raises KeyboardInterrupt)."""
        pending, self.pending = self.pending, None
        if pending is not None and self._prev is not None:
            self._prev(*pending)

    def __exit__(self, *exc: Any) -> None:
        if self._prev is not None:
            try:
                signal.signal(signal.SIGINT, self._prev)
            except (ValueError, OSError):  # pragma: no cover
                pass
            self._prev = None


# ---------------------------------------------------------------------------
# Fast BLAS wiring
#
# When the engine is first loaded, find an OpenBLAS shared library and hand its path to the Go
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
    mod = bridge()
    if not hasattr(mod, "UseBLAS"):
        _blas_log.warning(
            "peft_loraone: the engine extension predates the fast BLAS hook; using gonum (pure Go). "
            "Rebuild with `pip install .`."
        )
        return _blas_description
    if path == "gonum":
        _blas_description = mod.UseGonum()
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
        _blas_description = mod.UseBLAS(path, int(threads))
        _blas_threads = int(threads) if threads else 1
    except RuntimeError as exc:
        _blas_log.warning("peft_loraone: could not load %s (%s); the engine uses %s", path, exc, _blas_description)
        return _blas_description
    _blas_log.info("peft_loraone: engine BLAS: %s", _blas_description)
    return _blas_description


def blas_info() -> str:
    """Describe the kernels the engine uses now (an OpenBLAS, or gonum's pure Go)."""
    mod = bridge()
    if hasattr(mod, "BLASInfo"):
        return call(mod.BLASInfo)
    return _blas_description


def release_memory() -> int:
    """Drop the engine's scratch memory kept for reuse between calls (at most one workspace per core,
    each as large as the largest matrix's bases and panels: ~85 MB for 4096x11008 at r=64) and return the
    Go heap's free memory to the operating system. Returns how many workspaces were dropped;
    :func:`peft_loraone.initialize` calls it when it is done."""
    if not loaded():
        return 0  # nothing to release: the engine never ran in this process
    mod = bridge()
    if hasattr(mod, "ReleaseMemory"):
        return int(call(mod.ReleaseMemory))
    return 0


def kernel_info() -> str:
    """Describe the engine's own SIMD kernels (AVX-512 float32 products and f16/bf16 decoding), if any."""
    mod = bridge()
    if hasattr(mod, "KernelInfo"):
        return call(mod.KernelInfo)
    return "unknown (engine built before KernelInfo)"


def _init_blas() -> None:
    """Wire the BLAS chosen by PEFT_LORAONE_BLAS; runs once, when the engine is first loaded."""
    choice = os.environ.get("PEFT_LORAONE_BLAS", "").strip()
    if choice.lower() in ("gonum", "0", "off", "none", "false"):
        _blas_log.info("peft_loraone: PEFT_LORAONE_BLAS=%s: the engine uses gonum (pure Go)", choice)
        return
    use_blas(choice or None)

