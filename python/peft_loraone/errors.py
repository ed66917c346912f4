"""Exceptions and warnings raised by peft_loraone.

Every error subclasses :class:`LoraOneError` and the built-in exception a PEFT user
expects (``ValueError`` for bad values, ``TypeError`` for bad types, ``TimeoutError``,
``ImportError``, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import concurrent.futures


class LoraOneError(Exception):
    """Base class of every error raised by peft_loraone."""


class InvalidArgumentError(LoraOneError, ValueError):
    """A shape, stride, rank or option the engine cannot use."""


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type (for example ``tol='x'`` or ``rank=2.5``): both an
    :class:`InvalidArgumentError` (a ``ValueError``) and a ``TypeError``."""


class UnsupportedDTypeError(LoraOneError, TypeError):
    """An element type the engine does not read (inputs) or write (outputs)."""


class UnsupportedDeviceError(LoraOneError, ValueError):
    """A tensor that is not in CPU memory; move it with ``.cpu()``."""


class ReadOnlyOutputError(LoraOneError, ValueError):
    """An output tensor that is marked read-only."""


class NonFiniteError(LoraOneError, ValueError):
    """NaN or Inf in the input matrix, or factors that would not be finite (a gamma so small or so
    large that the LoRA-One scale 1/sqrt(gamma*sigma1) overflows)."""


class ZeroGradientError(LoraOneError, ValueError):
    """The input matrix is all zeros, so sigma1 = 0 and LoRA-One's scale 1/sqrt(gamma*sigma1) is undefined."""


class CancelledError(LoraOneError, concurrent.futures.CancelledError):
    """The job was cancelled (:meth:`peft_loraone.Job.cancel`, or Ctrl-C during a synchronous call) before
    it wrote its outputs. Also a ``concurrent.futures.CancelledError``."""


class JobTimeoutError(LoraOneError, TimeoutError):
    """:meth:`peft_loraone.Job.result` waited ``timeout`` seconds and the job has not finished; it keeps
    running: call ``result()`` again, or :meth:`~peft_loraone.Job.cancel` it."""


class ForkedProcessError(LoraOneError, RuntimeError):
    """The engine was used in this process's parent before it forked: the Go runtime does not survive
    ``fork()``, so the engine cannot run in the child. Start workers with
    ``multiprocessing.get_context("spawn")`` or ``"forkserver"``."""


class EngineLoadError(LoraOneError, ImportError):
    """The Go engine extension is missing or was built for another Python; reinstall the package."""


class EngineInternalError(LoraOneError, RuntimeError):
    """A bug inside the Go engine (a recovered panic). Please report it."""


class LoraOneWarning(UserWarning):
    """Warnings about legal but risky uses of peft_loraone."""
