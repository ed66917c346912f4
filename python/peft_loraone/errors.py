"""Exceptions and warnings raised by peft_loraone.

Every engine error subclasses :class:`LoraOneError` and the built-in exception a
PEFT user expects (``ValueError`` for bad values, ``TypeError`` for bad dtypes).
"""

from __future__ import annotations


class LoraOneError(Exception):
    """Base class of every error raised by peft_loraone."""


class InvalidArgumentError(LoraOneError, ValueError):
    """A shape, stride, rank or option the engine cannot use."""


class UnsupportedDTypeError(LoraOneError, TypeError):
    """An element type the engine does not read (inputs) or write (outputs)."""


class UnsupportedDeviceError(LoraOneError, ValueError):
    """A tensor that is not in CPU memory; move it with ``.cpu()``."""


class ReadOnlyOutputError(LoraOneError, ValueError):
    """An output tensor that is marked read-only."""


class NonFiniteError(LoraOneError, ValueError):
    """NaN or Inf in the input matrix."""


class ZeroGradientError(LoraOneError, ValueError):
    """The input matrix is all zeros, so sigma1 = 0 and LoRA-One's scale 1/sqrt(gamma*sigma1) is undefined."""


class EngineInternalError(LoraOneError, RuntimeError):
    """A bug inside the Go engine (a recovered panic). Please report it."""


class LoraOneWarning(UserWarning):
    """Warnings about legal but risky uses of peft_loraone."""
