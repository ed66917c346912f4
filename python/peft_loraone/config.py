"""Configuration of LoRA-One initialization (the counterpart of PEFT's ``EvaConfig``/``LoraGAConfig``)."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from ._peft_hook import LORAONE
from .errors import LoraOneWarning

__all__ = ["LoraConfig", "LoraOneConfig"]

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
        if self.tol is not None and (not _is_real(self.tol) or not math.isfinite(self.tol) or not 0 < self.tol < 1):
            raise ValueError(f"`tol` must be None or a number in (0, 1), got {self.tol!r}.")
        if self.algorithm not in (None, "krylov", "subspace"):
            raise ValueError(f"`algorithm` must be None, 'krylov' or 'subspace', got {self.algorithm!r}.")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` must be an integer in [0, 2**63), got {self.seed!r}.")
        for name in ("progress", "train_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable view (``loss_fn`` becomes its qualified name)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "loss_fn":
                value = None if value is None else getattr(value, "__qualname__", repr(value))
            out[f.name] = value
        return out


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
