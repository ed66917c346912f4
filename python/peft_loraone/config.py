"""Configuration of LoRA-One initialization (the counterpart of PEFT's ``EvaConfig``/``LoraGAConfig``)."""

from __future__ import annotations

import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

from ._peft_hook import LORAONE
from .errors import LoraOneWarning
from ._native import MAX_POWER_ITERS as _MAX_POWER_ITERS

__all__ = ["LoraConfig", "LoraOneConfig"]

#: The values of ``LoraOneConfig.capture``.
CAPTURE_MODES = ("dense", "weight", "sketch")

#: ``LoraOneConfig.sketch_size=None`` by ``sketch_passes``: the least sizes whose median relative error of s·B·A
#: stays below 5e-2 with a margin of ~1.4x on real gradients (see the class docstring and bench/RESULTS.md).
DEFAULT_SKETCH_SIZES = {1: "10r", 2: "7r"}

_SKETCH_SIZE = re.compile(r"^\s*(?:(\d+(?:\.\d*)?)\s*\*?\s*)?r\s*(?:([+-])\s*(\d+))?\s*$")


def parse_sketch_size(spec: Any) -> tuple[float, int]:
    """``sketch_size`` as ``(multiple of r, offset)``: ``"4r"`` -> (4, 0), ``"2r+1"`` -> (2, 1), ``64`` or ``"64"`` ->
    (0, 64). Raises ``ValueError`` for anything else."""
    if _is_int(spec):
        if spec < 1:
            raise ValueError(f"`sketch_size` must be >= 1, got {spec!r}.")
        return 0.0, int(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if text.isdigit() and int(text) >= 1:
            return 0.0, int(text)
        match = _SKETCH_SIZE.match(text)
        if match:
            mult = float(match.group(1)) if match.group(1) else 1.0
            offset = int(match.group(3) or 0) * (-1 if match.group(2) == "-" else 1)
            if mult > 0:
                return mult, offset
    raise ValueError(
        f"`sketch_size` must be a positive integer (the sketch size k itself) or a multiple of the rank such as '8r', "
        f"'4r' or '2r+1', got {spec!r}."
    )


def sketch_dims(spec: Any, rows: Optional[int], r: int, m: int, n: int) -> tuple[int, int]:
    """The sketch size ``k`` and row-sketch size ``l`` for a G of shape (m, n) and rank r, from ``sketch_size`` and
    ``sketch_rows``: ``k`` clamped to ``[r, min(m, n)]`` (at ``min(m, n)`` the sketch holds G whole), ``l = 2k + 1``
    unless ``rows`` is set, and at least ``k``. ``l`` is not capped at the height of the sketched side: rows beyond
    it still condition the least-squares solve (Psi·Q, l x k, has condition ~(sqrt(l) + sqrt(k))/(sqrt(l) - sqrt(k)),
    unbounded at l = k), which float32 sketches need."""
    mult, offset = parse_sketch_size(spec)
    k = int(math.ceil(mult * r)) + offset
    k = max(min(k, m, n), min(r, m, n), 1)
    ell = 2 * k + 1 if rows is None else int(rows)
    return k, max(k, ell)

#: arXiv identifier of the LoRA-One paper.
PAPER = "https://arxiv.org/abs/2502.01235"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class LoraOneConfig:
    r"""How :func:`peft_loraone.initialize` computes a LoRA-One initialization.

    LoRA-One ([Zhang, Liu, Chen, ICML 2025](https://arxiv.org/abs/2502.01235)) starts each LoRA pair at the
    best rank-$r$ approximation of one full fine-tuning gradient step. With $G$ the gradient of the training
    loss with respect to the base weight $W_0$ (averaged over ``num_batches`` batches, LoRA's $B = 0$), and
    $U_r, S_r, V_r$ the top-$r$ singular triplets of $-G$ ($\sigma_1 = S_{1}$):

    $$B = U_r \sqrt{S_r} / \sqrt{\gamma\sigma_1}, \qquad A = \sqrt{S_r} V_r^\top / \sqrt{\gamma\sigma_1},
    \qquad s\,BA = \frac{s}{\gamma\sigma_1} [-G]_r,$$

    where $s$ is the layer's LoRA scaling ($\alpha/r$, or $\alpha/\sqrt{r}$ with rsLoRA). $W_0$ is not modified.

    Args:
        gamma (`float`): The stabilizer $\gamma$; the initial update has spectral norm $s/\gamma$. Default 128,
            the reference implementation's.
        num_batches (`int`): How many batches of the data the gradient is averaged over. Default 8 (the
            reference uses the first 8 training examples at batch size 1).
        oversampling (`int`, *optional*): Extra columns of the randomized SVD's sketch. `None`: the engine's
            default.
        power_iters (`int`, *optional*): Maximum power (subspace) iterations of the randomized SVD. `None`: the
            engine's default.
        tol (`float`, *optional*): Stop the SVD iterations once the estimated relative Frobenius error of the
            rank-r approximation falls below this. `None`: the engine's default (1e-4).
        algorithm (`str`, *optional*): The truncated SVD: `"krylov"` (block Krylov; the default for `None`) or
            `"subspace"` (randomized subspace iteration).
        seed (`int`): Seed of the randomized SVD's test matrix; equal seeds give equal factors.
        progress (`bool`): Show tqdm progress bars (only on rank 0 under `torch.distributed`).
        loss_fn (`Callable[[output, batch], Tensor]`, *optional*): Computes the scalar loss from the model's
            output and the batch. `None`: use `output.loss` (pass `labels` in the batch).
        train_mode (`bool`): Run the forward passes in train mode (dropout on). Default `False`: eval mode, so
            the gradient is deterministic; the model's own mode is restored afterwards either way.
        capture (`str`): How G is captured.
            - `"dense"` (the default): from each base layer's own activations, G = (1/N) sum_b delta_bᵀ x_b with
              x_b its input and delta_b the gradient of the loss with respect to its output (hooks on the base
              layer). No base weight requires grad, so frozen and quantized bases (bitsandbytes 4-bit and 8-bit,
              hqq, torchao) work: G is then the gradient with respect to the dequantized weight.
            - `"weight"`: from the base weights' `.grad` (the target weights require grad during the passes);
              refused for quantized bases, whose weights cannot take a gradient.
            The rule for the default: `"dense"` whenever it is as exact as `"weight"` and not slower. Measured
            (2 shared CPU cores): the same G (s·B·A equal to 2e-7 relative on tiny Llama, GPT-2 and MiniLM, bitwise
            on Llama); capture time ~10% below `"weight"` on all-MiniLM-L6-v2 (all 36 linear layers; the sum grows
            in place by `addmm_`, no `W.grad` is allocated and added), and within 0-10% on 16-64-wide toy models
            (Python hooks cost ~20-30 µs a layer call); it also works on frozen and quantized bases. `"weight"` is
            kept for comparison.
            - `"sketch"`: G is never formed. From the same hooks, each target accumulates randomized sketches of
              G (float32): Y = G·Omega (out x k), Z = G·Omega_t (out x t, test vectors) and, in one pass,
              W = Psi·G (l x in), or, in two passes, X = Qᵀ·G (k x in) with Q = orth(Y) from the first (the sketched
              side is chosen so that the wider sketch runs along the smaller dimension). The Go engine reconstructs
              the top-r SVD (Tropp, Yurtsever, Udell, Cevher 2017 for one pass; the range finder for two) and reports
              its estimate of the relative error of s·B·A against the exact init (`ModuleReport.accuracy`). Memory
              per target is O((out + in)·k) instead of out·in: at most about 3k/min(out, in) of the dense G in one
              pass and k·(out + in)/(out·in) in two. The test matrices are drawn from `seed` and their shape (the same on
              every rank), once per shape: the targets of one shape share them. Works on quantized bases like `"dense"`.
        accumulate_on (`str`): Where the float32 sums of G live during the passes. `"device"` (default): on the
            model's device. `"cpu"`: in host memory, each batch's contribution copied there asynchronously
            (pinned buffers), so an accelerator holds at most about one layer's gradient at a time instead of
            all of them. The same as `"device"` for a model on the CPU.
        sketch_size (`int` or `str`, *optional*): `capture="sketch"`: the sketch size k, a multiple of each
            layer's rank (`"10r"`, `"4r"`, `"2r+1"`) or an integer; clamped to [r, min(out, in)] (at min(out, in) the
            sketch holds G whole and equals the exact init to float32 rounding). `None` (default): `"10r"` in one
            pass, `"7r"` in two. Chosen by measurement (bench/sketch_accuracy.py, 3 seeds of the test matrices; r=8;
            all 36 targets of all-MiniLM-L6-v2 on the CLI's similarity task, 8 batches of 8 sentences, and the 28 of
            a random 128-wide 4-layer Llama; spectra decay slowly, median sigma_(r+1)/sigma_r 0.89 and 0.93): the
            median relative error of s·B·A against the exact init, against the sketch's bytes relative to the dense
            G on MiniLM, was 0.049 at 8r (0.36 of dense), 0.042 at 9r (0.40), **0.032 at 10r** (0.44; Llama 0.022)
            in one pass, and 0.047 at 6r (0.21), **0.035 at 7r** (0.25; Llama 0.026) in two. The issue's target is a
            median of at most 5e-2; the defaults keep ~1.4x margin for data with heavier spectral tails (the
            smaller sizes sit at 0.042-0.049). The engine's estimate held there too: at the defaults the true error
            was at most the estimate for 108/108 MiniLM and 83/84 Llama module-seeds in one pass (at most 1.12x
            above it) and for all in two; over every size measured (2r+1 to 10r), at most 1.23x above it.
        sketch_rows (`int`, *optional*): `capture="sketch"`, one pass: the rows l of the co-range sketch
            W = Psi·G. `None`: 2k + 1 (Tropp et al.). Measured: at equal memory, l = 1.5k or
            3k-4k was no better than 2k + 1.
        sketch_test_vectors (`int`): `capture="sketch"`: t, the Gaussian test vectors of the error estimate
            (Z = G·Omega_t). Default 10; below it the estimate's safety factor grows (1.97 at t = 5).
        sketch_passes (`int`, *optional*): `capture="sketch"`: 1, 2, or `None` (default): 2 when `data` is batches,
            1 for a `train_step` callable. Two passes replay the same batches (kept from the first pass, so any
            iterable works, a shuffling DataLoader or a one-shot generator included; a `train_step` callable cannot
            be replayed, and an explicit 2 is refused for it): the forward/backward passes run twice, and the
            sketch is more accurate at equal k and holds p·(k + t) + k·q values instead of p·(k + t) + (2k + 1)·q
            (p = max(out, in), q = min(out, in)). In train mode the replay restores torch's RNG state, so dropout
            draws the same masks. Why two by default: a user picks "sketch" for memory, and at equal accuracy
            (median error 0.035 at '7r' against 0.032 at '10r' on MiniLM) two passes hold 0.25 of the dense G
            against 0.44; on a 1.1B Llama (TinyLlama's shape, r=16, all linear) 358 MiB of sketches = 8.5% of the
            float32 parameter bytes against 648 MiB = 15.4% in one pass (the issue's bound is 10%), for one more
            forward/backward over the batches (bench/RESULTS.md, "Capture modes at 1.1B parameters").
        sketch_dense_fallback (`bool`): `capture="sketch"`: a layer whose sketches would hold at least the bytes of
            its dense G (narrow layers, where k nears min(out, in); a whole sketch always holds more) is captured
            dense instead: exact, and no larger. Reported per module (`ModuleReport.capture`). Default `True`.
            Measured: the 4-layer 128-wide Llama of bench/sketch_accuracy.py held 1.42x the dense bytes in one pass
            at '10r'; at 1.1B (2048 wide) no layer falls back.
        cache_dir (`str`, *optional*): A directory for the gradient cache. After the gradient pass, what was
            captured (per target: the float32 mean G, or the sketches) is written there as one
            `loraone-<key>.safetensors.zst` file (a safetensors file in a zstd frame, written atomically by the Go
            engine, a CRC-32C per tensor). A later call with the same model (module structure and a fingerprint of
            the target weights), targets, data (a hash of the batches' tensors: the first `num_batches` batches are
            drawn from `data` once, up front) and capture settings reads it instead of running the batches, so a
            new `r`, `gamma`, `seed`, `tol` or SVD setting costs only the SVDs (for sketches: a rank up to the cached
            sketch size k; the sketch's own seed is part of the key). A mismatch, or a damaged file, recomputes and
            the report (`InitReport.cache`) says why. `None` (default): no cache.
        cache_dtype (`str`): `"float32"` (default) or `"bfloat16"`: how a dense G is stored (sketches are always
            float32). bfloat16 stores dense G in 0.40x the raw float32 bytes (float32: 0.93x) at a relative error
            of s·B·A against the float32 cache of 2e-4 to 7e-4 (median over modules; max 1.6e-3) on
            all-MiniLM-L6-v2 and a TinyLlama-shaped Llama (bench/RESULTS.md, "Gradient cache").
        cache_key (`str`, *optional*): Names the data in the cache key instead of hashing the batches; required
            with a `train_step` callable (whose batches initialize never sees). The caller vouches that equal keys
            mean equal data.
        dist_timeout (`float`, *optional*): Under `torch.distributed`: seconds a rank waits in the agreement step
            (after its batches, and before each batch under FSDP) for the other ranks before it raises
            `DistributedInitError` instead of hanging. `None`: the `PEFT_LORAONE_DIST_TIMEOUT` environment
            variable if set, else the process group's own timeout (30 minutes by default).
    """

    gamma: float = field(
        default=128.0,
        metadata={
            "help": "Stabilizer gamma: B·A = [-G]_r / (gamma·sigma1), so the initial update s·B·A has spectral norm "
            "s/gamma. The reference implementation uses 128 (older versions 16 and 64)."
        },
    )
    num_batches: int = field(
        default=8,
        metadata={
            "help": "Number of batches whose gradients are averaged into G. The reference uses 8 examples at batch "
            "size 1; the paper reports 8 to 64 samples suffice. Fewer batches in the data are used as they come."
        },
    )
    oversampling: Optional[int] = field(
        default=None,
        metadata={"help": "Oversampling of the randomized SVD (sketch width r + oversampling). None: engine default."},
    )
    power_iters: Optional[int] = field(
        default=None,
        metadata={"help": "Maximum number of power iterations of the randomized SVD. None: engine default."},
    )
    tol: Optional[float] = field(
        default=None,
        metadata={
            "help": "Estimated relative Frobenius error of the rank-r approximation below which the SVD iterations "
            "stop. None: engine default (1e-4)."
        },
    )
    algorithm: Optional[str] = field(
        default=None,
        metadata={"help": "Truncated SVD: 'krylov' (block Krylov) or 'subspace'. None: engine default (krylov)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the randomized SVD; the same seed gives the same factors."},
    )
    progress: bool = field(
        default=True,
        metadata={"help": "Show tqdm progress bars for the gradient pass and the SVDs (rank 0 only)."},
    )
    loss_fn: Optional[Callable[[Any, Any], Any]] = field(
        default=None,
        metadata={
            "help": "loss_fn(output, batch) -> scalar tensor. None: the model output's `loss` attribute (the batch "
            "must then contain labels). Unused when the data is a train_step callable."
        },
    )
    train_mode: bool = field(
        default=False,
        metadata={
            "help": "Compute the gradient in train mode (dropout active). Default False: eval mode, deterministic G. "
            "The model's train/eval state is restored afterwards in either case."
        },
    )

    capture: str = field(
        default="dense",
        metadata={
            "help": "How G is captured: 'dense' (default: from each base layer's input and output gradient; works "
            "on frozen and quantized bases) or 'weight' (from the base weights' .grad; not for quantized bases). "
            "'sketch' (randomized sketches: G never formed; O((out + in)·k) memory per target)."
        },
    )
    accumulate_on: str = field(
        default="device",
        metadata={
            "help": "Where G's float32 sums live: 'device' (the model's device) or 'cpu' (host memory, filled by "
            "asynchronous copies, so an accelerator holds about one layer's gradient at a time)."
        },
    )
    sketch_size: Optional[Union[int, str]] = field(
        default=None,
        metadata={
            "help": "capture='sketch': the sketch size k, as a multiple of each layer's rank ('10r', '4r', '2r+1') or "
            "an integer; clamped to [r, min(out, in)]. None: '10r' in one pass, '7r' in two (median relative error "
            "of s·B·A 0.032 and 0.035 on all-MiniLM-L6-v2 at r=8, 0.44 and 0.25 of the dense G's bytes)."
        },
    )
    sketch_rows: Optional[int] = field(
        default=None,
        metadata={
            "help": "capture='sketch', one pass: rows l of the co-range sketch W = Psi·G. None: 2k + 1 (Tropp et al.). "
            "Unused with two passes."
        },
    )
    sketch_test_vectors: int = field(
        default=10,
        metadata={
            "help": "capture='sketch': Gaussian test vectors t of the error estimate (Z = G·Omega_t); the estimate's "
            "safety factor is calibrated at t >= 10 and grows below it."
        },
    )
    sketch_passes: Optional[int] = field(
        default=None,
        metadata={
            "help": "capture='sketch': 1 (single-pass reconstruction) or 2 (range finder: a second pass over the "
            "same batches, kept from the first; more accurate at equal k and holds k·(out+in) instead of "
            "k·out + (2k+1)·in; needs batches, not a train_step callable). None (default): 2 when `data` is "
            "batches, 1 for a train_step callable."
        },
    )
    sketch_dense_fallback: bool = field(
        default=True,
        metadata={
            "help": "capture='sketch': capture a layer dense (exact) when its sketches would hold at least the bytes "
            "of its dense G (narrow layers, k near min(out, in)); reported per module as capture 'dense'."
        },
    )

    cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Directory of the gradient cache: the captured G (or sketches) is written there after the gradient "
            "pass and read back, instead of running the batches, by a later call with the same model, targets, data "
            "and capture settings (another r, gamma, seed or tol costs only the SVDs). None: no cache."
        },
    )
    cache_dtype: str = field(
        default="float32",
        metadata={"help": "How the gradient cache stores a dense G: 'float32' (default) or 'bfloat16' (half the bytes)."},
    )
    cache_key: Optional[str] = field(
        default=None,
        metadata={
            "help": "Identifies the data in the cache key instead of a hash of the batches; required for a train_step "
            "callable with cache_dir."
        },
    )
    dist_timeout: Optional[float] = field(
        default=None,
        metadata={
            "help": "torch.distributed: seconds to wait for the other ranks in the agreement step before raising "
            "DistributedInitError; None: PEFT_LORAONE_DIST_TIMEOUT if set, else the process group's timeout."
        },
    )

    def __post_init__(self) -> None:
        if not _is_real(self.gamma) or not math.isfinite(self.gamma) or self.gamma <= 0:
            raise ValueError(f"`gamma` must be a positive finite number, got {self.gamma!r}.")
        self.gamma = float(self.gamma)
        if not _is_int(self.num_batches) or self.num_batches < 1:
            raise ValueError(f"`num_batches` must be an integer >= 1, got {self.num_batches!r}.")
        for name in ("oversampling", "power_iters"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"`{name}` must be None or an integer >= 0, got {value!r}.")
        if self.power_iters is not None and self.power_iters > _MAX_POWER_ITERS:
            raise ValueError(
                f"`power_iters` must be at most {_MAX_POWER_ITERS} (the engine's bound: 2 + 2*{_MAX_POWER_ITERS} "
                f"passes over G), got {self.power_iters!r}; lower it or rely on `tol` to stop earlier."
            )
        if self.tol is not None and (not _is_real(self.tol) or not math.isfinite(self.tol) or not 0 < self.tol < 1):
            raise ValueError(f"`tol` must be None or a number in (0, 1), got {self.tol!r}.")
        if self.algorithm not in (None, "krylov", "subspace"):
            raise ValueError(f"`algorithm` must be None, 'krylov' or 'subspace', got {self.algorithm!r}.")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` must be an integer in [0, 2**63), got {self.seed!r}.")
        for name in ("progress", "train_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"`capture` must be one of {list(CAPTURE_MODES)}, got {self.capture!r}.")
        if self.accumulate_on not in ("device", "cpu"):
            raise ValueError(f"`accumulate_on` must be 'device' or 'cpu', got {self.accumulate_on!r}.")
        if self.sketch_size is not None:
            parse_sketch_size(self.sketch_size)
        if isinstance(self.sketch_size, str) and self.sketch_size.strip().isdigit():
            self.sketch_size = int(self.sketch_size.strip())
        if self.sketch_rows is not None and (not _is_int(self.sketch_rows) or self.sketch_rows < 1):
            raise ValueError(f"`sketch_rows` must be None or an integer >= 1, got {self.sketch_rows!r}.")
        if not _is_int(self.sketch_test_vectors) or self.sketch_test_vectors < 1:
            raise ValueError(f"`sketch_test_vectors` must be an integer >= 1, got {self.sketch_test_vectors!r}.")
        passes = self.sketch_passes
        if passes is not None and (passes not in (1, 2) or isinstance(passes, bool)):
            raise ValueError(f"`sketch_passes` must be None (automatic), 1 or 2, got {self.sketch_passes!r}.")
        if not isinstance(self.sketch_dense_fallback, bool):
            raise ValueError(f"`sketch_dense_fallback` must be True or False, got {self.sketch_dense_fallback!r}.")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"`cache_dir` must be None or a directory path, got {self.cache_dir!r}.")
        if self.cache_dir is not None:
            self.cache_dir = os.fspath(self.cache_dir)
        if self.cache_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"`cache_dtype` must be 'float32' or 'bfloat16', got {self.cache_dtype!r}.")
        if self.cache_key is not None and not isinstance(self.cache_key, str):
            raise ValueError(f"`cache_key` must be None or a string, got {self.cache_key!r}.")
        if self.dist_timeout is not None and (
            not _is_real(self.dist_timeout) or not math.isfinite(self.dist_timeout) or self.dist_timeout <= 0
        ):
            raise ValueError(f"`dist_timeout` must be None or a positive number of seconds, got {self.dist_timeout!r}.")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(f"`loss_fn` must be None or a callable loss_fn(output, batch), got {self.loss_fn!r}.")
        if self.gamma < 1:
            warnings.warn(
                f"`gamma`={self.gamma} < 1 makes the initial update s·B·A larger (spectral norm s/gamma) than the "
                "LoRA scaling itself; training is likely to diverge. The reference uses gamma=128.",
                LoraOneWarning,
                stacklevel=3,
            )
        if self.train_mode:
            warnings.warn(
                "`train_mode=True`: dropout is active while G is computed, so G (and the initialization) is random "
                "and noisier. Use it only when the model's train mode changes more than dropout.",
                LoraOneWarning,
                stacklevel=3,
            )

    def svd_settings(self) -> dict[str, Any]:
        """The engine keyword arguments this config sets (``None`` means the engine's default)."""
        return {
            "oversampling": self.oversampling,
            "power_iters": self.power_iters,
            "tol": self.tol,
            "seed": self.seed,
            "algorithm": self.algorithm,
        }

    def resolved_sketch_passes(self, replayable: bool = True) -> int:
        """``sketch_passes``, with ``None`` resolved: 2 when the batches can be replayed (``data`` is batches, which
        the first pass keeps), 1 when they cannot (a train_step callable)."""
        if self.sketch_passes is not None:
            return int(self.sketch_passes)
        return 2 if replayable else 1

    def capture_options(self, replayable: bool = True) -> dict[str, Any]:
        """Keyword arguments of the capture (``GradientCapture(options=...)``): the sketch's sizes, passes, seed and
        dense fallback for ``capture="sketch"``, nothing for the other modes. ``replayable``: whether ``data`` is
        batches (not a train_step callable), which decides ``sketch_passes=None``."""
        if self.capture != "sketch":
            return {}
        passes = self.resolved_sketch_passes(replayable)
        return {
            "size": DEFAULT_SKETCH_SIZES[passes] if self.sketch_size is None else self.sketch_size,
            "rows": self.sketch_rows,
            "test_vectors": self.sketch_test_vectors,
            "passes": passes,
            "seed": self.seed,
            "dense_fallback": self.sketch_dense_fallback,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable view (``loss_fn`` becomes its qualified name)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "loss_fn":
                value = None if value is None else getattr(value, "__qualname__", repr(value))
            out[f.name] = value
        return out

    @classmethod
    def reference(cls, **overrides: Any) -> "LoraOneConfig":
        """The LoRA-One reference implementation's settings (YuanheZ/LoRA-One ``run_exp.py``), with ``overrides``.

        The reference computes G with the model in **train mode** (``model.train()``: dropout active), averages
        it over the first **8** training examples (batch size 1: make batches of 1 to match) and uses
        ``gamma = 128``; so this returns ``LoraOneConfig(train_mode=True, gamma=128.0, num_batches=8)`` without
        the ``train_mode`` warning. What stays this package's own, on purpose: G is accumulated in float32 (the
        reference accumulates in the model's dtype), and the truncated SVD is the engine's (block Krylov to an
        estimated relative error of 1e-4) instead of ``torch.svd_lowrank(-G, q=512, niter=16)``: both give the
        top-r factors to well below training noise; pass ``algorithm="subspace", power_iters=16`` for the
        reference's method. The reference's LoRA settings (r = 8, alpha = 16, ``use_rslora=True``, all linear
        layers but ``lm_head``) belong to ``LoraConfig``.

        Example:
            ```python
            >>> peft_loraone.initialize(model, one_example_batches, config=LoraOneConfig.reference())
            >>> LoraOneConfig.reference(num_batches=64).num_batches
            64
            ```
        """
        settings: dict[str, Any] = {"train_mode": True, "gamma": 128.0, "num_batches": 8}
        settings.update(overrides)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`train_mode=True`", category=LoraOneWarning)
            return cls(**settings)


def LoraConfig(init: Any = LORAONE, **lora_kwargs: Any):
    """Shorthand for ``peft.LoraConfig(init_lora_weights=init, **lora_kwargs)``; returns a stock ``peft.LoraConfig``.

    Example:
        ```python
        >>> import peft_loraone
        >>> cfg = peft_loraone.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")
        >>> cfg.init_lora_weights
        'loraone'
        ```

    Raises:
        TypeError: if both ``init`` and ``init_lora_weights`` are given.
    """
    import peft

    if "init_lora_weights" in lora_kwargs:
        raise TypeError("peft_loraone.LoraConfig takes `init` or `init_lora_weights`, not both.")
    if isinstance(init, str) and init.lower() == LORAONE:
        init = LORAONE
    return peft.LoraConfig(init_lora_weights=init, **lora_kwargs)
