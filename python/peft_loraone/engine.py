r"""The LoRA-One engine: truncated SVDs and adapter factors computed in Go, in place.

Every function takes any DLPack producer (a torch tensor, a numpy array, a raw
``dltensor`` capsule) in float32, float64, float16 or bfloat16, contiguous or a
transposed view, and reads it where it lies: nothing is copied (except a torch
tensor carrying the lazy negation bit, which is resolved first). Outputs are
float32 or float64 tensors that Python allocates (or that you pass as
``out_b``/``out_a``, which are then filled in place and returned). Torch in,
torch out; numpy in, numpy out.

What reaches Go is checked first, as far as the producer allows: torch tensors are
described to Go from torch's own metadata (and their memory pinned, see :class:`Job`);
for numpy arrays and torch subclasses that export themselves, the capsule's claimed
extent must lie inside the memory the producer owns; outputs must not require grad,
carry torch's neg/conj bits, or overlap each other or the input. A raw capsule, or a
producer that is neither torch nor numpy, is trusted: its data pointer, shape and
strides cannot be checked against anything.

For a gradient :math:`G` (m x n, PEFT's ``(out_features, in_features)``), LoRA-One
(arXiv 2502.01235) takes the top-r SVD :math:`-G \approx U_r S_r V_r^T` and sets

.. math::

    B = U_r \,\mathrm{diag}(\sqrt{S_r}) / \sqrt{\gamma\sigma_1}, \qquad
    A = \mathrm{diag}(\sqrt{S_r})\, V_r^T / \sqrt{\gamma\sigma_1},

so that :math:`B A = [-G]_r / (\gamma \sigma_1)`.

The SVD is randomized (Gaussian sketch, subspace iterations with
re-orthonormalization, exact SVD of the small projected matrix only). It stops
by itself once the relative Frobenius change of the rank-r approximation between
two consecutive estimates is at most ``tol``; the change it reached is reported
as ``accuracy``.

Example::

    >>> import torch
    >>> from peft_loraone.engine import lora_one
    >>> g = torch.randn(64, 8) @ torch.randn(8, 32)
    >>> f = lora_one(g, rank=4, gamma=128.0)
    >>> f.B.shape, f.A.shape
    (torch.Size([64, 4]), torch.Size([4, 32]))
"""

from __future__ import annotations

import copy
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from ._dlpack import Borrowed, View, borrow, check_device, describe_memory, is_capsule
from .errors import (
    ArgumentTypeError,
    CancelledError,
    EngineInternalError,
    ForkedProcessError,
    InvalidArgumentError,
    JobTimeoutError,
    LoraOneError,
    NonFiniteError,
    ReadOnlyOutputError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
    ZeroGradientError,
)

__all__ = [
    "ArgumentTypeError",
    "CancelledError",
    "EngineInternalError",
    "Factors",
    "ForkedProcessError",
    "InvalidArgumentError",
    "Job",
    "JobTimeoutError",
    "LoraOneError",
    "NonFiniteError",
    "ReadOnlyOutputError",
    "UnsupportedDTypeError",
    "release_memory",
    "UnsupportedDeviceError",
    "ZeroGradientError",
    "lora_ga",
    "lora_one",
    "pissa",
    "submit_lora_ga",
    "submit_lora_one",
    "submit_pissa",
]

_METHOD_NAMES = {
    _native.METHOD_LORA_ONE: "lora_one",
    _native.METHOD_LORA_GA: "lora_ga",
    _native.METHOD_PISSA: "pissa",
    _native.METHOD_PANIC: "panic",
}

MAX_POWER_ITERS = _native.MAX_POWER_ITERS  # the largest power_iters the engine accepts

_POLL_MS = 50  # the slice a waiting thread spends in Go between checks for Ctrl-C
_INT_LIMIT = 2**31 - 1  # rank and oversampling above this are never meaningful


@dataclass(frozen=True)
class Factors:
    """The result of one engine call.

    Attributes:
        B: ``lora_B``, shape (m, r).
        A: ``lora_A``, shape (r, n).
        S: the top singular values used, float64, descending (r values; 2r for LoRA-GA).
        sigma1: the largest singular value ``S[0]``.
        accuracy: the engine's estimate of the relative Frobenius error of its rank-r
            approximation against the exact truncation (from the changes between its last
            estimates, or from the residuals of the last one); the target is reached when
            ``converged``. No guarantee when ``ambiguous``.
        passes: multiplications of the input (or its transpose) by a block of vectors.
        converged: whether ``accuracy <= tol`` was reached before the iteration cap.
        method: ``"lora_one"``, ``"lora_ga"`` or ``"pissa"``.
        scaling: the LoRA scaling s used for the offset (LoRA-GA, PiSSA), else None.
        gap_ratio: sigma_(r+1) / sigma_r as the engine saw it (0 when there is no
            sigma_(r+1), e.g. r = min(m, n)).
        ambiguous: True when sigma_r and sigma_(r+1) are too close for the rank-r truncation
            to be unique at the accuracy asked for (relative gap below 10 * max(tol, accuracy),
            at most 1%). ``accuracy`` (a distance to *the* exact truncation) is then no
            guarantee: any rank-r choice inside the cluster approximates G as well; read
            ``residual_excess``.
        residual_excess: an upper bound of ||G - X||_F / ||G - G_r||_F - 1 for the computed
            rank-r approximation X (0 = as good as the exact truncation); it stays true when the
            truncation is not unique. Computed only when ``ambiguous`` (it costs a read of G),
            else None.
    """

    B: Any
    A: Any
    S: Any
    sigma1: float
    accuracy: float
    passes: int
    converged: bool
    method: str
    scaling: float | None = None
    gap_ratio: float = 0.0
    ambiguous: bool = False
    residual_excess: float | None = None

    def offset(self) -> Any:
        """The matrix to subtract from W0 so the model's output is unchanged at step 0.

        ``s * B @ A`` for LoRA-GA and PiSSA (``W0 <- W0 - offset``); None for LoRA-One,
        which never modifies W0.
        """
        if self.method == "lora_one":
            return None
        if self.scaling is None:
            raise InvalidArgumentError(
                f"peft_loraone: {self.method} needs the LoRA scaling to compute the offset: pass scaling=..."
            )
        return self.scaling * (self.B @ self.A)


def _torch():
    import torch

    return torch


def _is_torch(x: Any) -> bool:
    """A torch tensor, subclasses included (torch is imported only if the caller already did)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


# ---------------------------------------------------------------------------
# Argument checks: all run before anything is exported or allocated
# ---------------------------------------------------------------------------


def _int_arg(name: str, value: Any, lo: int, hi: int, fix: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"peft_loraone: {name} must be an integer, got {value!r} ({type(value).__name__}); {fix}")
    value = int(value)
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"peft_loraone: {name} must be in [{lo}, {hi}], got {value}; {fix}")
    return value


def _real_arg(name: str, value: Any, *, positive: bool, finite: bool, fix: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"peft_loraone: {name} must be a real number, got {value!r} ({type(value).__name__}); {fix}")
    try:
        f = float(value)
    except OverflowError:  # an int beyond float range
        f = math.inf if value > 0 else -math.inf
    bad = math.isnan(f) or (finite and math.isinf(f)) or (f <= 0 if positive else f < 0)
    if bad:
        what = "a positive finite number" if positive and finite else "a number >= 0"
        raise InvalidArgumentError(f"peft_loraone: {name} must be {what}, got {value!r}; {fix}")
    return f


# ---------------------------------------------------------------------------
# Memory the producer owns, and keeping it alive
# ---------------------------------------------------------------------------


def _const_ptr(t: Any) -> int:
    """A torch tensor's data address without materializing a copy-on-write storage."""
    fn = getattr(t, "const_data_ptr", None)
    return int(fn() if fn is not None else t.data_ptr())


def _torch_bounds(t: Any) -> tuple[int, int]:
    """[lo, hi) of the whole storage under torch tensor ``t``."""
    base = _const_ptr(t) - t.storage_offset() * t.element_size()
    return base, base + t.untyped_storage().nbytes()


def _numpy_bounds(a: np.ndarray) -> tuple[int, int]:
    """[lo, hi) of the bytes numpy array ``a`` spans (numpy's byte_bounds)."""
    ai = a.__array_interface__
    data = ai["data"][0]
    if a.size == 0:
        return data, data
    strides = ai["strides"] or tuple(a.strides)
    lo = hi = data
    for d, s in zip(a.shape, strides):
        span = (d - 1) * s
        if span < 0:
            lo += span
        else:
            hi += span
    return lo, hi + a.itemsize


def _lazy_clone(t: Any) -> Any:
    """A copy-on-write alias of torch tensor ``t`` (no data is copied), or None where torch cannot make one.

    While the alias lives, the memory ``t`` has now stays allocated whatever happens to ``t``: a growing
    ``resize_``, ``t.data = ...``, ``set_()``, ``untyped_storage().resize_(0)`` give ``t`` new memory
    (copying what it needs) and leave this memory to the alias; an in-place write to ``t`` copies first.
    Torch can do this for storages from its own CPU allocator; not for memory it borrows (``from_numpy``,
    ``from_dlpack``, whose storages cannot be resized anyway) nor for shared-memory or pinned storages.
    """
    fn = getattr(t, "_lazy_clone", None)
    if fn is None:  # torch too old
        return None
    try:
        return fn()
    except Exception:  # noqa: BLE001 - not a plain CPU-allocator storage: fall back to holding the storage
        return None


_TORCH_DLPACK_DTYPES: dict[Any, tuple[int, int, int]] = {}


def _torch_dlpack_dtype(dtype: Any) -> tuple[int, int, int] | None:
    """DLPack's (code, bits, lanes) for a torch dtype (None for one DLPack has no code for here)."""
    if not _TORCH_DLPACK_DTYPES:
        torch = _torch()
        table = {
            "float32": (2, 32), "float64": (2, 64), "float16": (2, 16), "bfloat16": (4, 16),
            "int8": (0, 8), "int16": (0, 16), "int32": (0, 32), "int64": (0, 64),
            "uint8": (1, 8), "uint16": (1, 16), "uint32": (1, 32), "uint64": (1, 64),
            "bool": (6, 8), "complex32": (5, 32), "complex64": (5, 64), "complex128": (5, 128),
        }
        for attr, (code, bits) in table.items():
            if hasattr(torch, attr):
                _TORCH_DLPACK_DTYPES[getattr(torch, attr)] = (code, bits, 1)
    return _TORCH_DLPACK_DTYPES.get(dtype)


def _check_claim(name: str, view: View | None, bounds: tuple[int, int], shape: tuple[int, ...], what: str) -> None:
    """Refuse a capsule whose claimed memory is not inside what its producer owns."""
    if view is None:
        return  # unreadable header: the Go reader refuses it
    if tuple(view.shape) != tuple(shape):
        raise InvalidArgumentError(
            f"peft_loraone: {name}.__dlpack__() describes a tensor of shape {tuple(view.shape)}, but {name} has shape "
            f"{tuple(shape)}: its DLPack export is wrong, so the engine will not read or write it (pass a plain "
            "torch tensor or numpy array)"
        )
    ext = view.extent()
    if ext is None:
        return
    lo, hi = bounds
    if not (lo <= ext[0] and ext[1] <= hi):
        raise InvalidArgumentError(
            f"peft_loraone: {name}.__dlpack__() claims bytes [{ext[0]:#x}, {ext[1]:#x}) ({ext[1] - ext[0]} bytes), "
            f"outside the {hi - lo} bytes at [{lo:#x}, {hi:#x}) that {name}'s {what} holds: its DLPack export is "
            "wrong, so the engine will not read or write it (pass a plain torch tensor or numpy array)"
        )


class _Written:
    """A torch output the caller passed: where the engine writes it, to check it is still there after."""

    __slots__ = ("name", "tensor", "ptr", "shape", "strides")

    def __init__(self, name: str, t: Any) -> None:
        self.name, self.tensor = name, t
        self.ptr, self.shape, self.strides = _const_ptr(t), tuple(t.shape), tuple(t.stride())


class _Call:
    """Everything one engine call needs, kept alive until the call (or job) ends.

    Construction validates every argument before it exports or allocates anything, then borrows the
    input and outputs (checking what their capsules claim against the memory the producers own, and that
    no output overlaps the input or the other output), and pins torch memory for the job's lifetime.
    """

    def __init__(
        self,
        method: int,
        x: Any,
        rank: int,
        scale: float,
        *,
        out_b: Any,
        out_a: Any,
        dtype: Any,
        oversampling: int | None,
        power_iters: int | None,
        tol: float | None,
        seed: int,
        scaling: float | None,
        name: str,
        algorithm: str | None = None,
    ) -> None:
        # ---- scalar arguments ----
        rank = _int_arg("rank", rank, 1, _INT_LIMIT, "pass the adapter rank r, 1 <= r <= min(m, n)")
        if oversampling is not None:
            oversampling = _int_arg("oversampling", oversampling, 0, _INT_LIMIT, "or None for the engine default")
        if power_iters is not None:
            power_iters = _int_arg(
                "power_iters", power_iters, 0, _native.MAX_POWER_ITERS,
                "or None for the engine default (an upper bound on the passes; tol > 0 stops earlier)",
            )
        if tol is not None:
            tol = _real_arg("tol", tol, positive=False, finite=False, fix="or None for the engine default 1e-4")
        seed = _int_arg("seed", seed, 0, 2**63 - 1, "pass a non-negative integer below 2**63")
        scale_name = "scaling" if method == _native.METHOD_PISSA else "gamma"
        scale = _real_arg(scale_name, scale, positive=True, finite=True, fix=f"pass a positive {scale_name}")
        if scaling is not None:
            scaling = _real_arg("scaling", scaling, positive=False, finite=True, fix="pass the LoRA scaling alpha/r")
        if not isinstance(algorithm, (str, type(None))) or algorithm not in _native.ALGORITHMS:
            raise InvalidArgumentError(
                f"peft_loraone: algorithm must be 'krylov', 'subspace' or None (the default, krylov), got {algorithm!r}"
            )
        self.method = method
        self.scaling = scaling
        self.keep: list[Borrowed] = []  # capsules (and producers) Go reads at their addresses
        self.pins: list[Any] = []  # torch storages and copy-on-write aliases: the memory stays allocated
        self.written: list[_Written] = []  # torch outputs the caller passed

        # ---- the input: type, device, shape, rank; nothing exported or allocated yet ----
        check_device(x, name)
        use_torch = _is_torch(x)
        if not use_torch and not is_capsule(x) and not isinstance(x, np.ndarray):
            if not hasattr(x, "__dlpack__"):
                raise InvalidArgumentError(
                    f"peft_loraone: {name} must be a torch tensor, a numpy array or another DLPack producer, "
                    f"got {type(x).__name__}"
                )
            try:
                x = np.from_dlpack(x)  # another framework's CPU array: a zero-copy numpy view
            except Exception as exc:  # noqa: BLE001 - the producer's own error, named and wrapped
                raise InvalidArgumentError(
                    f"peft_loraone: {name} could not be read over DLPack ({type(exc).__name__}: {exc}); pass a torch "
                    "tensor or a numpy array"
                ) from exc
        if is_capsule(x) and (out_b is None or out_a is None):
            raise InvalidArgumentError(
                f"peft_loraone: {name} is a raw DLPack capsule, so its shape is unknown here: pass out_b and out_a"
            )
        nsv_factor = 2 if method == _native.METHOD_LORA_GA else 1
        if not is_capsule(x):
            if x.ndim != 2:
                raise InvalidArgumentError(
                    f"peft_loraone: {name} must be a 2-D matrix (out_features x in_features), got shape "
                    f"{tuple(x.shape)}; reshape it (for a conv kernel: weight.flatten(1))"
                )
            self._check_rank(rank, nsv_factor, tuple(x.shape), name)
        out_dtype = None if out_b is not None and out_a is not None else self._out_dtype(use_torch, x, dtype)
        for oname, o in (("out_b", out_b), ("out_a", out_a)):
            if o is not None:
                self._check_output(oname, o)
        if use_torch:
            if x.requires_grad:
                x = x.detach()
            if x.is_conj():
                x = x.resolve_conj()  # complex only (refused below as a dtype); real tensors never carry the bit
            if x.is_neg():
                x = x.resolve_neg()  # torch's lazy negation (e.g. _neg_view()): a copy with the true values

        # ---- borrow the input and the caller's outputs, and check what their capsules claim ----
        gb, gview = self._borrow(x, name, write=False)
        if is_capsule(x) and gview is not None and len(gview.shape) == 2:
            self._check_rank(rank, nsv_factor, gview.shape, name)
        views = [(name, gview)]
        outs = {}
        for oname, o in (("out_b", out_b), ("out_a", out_a)):
            if o is not None:
                outs[oname] = self._borrow(o, oname, write=True)
                views.append((oname, outs[oname][1]))
        _check_overlaps(views)

        # ---- allocate what the caller did not pass ----
        if gview is not None and len(gview.shape) == 2:
            m, n = gview.shape
        else:
            m, n = (tuple(x.shape) if not is_capsule(x) else (0, 0))
        self.B = out_b if out_b is not None else self._empty(use_torch, (m, rank), out_dtype)
        self.A = out_a if out_a is not None else self._empty(use_torch, (rank, n), out_dtype)
        # An unreadable capsule header means Go refuses the input before it looks at S.
        nsv = nsv_factor * rank if (gview is not None or not is_capsule(x)) else 1
        if use_torch:
            self.S = _torch().zeros(nsv, dtype=_torch().float64)
        else:
            self.S = np.zeros(nsv, dtype=np.float64)
        self.info = np.zeros(6, dtype=np.float64)  # accuracy, passes, converged, gap ratio, ambiguous, excess

        addresses: list[Any] = [gb.address, gb.versioned]
        for oname, t in (("out_b", self.B), ("out_a", self.A)):
            b = outs[oname][0] if oname in outs else self._borrow(t, oname, write=True, own=True)[0]
            addresses += [b.address, b.versioned]
        for tname, t in (("S", self.S), ("info", self.info)):
            b = borrow(t, tname)
            self.keep.append(b)
            addresses += [b.address, b.versioned]
        self.args = (
            method,
            *addresses,
            rank,
            scale,
            -1 if oversampling is None else oversampling,
            -1 if power_iters is None else power_iters,
            -1.0 if tol is None else tol,
            seed,
            _native.ALGORITHMS[algorithm],
        )

    # ---- helpers ----

    @staticmethod
    def _check_rank(rank: int, factor: int, shape: tuple[int, ...], name: str) -> None:
        m, n = shape
        if factor * rank > min(m, n):
            need = "2r <= min(m, n) for LoRA-GA" if factor == 2 else "1 <= r <= min(m, n)"
            raise InvalidArgumentError(
                f"peft_loraone: rank {rank} is too large for {name} of shape ({m}, {n}): {need}; pass a smaller rank"
            )

    @staticmethod
    def _out_dtype(use_torch: bool, x: Any, dtype: Any) -> Any:
        if use_torch:
            torch = _torch()
            if dtype is None:
                return torch.float64 if x.dtype == torch.float64 else torch.float32
            if dtype not in (torch.float32, torch.float64):
                raise UnsupportedDTypeError(f"peft_loraone: dtype must be torch.float32 or torch.float64, got {dtype}")
            return dtype
        if dtype is None:
            return np.float64 if getattr(x, "dtype", None) == np.float64 else np.float32
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise UnsupportedDTypeError(f"peft_loraone: dtype must be float32 or float64, got {dtype}")
        return dt

    @staticmethod
    def _check_output(name: str, o: Any) -> None:
        """What can be refused about an output before it is exported."""
        if not _is_torch(o):
            return
        if o.requires_grad:
            raise InvalidArgumentError(
                f"peft_loraone: {name} requires grad; the engine writes it in place, which autograd cannot track "
                "(torch refuses in-place writes to such tensors too). Pass a tensor that does not require grad (for a "
                f"parameter: {name}=param.data, or copy the factors in under torch.no_grad())"
            )
        if o.is_neg() or o.is_conj():
            bit = "negation" if o.is_neg() else "conjugation"
            raise InvalidArgumentError(
                f"peft_loraone: {name} carries torch's lazy {bit} bit (a _neg_view()/conj() view): the engine would "
                f"write raw memory that torch reads {'negated' if bit == 'negation' else 'conjugated'}. Pass a plain tensor"
            )

    def _borrow(self, t: Any, name: str, *, write: bool, own: bool = False) -> tuple[Borrowed, View | None]:
        """Borrow ``t``; for torch and numpy producers, check its capsule against the memory it owns; for
        torch, pin that memory (the storage object, and a copy-on-write alias) until the call ends."""
        if own:  # allocated here: nobody else can touch it
            b = borrow(t, name)
            self.keep.append(b)
            return b, None
        if _is_torch(t):
            b, view = self._borrow_torch(t, name)
            if write:
                self.written.append(_Written(name, t))
            return b, view
        b = borrow(t, name)
        self.keep.append(b)
        view = b.view()
        if isinstance(t, np.ndarray):
            bounds = _numpy_bounds(t)
            root, obj = t, t.base
            while obj is not None:  # down the chain of views (as_strided's DummyArray included)
                if isinstance(obj, np.ndarray):
                    root = obj
                elif type(obj).__name__ != "DummyArray":
                    break  # memory owned by something else (bytes, mmap, another producer): not checkable
                obj = getattr(obj, "base", None)
            if root is not t and root.base is None:  # t is a view of an array that owns its buffer
                rlo, rhi = _numpy_bounds(root)
                if not (rlo <= bounds[0] and bounds[1] <= rhi):
                    raise InvalidArgumentError(
                        f"peft_loraone: {name} spans bytes outside the buffer of the array it views (a stride trick "
                        "such as as_strided gone wrong); pass a plain array"
                    )
            _check_claim(name, view, bounds, tuple(t.shape), "array")
        return b, view

    def _borrow_torch(self, t: Any, name: str) -> tuple[Borrowed, View | None]:
        """Hand torch tensor ``t`` to Go and pin its memory until the call ends.

        The storage object is held (so ``t.data = ...`` / ``t.set_()`` cannot free the StorageImpl) and, where
        torch can, a copy-on-write alias of the memory (so a growing ``resize_``, which reallocates inside the
        same StorageImpl, cannot free it either). Go is then given a DLPack descriptor built here from the
        alias's own metadata, not ``t.__dlpack__()``: exporting a tensor whose memory is shared copy-on-write
        makes torch copy it, which would turn every further job on the same memory (views of one gradient
        buffer, outputs in one arena) into a copy of the whole storage. A subclass that overrides
        ``__dlpack__`` is a producer of its own: its export is used, and checked against the storage.
        """
        torch = _torch()
        check_device(t, name)
        src = t.detach() if t.requires_grad else t
        if type(t).__dlpack__ is not torch.Tensor.__dlpack__:
            storage = src.untyped_storage()  # held before the export: a swap cannot free what it describes
            b = borrow(src, name)
            self.keep.append(b)
            self.pins.append(storage)
            clone = _lazy_clone(src)
            if clone is not None:
                self.pins.append(clone)
                bounds = _torch_bounds(clone)  # the memory the alias pins: the capsule must lie inside it
            else:
                bounds = (storage.data_ptr(), storage.data_ptr() + storage.nbytes())
            view = b.view()
            _check_claim(name, view, bounds, tuple(t.shape), "storage")
            return b, view
        if src.layout != torch.strided:
            raise InvalidArgumentError(f"peft_loraone: {name} is a {src.layout} tensor; pass a dense one (.to_dense())")
        code = _torch_dlpack_dtype(src.dtype)
        if code is None:
            raise UnsupportedDTypeError(
                f"peft_loraone: {name} has dtype {src.dtype}; the engine reads float32, float64, float16 or bfloat16 "
                "and writes float32 or float64"
            )
        storage = src.untyped_storage()
        self.pins.append(storage)
        clone = _lazy_clone(src)
        pinned = src
        if clone is not None:
            self.pins.append(clone)
            pinned = clone  # ours alone: its metadata cannot change under us
        try:
            ptr = _const_ptr(pinned)
        except Exception as exc:  # noqa: BLE001 - a tensor without memory (a wrapper subclass, a fake tensor)
            raise InvalidArgumentError(f"peft_loraone: {name} has no CPU memory the engine can read ({exc})") from exc
        b = describe_memory(pinned, ptr, tuple(pinned.shape), tuple(pinned.stride()), code)
        self.keep.append(b)
        view = b.view()
        if clone is None:  # a swap between taking the storage and reading the metadata would show here
            base = storage.data_ptr()
            _check_claim(name, view, (base, base + storage.nbytes()), tuple(t.shape), "storage")
        return b, view

    def finish(self) -> Factors:
        """After Go succeeded: check the caller's torch outputs still hold the memory Go wrote, tell autograd
        they were written, and build the factors."""
        self.pins.clear()  # drop the copy-on-write aliases first: the outputs own their memory again
        for w in self.written:
            t = w.tensor
            if (_const_ptr(t), tuple(t.shape), tuple(t.stride())) != (w.ptr, w.shape, w.strides):
                raise InvalidArgumentError(
                    f"peft_loraone: {w.name}'s memory was replaced while the engine wrote it (resize_, set_, "
                    f"`.data =`, or an in-place write or .numpy() that made torch copy it): {w.name} does not hold "
                    "the factors. Leave the outputs alone until the job ends, and run it again"
                )
        torch = sys.modules.get("torch")
        for w in self.written:
            # Autograd must know: a graph that saved this tensor now raises "modified by an inplace operation".
            torch.autograd.graph.increment_version(w.tensor)
        self.release()
        s = self.S
        return Factors(
            B=self.B,
            A=self.A,
            S=s,
            sigma1=float(s[0]),
            accuracy=float(self.info[0]),
            passes=int(self.info[1]),
            converged=bool(self.info[2]),
            method=_METHOD_NAMES[self.method],
            scaling=self.scaling,
            gap_ratio=float(self.info[3]),
            ambiguous=bool(self.info[4]),
            residual_excess=None if self.info[5] < 0 else float(self.info[5]),
        )

    def release(self) -> None:
        """Drop every capsule, storage and alias; call only once Go is done with them."""
        self.pins.clear()
        self.keep.clear()

    def _empty(self, use_torch: bool, shape: tuple[int, int], dtype: Any) -> Any:
        if use_torch:
            return _torch().empty(shape, dtype=dtype)
        return np.empty(shape, dtype=dtype)


def _check_overlaps(views: list[tuple[str, View | None]]) -> None:
    ranges = [(n, v.extent()) for n, v in views if v is not None]
    ranges = [(n, e) for n, e in ranges if e is not None]
    for i in range(len(ranges)):
        for j in range(i + 1, len(ranges)):
            (n1, (lo1, hi1)), (n2, (lo2, hi2)) = ranges[i], ranges[j]
            if lo1 < hi2 and lo2 < hi1:
                raise InvalidArgumentError(
                    f"peft_loraone: {n2} overlaps {n1} in memory ({n2} spans [{lo2:#x}, {hi2:#x}), {n1} spans "
                    f"[{lo1:#x}, {hi1:#x})); the engine would read or write one through the other. Pass separate tensors"
                )


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Job:
    """A computation running in the Go engine (see :func:`submit_lora_one`); like a ``Future``.

    :meth:`result` waits (releasing the GIL) and returns the :class:`Factors` or raises the job's error;
    any number of threads may call it, and all get the same result or an exception of the same class and
    message. ``result(timeout=...)`` raises :class:`~peft_loraone.JobTimeoutError` (a ``TimeoutError``)
    if the job is not done by then; Ctrl-C interrupts the wait within about 50 ms, and the job keeps
    running: call ``result()`` again to collect it, or :meth:`cancel` it.

    Memory: the job keeps its input and output tensors, their storages and (for torch tensors from torch's
    own allocator) a copy-on-write alias of their memory alive until it ends. So ``g.data = ...``,
    ``g.set_(...)``, a growing ``g.resize_(...)`` or ``g.untyped_storage().resize_(0)`` during the job
    cannot make Go read or write freed memory: ``g`` gets new memory and the job goes on with the old one
    (for an output, :meth:`result` then raises, since the output no longer holds the factors). What stays
    undefined: in-place writes to the input or outputs while the job runs (for a torch tensor the write
    makes torch copy the tensor first, so the job sees the old values; a numpy view taken of it earlier
    does not follow the copy; through numpy, or a torch tensor over numpy/DLPack memory, the job reads
    the changing values), reading the outputs before the job ends, and resizing memory torch cannot
    alias (``numpy``'s ``resize(refcheck=False)``; a growing ``resize_`` of a shared-memory tensor, which
    crashes torch on its own). A job that is garbage-collected without :meth:`result` waits for Go to
    finish first, so memory is never freed under Go.
    """

    def __init__(self, call: _Call, *, queue: bool = True) -> None:
        self._call = call
        self._lock = threading.Lock()
        self._outcome: tuple[Factors | None, LoraOneError | None] | None = None
        self._id: int | None = None
        self._pool = _native.pool()
        start = self._pool.Submit if queue else self._pool.Run
        self._id = _native.call(start, *call.args)
        _native.live_jobs.add(self)

    # ---- waiting ----

    def result(self, timeout: float | None = None) -> Factors:
        """Wait for the job and return its factors, or raise its error.

        Args:
            timeout: seconds to wait at most (None: until it is done); then
                :class:`~peft_loraone.JobTimeoutError` is raised and the job keeps running.

        Raises:
            JobTimeoutError: the timeout elapsed.
            CancelledError: the job was cancelled before it wrote its outputs.
            ForkedProcessError: this process was forked from the one that submitted the job.
            KeyboardInterrupt: Ctrl-C during the wait (the job keeps running).
            LoraOneError: the job's own error (bad input, NaN/Inf, ...).
        """
        if timeout is not None:
            timeout = _real_arg("timeout", timeout, positive=False, finite=False, fix="or None to wait until done")
        return self._wait(timeout, cancel_on_interrupt=False)

    def _wait(self, timeout: float | None, *, cancel_on_interrupt: bool) -> Factors:
        deadline = None if timeout is None else time.monotonic() + timeout
        with _native.DeferredInterrupt() as sig:
            while self._outcome is None:
                if sig.pending is not None:
                    self._interrupted(sig, cancel_on_interrupt)
                ms = _POLL_MS
                if deadline is not None:
                    ms = max(0, min(ms, math.ceil((deadline - time.monotonic()) * 1000)))
                self._poll_locked(ms)
                if self._outcome is None and deadline is not None and time.monotonic() >= deadline:
                    raise JobTimeoutError(
                        f"peft_loraone: the job did not finish within {timeout} s; it keeps running: call result() "
                        "again to wait for it, or cancel() it"
                    )
            if sig.pending is not None:  # Ctrl-C in the slice in which the job finished: still honoured
                self._interrupted(sig, False)
        factors, error = self._outcome
        if error is not None:
            raise copy.copy(error)
        assert factors is not None
        return factors

    def _interrupted(self, sig: _native.DeferredInterrupt, cancel: bool) -> None:
        """Run the previous SIGINT handler; if it raises (KeyboardInterrupt) and the job must not outlive
        the call (a synchronous call), cancel the job and wait until Go has stopped before re-raising."""
        try:
            sig.deliver()
        except BaseException:
            if cancel and self._outcome is None:
                self.cancel()
                while self._outcome is None:  # one pass at most; further Ctrl-C stays deferred meanwhile
                    self._poll_locked(_POLL_MS)
            raise

    def _poll_locked(self, ms: int) -> None:
        """Poll Go for at most ``ms`` ms, one thread at a time; record the outcome when the job is done."""
        if not self._lock.acquire(timeout=ms / 1000 if ms > 0 else 0):
            return  # another thread is polling; its slice ends within _POLL_MS
        try:
            if self._outcome is None:
                self._poll(ms)
        finally:
            self._lock.release()

    def _poll(self, ms: int) -> None:
        try:
            done = _native.call(self._pool.Poll, self._id, ms)
        except ForkedProcessError:
            raise  # not the job's outcome: the job lives in the parent process
        except LoraOneError as exc:  # the job finished with an error (Go forgot it)
            self._record(None, exc)
            return
        if done:
            try:
                factors = self._call.finish()
            except LoraOneError as exc:
                self._record(None, exc)
                return
            self._record(factors, None)

    def _record(self, factors: Factors | None, error: LoraOneError | None) -> None:
        self._call.release()
        error = error.with_traceback(None) if error is not None else None
        self._outcome = (factors, error)

    # ---- control ----

    def cancel(self) -> bool:
        """Ask the engine to stop the job before its next pass over the input (or before it starts, if it
        is queued). Returns True if the job was still running or queued: :meth:`result` then raises
        :class:`~peft_loraone.CancelledError` (unless Go was already writing the outputs, in which case the
        job completes normally); False if it had already finished. The tensors stay in use until Go has
        stopped; :meth:`result` (or garbage collection) waits for that."""
        if self._outcome is not None:
            return False
        return bool(_native.call(self._pool.Cancel, self._id))

    def done(self) -> bool:
        """Whether the job has finished (successfully or not); never waits."""
        if self._outcome is None:
            self._poll_locked(0)
        return self._outcome is not None

    def _stop_at_exit(self) -> None:
        """At interpreter exit: cancel the job if it still runs and wait until Go has let go of its tensors."""
        if self._outcome is None and self._id is not None:
            self._pool.Cancel(self._id)
            try:
                self._pool.Poll(self._id, -1)
            except RuntimeError:  # the job's own error (cancelled, ...): nobody will ask for it any more
                pass
            self._outcome = (None, CancelledError("peft_loraone: the job was cancelled at interpreter exit"))

    def __del__(self) -> None:
        if getattr(self, "_outcome", True) is not None or getattr(self, "_id", None) is None:
            return
        try:
            if _native.forked():
                return  # no Go runtime here: nothing runs or writes this memory in this process
            self._pool.Poll(self._id, -1)  # never free memory under Go: wait (the GIL is released)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


def lora_one(
    grad: Any,
    rank: int,
    *,
    gamma: float = 128.0,
    out_b: Any = None,
    out_a: Any = None,
    dtype: Any = None,
    oversampling: int | None = None,
    power_iters: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    algorithm: str | None = None,
) -> Factors:
    r"""LoRA-One factors of the gradient ``grad`` (m x n).

    Computes :math:`-G \approx U_r S_r V_r^T` and returns
    :math:`B = U_r\sqrt{S_r}/\sqrt{\gamma\sigma_1}` (m x r) and
    :math:`A = \sqrt{S_r}V_r^T/\sqrt{\gamma\sigma_1}` (r x n), so that
    :math:`B A = [-G]_r/(\gamma\sigma_1)`. W0 is not modified.

    Args:
        grad: the one-step full gradient, a DLPack producer (float32/64/16, bfloat16; CPU;
            contiguous or transposed). Tensors that require grad are detached. A torch tensor
            with the lazy negation bit (``is_neg()``, e.g. from ``_neg_view()``) is resolved
            first, which is a copy; every other input is read in place.
        rank: r, at least 1 and at most min(m, n).
        gamma: the stabilizing constant (reference default 128).
        out_b, out_a: optional float32/float64 outputs of shape (m, r) and (r, n), filled in
            place and returned as ``B`` and ``A``. They must not require grad, carry torch's
            neg/conj bit, or overlap each other or the input; after the write, torch's version
            counter of each is bumped (autograd then refuses a backward through a graph that
            saved them).
        dtype: output dtype when the outputs are allocated here (float32 by default,
            float64 for a float64 input).
        oversampling: extra sketch columns (engine default when None).
        power_iters: maximum number of subspace iterations (engine default when None), at most
            ``MAX_POWER_ITERS`` = 1000 (2 + 2 * 1000 passes over G).
        tol: stop once the estimated relative error of the rank-r approximation is at most this
            (engine default 1e-4 when None; 0 runs all ``power_iters``). The estimate reached is
            ``Factors.accuracy``.
        algorithm: the truncated SVD: ``"krylov"`` (block Lanczos bidiagonalization, the default
            when None) or ``"subspace"`` (randomized subspace iteration; ``oversampling`` applies
            to it only).
        seed: seed of the Gaussian sketch, an integer in [0, 2**63); results are deterministic
            for a seed.

    On the main thread, Ctrl-C stops the computation within one pass over ``grad`` and raises
    ``KeyboardInterrupt`` (the outputs are then not written). Every argument is validated before
    anything is allocated.

    Raises:
        ZeroGradientError: ``grad`` is all zeros (sigma1 = 0).
        NonFiniteError: ``grad`` holds NaN or Inf, or a factor would not be finite (gamma far too
            small or large).
        InvalidArgumentError: bad rank, shape, layout, option or overlapping outputs (a ``ValueError``;
            :class:`ArgumentTypeError`, also a ``TypeError``, for an argument of the wrong type).
        UnsupportedDTypeError: an integer or other unsupported dtype (a ``TypeError``).
        UnsupportedDeviceError: a tensor not in CPU memory.
        ReadOnlyOutputError: a read-only output.
        ForkedProcessError: this process was forked after its parent used the engine.
    """
    return _compute(
        _native.METHOD_LORA_ONE, grad, rank, gamma, "grad", None,
        dict(out_b=out_b, out_a=out_a, dtype=dtype, oversampling=oversampling, power_iters=power_iters, tol=tol, seed=seed,
             algorithm=algorithm),
    )


def lora_ga(
    grad: Any,
    rank: int,
    *,
    gamma: float = 16.0,
    scaling: float | None = None,
    out_b: Any = None,
    out_a: Any = None,
    dtype: Any = None,
    oversampling: int | None = None,
    power_iters: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    algorithm: str | None = None,
) -> Factors:
    r"""LoRA-GA factors, the reference variant (arXiv 2407.05000), for comparison.

    Computes the rank-2r SVD :math:`G \approx U S V^T` of **+G** and returns
    :math:`A = V_{[:, 0:r]}^T\, m^{1/4}/\sqrt{\gamma}` and
    :math:`B = U_{[:, r:2r]}\, m^{1/4}/\sqrt{\gamma}` (no singular values). The method
    offsets the base weight, :math:`W_0 \leftarrow W_0 - s B A`: see :meth:`Factors.offset`
    (needs ``scaling``). Requires 2r <= min(m, n). PEFT's own ``lora_ga`` differs (it
    multiplies B by singular values and scales only B).

    Other arguments as in :func:`lora_one`; ``S`` holds 2r singular values.
    """
    return _compute(
        _native.METHOD_LORA_GA, grad, rank, gamma, "grad", scaling,
        dict(out_b=out_b, out_a=out_a, dtype=dtype, oversampling=oversampling, power_iters=power_iters, tol=tol, seed=seed,
             algorithm=algorithm),
    )


def pissa(
    weight: Any,
    rank: int,
    *,
    scaling: float,
    out_b: Any = None,
    out_a: Any = None,
    dtype: Any = None,
    oversampling: int | None = None,
    power_iters: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    algorithm: str | None = None,
) -> Factors:
    r"""PiSSA factors of the weight ``weight`` (m x n), for comparison.

    Computes :math:`W \approx U_r S_r V_r^T` and returns
    :math:`B = U_r\sqrt{S_r/s}`, :math:`A = \sqrt{S_r/s}\,V_r^T`, so :math:`s B A = [W]_r`;
    the base weight is offset by :math:`W_0 \leftarrow W_0 - s B A` (:meth:`Factors.offset`).

    Other arguments as in :func:`lora_one`.
    """
    return _compute(
        _native.METHOD_PISSA, weight, rank, scaling, "weight", scaling,
        dict(out_b=out_b, out_a=out_a, dtype=dtype, oversampling=oversampling, power_iters=power_iters, tol=tol, seed=seed,
             algorithm=algorithm),
    )


def release_memory() -> int:
    """Return the scratch memory the engine keeps between calls to the operating system.

    Each call takes a workspace (its Krylov bases, projected matrix and product panels) from a small free
    list and gives it back, so that a run of calls reuses memory instead of faulting fresh pages in; up to
    one workspace per core stays alive after the calls, as large as the largest matrix needed (~85 MB for a
    4096x11008 gradient at r=64). This drops them; the next call allocates again. Returns how many were
    dropped. :func:`peft_loraone.initialize` calls it when it is done.
    """
    return _native.release_memory()


def _compute(method: int, x: Any, rank: int, scale: float, name: str, scaling: float | None, kw: dict) -> Factors:
    call = _Call(method, x, rank, scale, scaling=scaling, name=name, **kw)
    if _on_main_thread():
        # Go runs the computation on its own goroutine while this thread waits in short slices, so Ctrl-C
        # works: it cancels the computation, waits for Go to stop (one pass at most) and raises
        # KeyboardInterrupt. The job does not queue behind the pool's workers.
        return Job(call, queue=False)._wait(None, cancel_on_interrupt=True)
    try:
        _native.compute(*call.args)  # call keeps every borrowed tensor alive until Go returns
    except BaseException:
        call.release()
        raise
    return call.finish()


def _submit(method: int, x: Any, rank: int, scale: float, name: str, scaling: float | None, kw: dict) -> Job:
    call = _Call(method, x, rank, scale, scaling=scaling, name=name, **kw)
    return Job(call)


def submit_lora_one(grad: Any, rank: int, *, gamma: float = 128.0, **kwargs: Any) -> Job:
    """Queue :func:`lora_one` in the Go worker pool and return a :class:`Job` at once; ``job.result()`` waits.

    Lets Python go on (for example, finish a backward pass) while Go computes; several
    jobs run concurrently (``GOMAXPROCS`` of them, or ``PEFT_LORAONE_WORKERS``). Arguments
    are validated (and bad ones raised) here, before anything is queued. See :class:`Job` for
    what may and may not be done with the tensors while the job runs.
    """
    return _submit(_native.METHOD_LORA_ONE, grad, rank, gamma, "grad", None, _kwargs(kwargs))


def submit_lora_ga(grad: Any, rank: int, *, gamma: float = 16.0, scaling: float | None = None, **kwargs: Any) -> Job:
    """Queue :func:`lora_ga`; see :func:`submit_lora_one`."""
    return _submit(_native.METHOD_LORA_GA, grad, rank, gamma, "grad", scaling, _kwargs(kwargs))


def submit_pissa(weight: Any, rank: int, *, scaling: float, **kwargs: Any) -> Job:
    """Queue :func:`pissa`; see :func:`submit_lora_one`."""
    return _submit(_native.METHOD_PISSA, weight, rank, scaling, "weight", scaling, _kwargs(kwargs))


_KW = ("out_b", "out_a", "dtype", "oversampling", "power_iters", "tol", "seed", "algorithm")


def _kwargs(kwargs: dict) -> dict:
    unknown = set(kwargs) - set(_KW)
    if unknown:
        raise ArgumentTypeError(f"peft_loraone: unexpected keyword arguments {sorted(unknown)}; accepted: {list(_KW)}")
    out = {k: None for k in _KW}
    out["seed"] = 0
    out.update(kwargs)
    return out
