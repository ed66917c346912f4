r"""The gradient cache: capture G once, re-initialize for any rank, gamma, seed or SVD tolerance without a new
gradient pass (``LoraOneConfig(cache_dir=...)``).

The expensive part of LoRA-One on a real model is the gradient pass, not the SVDs. After the pass,
:func:`peft_loraone.initialize` writes what the capture accumulated, per base weight, to one cache file:

- ``"weight"``/``"dense"`` capture: the float32 (float64) mean G, in the accumulator's orientation (``(in, out)`` for
  a Conv1D in ``"weight"`` mode), optionally stored as bfloat16 (``cache_dtype``);
- ``"sketch"`` capture: the sketch sums Y (Q after the first pass of a two-pass sketch), Z and W (or X) with the sizes
  k, l, t; the test matrices are not stored, they are drawn again from the seed and the module name.

The file is ``<cache_dir>/loraone-<key>.safetensors.zst``: a standard safetensors file inside a standard zstd frame
(``zstd -d`` gives a file the ``safetensors`` package opens), written and read by the Go engine (package gradcache,
through ``bridge.CacheWriter``/``bridge.CacheReader``) straight from and into the tensors' memory, with the GIL
released, atomically (temporary file, fsync, rename) and with a CRC-32C per tensor. Its ``__metadata__`` carries the
cache key's parts.

The key (a SHA-256, its first 20 hex digits name the file) is made of five parts, each stored in the file so that a
mismatch can say what differed:

``model``
    The module structure: the model's class and every parameter's name, shape and dtype, LoRA parameters left out
    (so another ``r`` is the same model).
``weights``
    A cheap fingerprint of the weights: 4096 evenly spaced elements of every target base weight (its stored bytes:
    packed for a quantized base) and 16 of every other non-LoRA parameter.
``targets``
    The targets: name, ``(out, in)``, layer kind and ``fan_in_fan_out``.
``data``
    A BLAKE2b hash of the batches: every tensor's dtype, shape and bytes, the nesting and keys around them. The first
    ``num_batches`` batches are drawn from ``data`` once, up front (they are then run from that list, so the data is
    consumed once and never twice, and a two-pass sketch replays the same list); only token ids and the like are
    held, not activations. A ``train_step`` callable cannot be hashed: ``LoraOneConfig.cache_key`` names its data.
``capture``
    ``capture``, ``train_mode``, ``loss_fn``'s qualified name, ``cache_dtype``, the model's device type, and for
    ``"sketch"`` the sketch options (size, rows, test vectors, passes, seed, dense fallback).

Rank, gamma, seed (outside a sketch) and the SVD settings are not in the key: changing them costs only the SVDs. A
sketch supports any rank up to its cached size k (a larger rank recomputes, saying so); note that a sketch read back
for a new rank keeps its cached k, so it is not the init a fresh pass with the size rule ``"10r"`` would give at that
rank.

Not cached: runs under ``torch.distributed`` (each rank would need the same file; reported as the reason). A damaged
file (empty, truncated, bit-flipped, another format version) is reported and recomputed, and the new pass overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import LoraOneError

logger = logging.getLogger(__name__)

__all__ = ["CacheError", "GradientCache", "read_file", "read_header", "write_file"]

#: Version of the key and of the metadata layout this module writes (the Go package has its own file format version).
KEY_VERSION = "1"
FILE_PREFIX = "loraone-"
FILE_SUFFIX = ".safetensors.zst"
_KEY_PARTS = ("model", "weights", "targets", "data", "capture")
_PART_NAMES = {
    "model": "the model's structure",
    "weights": "the model's weights",
    "targets": "the target modules",
    "data": "the data",
    "capture": "the capture settings",
}


class CacheError(LoraOneError, ValueError):
    """A gradient cache file that cannot be used: empty, truncated, corrupted, foreign or of another version."""


# ---------------------------------------------------------------------------------------------------------
# files: the engine's CacheWriter / CacheReader over DLPack descriptors of the tensors' own memory
# ---------------------------------------------------------------------------------------------------------


def _borrow(t: torch.Tensor, name: str) -> Any:
    from ._dlpack import describe_memory
    from .engine import _torch_dlpack_dtype

    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"peft_loraone cache: {name} must be a contiguous CPU tensor")
    code = _torch_dlpack_dtype(t.dtype)
    return describe_memory(t, t.data_ptr(), tuple(t.shape), tuple(t.stride()), code)


def _call(fn: Any, *args: Any) -> Any:
    from . import _native

    _native.check_fork()
    try:
        return fn(*args)
    except RuntimeError as exc:
        msg = str(exc)
        if msg.startswith("cache-invalid: "):
            raise CacheError(f"peft_loraone: {msg[len('cache-invalid: '):]}") from None
        _native.raise_engine_error(exc)


def write_file(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    *,
    bfloat16: tuple[str, ...] = (),
    level: int = 1,
) -> None:
    """Write ``tensors`` (contiguous CPU float tensors) and ``meta`` to ``path`` through the Go engine, atomically.

    The tensors are compressed straight from their memory (no copy) with the GIL released; the names in ``bfloat16``
    (float32 tensors) are stored as bfloat16.
    """
    from . import _native

    mod = _native.bridge()
    w = mod.NewCacheWriter(os.fspath(path), json.dumps(dict(meta)), int(level))
    keep = []
    for name, t in tensors.items():
        b = _borrow(t, name)
        keep.append(b)
        _call(w.Add, name, b.address, b.versioned, name in bfloat16)
    _call(w.Commit)
    del keep


def read_header(path: str) -> dict[str, Any]:
    """The header of the cache file at ``path``: ``{"meta": {...}, "tensors": [{"name", "dtype", "shape"}]}``.

    Raises:
        CacheError: the file is empty, not zstd, not a gradient cache, of another version, or its header is damaged.
    """
    from . import _native

    r = _native.bridge().NewCacheReader(os.fspath(path))
    try:
        return json.loads(_call(r.Header))
    finally:
        _call(r.Close)


_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.float32}


def read_file(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read every tensor of the cache file at ``path`` into new CPU tensors (bfloat16 ones widened to float32):
    ``(metadata, tensors)``. Each tensor is decompressed straight into its final memory, checksum verified.

    Raises:
        CacheError: the file is damaged (truncated, a checksum mismatch, bytes after the data, ...).
    """
    from . import _native

    r = _native.bridge().NewCacheReader(os.fspath(path))
    try:
        header = json.loads(_call(r.Header))
        out: dict[str, torch.Tensor] = {}
        keep = []
        for t in header["tensors"]:
            dtype = _DTYPES.get(t["dtype"])
            if dtype is None:
                raise CacheError(f"peft_loraone: {path}: tensor {t['name']!r} has dtype {t['dtype']}: not a cache")
            dst = torch.empty(t["shape"], dtype=dtype)
            b = _borrow(dst, t["name"])
            keep.append(b)
            _call(r.Into, t["name"], b.address, b.versioned)
            out[t["name"]] = dst
        _call(r.Read)
        del keep
        return header["meta"], out
    finally:
        _call(r.Close)


# ---------------------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _sample_bytes(t: Any, count: int) -> bytes:
    """``count`` evenly spaced elements of tensor ``t`` (its stored bytes), for a fingerprint."""
    try:
        flat = t.detach().reshape(-1)
        if flat.numel() == 0 or flat.is_meta:
            return b""
        step = max(1, flat.numel() // count)
        sample = flat[::step][:count].to("cpu").contiguous()
        return sample.view(torch.uint8).numpy().tobytes()
    except Exception:  # noqa: BLE001 - a tensor subclass without plain storage: shape and dtype only
        return repr((tuple(getattr(t, "shape", ())), str(getattr(t, "dtype", "")))).encode()


def model_parts(model: torch.nn.Module, targets: list[Any]) -> dict[str, str]:
    """The ``model``, ``weights`` and ``targets`` parts of the key."""
    params = [
        (n.replace(".base_layer.", "."), p)  # the name without PEFT's wrapper: other targets, the same model
        for n, p in model.named_parameters(remove_duplicate=False)
        if not any(part.startswith("lora_") for part in n.split("."))  # another r: the same model
    ]
    structure = [type(model).__name__] + [(n, tuple(p.shape), str(p.dtype)) for n, p in params]
    h = hashlib.blake2b(digest_size=32)
    target_ids = {id(t.weight) for t in targets}
    for t in targets:
        h.update(t.name.encode())
        h.update(_sample_bytes(t.weight, 4096))
    for n, p in params:
        if id(p) not in target_ids:
            h.update(n.encode())
            h.update(_sample_bytes(p, 16))
    tg = [(t.name, tuple(t.shape), t.kind, bool(t.fan_in_fan_out)) for t in targets]
    return {"model": _digest(structure), "weights": h.hexdigest(), "targets": _digest(tg)}


def _hash_batch(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            t = t.to("cpu").contiguous()
            t = t.to(torch.uint8) if t.dtype == torch.bool else t
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"M")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _hash_batch(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _hash_batch(h, v)
    else:
        h.update(repr(obj).encode())


def data_part(batches: Optional[list[Any]], key: Optional[str], num_batches: int) -> str:
    """The ``data`` part: the user's ``cache_key``, else a hash of the batches."""
    if key is not None:
        return _digest(["key", key, num_batches])
    h = hashlib.blake2b(digest_size=32)
    h.update(f"batches{len(batches)}".encode())
    for b in batches:
        _hash_batch(h, b)
    return h.hexdigest()


def capture_part(config: Any, device: torch.device, replayable: bool) -> tuple[str, dict[str, Any]]:
    loss = config.loss_fn
    desc = {
        "capture": config.capture,
        "train_mode": config.train_mode,
        "loss_fn": None if loss is None else f"{getattr(loss, '__module__', '')}.{getattr(loss, '__qualname__', loss)}",
        "cache_dtype": config.cache_dtype,
        "device": device.type,
        "sketch": config.capture_options(replayable) if config.capture == "sketch" else None,
    }
    return _digest(desc), desc


# ---------------------------------------------------------------------------------------------------------
# the cache of one initialize call
# ---------------------------------------------------------------------------------------------------------


def _acc_kind(acc: Any) -> Optional[str]:
    from ._capture import SketchAccumulator, _SumAccumulator

    if isinstance(acc, SketchAccumulator):
        return "sketch"
    if isinstance(acc, _SumAccumulator):
        return "sum"
    return None


@dataclass
class GradientCache:
    """The gradient cache of one :func:`peft_loraone.initialize` call (see the module docstring).

    ``initialize`` makes it with :meth:`prepare` before the gradient pass, calls :meth:`restore` instead of running
    the batches when :attr:`entry` was found, and :meth:`store` after a pass that ran; :meth:`status` goes into the
    report.
    """

    directory: str
    parts: dict[str, str]
    capture_desc: dict[str, Any]
    dtype: str
    path: str = ""
    entry: Optional[tuple[dict[str, str], dict[str, torch.Tensor]]] = None
    reason: str = ""
    used: bool = False
    written: bool = False
    seconds: float = 0.0
    nbytes: int = 0
    disabled: bool = False
    _accs: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return _digest([KEY_VERSION] + [self.parts[p] for p in _KEY_PARTS])[:20]

    # -- before the pass ---------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, config: Any, model: torch.nn.Module, targets: list[Any], batches: Optional[list[Any]],
                device: torch.device) -> "GradientCache":
        """Compute the key and look the cache file up (reading it whole when it matches, so that a damaged file
        is found before the batches are skipped)."""
        start = time.perf_counter()
        import torch.distributed as dist

        parts = model_parts(model, targets)
        parts["data"] = data_part(batches, config.cache_key, config.num_batches)
        parts["capture"], desc = capture_part(config, device, batches is not None)
        cache = cls(directory=config.cache_dir, parts=parts, capture_desc=desc, dtype=config.cache_dtype)
        cache.path = os.path.join(cache.directory, f"{FILE_PREFIX}{cache.key}{FILE_SUFFIX}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            cache.disabled = True
            cache.reason = "not used under torch.distributed (each rank computes its share of G)"
            return cache
        cache._lookup(targets)
        cache.seconds = time.perf_counter() - start
        return cache

    def _lookup(self, targets: list[Any]) -> None:
        if not os.path.exists(self.path):
            self.reason = self._why_missing()
            return
        try:
            meta, tensors = read_file(self.path)
        except CacheError as exc:
            self.reason = f"the cache file is unusable ({exc}); recomputed"
            logger.warning("peft_loraone: %s", self.reason)
            return
        mismatch = self._compare(meta) or self._check_layout(meta, tensors, targets)
        if mismatch:
            self.reason = f"{mismatch}; recomputed"
            return
        self.entry = (meta, tensors)
        self.nbytes = os.path.getsize(self.path)

    def _compare(self, meta: Mapping[str, str]) -> str:
        if meta.get("loraone.key_version") != KEY_VERSION:
            return f"the cache file has key version {meta.get('loraone.key_version')!r}, this build {KEY_VERSION!r}"
        differ = [_PART_NAMES[p] for p in _KEY_PARTS if meta.get(f"loraone.key.{p}") != self.parts[p]]
        if differ:
            return "the cache file was made with other " + ", ".join(differ)
        return ""

    def _why_missing(self) -> str:
        """Why no cache file matches: compare with the newest other cache file in the directory."""
        try:
            others = [
                os.path.join(self.directory, f)
                for f in os.listdir(self.directory)
                if f.startswith(FILE_PREFIX) and f.endswith(FILE_SUFFIX)
            ]
        except OSError:
            return "no cache yet (the directory does not exist)"
        others.sort(key=lambda p: os.path.getmtime(p), reverse=True)
        for other in others[:8]:
            try:
                meta = read_header(other)["meta"]
            except (CacheError, OSError):
                continue
            if meta.get("loraone.key.model") != self.parts["model"]:
                continue  # another model: says nothing about this one
            differ = [_PART_NAMES[p] for p in _KEY_PARTS if meta.get(f"loraone.key.{p}") != self.parts[p]]
            return (
                f"no cache for these settings: the newest cache of this model ({os.path.basename(other)}) has other "
                + ", ".join(differ)
            )
        return "no cache yet for this model"

    def _check_layout(self, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor], targets: list[Any]) -> str:
        try:
            accs = json.loads(meta["loraone.accumulators"])
        except (KeyError, ValueError):
            return "the cache file has no accumulator list"
        by_name = {t.name: t for t in targets}
        for a in accs:
            for n in a["targets"]:
                if n not in by_name:
                    return f"the cache file has target {n!r}, which this model lacks"
            for tname in a.get("tensors", []):
                if tname not in tensors:
                    return f"the cache file lacks tensor {tname!r}"
            if a["kind"] == "sketch":
                for n in a["targets"]:
                    if by_name[n].rank > a["k"]:
                        return (
                            f"rank {by_name[n].rank} of {n!r} exceeds the cached sketch size k={a['k']} (a sketch "
                            "supports ranks up to k)"
                        )
        self._accs = {a["targets"][0]: a for a in accs}
        return ""

    # -- instead of the pass ---------------------------------------------------------------------------

    def restore(self, capture: Any) -> Optional[int]:
        """Give every accumulator of ``capture`` the cached state and submit it to the engine (as
        ``capture.finish()`` would after the batches); returns the cached sample count."""
        meta, tensors = self.entry
        by_first = {acc.targets[0].name: acc for acc in capture.accumulators if acc.targets}
        batches = int(meta["loraone.batches"])
        for first, a in self._accs.items():
            acc = by_first.get(first)
            if acc is None or _acc_kind(acc) != a["kind"]:
                raise CacheError(f"peft_loraone: {self.path}: accumulator of {first!r} does not match ({a['kind']})")
            if a.get("empty"):
                continue  # no contribution in the cached pass: capture.finish() reports it as no gradient
            if a["kind"] == "sum":
                acc.total = tensors[a["tensors"][0]].to(acc.dtype)
                acc.submit(capture._engine, 1, capture.gamma, capture.svd)  # the cached mean: / 1 is exact
            else:
                acc.k, acc.l, acc.t, acc.name = int(a["k"]), int(a["l"]), int(a["t"]), a["name"]
                acc.phase = int(a["phase"])
                acc.rand_device = torch.device(a["rand_device"])
                for attr in ("Y", "Z", "W", "X"):
                    key = f"{first}::{attr}"
                    setattr(acc, attr, tensors[key] if key in tensors else None)
                if a.get("error"):
                    from .errors import ZeroGradientError

                    acc._error = ZeroGradientError(f"peft_loraone engine: {a['error']}")
                acc.submit(capture._engine, batches, capture.gamma, capture.svd)
        capture.batches = batches
        self.used = True
        self.reason = "read instead of running the batches (same model, targets, data and capture settings)"
        self.entry = None  # the accumulators own the tensors now
        samples = meta.get("loraone.samples", "")
        return int(samples) if samples else None

    # -- after a pass that ran -------------------------------------------------------------------------

    def store(self, capture: Any, samples: Optional[int]) -> None:
        """Write what ``capture``'s accumulators hold (after their submission) to the cache file; a failure to
        write is logged and reported, never raised (the init itself succeeded)."""
        if self.disabled or self.used:
            return
        start = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        bf16: list[str] = []
        accs = []
        for acc in capture.accumulators:
            kind = _acc_kind(acc)
            names = [t.name for t in acc.targets]
            if kind is None:
                self.reason += f"; not written: {type(acc).__name__} cannot be cached"
                return
            entry: dict[str, Any] = {"kind": kind, "targets": names, "tensors": []}
            first = names[0]
            if kind == "sum":
                g = acc.mean if acc.mean is not None else None
                if g is None:
                    entry["empty"] = True
                else:
                    key = f"{first}::G"
                    tensors[key] = g.to("cpu").contiguous()
                    entry["tensors"].append(key)
                    if self.dtype == "bfloat16" and g.dtype == torch.float32:
                        bf16.append(key)
            else:
                if acc.Y is None:
                    entry["empty"] = True
                else:
                    entry.update(k=acc.k, l=acc.l, t=acc.t, name=getattr(acc, "name", first), phase=acc.phase,
                                 rand_device=str(acc.rand_device), passes=acc.passes, transposed=acc.transposed)
                    if acc._error is not None:
                        entry["error"] = str(acc._error).removeprefix("peft_loraone engine: ")
                    for attr in ("Y", "Z", "W", "X"):
                        v = getattr(acc, attr)
                        if v is not None:
                            key = f"{first}::{attr}"
                            tensors[key] = v.to("cpu").contiguous()
                            entry["tensors"].append(key)
            accs.append(entry)
        meta = {f"loraone.key.{p}": self.parts[p] for p in _KEY_PARTS}
        meta.update({
            "loraone.key_version": KEY_VERSION,
            "loraone.capture": json.dumps(self.capture_desc, sort_keys=True, default=str),
            "loraone.batches": str(capture.batches),
            "loraone.samples": "" if samples is None else str(samples),
            "loraone.accumulators": json.dumps(accs),
            "loraone.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        try:
            os.makedirs(self.directory, exist_ok=True)
            _remove_stale_temporaries(self.directory)
            write_file(self.path, tensors, meta, bfloat16=tuple(bf16))
        except (LoraOneError, OSError) as exc:
            self.reason += f"; the cache could not be written: {exc}"
            logger.warning("peft_loraone: gradient cache not written: %s", exc)
            return
        self.written = True
        self.nbytes = os.path.getsize(self.path)
        self.seconds += time.perf_counter() - start

    def status(self) -> dict[str, Any]:
        """What goes into ``InitReport.cache``."""
        return {
            "used": self.used,
            "written": self.written,
            "path": self.path,
            "reason": self.reason,
            "seconds": self.seconds,
            "bytes": self.nbytes,
        }


def _remove_stale_temporaries(directory: str, age: float = 3600.0) -> None:
    """Remove the temporary files of writes killed more than ``age`` seconds ago (a write in progress in another
    process is younger); they are hidden (``.loraone-...tmp-...``) and never read as a cache."""
    now = time.time()
    for f in os.listdir(directory):
        if f.startswith("." + FILE_PREFIX) and ".tmp-" in f:
            path = os.path.join(directory, f)
            try:
                if now - os.path.getmtime(path) > age:
                    os.remove(path)
            except OSError:
                pass


def take_batches(data: Any, limit: int) -> list[Any]:
    """The first ``limit`` batches of ``data``, drawn once (the gradient pass then runs from this list)."""
    out = []
    for batch in data:
        out.append(batch)
        if len(out) >= limit:
            break
    return out
