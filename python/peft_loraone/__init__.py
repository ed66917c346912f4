"""peft-loraone: LoRA-One initialization for Hugging Face PEFT.

LoRA-One (Zhang, Liu, Chen, ICML 2025, arXiv 2502.01235) replaces LoRA's random
adapter init with the top-r SVD of the one-step full fine-tuning gradient, computed
by a Go engine that reads the gradient in place over DLPack.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# The engine module does not load the Go extension: that happens on first use (see _native), so
# `import peft_loraone` starts no Go runtime and a process forked after it can still use the engine.
from .engine import Factors, Job, lora_ga, lora_one, pissa, submit_lora_ga, submit_lora_one, submit_pissa
from .errors import (
    ArgumentTypeError,
    CancelledError,
    EngineInternalError,
    EngineLoadError,
    ForkedProcessError,
    InvalidArgumentError,
    JobTimeoutError,
    LoraOneError,
    LoraOneWarning,
    NonFiniteError,
    ReadOnlyOutputError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
    ZeroGradientError,
)

from ._peft_hook import LORAONE, PeftCompatibilityError
from ._peft_hook import install as _install_peft_hook

_install_peft_hook()  # LoraConfig(init_lora_weights="loraone") -> PEFT's placeholder init; checks PEFT

from .config import LoraConfig, LoraOneConfig  # noqa: E402
from .initialize import get_peft_model, initialize  # noqa: E402
from .optim import LoraPreconditioner, create_preconditioned_optimizer  # noqa: E402
from .report import InitReport, ModuleReport, SkippedModule  # noqa: E402

try:
    __version__ = version("peft-loraone")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    # LoraOneCallback subclasses transformers.TrainerCallback: import it (and transformers' trainer) on first use only
    if name == "LoraOneCallback":
        from .callback import LoraOneCallback

        return LoraOneCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ArgumentTypeError",
    "CancelledError",
    "EngineInternalError",
    "EngineLoadError",
    "ForkedProcessError",
    "Factors",
    "InitReport",
    "InvalidArgumentError",
    "Job",
    "JobTimeoutError",
    "LORAONE",
    "LoraConfig",
    "LoraOneCallback",
    "LoraOneConfig",
    "LoraOneError",
    "LoraOneWarning",
    "LoraPreconditioner",
    "ModuleReport",
    "NonFiniteError",
    "PeftCompatibilityError",
    "ReadOnlyOutputError",
    "SkippedModule",
    "UnsupportedDTypeError",
    "UnsupportedDeviceError",
    "ZeroGradientError",
    "__version__",
    "create_preconditioned_optimizer",
    "get_peft_model",
    "initialize",
    "lora_ga",
    "lora_one",
    "pissa",
    "submit_lora_ga",
    "submit_lora_one",
    "submit_pissa",
]
