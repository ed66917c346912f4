r"""The engine's sketch entry points: LoRA-One factors of a gradient G that was never formed.

``G`` (m x n) is known only through randomized sketches that the caller accumulated (see
``loraone/sketch.go`` and ``docs/capture.md``), with Gaussian test matrices Omega (n x k), Psi (l x m) and
Omega_t (n x t)::

    single pass                              two pass
    y      Y = G Omega      m x k            Q = orth(G Omega)  m x k   (orthonormalize(Y), in place)
    w      W = Psi G        l x n            X = Q^T G          k x n
    psi    Psi              l x m            (not used)
    z      Z = G Omega_t    m x t            (both modes)
    omega_t Omega_t         n x t

:func:`sketch_lora_one` reconstructs the top-r SVD of G from them in Go (QR, a small least-squares solve, the
SVD of the small core) and writes LoRA-One's factors, ``B A = [-G^]_r / (gamma sigma1^)``, into ``out_b``/``out_a``,
with an error estimate from the test vectors (``Accuracy``: the estimated relative error of ``s B A`` against the
exact LoRA-One init of G; never more than 1.10x optimistic over the engine's synthetic sweep).

This module reuses :mod:`peft_loraone.engine`'s boundary: its ``_Call`` borrows every tensor over DLPack (the
capsule, its storage and a copy-on-write alias are kept alive for the call; what each capsule claims is checked
against the memory its producer owns), checks the outputs before anything is written, and after the call checks
the outputs still hold the memory Go wrote and bumps their autograd version; :func:`_native.call` loads the
extension lazily and maps the engine's error kinds to exception classes. The reconstruction is small (O((m+n) k^2))
and runs synchronously; :func:`submit_sketch_lora_one` wraps its outcome in a finished :class:`FinishedJob`, so
callers handle it like an :class:`~peft_loraone.engine.Job`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _native
from ._dlpack import check_device
from .engine import Factors, _Call, _check_overlaps, _const_ptr, _int_arg, _is_torch, _real_arg
from .errors import InvalidArgumentError, LoraOneError, UnsupportedDTypeError

__all__ = ["FinishedJob", "SketchFactors", "orthonormalize", "sketch_lora_one", "submit_sketch_lora_one"]

#: Least length of the engine's info vector (bridge.SketchInfoLen).
INFO_LEN = 4
#: Length allocated: Go writes the first INFO_LEN values; engine._Call.finish, which the sketch call reuses, reads
#: the dense call's longer info vector (6 values: accuracy, passes, converged, gap ratio, ambiguous, excess), so
#: the rest stays zero for it to read. The sketch's own numbers are taken from the first INFO_LEN only.
_INFO_ALLOC = max(INFO_LEN, 6)


@dataclass(frozen=True)
class SketchFactors(Factors):
    """:class:`~peft_loraone.engine.Factors` reconstructed from a sketch.

    ``accuracy`` is the engine's estimate of the relative error of ``s B A`` against the exact LoRA-One init from G
    (``info[0]``); ``passes`` the passes over the data (1 or 2); ``converged`` is always True (nothing iterates).

    Attributes:
        residual: Estimated ``||G - [G^]_r||_F / ||G||_F`` (includes G's own tail beyond rank r).
        sketch_size: k, the columns of Y.
        numerical_rank: Numerical rank of the reconstruction G^ (< k: the sketch captured G whole).
        two_pass: Whether the two-pass (range finder) reconstruction ran.
    """

    residual: float = math.nan
    sketch_size: int = 0
    numerical_rank: int = 0
    two_pass: bool = False


class FinishedJob:
    """The outcome of a synchronous engine call, with the interface of :class:`~peft_loraone.engine.Job`."""

    def __init__(self, factors: Optional[Factors] = None, error: Optional[BaseException] = None) -> None:
        self._factors = factors
        self._error = error.with_traceback(None) if error is not None else None

    def result(self, timeout: Optional[float] = None) -> Factors:
        """The factors, or the call's error (raised again, a copy each time)."""
        if self._error is not None:
            raise copy.copy(self._error)
        assert self._factors is not None
        return self._factors

    def done(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False


def _matrix(name: str, x: Any) -> tuple[int, int]:
    """Refuse what is not a 2-D floating CPU torch tensor or numpy array; returns its shape."""
    check_device(x, name)
    if not (_is_torch(x) or isinstance(x, np.ndarray)):
        raise InvalidArgumentError(
            f"peft_loraone: sketch {name} must be a torch tensor or numpy array, got {type(x).__name__}"
        )
    if x.ndim != 2:
        raise InvalidArgumentError(f"peft_loraone: sketch {name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    floating = x.is_floating_point() if _is_torch(x) else np.issubdtype(x.dtype, np.floating)
    if not floating:
        raise UnsupportedDTypeError(
            f"peft_loraone: sketch {name} has dtype {x.dtype}; the engine reads float32, float64, float16, bfloat16"
        )
    return int(x.shape[0]), int(x.shape[1])


class _SketchCall(_Call):
    """``engine._Call``'s borrowing and output checks around ``bridge.SketchLoRAOne`` (not its constructor: the
    argument list differs; ``_borrow``, ``_check_output``, ``finish`` and ``release`` are reused as they are)."""

    def __init__(
        self,
        y: Any,
        w: Any,
        psi: Any,
        z: Any,
        omega_t: Any,
        rank: int,
        gamma: float,
        two_pass: bool,
        out_b: Any,
        out_a: Any,
        dtype: Any,
    ) -> None:
        rank = _int_arg("rank", rank, 1, 2**31 - 1, "pass the adapter rank r, 1 <= r <= k")
        gamma = _real_arg("gamma", gamma, positive=True, finite=True, fix="pass a positive gamma")
        if not isinstance(two_pass, bool):
            raise InvalidArgumentError(f"peft_loraone: two_pass must be True or False, got {two_pass!r}")
        self.method = _native.METHOD_LORA_ONE
        self.scaling = None
        self.two_pass = two_pass
        self.keep: list[Any] = []
        self.pins: list[Any] = []
        self.written: list[Any] = []
        inputs = {"Y": y, "W": w, "Z": z, "OmegaT": omega_t}
        if not two_pass:
            if psi is None:
                raise InvalidArgumentError(
                    "peft_loraone: psi (the l x m test matrix Psi) is required in single-pass mode"
                )
            inputs["Psi"] = psi
        shapes = {name: _matrix(name, t) for name, t in inputs.items()}
        (m, k), (_, n) = shapes["Y"], shapes["W"]
        if not 1 <= rank <= k:
            raise InvalidArgumentError(f"peft_loraone: rank {rank} outside [1, k = {k}] (k = columns of the sketch Y)")
        use_torch = _is_torch(y)
        if out_b is None or out_a is None:
            out_dtype = self._out_dtype(use_torch, y, dtype)
        for oname, o, shape in (("out_b", out_b, (m, rank)), ("out_a", out_a, (rank, n))):
            if o is not None:
                if tuple(o.shape) != shape:
                    raise InvalidArgumentError(f"peft_loraone: {oname} has shape {tuple(o.shape)}, want {shape}")
                self._check_output(oname, o)

        views = []
        addresses: dict[str, list[Any]] = {}
        for name, t in inputs.items():
            if use_torch and t.requires_grad:
                t = t.detach()
            b, view = self._borrow(t, name, write=False)
            views.append((name, view))
            addresses[name] = [b.address, b.versioned]
        self.B = out_b if out_b is not None else self._empty(use_torch, (m, rank), out_dtype)
        self.A = out_a if out_a is not None else self._empty(use_torch, (rank, n), out_dtype)
        for oname, t, own in (("out_b", self.B, out_b is None), ("out_a", self.A, out_a is None)):
            b, view = self._borrow(t, oname, write=True, own=own)
            views.append((oname, view if view is not None else b.view()))
            addresses[oname] = [b.address, b.versioned]
        # Only the outputs must not overlap anything (the inputs are only read).
        outs = [v for v in views if v[0] in ("out_b", "out_a")]
        for name, view in views:
            if name not in ("out_b", "out_a"):
                for o in outs:
                    _check_overlaps([(name, view), o])
        _check_overlaps(outs)
        if use_torch:
            import torch

            self.S = torch.zeros(rank, dtype=torch.float64)
            self.info = torch.zeros(_INFO_ALLOC, dtype=torch.float64)
        else:
            self.S = np.zeros(rank, dtype=np.float64)
            self.info = np.zeros(_INFO_ALLOC, dtype=np.float64)
        for name, t in (("S", self.S), ("info", self.info)):
            b, _ = self._borrow(t, name, write=True, own=True)
            addresses[name] = [b.address, b.versioned]
        psi_addr = addresses.get("Psi", [0, False])
        self.args = (
            *addresses["Y"], *addresses["W"], *psi_addr, *addresses["Z"], *addresses["OmegaT"],
            *addresses["out_b"], *addresses["out_a"], *addresses["S"], *addresses["info"],
            rank, gamma, two_pass,
        )

    def run(self) -> SketchFactors:
        try:
            _native.call(_native.bridge().SketchLoRAOne, *self.args)
        except BaseException:
            self.release()
            raise
        info = [float(v) for v in self.info]
        f = self.finish()  # engine._Call: outputs still where Go wrote them, autograd versions bumped, released
        return SketchFactors(
            B=f.B, A=f.A, S=f.S, sigma1=f.sigma1, accuracy=info[0], passes=2 if self.two_pass else 1,
            converged=True, method="lora_one", residual=info[1], sketch_size=int(info[2]),
            numerical_rank=int(info[3]), two_pass=self.two_pass,
        )


def sketch_lora_one(
    y: Any,
    w: Any,
    z: Any,
    omega_t: Any,
    rank: int,
    *,
    psi: Any = None,
    gamma: float = 128.0,
    two_pass: bool = False,
    out_b: Any = None,
    out_a: Any = None,
    dtype: Any = None,
) -> SketchFactors:
    r"""LoRA-One factors reconstructed from sketches of G (see the module docstring for what each sketch holds).

    Args:
        y: Single pass: ``Y = G Omega`` (m x k); two pass: ``Q`` (``orthonormalize(Y)``).
        w: Single pass: ``W = Psi G`` (l x n, l >= k); two pass: ``X = Q^T G`` (k x n).
        z: ``Z = G Omega_t`` (m x t), the test sketch (t = 10 recommended).
        omega_t: ``Omega_t`` (n x t), independent of Omega and Psi.
        rank: r, ``1 <= r <= k``; ``k <= min(m, n)``.
        psi: ``Psi`` (l x m); required in single-pass mode, unused in two-pass mode.
        gamma: LoRA-One's gamma.
        two_pass: Which reconstruction (see above).
        out_b, out_a: Optional float32/float64 outputs (m x r, r x n), filled in place (any layout).
        dtype: Output dtype when they are allocated here (float32, float64 for float64 ``y``).

    Every tensor must be in CPU memory (torch or numpy, float32/64/16 or bfloat16, row- or column-major).

    Returns:
        :class:`SketchFactors`; ``accuracy`` is the engine's estimate of the relative error of ``s B A``.

    Raises:
        ZeroGradientError: Y or W all zero (G = 0).
        NonFiniteError: NaN or Inf in a sketch.
        InvalidArgumentError: shapes that disagree, ``rank`` outside ``[1, k]``, ``k > min(m, n)``, ``l < k``, a missing
            ``psi`` in single-pass mode, a two-pass ``y`` that is not orthonormal, overlapping outputs.
    """
    return _SketchCall(y, w, psi, z, omega_t, rank, gamma, two_pass, out_b, out_a, dtype).run()


def submit_sketch_lora_one(*args: Any, **kwargs: Any) -> FinishedJob:
    """:func:`sketch_lora_one`, run now, its outcome (factors or engine error) wrapped in a :class:`FinishedJob`
    whose ``result()`` returns or raises it: the interface of :func:`peft_loraone.engine.submit_lora_one`'s jobs.
    Errors in the arguments (raised before the engine is called) are raised here, as ``submit_lora_one`` does."""
    call = _SketchCall(*_bind(*args, **kwargs))
    try:
        return FinishedJob(call.run())
    except LoraOneError as exc:
        return FinishedJob(error=exc)


def _bind(
    y: Any,
    w: Any,
    z: Any,
    omega_t: Any,
    rank: int,
    *,
    psi: Any = None,
    gamma: float = 128.0,
    two_pass: bool = False,
    out_b: Any = None,
    out_a: Any = None,
    dtype: Any = None,
) -> tuple:
    return (y, w, psi, z, omega_t, rank, gamma, two_pass, out_b, out_a, dtype)


def orthonormalize(y: Any) -> int:
    """Overwrite ``y`` (m x k, m >= k, float32 or float64, CPU, writable) with ``Q`` of its thin QR (Householder
    in float64), in place; returns the numerical rank of the original ``y``. The first step of the two-pass sketch.

    Raises:
        ZeroGradientError: ``y`` is all zero.
        NonFiniteError: NaN or Inf in ``y``.
        InvalidArgumentError: not 2-D, or rows < cols.
    """
    _matrix("Y", y)
    call = _SketchBorrow()
    try:
        b, _ = call._borrow(y, "Y", write=True)
        rank = _native.call(_native.bridge().Orthonormalize, b.address, b.versioned)
        call.finish_written()
    finally:
        call.release()
    return int(rank)


class _SketchBorrow(_Call):
    """Just ``engine._Call``'s borrowing state, for a call with one in-place tensor."""

    def __init__(self) -> None:  # noqa: D107 - no argument checks: the caller did them
        self.keep, self.pins, self.written = [], [], []

    def finish_written(self) -> None:
        """What ``_Call.finish`` does for written tensors: they must still hold the memory Go wrote; autograd is
        told they changed."""
        self.pins.clear()
        for w in self.written:
            t = w.tensor
            if (_const_ptr(t), tuple(t.shape), tuple(t.stride())) != (w.ptr, w.shape, w.strides):
                raise InvalidArgumentError(f"peft_loraone: {w.name}'s memory was replaced while the engine wrote it")
        import torch

        for w in self.written:
            torch.autograd.graph.increment_version(w.tensor)

