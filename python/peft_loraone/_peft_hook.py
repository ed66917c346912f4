"""Teach PEFT the value ``init_lora_weights="loraone"``.

PEFT has no registry for initialization methods: ``LoraLayer.update_layer`` (and the ``update_layer``
of every layer type) switches on ``config.init_lora_weights`` in an if/elif chain, and an unknown
truthy string ends in ``LoraLayer.reset_lora_parameters(adapter_name, init_lora_weights)``, which
raises ``ValueError("Unknown initialization ...")`` for Linear, Conv1D, Conv and MultiheadAttention
layers (and silently takes the default for Embedding).

The hook wraps that single method. When it is called with ``"loraone"`` it

1. runs PEFT's own default placeholder init instead (``init_lora_weights=True``: A Kaiming-uniform,
   B = 0, so the adapter is a no-op and the PEFT model's forward equals the base model's), and
2. marks the layer as *pending* for that adapter and gives it a forward pre-hook that warns once,
   with :class:`LoraOneWarning`, when the model runs before :func:`peft_loraone.initialize` has
   replaced the placeholder.

Everything else (other values, other callers) passes through unchanged. The hook is installed when
``peft_loraone`` is imported. :func:`install` first checks the installed PEFT (version floor, the
method and its signature, that PEFT does not handle ``"loraone"`` itself) and then *probes* it: it
wraps a tiny model with every dispatched layer type (Linear, Conv1D, Embedding, Conv1d/2d,
MultiheadAttention) using ``init_lora_weights="loraone"`` and verifies that each adapter is at the
placeholder init. If any check fails, the original method is put back and
:class:`PeftCompatibilityError` says what changed.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from .errors import LoraOneError, LoraOneWarning

__all__ = [
    "LORAONE",
    "PeftCompatibilityError",
    "clear_pending",
    "install",
    "is_installed",
    "is_loraone",
    "pending_adapters",
]

#: The value of ``LoraConfig.init_lora_weights`` that selects LoRA-One.
LORAONE = "loraone"

#: Oldest PEFT whose ``update_layer(adapter_name, r, lora_alpha, config, **kwargs)`` signature and
#: dispatch the hook was written against (v0.19 changed the signature).
MIN_PEFT_VERSION = "0.19.0"

_PENDING_ATTR = "_peft_loraone_pending"  # dict[adapter_name, _Cohort] on each LoRA layer
_HOOKED_ATTR = "_peft_loraone_prehook"  # forward pre-hook handle on each LoRA layer
_MARKER = "_peft_loraone_hook"  # set on the wrapper function


class PeftCompatibilityError(LoraOneError, RuntimeError):
    """The installed PEFT changed so that ``init_lora_weights="loraone"`` can no longer be hooked."""


def is_loraone(value: Any) -> bool:
    """True when ``value`` (an ``init_lora_weights`` value) selects LoRA-One (case-insensitive)."""
    return isinstance(value, str) and value.lower() == LORAONE


# ----------------------------------------------------------------------------------------------
# "not initialized yet" warning, once per group of layers created together
# ----------------------------------------------------------------------------------------------


class _Cohort:
    """Layers marked pending one after another, with no forward in between, share a cohort: a model
    wrapped by one ``get_peft_model`` call warns once, not once per layer."""

    __slots__ = ("warned",)

    def __init__(self) -> None:
        self.warned = False

    def __deepcopy__(self, memo: dict) -> _Cohort:
        new = _Cohort()
        new.warned = self.warned
        return new


_current_cohort = _Cohort()


def _mark_pending(layer: nn.Module, adapter_name: str) -> None:
    global _current_cohort
    if _current_cohort.warned:
        _current_cohort = _Cohort()
    pending = layer.__dict__.get(_PENDING_ATTR)
    if pending is None:
        pending = {}
        # plain attribute (not a buffer): never part of a state_dict
        object.__setattr__(layer, _PENDING_ATTR, pending)
    pending[adapter_name] = _current_cohort
    if layer.__dict__.get(_HOOKED_ATTR) is None:
        handle = layer.register_forward_pre_hook(_warn_if_pending)
        object.__setattr__(layer, _HOOKED_ATTR, handle)


def _lora_b(layer: nn.Module, adapter_name: str) -> torch.Tensor | None:
    lora_b = getattr(layer, "lora_B", None)
    if lora_b is not None and adapter_name in lora_b:
        return lora_b[adapter_name].weight
    emb_b = getattr(layer, "lora_embedding_A", None)  # embeddings: A is the zero factor
    if emb_b is not None and adapter_name in emb_b:
        return emb_b[adapter_name]
    return None


def _warn_if_pending(layer: nn.Module, args: Any) -> None:
    pending = layer.__dict__.get(_PENDING_ATTR)
    if not pending or getattr(layer, "disable_adapters", False):
        return
    active = getattr(layer, "active_adapters", ())
    for adapter_name, cohort in list(pending.items()):
        if cohort.warned or adapter_name not in active:
            continue
        zero_factor = _lora_b(layer, adapter_name)
        if zero_factor is None or zero_factor.is_meta:
            continue
        if bool(zero_factor.detach().any()):
            # trained or loaded since: not a placeholder any more
            del pending[adapter_name]
            continue
        cohort.warned = True
        warnings.warn(
            f"The LoRA adapter {adapter_name!r} was created with init_lora_weights='loraone' but has not "
            "been initialized yet: it is still PEFT's placeholder (B = 0), i.e. plain LoRA. Call "
            "peft_loraone.initialize(model, data) before training (or use peft_loraone.get_peft_model).",
            LoraOneWarning,
            stacklevel=2,
        )


def pending_adapters(layer: nn.Module) -> list[str]:
    """Adapters of ``layer`` still at the placeholder init of ``init_lora_weights="loraone"``."""
    return list(layer.__dict__.get(_PENDING_ATTR) or ())


def clear_pending(layer: nn.Module, adapter_name: str) -> None:
    """Forget that ``adapter_name`` of ``layer`` awaits initialization (called by ``initialize``)."""
    pending = layer.__dict__.get(_PENDING_ATTR)
    if pending:
        pending.pop(adapter_name, None)


# ----------------------------------------------------------------------------------------------
# the hook itself
# ----------------------------------------------------------------------------------------------


def _make_wrapper(original: Any) -> Any:
    @functools.wraps(original)
    def reset_lora_parameters(self: nn.Module, adapter_name: str, init_lora_weights: Any, *args: Any, **kwargs: Any):
        if is_loraone(init_lora_weights):
            # placeholder: PEFT's default init (B = 0); peft_loraone.initialize overwrites it
            result = original(self, adapter_name, True, *args, **kwargs)
            _mark_pending(self, adapter_name)
            return result
        return original(self, adapter_name, init_lora_weights, *args, **kwargs)

    setattr(reset_lora_parameters, _MARKER, True)
    return reset_lora_parameters


def _lora_layer_class() -> type:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as exc:  # pragma: no cover - depends on the installed PEFT
        raise PeftCompatibilityError(
            f"peft_loraone: cannot import peft.tuners.lora.layer.LoraLayer ({exc}); the installed PEFT "
            f"is not supported (need peft >= {MIN_PEFT_VERSION})."
        ) from exc
    return LoraLayer


def is_installed() -> bool:
    """True when the hook is in place on ``peft.tuners.lora.layer.LoraLayer``."""
    method = getattr(_lora_layer_class(), "reset_lora_parameters", None)
    return bool(getattr(method, _MARKER, False))


def _static_checks(layer_cls: type) -> None:
    import peft
    from packaging.version import Version

    found = getattr(peft, "__version__", "0")
    if Version(found) < Version(MIN_PEFT_VERSION):
        raise PeftCompatibilityError(
            f"peft_loraone needs peft >= {MIN_PEFT_VERSION}, found {found}. Upgrade with `pip install -U peft`."
        )
    method = layer_cls.__dict__.get("reset_lora_parameters")
    if method is None:
        raise PeftCompatibilityError(
            f"peft {found}: LoraLayer.reset_lora_parameters no longer exists, so init_lora_weights='loraone' "
            "cannot be routed to the placeholder init. Pin peft to a supported version "
            f"(>= {MIN_PEFT_VERSION}, tested with 0.21) and report this at peft-loraone."
        )
    params = list(inspect.signature(method).parameters)
    if params[:3] != ["self", "adapter_name", "init_lora_weights"]:
        raise PeftCompatibilityError(
            f"peft {found}: LoraLayer.reset_lora_parameters{inspect.signature(method)} changed its signature "
            "(expected (self, adapter_name, init_lora_weights)); the init_lora_weights='loraone' hook no longer "
            f"applies. Pin peft (>= {MIN_PEFT_VERSION}, tested with 0.21)."
        )
    try:
        source = inspect.getsource(layer_cls.update_layer)
    except (OSError, TypeError):  # no source shipped: the probe below still decides
        source = ""
    if f'"{LORAONE}"' in source or f"'{LORAONE}'" in source:
        raise PeftCompatibilityError(
            f"peft {found} handles init_lora_weights='{LORAONE}' itself; peft_loraone's hook would shadow it. "
            "Use PEFT's implementation or pin peft to an older version."
        )


def _probe() -> None:
    """Wrap one layer of each dispatched type with ``init_lora_weights="loraone"`` and check that the
    result is PEFT's placeholder init, marked pending."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer

    class _Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.emb = nn.Embedding(5, 4)
            self.conv2 = nn.Conv2d(2, 3, 1)
            self.conv1 = nn.Conv1d(2, 3, 1)
            self.mha = nn.MultiheadAttention(4, 1)

    cfg = LoraConfig(
        r=2, lora_alpha=2, target_modules=["lin", "emb", "conv2", "conv1", "mha"], init_lora_weights=LORAONE
    )
    # the probe's own placeholder layers must not move the real cohort
    global _current_cohort
    saved = _current_cohort
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(_Probe(), cfg)
    finally:
        _current_cohort = saved
    layers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name in ("lin", "emb", "conv2", "conv1", "mha"):
        layer = layers.get(name)
        if layer is None:
            raise AssertionError(f"no LoRA layer was created for the probe's {name!r} module")
        zero = _lora_b(layer, "default")
        if zero is None or bool(zero.detach().any()):
            raise AssertionError(f"the {type(layer).__name__} layer is not at the placeholder init (B = 0)")
        if "default" not in pending_adapters(layer):
            raise AssertionError(f"the {type(layer).__name__} layer was not routed through the hook")


def install() -> None:
    """Install the ``init_lora_weights="loraone"`` hook on PEFT (idempotent).

    Raises:
        PeftCompatibilityError: if the installed PEFT is too old, changed the method the hook wraps, handles
            ``"loraone"`` itself, or no longer produces the placeholder init through the hook.
    """
    layer_cls = _lora_layer_class()
    if is_installed():
        return
    _static_checks(layer_cls)
    original = layer_cls.__dict__["reset_lora_parameters"]
    layer_cls.reset_lora_parameters = _make_wrapper(original)
    try:
        _probe()
    except Exception as exc:
        layer_cls.reset_lora_parameters = original
        import peft

        raise PeftCompatibilityError(
            f"peft {peft.__version__}: init_lora_weights='{LORAONE}' no longer reaches PEFT's placeholder init "
            f"through peft_loraone's hook ({type(exc).__name__}: {exc}). Pin peft (>= {MIN_PEFT_VERSION}, tested "
            "with 0.21) and report this at peft-loraone."
        ) from exc
