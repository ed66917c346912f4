r"""Gradient capture for LoRA-One: the one-step full gradient G of each target base weight, or what stands in for it.

Two parts, kept apart so that :func:`peft_loraone.initialize` stays a straight pipeline (validate → capture →
decompose → write → report):

- :class:`GradientCapture`, the context around the forward/backward passes: it saves and restores the model's
  state (train/eval modes, ``requires_grad`` flags, ``.grad``, enabled adapters), owns every hook handle, and
  routes what the hooks see to the accumulators;
- one :class:`Accumulator` per base weight, of the type the capture mode names, with the same few methods:
  ``add`` (one batch's contribution), ``merge`` (sum over the ranks of ``torch.distributed``), ``submit`` (hand
  the engine its job) and ``reopen`` (take more contributions after a submission).

Capture modes (``LoraOneConfig.capture``):

``"weight"`` (:class:`WeightGradAccumulator`)
    Only the target base weights require grad; a ``post_accumulate_grad_hook`` on each moves its gradient out of
    ``.grad`` into a float32 (float64 for float64 weights) sum as soon as backward produced it, so peak memory
    is the model, the activations and one float32 copy of the target gradients. Needs weights that can take a
    gradient: refused for quantized bases.
``"dense"`` (:class:`DenseAccumulator`)
    G from the base layer's own activations, for a Linear ``y = x Wᵀ + b`` (tokens flattened, x: T x in,
    delta = dL/dy: T x out)::

        dL/dW = deltaᵀ x                       (out x in)
        G     = (1/N) sum_b delta_bᵀ x_b        (N batches)

    and the same product for GPT-2's Conv1D (``y = x W + b``, W: in x out; its dL/dW = xᵀ delta is the
    transpose, and G is reported as (out, in) in every mode). x comes from a forward hook on the base layer,
    delta from a tensor hook on its output. No weight requires grad, so frozen and quantized (bitsandbytes
    4-bit and 8-bit, hqq, torchao) weights work: G is then the gradient with respect to the dequantized weight. Padding tokens
    whose loss is masked have delta = 0 and add nothing. For backward to run, something upstream of each target
    must require grad: a forward pre-hook gives a base layer whose input does not require grad (the first
    targets after the embedding) a leaf view of it that does (same storage; its ``.grad`` is dropped as soon as it
    is written). This costs one extra product (dL/dx) in those layers only and leaves every hook a user has on the
    model working as in ``"weight"`` mode (the alternative, a leaf copy of the output, hides the gradient from
    forward hooks that a user registered before ours: their output would not require grad).

``"sketch"`` (:class:`SketchAccumulator`)
    The same hooks as ``"dense"``, but G is never formed: each batch's x and delta are multiplied by thin Gaussian
    test matrices and added into sketches of G (Y = G·Omega, Z = G·Omega_t and W = Psi·G, or in a second pass over
    the same batches X = Qᵀ·G with Q = orth(Y)), O((out + in)·k) values per target; the Go engine reconstructs the
    top-r SVD from them with an error estimate (:mod:`peft_loraone._sketch_engine`). Works on the same frozen and
    quantized bases as ``"dense"``.

Accumulation (``LoraOneConfig.accumulate_on``): ``"device"`` keeps each sum on the device of the activations
(dense) or of the weight (weight); ``"cpu"`` keeps it in host memory and moves each batch's contribution there
through pinned buffers with asynchronous copies (:class:`_HostStager`), so device memory grows by at most about
one layer's float32 gradient at a time (the contribution in flight) instead of a copy of all target gradients.

In the last batch each accumulator is final the moment its last contribution arrives (weight: its hook fires;
dense: every forward call of the batch got its delta). It is then averaged and handed to the engine
(``submit_lora_one``) right away, so the SVDs run in Go's worker pool while backward continues through the
earlier layers, when the model runs on an accelerator. On the CPU the jobs wait for ``finish()``, after the last
backward (``overlap=False``): there the engine would take cores from torch's intra-op threads, whose barriers
spin (134M Llama, 2 cores, torch on both: 5.4-8.6 s against 2.3 s for backward alone), and even with a core free
(torch on 1 of 2) the overlap raised the peak resident memory by 55-80 MB for a 1.5% shorter run.
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

__all__ = [
    "ACCUMULATORS",
    "Accumulator",
    "DenseAccumulator",
    "GradientCapture",
    "SketchAccumulator",
    "Target",
    "WeightGradAccumulator",
    "engine_overlaps_backward",
]


@dataclass(eq=False)
class Target:
    """One LoRA layer to initialize: the layer, its base layer and weight, and the geometry of its G.

    ``weight`` is the base layer's weight Parameter as stored (for bitsandbytes a packed ``Params4bit`` or an
    ``Int8Params``); the shape of G comes from ``out_features``/``in_features``, never from the stored weight.
    """

    name: str
    layer: nn.Module
    weight: nn.Parameter
    fan_in_fan_out: bool
    r: int
    scaling: float
    out_dtype: torch.dtype  # of the engine's output buffers
    out_features: int = 0
    in_features: int = 0
    kind: str = "linear"  # initialize's _layer_kind: "linear", "bnb-4bit", "bnb-8bit"
    accumulator: Optional[Accumulator] = None
    job: Any = None
    stale_jobs: list = field(default_factory=list)
    out_b: Optional[torch.Tensor] = None
    out_a: Optional[torch.Tensor] = None
    submitted_at: float = 0.0

    def __post_init__(self) -> None:
        if not (self.out_features and self.in_features):  # a plain Linear or Conv1D: read the stored weight
            rows, cols = self.weight.shape
            self.out_features, self.in_features = (cols, rows) if self.fan_in_fan_out else (rows, cols)

    @property
    def base(self) -> nn.Module:
        return self.layer.get_base_layer()

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n) = (out, in)``: the shape of G after the Conv1D transpose."""
        return (self.out_features, self.in_features)

    @property
    def rank(self) -> int:
        """Rank written: ``min(r, m, n)``."""
        return min(self.r, *self.shape)


def engine_overlaps_backward(device: torch.device) -> bool:
    """Whether the engine should run while backward does: only when the model is on an accelerator, so
    that backward leaves the CPU to the engine (see the module docstring for what overlapping on the CPU
    cost)."""
    return device.type != "cpu"


# ---------------------------------------------------------------------------------------------------------
# host staging (accumulate_on="cpu")
# ---------------------------------------------------------------------------------------------------------


class _HostStager:
    """Adds device tensors into host tensors with asynchronous copies.

    ``add(dest, src)`` copies ``src`` (on an accelerator) into a pinned host buffer with ``non_blocking=True``,
    records a CUDA event, and adds the buffer into ``dest`` (host) once the copy is done: checked at every
    ``add``, forced for the oldest copy when more than ``depth`` are in flight, and for all by :meth:`flush`. So
    host additions overlap the device's work, and at most ``depth`` pinned buffers of each shape exist. ``src``
    may be freed by the caller right after ``add`` returns (its stream is recorded). Non-CUDA accelerators take
    the plain blocking path.
    """

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self._inflight: deque[tuple[torch.Tensor, Any, torch.Tensor]] = deque()
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self.pinned_bytes = 0

    def add(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type == "cpu":
            dest.add_(src)
            return
        if src.device.type != "cuda":
            dest.add_(src.to("cpu"))
            return
        key = (tuple(src.shape), src.dtype)
        pool = self._free.setdefault(key, [])
        if pool:
            buf = pool.pop()
        else:
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self.pinned_bytes += buf.numel() * buf.element_size()
        stream = torch.cuda.current_stream(src.device)
        src.record_stream(stream)  # the caller may free src: its memory is not reused before the copy ran
        buf.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        self._inflight.append((buf, event, dest))
        self._drain(block=len(self._inflight) > self.depth)

    def _drain(self, block: bool) -> None:
        while self._inflight:
            buf, event, dest = self._inflight[0]
            if not event.query():
                if not block:
                    return
                event.synchronize()
            self._inflight.popleft()
            dest.add_(buf)
            self._free[(tuple(buf.shape), buf.dtype)].append(buf)
            block = len(self._inflight) > self.depth

    def flush(self) -> None:
        """Complete every copy in flight (blocks)."""
        while self._inflight:
            buf, event, dest = self._inflight.popleft()
            event.synchronize()
            dest.add_(buf)
            self._free[(tuple(buf.shape), buf.dtype)].append(buf)

    def release(self) -> None:
        self.flush()
        self._free.clear()


# ---------------------------------------------------------------------------------------------------------
# accumulators: one per base weight, shared by the targets whose base weight it is (tied weights)
# ---------------------------------------------------------------------------------------------------------


class Accumulator(abc.ABC):
    """What one capture mode keeps of one base weight across the batches, and the engine job it makes of it.

    Class attributes:
        mode: The ``LoraOneConfig.capture`` value.
        source: What the context feeds :meth:`add`: ``"grad"`` (the weight's ``.grad`` after each backward,
            in the weight's own orientation) or ``"activations"`` (``add(x, delta)`` for every forward call of the
            base layer, x: T x in its input and delta: T x out the gradient of the loss with respect to its
            output, tokens flattened, in the model's dtype and on its device).

    Args:
        shape: ``(out, in)`` of G.
        dtype: Accumulation dtype (float32, or float64 for float64 models).
        device: Where the accumulator lives (``accumulate_on``: the model's device, or the CPU).
        stager: Moves device contributions into host accumulators (``accumulate_on="cpu"``).
    """

    mode: ClassVar[str]
    source: ClassVar[str]
    #: Whether the context may submit in the last batch's backward, as soon as the accumulator is final (when
    #: ``overlap``); else the submission waits for :meth:`GradientCapture.finish`.
    submit_in_backward: ClassVar[bool] = True
    #: Passes over the batches (a two-pass sketch replays them after :meth:`next_pass`).
    passes: int = 1

    def __init__(
        self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, stager: Optional[_HostStager]
    ) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.stager = stager
        self.targets: list[Target] = []
        self.contributions = 0  # add() calls
        self.pending = 0  # forward calls of the current batch still waiting for their delta ("activations")

    @abc.abstractmethod
    def add(self, *contribution: torch.Tensor) -> None:
        """Add one contribution (see :attr:`source`)."""

    @abc.abstractmethod
    def merge(self, group: Any = None) -> None:
        """Sum the accumulated state over the ranks of ``group`` (``torch.distributed``), in place, so that every
        rank holds the sum over all ranks' batches; the caller divides by the global batch count (the ``batches``
        of :meth:`submit`). A no-op when ``torch.distributed`` is not initialized."""

    @abc.abstractmethod
    def submit(self, engine: Any, batches: int, gamma: float, svd: dict[str, Any]) -> None:
        """Hand the engine its job: for every target, set ``t.job`` (a ``Job`` whose ``result()`` is the
        ``Factors``), ``t.out_b``/``t.out_a`` (the output buffers) and ``t.submitted_at``. ``batches`` is N of
        G = (1/N) sum."""

    @abc.abstractmethod
    def reopen(self, batches: int) -> None:
        """After :meth:`submit`, take more contributions (another backward in the last batch): the targets'
        jobs become stale and the state returns to the sum over ``batches`` batches."""

    @property
    @abc.abstractmethod
    def has_data(self) -> bool:
        """Whether any contribution arrived."""

    @property
    @abc.abstractmethod
    def submitted(self) -> bool:
        """Whether :meth:`submit` ran and no contribution came after it."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of the accumulated state (the sum, or the sketches), wherever it lives."""

    def clear(self) -> None:
        """Drop the accumulated state (after an error)."""

    def next_pass(self) -> None:
        """Between two passes over the same batches (only accumulators with ``passes == 2`` use it)."""


class _SumAccumulator(Accumulator):
    """The sum of the contributions as one dense matrix, averaged into G at submission (weight and dense)."""

    transposed: bool = False  # the sum is kept in (in, out) orientation (weight mode, Conv1D)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.total: Optional[torch.Tensor] = None  # running sum
        self.mean: Optional[torch.Tensor] = None  # G, on the host, once handed to the engine

    @property
    def has_data(self) -> bool:
        return self.total is not None or self.mean is not None

    @property
    def submitted(self) -> bool:
        return self.mean is not None

    @property
    def nbytes(self) -> int:
        if not self.has_data:
            return 0
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def _stored_shape(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    def _state(self) -> list[torch.Tensor]:
        """The sums that the ranks add up (as :meth:`SketchAccumulator._state`: a dense fallback inside a sketch
        capture is all-reduced like a sketch)."""
        return [self.total] if self.total is not None else []

    def _add_sum(self, contribution: torch.Tensor, owned: bool) -> None:
        """Add a contribution already in the stored orientation; ``owned``: it is a fresh temporary that may
        become the sum itself."""
        if self.total is None:
            if self.device.type == "cpu" and contribution.device.type != "cpu":
                self.total = torch.zeros(self._stored_shape(), dtype=self.dtype, device="cpu")
            elif owned and contribution.dtype == self.dtype and contribution.device == self.device:
                self.total = contribution
                return
            else:
                self.total = contribution.to(device=self.device, dtype=self.dtype, copy=True)
                return
        if self.total.device == contribution.device:
            self.total.add_(contribution)
        elif self.stager is not None and self.total.device.type == "cpu":
            self.stager.add(self.total, contribution)
        else:
            self.total.add_(contribution.to(self.total.device))

    def merge(self, group: Any = None, dst: Optional[int] = None) -> None:
        """As :meth:`Accumulator.merge`; with ``dst`` (a global rank) the sum is reduced to that rank only, and the
        other ranks drop theirs (``peft_loraone._distributed``: the owner of this weight decomposes G)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.stager is not None:
            self.stager.flush()
        if self.total is None:  # this rank saw no contribution: it still takes part in the collective
            self.total = torch.zeros(self._stored_shape(), dtype=self.dtype, device=self.device)
        if dst is None:
            dist.all_reduce(self.total, op=dist.ReduceOp.SUM, group=group)
            return
        rank = dist.get_rank()
        if dist.get_backend(group) != "gloo":
            dist.reduce(self.total, dst=dst, op=dist.ReduceOp.SUM, group=group)
        elif rank == dst:  # gloo's reduce moves more bytes than its all-reduce: direct sends, summed in rank order
            buf = torch.empty_like(self.total)
            for src in range(dist.get_world_size(group)):
                if src != dst:
                    dist.recv(buf, src=src, group=group)
                    self.total.add_(buf)
        else:
            dist.send(self.total, dst=dst, group=group)
        if rank != dst:
            self.total = None

    def submit(self, engine: Any, batches: int, gamma: float, svd: dict[str, Any]) -> None:
        if self.stager is not None and self.total is not None and self.total.device.type == "cpu":
            self.stager.flush()
        g = self.total.div_(batches)  # in place: G = mean over the batches
        self.total = None
        if g.device.type != "cpu":
            g = g.to("cpu")  # the engine reads host memory
        self.mean = g
        grad = g.t() if self.transposed else g  # (out, in); a view, no copy
        for t in self.targets:
            m, n = t.shape
            k = t.rank
            t.out_b = torch.empty((m, k), dtype=t.out_dtype)  # Shape: (out_features, rank)
            t.out_a = torch.empty((k, n), dtype=t.out_dtype)  # Shape: (rank, in_features)
            t.submitted_at = time.perf_counter()
            t.job = engine.submit_lora_one(grad, k, gamma=gamma, out_b=t.out_b, out_a=t.out_a, **svd)

    def reopen(self, batches: int) -> None:
        if self.mean is None:
            return
        self.total = (self.mean * batches).to(self.device)  # mean is a host copy
        self.mean = None
        for t in self.targets:
            if t.job is not None:
                t.stale_jobs.append(t.job)
            t.job = None

    def clear(self) -> None:
        self.total = self.mean = None


class WeightGradAccumulator(_SumAccumulator):
    """``"weight"`` mode: the sum of the weight's ``.grad`` over the backward passes (kept in the weight's own
    orientation, (in, out) for Conv1D, and transposed as a view at submission)."""

    mode = "weight"
    source = "grad"

    def __init__(self, *args: Any, transposed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transposed = transposed

    def add(self, grad: torch.Tensor) -> None:  # type: ignore[override]
        self.contributions += 1
        with torch.no_grad():
            self._add_sum(grad.detach(), owned=False)


class DenseAccumulator(_SumAccumulator):
    """``"dense"`` mode: G = (1/N) sum deltaᵀ x from the base layer's activations, (out, in) for Linear and
    Conv1D alike, on the activations' device.

    Each product deltaᵀ x runs in the activations' dtype, as autograd computes dL/dW (so a bfloat16 model gets
    the same G as in ``"weight"`` mode, and no float32 copies of x and delta are made), and is added into the
    float32 (float64) sum; in float32 and float64 it goes straight into the sum (``addmm_``, no temporary).
    """

    mode = "dense"
    source = "activations"

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> None:  # type: ignore[override]
        self.contributions += 1
        with torch.no_grad():
            # x: (tokens, in_features), delta: (tokens, out_features)
            if x.dtype != delta.dtype:  # autocast: the wider of the two
                dtype = torch.promote_types(x.dtype, delta.dtype)
                x, delta = x.to(dtype), delta.to(dtype)
            if self.total is not None and self.total.device == x.device and self.total.dtype == x.dtype:
                self.total.addmm_(delta.t(), x)  # no temporary: straight into the sum
            else:
                self._add_sum(delta.t() @ x, owned=True)


def _sketch_seed(seed: int, name: str, which: str) -> int:
    """A 63-bit seed for one test matrix of one module: the same on every rank and in every run."""
    digest = hashlib.blake2b(f"{seed}/{name}/{which}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _TestMatrices:
    """The sketches' Gaussian test matrices, drawn once per shape and shared by every sketch of that shape.

    A test matrix depends only on ``LoraOneConfig.seed``, its role (``"omega"``: [Omega, Omega_t]; ``"psi"``) and
    its shape, so it is the same on every rank and in every run, and every target of one shape (the 22 q_proj of
    a 22-layer Llama) uses the same one: each target's sketch only needs its own test matrix to be Gaussian and
    independent of its G, which a shared draw is. Held from the first draw until :meth:`clear` (the context
    clears it between the passes and at the end). Measured at 1.1B (TinyLlama's shape, r = 16, 154 targets,
    8 batches, one pass): 4 distinct matrices, 11 MiB, drawn 4 times instead of 2 x 154 x 8 (~9 s of normals on 1
    thread); per-module draws held for the run would have been 1.4x the sketches.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self.draws = 0  # matrices drawn (for tests and benchmarks)

    def get(self, seed: int, which: str, shape: tuple[int, int], dtype: torch.dtype, device: Any) -> torch.Tensor:
        dev = torch.device(device)
        key = (seed, which, tuple(shape), dtype, dev)
        mat = self._cache.get(key)
        if mat is None:
            mat = draw_test_matrix(seed, which, shape, dtype, dev)
            self._cache[key] = mat
            self.draws += 1
        return mat

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self._cache.values())

    def clear(self) -> None:
        self._cache.clear()


def draw_test_matrix(seed: int, which: str, shape: tuple[int, int], dtype: torch.dtype, device: Any) -> torch.Tensor:
    """The N(0, 1) test matrix ``which`` (``"omega"`` or ``"psi"``) of the given shape for ``seed``: a function of
    these alone (torch's generator on ``device``, seeded from them)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(_sketch_seed(seed, f"{shape[0]}x{shape[1]}", which))
    return torch.randn(tuple(shape), generator=gen, device=dev, dtype=dtype)


class SketchAccumulator(Accumulator):
    r"""``"sketch"`` mode: randomized sketches of G from the base layer's activations; G is never formed.

    The sketched matrix is ``H = G`` (m x n) when ``in <= out``, else ``H = G^T``, so that the wide row sketch
    (l = 2k + 1 rows) runs along the smaller dimension: H is p x q with p = max(m, n), q = min(m, n), and
    ``H = sum u_b^T v_b`` with (u, v) = (delta, x) for G and (x, delta) for G^T. Per forward call (tokens T), in
    float32 (float64 for float64 models; x and delta are upcast per batch):

    ======================  ===================================  =====================
    sketch                  accumulated as                       held
    ======================  ===================================  =====================
    Y = H Omega             u^T (v Omega)                        p x k
    Z = H Omega_t           u^T (v Omega_t)                      p x t (test vectors)
    W = Psi H (one pass)    (Psi u^T) v                          l x q
    X = Q^T H (two passes)  (u Q)^T v, second pass, Q = orth(Y)  k x q
    ======================  ===================================  =====================

    so ``nbytes`` = 4·(p·k + l·q + p·t) for one pass and 4·(p·k + k·q + p·t) for two (W is never allocated then).
    Omega (q x k), Omega_t (q x t) and Psi (l x p) are N(0, 1) test matrices drawn by torch on the activations'
    device from a seed made of ``LoraOneConfig.seed``, their role and their shape (identical on every rank, so the
    sketches add up over ranks exactly: :meth:`merge`). Inside :class:`GradientCapture` they are drawn **once per
    shape** and shared by every target of that shape (:class:`_TestMatrices`; each target's sketch only needs its
    own test matrix to be Gaussian and independent of its G). Per-module matrices would cost either a redraw at
    every contribution (at 1.1B, TinyLlama's shape, r = 16, 154 targets x 8 batches: ~9 s of normals on 1 thread,
    the sketch's whole time over dense) or, stored, q·(k+t) + l·p more values per target, 1.4x the sketches; shared,
    the 1.1B capture holds 4 matrices (11 MiB) drawn 4 times. A standalone accumulator (``draws=None``) draws them
    at every use and holds nothing.

    ``submit`` averages the sketches (1/N), reconstructs the factors in the Go engine
    (:func:`peft_loraone._sketch_engine.sketch_lora_one`: small, synchronous) and hands each target a finished job;
    the sums stay, so :meth:`reopen` only marks the jobs stale. The engine's error estimate (the estimated relative
    error of s·B·A against the exact init) becomes ``Factors.accuracy``.

    Args:
        size: ``LoraOneConfig.sketch_size`` (``"10r"``, ``"2r+1"`` or an integer k).
        rows: ``LoraOneConfig.sketch_rows`` (l; ``None``: 2k + 1).
        test_vectors: t.
        passes: 1 or 2; with 2 the caller replays the batches after :meth:`next_pass`.
        seed: ``LoraOneConfig.seed``.
    """

    mode = "sketch"
    source = "activations"
    submit_in_backward = False  # the reconstruction reads host copies: deferred to finish(), not run inside backward

    def __init__(
        self,
        *args: Any,
        size: Any = "10r",
        rows: Optional[int] = None,
        test_vectors: int = 10,
        passes: int = 1,
        seed: int = 0,
        draws: Optional[_TestMatrices] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.draws = draws  # the capture's shared test matrices; None: drawn at every use, not held
        if passes not in (1, 2):
            raise ValueError(f"sketch passes must be 1 or 2, got {passes!r}")
        self.size, self.rows, self.t, self.passes, self.seed = size, rows, int(test_vectors), int(passes), int(seed)
        m, n = self.shape
        self.transposed = n > m  # sketch H = G^T: the row sketch along the smaller dimension
        self.p, self.q = max(m, n), min(m, n)
        self.k = self.l = 0  # resolved at the first contribution, once every (tied) target is known
        self.phase = 1
        self.Y: Optional[torch.Tensor] = None  # p x k; Q = orth(Y) after next_pass()
        self.Z: Optional[torch.Tensor] = None  # p x t
        self.W: Optional[torch.Tensor] = None  # l x q (one pass)
        self.X: Optional[torch.Tensor] = None  # k x q (two passes)
        self._q_compute: Optional[torch.Tensor] = None  # Q on the activations' device (pass 2)
        self.rand_device: Optional[torch.device] = None  # where the test matrices are drawn
        self._submitted = False
        self._error: Optional[BaseException] = None  # ZeroGradientError from orthonormalizing an all-zero Y

    # -- sizes and test matrices ---------------------------------------------------------------------------

    def _resolve(self) -> None:
        if self.k:
            return
        from .config import sketch_dims

        rank = max((t.rank for t in self.targets), default=1)
        m, n = self.shape
        self.k, self.l = sketch_dims(self.size, self.rows, rank, m, n)
        self.name = self.targets[0].name if self.targets else ""

    def _draw(self, which: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        if self.draws is not None:
            return self.draws.get(self.seed, which, shape, self.dtype, device)
        return draw_test_matrix(self.seed, which, shape, self.dtype, device)

    def planned_nbytes(self) -> int:
        """What :attr:`nbytes` will be once contributions arrive (the sizes resolved from the targets now)."""
        self._resolve()
        second = self.l * self.q if self.passes == 1 else self.k * self.q
        return (self.p * (self.k + self.t) + second) * torch.empty((), dtype=self.dtype).element_size()

    def omega(self, device: torch.device) -> torch.Tensor:
        """[Omega, Omega_t] (q x (k + t)), the same values at every call."""
        return self._draw("omega", (self.q, self.k + self.t), device)

    def psi(self, device: torch.device) -> torch.Tensor:
        """Psi (l x p)."""
        return self._draw("psi", (self.l, self.p), device)

    def _ensure(self, device: torch.device) -> None:
        if self.Y is not None:
            return
        self._resolve()
        self.rand_device = torch.device(device)
        z = dict(dtype=self.dtype, device=self.device)
        self.Y = torch.zeros((self.p, self.k), **z)
        self.Z = torch.zeros((self.p, self.t), **z)
        if self.passes == 1:
            self.W = torch.zeros((self.l, self.q), **z)

    # -- accumulation --------------------------------------------------------------------------------------

    def _addmm(self, dest: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        if dest.device == a.device:
            dest.addmm_(a, b)
        elif self.stager is not None and dest.device.type == "cpu":
            self.stager.add(dest, a @ b)
        else:
            dest.add_((a @ b).to(dest.device))

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> None:  # type: ignore[override]
        self.contributions += 1
        with torch.no_grad():
            x, delta = x.to(self.dtype), delta.to(self.dtype)  # x: (tokens, in), delta: (tokens, out)
            u, v = (x, delta) if self.transposed else (delta, x)  # H = sum u^T v (p x q)
            if self.phase == 2:
                if self._q_compute is not None:
                    self._addmm(self.X, (u @ self._q_compute).t(), v)
                return
            self._ensure(x.device)
            k = self.k
            pv = v @ self.omega(x.device)  # (tokens, k + t)
            ut = u.t()
            self._addmm(self.Y, ut, pv[:, :k])
            self._addmm(self.Z, ut, pv[:, k:])
            if self.W is not None:
                self._addmm(self.W, self.psi(x.device) @ ut, v)

    def _state(self) -> list[torch.Tensor]:
        """The sums that the ranks add up in the current phase."""
        if self.phase == 2:
            return [self.X] if self.X is not None else []
        return [s for s in (self.Y, self.Z, self.W) if s is not None]

    def merge(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.stager is not None:
            self.stager.flush()
        if self.phase == 1 and self.Y is None and self.targets:  # no contribution here: it still takes part
            self._ensure(_weight_device(self.targets[0]))
        for s in self._state():
            dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)

    def next_pass(self) -> None:
        """End of pass 1 of a two-pass sketch: merge Y over the ranks, replace it by Q = orth(Y) (the engine's
        Householder QR, in place) and start X = Q^T H for the replayed batches."""
        from . import _sketch_engine
        from .errors import ZeroGradientError

        if self.passes != 2 or self.phase != 1:
            return
        self.merge()
        self.phase = 2
        if self.Y is None:
            return  # no contribution: nothing to refine (reported as "no gradient")
        if self.stager is not None:
            self.stager.flush()
        y = self.Y if self.Y.device.type == "cpu" else self.Y.to("cpu")
        try:
            _sketch_engine.orthonormalize(y)
        except ZeroGradientError as exc:
            self._error = exc
            return
        except Exception as exc:
            exc.add_note(f"peft_loraone: while orthonormalizing the sketch of {self.targets[0].name!r}")
            raise
        if y is not self.Y:
            self.Y.copy_(y)
        self._q_compute = self.Y.to(self.rand_device)
        self.X = torch.zeros((self.k, self.q), dtype=self.dtype, device=self.device)

    def submit(self, engine: Any, batches: int, gamma: float, svd: dict[str, Any]) -> None:
        import dataclasses

        from . import _sketch_engine
        from .errors import LoraOneError

        if self.stager is not None:
            self.stager.flush()
        self._submitted = True
        m, n = self.shape
        if self._error is None:
            cpu = torch.device("cpu")
            scale = 1.0 / batches
            z = (self.Z * scale).to(cpu)
            omega_t = self.omega(self.rand_device)[:, self.k :].to(cpu).contiguous()
            if self.passes == 2:
                y, w, psi = self.Y.to(cpu), (self.X * scale).to(cpu), None
            else:
                y, w, psi = (self.Y * scale).to(cpu), (self.W * scale).to(cpu), self.psi(self.rand_device).to(cpu)
        for t in self.targets:
            k = t.rank
            t.out_b = torch.empty((m, k), dtype=t.out_dtype)  # Shape: (out_features, rank)
            t.out_a = torch.empty((k, n), dtype=t.out_dtype)  # Shape: (rank, in_features)
            t.submitted_at = time.perf_counter()
            if self._error is not None:
                t.job = _sketch_engine.FinishedJob(error=self._error)
                continue
            # the engine's B (p x r) and A (r x q) are of H; for H = G^T they are A^T and B^T
            out_b, out_a = (t.out_a.t(), t.out_b.t()) if self.transposed else (t.out_b, t.out_a)
            try:
                f = _sketch_engine.sketch_lora_one(
                    y, w, z, omega_t, k, psi=psi, gamma=gamma, two_pass=self.passes == 2, out_b=out_b, out_a=out_a
                )
            except LoraOneError as exc:
                t.job = _sketch_engine.FinishedJob(error=exc)
            else:
                t.job = _sketch_engine.FinishedJob(dataclasses.replace(f, B=t.out_b, A=t.out_a))

    def reopen(self, batches: int) -> None:
        if not self._submitted:
            return
        self._submitted = False  # the sums were kept: more contributions add to them
        for t in self.targets:
            if t.job is not None:
                t.stale_jobs.append(t.job)
            t.job = None

    @property
    def has_data(self) -> bool:
        return self.Y is not None

    @property
    def submitted(self) -> bool:
        return self._submitted

    @property
    def nbytes(self) -> int:
        """Bytes of the sketches at their largest: Y (Q), Z, and W (one pass) or X (two passes); the test
        matrices are drawn again for each contribution, not held."""
        if not self.has_data:
            return 0
        return self.planned_nbytes()

    def clear(self) -> None:
        self.Y = self.Z = self.W = self.X = self._q_compute = None


#: The accumulator type of each capture mode.
ACCUMULATORS: dict[str, type[Accumulator]] = {
    "weight": WeightGradAccumulator,
    "dense": DenseAccumulator,
    "sketch": SketchAccumulator,
}


# ---------------------------------------------------------------------------------------------------------
# the context
# ---------------------------------------------------------------------------------------------------------


def _accumulation_dtype(t: Target) -> torch.dtype:
    w = t.weight
    return torch.float64 if isinstance(w, torch.Tensor) and w.dtype == torch.float64 else torch.float32


def _first_arg(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    for key in ("input", "x", "hidden_states"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


class GradientCapture:
    """Context manager around the forward/backward passes of :func:`peft_loraone.initialize`.

    Saves the model's state on entry and restores it on exit (also on error): train/eval modes, every
    ``requires_grad`` flag, the ``.grad`` of the target weights (weight mode), the enabled adapters; and removes
    every hook it installed. Inside, every adapter is disabled (G is the base model's gradient; the adapter being
    initialized has B = 0 anyway) and no parameter requires grad except, in weight mode, the target weights.

    Args:
        model: The module the batches run through (the PEFT model); its whole state is saved and restored.
        targets: The layers to initialize.
        gamma, svd: Engine settings (``LoraOneConfig.gamma`` and ``svd_settings()``).
        train_mode: Run in train mode (else eval).
        overlap: Submit each weight's G to the engine as soon as it is final in the last batch, while backward
            continues (see :func:`engine_overlaps_backward`); else every job starts in :meth:`finish`.
        mode: ``"weight"``, ``"dense"`` or ``"sketch"`` (:data:`ACCUMULATORS`).
        accumulate_on: ``"device"`` or ``"cpu"``.
        options: Extra keyword arguments of the mode's accumulator constructor (a sketch's sizes, passes and seed:
            ``LoraOneConfig.capture_options()``).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        *,
        gamma: float,
        svd: dict[str, Any],
        train_mode: bool,
        overlap: bool,
        mode: str,
        accumulate_on: str = "device",
        options: Optional[dict[str, Any]] = None,
    ):
        from . import engine  # the built Go extension; imported only when used

        if mode not in ACCUMULATORS:
            raise ValueError(f"Unknown capture mode {mode!r}; expected one of {sorted(ACCUMULATORS)}.")
        if accumulate_on not in ("device", "cpu"):
            raise ValueError(f"`accumulate_on` must be 'device' or 'cpu', got {accumulate_on!r}.")
        self._engine = engine
        self.model = model
        self.targets = targets
        self.gamma = gamma
        self.svd = svd
        self.train_mode = train_mode
        self.overlap = overlap and ACCUMULATORS[mode].submit_in_backward
        self.mode = mode
        self.accumulate_on = accumulate_on
        self.batches = 0  # batches started (in the first pass)
        self.last = False
        self.replaying = False  # in a second pass over the same batches (two-pass sketch)
        self.stager = _HostStager() if accumulate_on == "cpu" else None
        kind = ACCUMULATORS[mode]
        options = dict(options or {})
        dense_fallback = bool(options.pop("dense_fallback", False))
        #: The sketches' test matrices, one per shape, shared by the targets (see :class:`_TestMatrices`).
        self.test_matrices = _TestMatrices() if kind is SketchAccumulator else None
        if self.test_matrices is not None:
            options["draws"] = self.test_matrices
        self._accumulators: dict[int, Accumulator] = {}  # by id(base weight)
        for t in targets:
            acc = self._accumulators.get(id(t.weight))
            if acc is None:
                device = torch.device("cpu") if accumulate_on == "cpu" else _weight_device(t)
                extra = dict(options)
                if kind is WeightGradAccumulator:
                    extra["transposed"] = t.fan_in_fan_out
                acc = kind(t.shape, _accumulation_dtype(t), device, self.stager, **extra)
                self._accumulators[id(t.weight)] = acc
            acc.targets.append(t)
            t.accumulator = acc
        if dense_fallback:
            self._dense_where_sketch_is_larger()
        #: Passes over the batches that the accumulators need (2 for a two-pass sketch; see :meth:`begin_pass`).
        self.passes = max((acc.passes for acc in self._accumulators.values()), default=1)
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._saved_grads: list[tuple[nn.Parameter, Optional[torch.Tensor]]] = []
        self._saved_modes: list[tuple[nn.Module, bool]] = []
        self._saved_enabled: list[nn.Module] = []
        self._handles: list[Any] = []

    @property
    def accumulators(self) -> list[Accumulator]:
        return list(self._accumulators.values())

    def _dense_where_sketch_is_larger(self) -> None:
        """``sketch_dense_fallback``: a base weight whose sketches would hold at least the bytes of its dense G
        (narrow layers: k near min(out, in)) is captured dense instead: exact, and no larger."""
        for key, acc in list(self._accumulators.items()):
            if not isinstance(acc, SketchAccumulator):
                continue
            dense_bytes = acc.shape[0] * acc.shape[1] * torch.empty((), dtype=acc.dtype).element_size()
            if acc.planned_nbytes() < dense_bytes:
                continue
            dense = DenseAccumulator(acc.shape, acc.dtype, acc.device, acc.stager)
            dense.targets = acc.targets
            for t in dense.targets:
                t.accumulator = dense
            self._accumulators[key] = dense

    # -- state ------------------------------------------------------------------------------------------

    def __enter__(self) -> GradientCapture:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        try:
            self._saved_modes = [(m, m.training) for m in self.model.modules()]
            self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
            # G is the base model's gradient: every adapter off (the one being initialized has B = 0 anyway)
            for m in self.model.modules():
                if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not m.disable_adapters:
                    m.enable_adapters(False)
                    self._saved_enabled.append(m)
            for p, _ in self._saved_flags:
                p.requires_grad_(False)
            if ACCUMULATORS[self.mode].source == "grad":
                self._install_grad_hooks()
            else:
                self._install_activation_hooks()
            self.model.train(self.train_mode)
        except BaseException:
            self._restore()
            raise
        return self

    def _install_grad_hooks(self) -> None:
        weights = {id(t.weight): t.weight for t in self.targets}
        self._saved_grads = [(w, w.grad) for w in weights.values()]
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
            self._handles.append(w.register_post_accumulate_grad_hook(self._on_grad))

    def _install_activation_hooks(self) -> None:
        seen: set[int] = set()
        for t in self.targets:
            base = t.base
            if id(base) in seen:
                continue
            seen.add(id(base))
            acc = t.accumulator
            self._handles.append(base.register_forward_pre_hook(_input_requires_grad, with_kwargs=True))
            self._handles.append(base.register_forward_hook(self._activation_hook(acc), with_kwargs=True))

    def __exit__(self, *exc: Any) -> None:
        self._restore()
        if self.stager is not None:
            try:
                self.stager.release()
            except Exception:  # noqa: BLE001 - only on an error path already propagating
                if exc[0] is None:
                    raise
        if exc[0] is not None:
            self.cancel()

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in reversed(self._saved_enabled):
            m.enable_adapters(True)
        self._saved_enabled.clear()
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        for p, grad in self._saved_grads:
            p.grad = grad
        for m, mode in self._saved_modes:
            m.training = mode
        self._saved_flags, self._saved_grads, self._saved_modes = [], [], []

    # -- batches ----------------------------------------------------------------------------------------

    def begin_batch(self, last: bool) -> None:
        """Call before each batch's forward/backward; ``last`` marks the final one (of the last pass)."""
        if not self.replaying:
            self.batches += 1
        self.last = last
        for acc in self._accumulators.values():
            acc.pending = 0

    def begin_pass(self) -> None:
        """Call between the passes of a two-pass capture (:attr:`passes` == 2), before replaying the same batches
        in the same order: each accumulator turns what pass 1 gave into what pass 2 refines (a sketch's
        Q = orth(Y)); the batch count stays pass 1's."""
        for acc in self._accumulators.values():
            acc.next_pass()
        if self.test_matrices is not None:
            self.test_matrices.clear()  # pass 2 multiplies by Q only
        self.replaying = True

    def _on_grad(self, weight: torch.Tensor) -> None:
        grad = weight.grad
        if grad is None:
            return
        acc = self._accumulators[id(weight)]
        acc.reopen(self.batches)  # another backward in the last batch after G was handed over
        acc.add(grad)
        weight.grad = None
        if self.last and self.overlap:
            acc.submit(self._engine, self.batches, self.gamma, self.svd)

    def _activation_hook(self, acc: Accumulator):
        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            if self.replaying and acc.passes < 2:
                return  # a one-pass accumulator (dense fallback) in the replay: it has every batch already
            x = _first_arg(args, kwargs)
            if x is None:
                return
            held = [x.detach(), x._version]  # released as soon as the delta arrived
            acc.pending += 1

            def on_delta(delta: torch.Tensor) -> None:
                x_, version = held
                if x_ is None:
                    return  # a second backward through the same graph (retain_graph): already counted
                held[0] = None
                if x_._version != version:
                    raise RuntimeError(
                        f"peft_loraone: the input of {acc.targets[0].name!r} was modified in place after its forward "
                        "pass, so G cannot be taken from it (autograd could not differentiate its weight either, nor "
                        "train a LoRA adapter on it): make that in-place operation out of place."
                    )
                if x_.device != delta.device:  # the input moved by a forward wrapper (accelerate's device maps)
                    x_ = x_.to(delta.device)
                acc.reopen(self.batches)
                acc.add(x_.reshape(-1, x_.shape[-1]), delta.reshape(-1, delta.shape[-1]))
                acc.pending = max(acc.pending - 1, 0)
                if self.last and self.overlap and acc.pending == 0:
                    acc.submit(self._engine, self.batches, self.gamma, self.svd)

            output.register_hook(on_delta)

        return on_forward

    def finish(self) -> list[Target]:
        """Hand over every accumulator not yet submitted; returns the targets that never received a
        contribution."""
        missing = []
        for acc in self._accumulators.values():
            if acc.submitted:
                continue
            if acc.has_data:
                acc.submit(self._engine, self.batches, self.gamma, self.svd)
            else:
                missing.extend(acc.targets)
        if self.test_matrices is not None:
            self.test_matrices.clear()
        return missing

    def cancel(self) -> None:
        """Cancel, wait for and drop every job; used on error so no engine work outlives the call.

        Every job is asked to stop first (the engine checks between passes), then each is waited for, so an
        error during the batches does not wait for the SVDs already queued to run to their end."""
        for acc in self._accumulators.values():
            acc.clear()
        jobs = [job for t in self.targets for job in (*t.stale_jobs, t.job) if job is not None]
        for stop in ("cancel", "result"):  # ask every job to stop, then wait for each
            for job in jobs:
                try:
                    getattr(job, stop)()
                except Exception:  # noqa: BLE001 - the first error is already propagating
                    pass
        for t in self.targets:
            t.job, t.stale_jobs = None, []

    def drain_stale(self) -> None:
        for t in self.targets:
            for job in t.stale_jobs:
                try:
                    job.result()
                except Exception:  # noqa: BLE001 - superseded by a newer job
                    pass
            t.stale_jobs = []


def _weight_device(t: Target) -> torch.device:
    w = t.weight
    return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")


def _input_requires_grad(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
    """Forward pre-hook of a base layer in an activation mode: when its input does not require grad (no weight
    does, so the first targets see such inputs), pass a leaf copy that does, so that its output, and the loss,
    join the graph and the output's gradient (delta) is computed."""
    if not torch.is_grad_enabled():
        return None
    if args:
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            return (_grad_leaf(x), *args[1:]), kwargs
        return None
    for key in ("input", "x", "hidden_states"):
        x = kwargs.get(key)
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and not x.requires_grad:
                return args, {**kwargs, key: _grad_leaf(x)}
            return None
    return None


def _grad_leaf(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a leaf that requires grad (same storage); its ``.grad`` (nobody's business) is dropped as soon as
    backward wrote it, so it does not stay allocated until the graph is freed."""
    leaf = x.detach().requires_grad_(True)
    leaf.register_post_accumulate_grad_hook(_drop_grad)
    return leaf


def _drop_grad(leaf: torch.Tensor) -> None:
    leaf.grad = None
