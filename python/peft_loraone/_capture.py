"""Gradient capture for LoRA-One: the one-step full gradient G of each target base weight.

Only the target base weights require grad while the batches run; a ``post_accumulate_grad_hook`` on each
moves its gradient out of ``.grad`` into a float32 (float64 for float64 weights) accumulator as soon as
backward produced it, so peak memory is the model, the activations and one float32 copy of the target
gradients. In the last batch each weight's accumulator is final the moment its hook fires: it is averaged

    G = (1/N) * sum_i dL_i/dW        (N batches)

and handed to the engine (``submit_lora_one``) right away, so the SVDs run in Go's worker pool while
backward continues through the earlier layers, when the model runs on an accelerator. On the CPU the jobs
wait for ``finish()``, after the last backward (``overlap=False``): there the engine would take cores from
torch's intra-op threads, whose barriers spin (134M Llama, 2 cores, torch on both: 5.4-8.6 s against 2.3 s
for backward alone), and even with a core free (torch on 1 of 2) the overlap raised the peak resident
memory by 55-80 MB for a 1.5% shorter run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["GradientCapture", "Target", "engine_overlaps_backward"]


@dataclass(eq=False)
class Target:
    """One LoRA layer to initialize: the layer, its base weight and the geometry of its G."""

    name: str
    layer: nn.Module
    weight: nn.Parameter
    fan_in_fan_out: bool
    r: int
    scaling: float
    out_dtype: torch.dtype  # of the engine's output buffers
    job: Any = None
    stale_jobs: list = field(default_factory=list)
    out_b: Optional[torch.Tensor] = None
    out_a: Optional[torch.Tensor] = None
    submitted_at: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n) = (out, in)``: the shape of G after the Conv1D transpose."""
        rows, cols = self.weight.shape
        return (cols, rows) if self.fan_in_fan_out else (rows, cols)

    @property
    def rank(self) -> int:
        """Rank written: ``min(r, m, n)``."""
        return min(self.r, *self.shape)


class _Slot:
    """Accumulator of one base weight (shared by the targets whose base weight it is)."""

    __slots__ = ("targets", "total", "mean", "batches_seen")

    def __init__(self) -> None:
        self.targets: list[Target] = []
        self.total: Optional[torch.Tensor] = None  # running sum of the gradients
        self.mean: Optional[torch.Tensor] = None  # G, once handed to the engine
        self.batches_seen = 0


def engine_overlaps_backward(device: torch.device) -> bool:
    """Whether the engine should run while backward does: only when the model is on an accelerator, so
    that backward leaves the CPU to the engine (see the module docstring for what overlapping on the CPU
    cost)."""
    return device.type != "cpu"


class GradientCapture:
    """Context manager around the forward/backward passes of :func:`peft_loraone.initialize`.

    Args:
        model: The module the batches run through (the PEFT model); its whole state is saved and restored.
        targets: The layers to initialize.
        gamma, svd: Engine settings (``LoraOneConfig.gamma`` and ``svd_settings()``).
        train_mode: Run in train mode (else eval).
        overlap: Submit each weight's G to the engine from its hook in the last batch, while backward
            continues (see :func:`engine_overlaps_backward`); else every job starts in :meth:`finish`.
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
    ):
        from . import engine  # the built Go extension; imported only when used

        self._engine = engine
        self.model = model
        self.targets = targets
        self.gamma = gamma
        self.svd = svd
        self.train_mode = train_mode
        self.overlap = overlap
        self.batches = 0  # batches started
        self.last = False
        self._slots: dict[int, _Slot] = {}
        for t in targets:
            self._slots.setdefault(id(t.weight), _Slot()).targets.append(t)
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._saved_grads: list[tuple[nn.Parameter, Optional[torch.Tensor]]] = []
        self._saved_modes: list[tuple[nn.Module, bool]] = []
        self._saved_enabled: list[nn.Module] = []
        self._handles: list[Any] = []

    # -- state ------------------------------------------------------------------------------------------

    def __enter__(self) -> GradientCapture:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        try:
            self._saved_modes = [(m, m.training) for m in self.model.modules()]
            self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
            weights = {id(t.weight): t.weight for t in self.targets}
            self._saved_grads = [(w, w.grad) for w in weights.values()]
            # G is the base model's gradient: every adapter off (the one being initialized has B = 0 anyway)
            for m in self.model.modules():
                if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not m.disable_adapters:
                    m.enable_adapters(False)
                    self._saved_enabled.append(m)
            for p, _ in self._saved_flags:
                p.requires_grad_(False)
            for w in weights.values():
                w.grad = None
                w.requires_grad_(True)
                self._handles.append(w.register_post_accumulate_grad_hook(self._on_grad))
            self.model.train(self.train_mode)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()
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
        """Call before each batch's forward/backward; ``last`` marks the final one."""
        self.batches += 1
        self.last = last

    def _on_grad(self, weight: torch.Tensor) -> None:
        grad = weight.grad
        if grad is None:
            return
        slot = self._slots[id(weight)]
        with torch.no_grad():
            if slot.mean is not None:
                # another backward in the last batch after G was handed over: start again from the sum
                slot.total = (slot.mean * self.batches).to(grad.device)  # mean may be a host copy
                slot.mean = None
                for t in slot.targets:
                    t.stale_jobs.append(t.job)
                    t.job = None
            if slot.total is None:
                dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
                slot.total = grad.detach().to(dtype=dtype, copy=True)
            else:
                slot.total.add_(grad)
        weight.grad = None
        slot.batches_seen += 1
        if self.last and self.overlap:
            self._submit(slot)

    def _submit(self, slot: _Slot) -> None:
        g = slot.total.div_(self.batches)  # in place: G = mean over the batches
        slot.total = None
        if g.device.type != "cpu":
            g = g.to("cpu")  # the engine reads host memory
        slot.mean = g
        for t in slot.targets:
            m, n = t.shape
            k = t.rank
            # G is (out, in); Conv1D stores W as (in, out), so its gradient is transposed (a view, no copy)
            grad = g.t() if t.fan_in_fan_out else g
            t.out_b = torch.empty((m, k), dtype=t.out_dtype)  # Shape: (out_features, rank)
            t.out_a = torch.empty((k, n), dtype=t.out_dtype)  # Shape: (rank, in_features)
            t.submitted_at = time.perf_counter()
            t.job = self._engine.submit_lora_one(grad, k, gamma=self.gamma, out_b=t.out_b, out_a=t.out_a, **self.svd)

    def finish(self) -> list[Target]:
        """Hand over every weight not yet submitted (no gradient in the last batch); returns the targets
        that never received a gradient."""
        missing = []
        for slot in self._slots.values():
            if slot.mean is None and slot.total is not None:
                self._submit(slot)
            elif slot.mean is None:
                missing.extend(slot.targets)
        return missing

    def cancel(self) -> None:
        """Wait for (and drop) every job; used on error so no engine work outlives the call."""
        for slot in self._slots.values():
            slot.total = slot.mean = None
        for t in self.targets:
            for job in [*t.stale_jobs, t.job]:
                if job is not None:
                    try:
                        job.result()
                    except Exception:  # noqa: BLE001 - the first error is already propagating
                        pass
            t.job, t.stale_jobs = None, []

    def drain_stale(self) -> None:
        for t in self.targets:
            for job in t.stale_jobs:
                try:
                    job.result()
                except Exception:  # noqa: BLE001 - superseded by a newer job
                    pass
            t.stale_jobs = []
