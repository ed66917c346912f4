"""What :func:`peft_loraone.initialize` did, module by module, and the provenance file it leaves."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["PROVENANCE_FILE", "InitReport", "ModuleReport", "SkippedModule"]

#: Name of the side file written next to a saved adapter (``adapter_config.json``'s neighbour).
PROVENANCE_FILE = "loraone_provenance.json"


@dataclass(frozen=True)
class ModuleReport:
    """One LoRA layer initialized by LoRA-One.

    Attributes:
        name: Module name inside the PEFT model (``base_model.model.``... prefix removed).
        shape: ``(out, in)`` of the weight, i.e. of G after the Conv1D transpose.
        rank: Rank written (``min(r, out, in)``); ``r`` is the layer's LoRA rank.
        r: The layer's LoRA rank.
        scaling: The layer's LoRA scaling ``s`` (rsLoRA and patterns included).
        sigma1: Largest singular value of G (``"sketch"``: of its reconstruction).
        accuracy: The engine's accuracy estimate of the rank-``rank`` truncation. With ``capture="sketch"``: the
            engine's estimate (from its test vectors) of the relative error of ``s·B·A`` against the exact LoRA-One
            init from G, which the sketch never formed.
        passes: Passes the randomized SVD made over G; with ``capture="sketch"``, passes over the batches (1 or 2).
        converged: Whether the engine met its tolerance (always True for a sketch: nothing iterates).
        seconds: Latency: wall time from handing G to the engine (during the last backward pass) until its
            factors were collected; jobs run concurrently, so these overlap and do not add up.
        capture: The capture mode that produced G (``LoraOneConfig.capture``: ``"dense"``, ``"weight"`` or
            ``"sketch"``).
        accumulator_bytes: Bytes the module's accumulator held during the passes (its float32/float64 sum of G, or
            its sketches at their largest: Y, Z and W, or Y, Z and X with two passes); modules sharing one base
            weight (tied) share one accumulator and each reports it.
        accumulated_on: Device of that accumulator (``"cpu"`` with ``accumulate_on="cpu"``).
        residual: ``"sketch"`` only (else ``None``): the estimated ``||G - [G^]_r||_F / ||G||_F``, which includes
            G's own tail beyond rank r (what no rank-r init captures).
        sketch_size: ``"sketch"`` only: the sketch size k used for the module.
        ambiguous: True when sigma_r and sigma_(r+1) of G were too close for the rank-``rank`` truncation to be
            unique at the engine's tolerance (``Factors.ambiguous``): ``accuracy`` is then no guarantee of closeness to
            one exact truncation (any choice inside the cluster is as good); ``residual_excess`` is the error that
            stays true.
        gap_ratio: sigma_(r+1) / sigma_r as the engine saw it (0 when unknown).
        residual_excess: Upper bound of ``||G - X||_F / ||G - G_r||_F - 1`` (computed when ``ambiguous``; else None).
    """

    name: str
    shape: tuple[int, int]
    rank: int
    r: int
    scaling: float
    sigma1: float
    accuracy: float
    passes: int
    converged: bool
    seconds: float
    capture: str = "weight"
    accumulator_bytes: int = 0
    accumulated_on: str = "cpu"
    residual: Optional[float] = None
    sketch_size: Optional[int] = None
    ambiguous: bool = False
    gap_ratio: float = 0.0
    residual_excess: Optional[float] = None


@dataclass(frozen=True)
class SkippedModule:
    """A LoRA layer of the adapter left at PEFT's default init (B = 0), and why."""

    name: str
    layer_type: str
    reason: str


@dataclass
class InitReport:
    """Returned by :func:`peft_loraone.initialize`; ``str(report)`` is a summary table.

    Attributes:
        adapter_name: The adapter that was initialized.
        modules: Initialized layers, in model order.
        skipped: Layers kept at the default init (unsupported type, zero gradient, ...).
        batches: Batches (or ``train_step`` calls) the gradient was averaged over.
        samples: Examples in those batches, when it could be read off the batches (else ``None``).
        config: ``LoraOneConfig.to_dict()`` of the run.
        capture_seconds: Forward/backward time.
        total_seconds: Time of the whole call.
        versions: Versions of peft_loraone, peft and torch.
        accumulator_bytes: Bytes held by all accumulators together during the passes (a shared one counted once;
            with ``accumulate_on="cpu"`` on an accelerator, the pinned staging buffers come on top).
        world_size: Ranks of ``torch.distributed`` that computed G together (1: a single process); ``batches`` and
            ``samples`` then count all ranks' batches.
        rank: This process's rank.
        sent_bytes, received_bytes: Bytes this rank sent and received in LoRA-One's collectives (sketches or
            gradients, factors, the agreement step; textbook volumes of ring all-reduce, reduce and broadcast,
            see ``peft_loraone._distributed``); 0 for a single process.
        cache: The gradient cache (``LoraOneConfig.cache_dir``), else ``None``: ``{"used": bool, "path": str,
            "reason": str, "seconds": float, "bytes": int, "written": bool}``; ``used`` says whether G was read
            from the cache instead of running the batches, ``reason`` why or why not (a mismatch or a damaged file
            names what differed), ``written`` whether this call wrote the file.
    """

    adapter_name: str
    modules: list[ModuleReport] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    batches: int = 0
    samples: Optional[int] = None
    config: dict[str, Any] = field(default_factory=dict)
    capture_seconds: float = 0.0
    total_seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    accumulator_bytes: int = 0
    world_size: int = 1
    rank: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    cache: Optional[dict[str, Any]] = None

    def __getitem__(self, name: str) -> ModuleReport:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable provenance: what the saved adapter is and how it was made."""
        return {
            "init": "loraone",
            "paper": "https://arxiv.org/abs/2502.01235",
            "formula": "B·A = [-G]_r / (gamma·sigma1); G = mean gradient of the loss w.r.t. W0 over the batches",
            "adapter_name": self.adapter_name,
            "gamma": self.config.get("gamma"),
            "batches": self.batches,
            "samples": self.samples,
            "svd": {k: self.config.get(k) for k in ("oversampling", "power_iters", "tol", "seed", "algorithm")},
            "config": self.config,
            "versions": self.versions,
            "modules": [asdict(m) for m in self.modules],
            "skipped": [asdict(s) for s in self.skipped],
            "capture": self.config.get("capture"),
            "accumulate_on": self.config.get("accumulate_on"),
            "accumulator_bytes": self.accumulator_bytes,
            "capture_seconds": self.capture_seconds,
            "total_seconds": self.total_seconds,
            "world_size": self.world_size,
            "rank": self.rank,
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "cache": self.cache,
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write :data:`PROVENANCE_FILE` into ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PROVENANCE_FILE)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        return path

    def __str__(self) -> str:
        modes = sorted({m.capture for m in self.modules})
        sketched = "sketch" in modes
        accuracy = "est. error" if modes == ["sketch"] else "accuracy"
        header = ("module", "shape", "rank", "scaling", "sigma1", accuracy, "passes", "latency", "held")
        if sketched:
            header += ("k",)
        if len(modes) > 1:
            header += ("capture",)
        rows = [
            (
                m.name,
                f"{m.shape[0]}x{m.shape[1]}",
                str(m.rank) if m.rank == m.r else f"{m.rank}/{m.r}",
                f"{m.scaling:.4g}",
                f"{m.sigma1:.4e}",
                f"{m.accuracy:.2e}" + ("" if m.converged else "*") + ("~" if m.ambiguous else ""),
                str(m.passes),
                f"{m.seconds * 1e3:.0f} ms",
                _bytes(m.accumulator_bytes),
            )
            + ((str(m.sketch_size) if m.sketch_size else "-",) if sketched else ())
            + ((m.capture,) if len(modes) > 1 else ())
            for m in self.modules
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        right = {2, 3, 4, 5, 6, 7, 8, 9} if sketched else {2, 3, 4, 5, 6, 7, 8}

        def fmt(cells: tuple[str, ...]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        gamma = self.config.get("gamma")
        samples = f", {self.samples} samples" if self.samples is not None else ""
        lines = [
            f"LoRA-One init of adapter {self.adapter_name!r}: {len(self.modules)} modules initialized, "
            f"{len(self.skipped)} kept at default init; gamma={gamma}, {self.batches} batches{samples}; "
            f"gradient {self.capture_seconds:.2f} s, total {self.total_seconds:.2f} s",
            f"capture {'/'.join(modes) or self.config.get('capture', '?')}: "
            f"{'sketches of G' if modes == ['sketch'] else 'G'} accumulated on "
            f"{'/'.join(sorted({m.accumulated_on for m in self.modules})) or '-'}, "
            f"{_bytes(self.accumulator_bytes)} held in all",
        ]
        if self.world_size > 1:
            lines.append(
                f"torch.distributed: {self.world_size} ranks; rank {self.rank} sent {_bytes(self.sent_bytes)}, "
                f"received {_bytes(self.received_bytes)}"
            )
        if self.cache is not None:
            c = self.cache
            lines.append(
                f"gradient cache: {'read' if c.get('used') else ('written' if c.get('written') else 'not used')} "
                f"({c.get('reason', '')}) {c.get('path', '')}"
            )
        lines += [fmt(header), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows]
        if sketched:
            estimates = sorted(m.accuracy for m in self.modules if m.capture == "sketch")
            lines.append(
                f"{accuracy if modes == ['sketch'] else 'accuracy of sketch modules'}: the engine's estimate of the "
                "relative error of s·B·A against the exact LoRA-One init (G was sketched, never formed); median "
                f"{estimates[len(estimates) // 2]:.2e}, max {estimates[-1]:.2e}"
            )
        if any(not m.converged for m in self.modules):
            lines.append("* the randomized SVD stopped at its iteration limit before reaching its tolerance")
        ambiguous = [m for m in self.modules if m.ambiguous]
        if ambiguous:
            worst = max((m.residual_excess for m in ambiguous if m.residual_excess is not None), default=None)
            lines.append(
                f"~ rank-r truncation not unique ({len(ambiguous)} modules): sigma_r and sigma_(r+1) are closer than the "
                "tolerance resolves (sigma_(r+1)/sigma_r up to "
                f"{max(m.gap_ratio for m in ambiguous):.6f}); any rank-r choice inside the cluster is as good; "
                "residual ||G - X|| / ||G - G_r|| - 1 <= "
                + (f"{worst:.2e}" if worst is not None else "?")
            )
        if self.skipped:
            lines.append("kept at PEFT's default init (B = 0):")
            lines += [f"  {s.name} ({s.layer_type}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _bytes(n: int) -> str:
    """``1.5 MiB``-style size."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
