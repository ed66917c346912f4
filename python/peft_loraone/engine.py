r"""The LoRA-One engine: truncated SVDs and adapter factors computed in Go, in place.

Every function takes any DLPack producer (a torch tensor, a numpy array, a raw
``dltensor`` capsule) in float32, float64, float16 or bfloat16, contiguous or a
transposed view, and reads it where it lies: nothing is copied. Outputs are
float32 or float64 tensors that Python allocates (or that you pass as
``out_b``/``out_a``, which are then filled in place and returned). Torch in,
torch out; numpy in, numpy out.

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

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from ._dlpack import Borrowed, borrow, is_capsule
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

__all__ = [
    "EngineInternalError",
    "Factors",
    "InvalidArgumentError",
    "Job",
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


@dataclass(frozen=True)
class Factors:
    """The result of one engine call.

    Attributes:
        B: ``lora_B``, shape (m, r).
        A: ``lora_A``, shape (r, n).
        S: the top singular values used, float64, descending (r values; 2r for LoRA-GA).
        sigma1: the largest singular value ``S[0]``.
        accuracy: relative Frobenius change of the rank-r approximation between the
            engine's last two estimates (smaller is better; the default target is reached
            when ``converged``).
        passes: multiplications of the input (or its transpose) by a block of vectors.
        converged: whether ``accuracy <= tol`` was reached before the iteration cap.
        method: ``"lora_one"``, ``"lora_ga"`` or ``"pissa"``.
        scaling: the LoRA scaling s used for the offset (LoRA-GA, PiSSA), else None.
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
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "data_ptr")


class _Call:
    """Everything one engine call needs, kept alive until the call (or job) ends."""

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
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise InvalidArgumentError(f"peft_loraone: rank must be a positive integer, got {rank!r}")
        rank = int(rank)
        for opt_name, value in (("oversampling", oversampling), ("power_iters", power_iters)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
                raise InvalidArgumentError(f"peft_loraone: {opt_name} must be a non-negative integer, got {value!r}")
        if tol is not None and not (tol >= 0):
            raise InvalidArgumentError(f"peft_loraone: tol must be a non-negative number, got {tol!r}")
        if algorithm not in _native.ALGORITHMS:
            raise InvalidArgumentError(
                f"peft_loraone: algorithm must be 'krylov', 'subspace' or None (the default, krylov), got {algorithm!r}"
            )
        self.method = method
        self.scaling = scaling
        self.keep: list[Borrowed] = []

        device = getattr(getattr(x, "device", None), "type", None)
        if device is not None and device != "cpu":
            raise UnsupportedDeviceError(
                f"peft_loraone: {name} is on {x.device}; the engine reads CPU memory only: move it with .cpu()"
            )
        use_torch = _is_torch(x)
        if not use_torch and not is_capsule(x) and not isinstance(x, np.ndarray):
            if not hasattr(x, "__dlpack__"):
                raise InvalidArgumentError(
                    f"peft_loraone: {name} must be a torch tensor, a numpy array or another DLPack producer, "
                    f"got {type(x).__name__}"
                )
            x = np.from_dlpack(x)  # another framework's CPU array: a zero-copy numpy view
        if is_capsule(x) and (out_b is None or out_a is None):
            raise InvalidArgumentError(
                f"peft_loraone: {name} is a raw DLPack capsule, so its shape is unknown here: pass out_b and out_a"
            )
        if use_torch and getattr(x, "requires_grad", False):
            x = x.detach()
        if not is_capsule(x):
            if x.ndim != 2:
                raise InvalidArgumentError(
                    f"peft_loraone: {name} must be a 2-D matrix (out_features x in_features), got shape "
                    f"{tuple(x.shape)}; reshape it (for a conv kernel: weight.flatten(1))"
                )
        nsv = 2 * rank if method == _native.METHOD_LORA_GA else rank
        self.B = out_b if out_b is not None else self._empty(use_torch, (x.shape[0], rank), x, dtype)
        self.A = out_a if out_a is not None else self._empty(use_torch, (rank, x.shape[1]), x, dtype)
        if use_torch:
            torch = _torch()
            self.S = torch.zeros(nsv, dtype=torch.float64)
        else:
            self.S = np.zeros(nsv, dtype=np.float64)
        self.info = np.zeros(3, dtype=np.float64)

        tensors = []
        for tname, t in ((name, x), ("out_b", self.B), ("out_a", self.A), ("S", self.S), ("info", self.info)):
            b = borrow(t, tname)
            self.keep.append(b)
            tensors += [b.address, b.versioned]
        self.args = (
            method,
            *tensors,
            rank,
            float(scale),
            -1 if oversampling is None else int(oversampling),
            -1 if power_iters is None else int(power_iters),
            -1.0 if tol is None else float(tol),
            int(seed),
            _native.ALGORITHMS[algorithm],
        )

    @staticmethod
    def _empty(use_torch: bool, shape: tuple[int, int], x: Any, dtype: Any) -> Any:
        if use_torch:
            torch = _torch()
            if dtype is None:
                dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            if dtype not in (torch.float32, torch.float64):
                raise UnsupportedDTypeError(f"peft_loraone: dtype must be torch.float32 or torch.float64, got {dtype}")
            return torch.empty(shape, dtype=dtype)
        if dtype is None:
            dtype = np.float64 if x.dtype == np.float64 else np.float32
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise UnsupportedDTypeError(f"peft_loraone: dtype must be float32 or float64, got {dtype}")
        return np.empty(shape, dtype=dtype)

    def factors(self) -> Factors:
        self.keep.clear()
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
        )


class Job:
    """A computation queued in the Go worker pool (see :func:`submit_lora_one`).

    The job keeps its input and output tensors alive until :meth:`result` returns;
    do not modify them meanwhile. A job that is garbage-collected without
    :meth:`result` waits for Go to finish first, so memory is never freed under Go.
    """

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._pool = _native.pool()
        self._id = _native.call(self._pool.Submit, *call.args)
        self._result: Factors | None = None
        self._error: BaseException | None = None

    def result(self) -> Factors:
        """Wait for the job (the GIL is released) and return its factors, or raise its error."""
        if self._id is not None:
            job_id, self._id = self._id, None
            try:
                _native.call(self._pool.Wait, job_id)
                self._result = self._call.factors()
            except LoraOneError as exc:
                self._error = exc
            finally:
                self._call.keep.clear()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def done(self) -> bool:
        """Whether :meth:`result` has already been collected."""
        return self._id is None

    def __del__(self) -> None:
        if getattr(self, "_id", None) is not None:
            try:
                self._pool.Wait(self._id)
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass
            self._id = None


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
            contiguous or transposed). Tensors that require grad are detached.
        rank: r, at least 1 and at most min(m, n).
        gamma: the stabilizing constant (reference default 128).
        out_b, out_a: optional float32/float64 outputs of shape (m, r) and (r, n), filled in
            place and returned as ``B`` and ``A``.
        dtype: output dtype when the outputs are allocated here (float32 by default,
            float64 for a float64 input).
        oversampling: extra sketch columns (engine default when None).
        power_iters: maximum number of subspace iterations (engine default when None).
        tol: stop once the estimated relative error of the rank-r approximation is at most this
            (engine default 1e-4 when None; 0 runs all ``power_iters``). The estimate reached is
            ``Factors.accuracy``.
        algorithm: the truncated SVD: ``"krylov"`` (block Lanczos bidiagonalization, the default
            when None) or ``"subspace"`` (randomized subspace iteration; ``oversampling`` applies
            to it only).
        seed: seed of the Gaussian sketch; results are deterministic for a seed.

    Raises:
        ZeroGradientError: ``grad`` is all zeros (sigma1 = 0).
        NonFiniteError: ``grad`` holds NaN or Inf.
        InvalidArgumentError: bad rank, shape, layout or option (a ``ValueError``).
        UnsupportedDTypeError: an integer or other unsupported dtype (a ``TypeError``).
        UnsupportedDeviceError: a tensor not in CPU memory.
        ReadOnlyOutputError: a read-only output.
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
    _native.compute(*call.args)  # call keeps every borrowed tensor alive until Go returns
    return call.factors()


def _submit(method: int, x: Any, rank: int, scale: float, name: str, scaling: float | None, kw: dict) -> Job:
    call = _Call(method, x, rank, scale, scaling=scaling, name=name, **kw)
    return Job(call)


def submit_lora_one(grad: Any, rank: int, *, gamma: float = 128.0, **kwargs: Any) -> Job:
    """Queue :func:`lora_one` in the Go worker pool and return at once; ``job.result()`` waits.

    Lets Python go on (for example, finish a backward pass) while Go computes; several
    jobs run concurrently (``GOMAXPROCS`` of them, or ``PEFT_LORAONE_WORKERS``).
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
        raise TypeError(f"peft_loraone: unexpected keyword arguments {sorted(unknown)}; accepted: {list(_KW)}")
    out = {k: None for k in _KW}
    out["seed"] = 0
    out.update(kwargs)
    return out
