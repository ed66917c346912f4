r"""LoRA-One initialization of a PEFT LoRA adapter: one-step full gradient -> engine -> ``lora_A``/``lora_B``.

For every LoRA layer of the adapter whose base layer is a ``Linear`` (or GPT-2's ``Conv1D``), with G the
gradient of the training loss with respect to its base weight $W_0$ (averaged over the batches, with
every adapter disabled, which is the base model's gradient since LoRA starts at B = 0):

    B = U_r sqrt(S_r) / sqrt(gamma * sigma1)      # Shape: (out_features, r)
    A = sqrt(S_r) V_r^T / sqrt(gamma * sigma1)    # Shape: (r, in_features)
    s * B @ A = (s / (gamma * sigma1)) * [-G]_r

where ``U_r, S_r, V_r`` are the top-r singular triplets of -G (computed by the Go engine), sigma1 its
largest singular value and ``s`` the layer's scaling. W0 is not modified; the initialized model is one
full fine-tuning gradient step, truncated to rank r, with spectral norm s/gamma.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import inspect
import logging
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import _distributed, _peft_hook
from ._capture import GradientCapture, Target, engine_overlaps_backward
from ._peft_hook import is_loraone
from .config import LoraOneConfig
from .errors import LoraOneWarning
from .report import InitReport, ModuleReport, SkippedModule

logger = logging.getLogger(__name__)

__all__ = ["get_peft_model", "initialize"]

_SUPPORTED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_QUANT_BACKENDS = ("bnb", "gptq", "awq", "aqlm", "eetq", "hqq", "torchao", "inc", "hadamard", "quanto", "fp8")
_REPORTS_ATTR = "_peft_loraone_reports"

Data = Union[Iterable[Any], Callable[..., Any]]


# ---------------------------------------------------------------------------------------------------------
# model inspection
# ---------------------------------------------------------------------------------------------------------


class _InjectedTuner:
    """The parts of a ``LoraModel`` that :func:`initialize` uses, for a model whose LoRA layers were injected
    without a ``PeftModel`` wrapper (``peft.inject_adapter_in_model``, transformers' ``model.add_adapter``):
    PEFT then stores the adapter configs as ``model.peft_config``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.peft_config = model.peft_config  # the same dict: writing an entry updates the model's


def _tuner(model: nn.Module):
    from peft import PeftModel
    from peft.tuners.lora import LoraModel
    from peft.tuners.lora.layer import LoraLayer

    if isinstance(model, PeftModel):
        tuner = model.base_model
    else:
        tuner = model
    if isinstance(tuner, LoraModel):
        return tuner
    configs = getattr(model, "peft_config", None)
    has_lora = isinstance(model, nn.Module) and any(isinstance(m, LoraLayer) for m in model.modules())
    if has_lora and isinstance(configs, dict):
        return _InjectedTuner(model)
    hint = " (its LoRA layers have no `peft_config` attribute next to them)" if has_lora else ""
    raise TypeError(
        "peft_loraone.initialize expects a PEFT LoRA model: the result of peft.get_peft_model with a LoraConfig, "
        "or a model whose LoRA layers were added by peft.inject_adapter_in_model / model.add_adapter; got "
        f"{type(model).__name__}{hint}."
    )


def _is_quantized(layer: nn.Module) -> bool:
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    module = type(layer).__module__
    if any(f".lora.{backend}" in module for backend in _QUANT_BACKENDS):
        return True
    if weight is None:
        return False
    if getattr(weight, "quant_state", None) is not None or getattr(base, "quant_state", None) is not None:
        return True
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        return True
    return isinstance(weight, torch.Tensor) and weight.dtype not in _SUPPORTED_FLOATS


def _quantized_kind(layer: nn.Module) -> Optional[str]:
    """The quantized LoRA layers LoRA-One initializes from activations (``capture="dense"``), else None:

    - 'bnb-4bit', 'bnb-8bit': PEFT's bitsandbytes layers over ``Linear4bit`` (packed ``Params4bit`` weight with a
      quant_state) or ``Linear8bitLt``;
    - 'hqq': PEFT's ``HqqLoraLinear`` over hqq's ``HQQLinear``;
    - 'torchao': PEFT's ``TorchaoLoraLinear`` over a Linear whose weight is a torchao tensor subclass.

    Each computes ``y = x deq(W)ᵀ + b`` (up to the backend's rounding of x), so deltaᵀ x is the gradient with
    respect to the dequantized weight. Reads class and module names only: no backend is imported here.
    """
    module = type(layer).__module__
    base = layer.get_base_layer()
    if module.startswith("peft.tuners.lora.bnb"):
        names = {c.__name__ for c in type(base).__mro__ if c.__module__.startswith("bitsandbytes")}
        if "Linear4bit" in names and type(getattr(base, "weight", None)).__name__ == "Params4bit":
            return "bnb-4bit"
        if "Linear8bitLt" in names:
            return "bnb-8bit"
    elif module.startswith("peft.tuners.lora.hqq") and hasattr(base, "W_q"):
        return "hqq"
    elif module.startswith("peft.tuners.lora.torchao") and type(getattr(base, "weight", None)).__module__.startswith(
        "torchao."
    ):
        return "torchao"
    return None


def _base_weight(layer: nn.Module) -> Any:
    """The stored weight of a LoRA layer's base (hqq keeps it as ``W_q``)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    return base.W_q if weight is None and hasattr(base, "W_q") else weight


#: Layer kinds LoRA-One initializes; the quantized ones only where G comes from activations (not capture="weight").
_QUANTIZED_KINDS = ("bnb-4bit", "bnb-8bit", "hqq", "torchao")
_SUPPORTED_KINDS = ("linear", *_QUANTIZED_KINDS)


def _layer_kind(layer: nn.Module) -> str:
    """'linear' (Linear, Conv1D), one of :data:`_QUANTIZED_KINDS`, 'quantized' (any other quantized base:
    unsupported) or the name of an unsupported layer type."""
    from peft.tuners.lora import layer as lora_layer

    quantized = _quantized_kind(layer)
    if quantized is not None:
        return quantized
    if _is_quantized(layer):
        return "quantized"
    if type(layer) is lora_layer.Linear or (
        isinstance(layer, lora_layer.Linear) and type(layer).__module__.startswith("peft.tuners.lora.layer")
    ):
        return "linear"
    return type(layer).__name__


def _lora_layers(tuner: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """LoRA layers holding ``adapter_name``, outermost first; layers nested inside another LoRA layer's base
    (MultiheadAttention's ``out_proj``) belong to their parent and are left out."""
    from peft.tuners.lora.layer import LoraLayer

    found: list[tuple[str, nn.Module]] = []
    parents: list[str] = []
    for name, module in tuner.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        if any(name.startswith(p + ".") for p in parents):
            continue
        parents.append(name)
        found.append((name, module))
    return found


def _all_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora.layer import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------

_END = object()


def _is_train_step(data: Any) -> bool:
    return callable(data) and not isinstance(data, (Iterable, Mapping, torch.Tensor, nn.Module))


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def return_freed_host_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim(0)``); returns
    whether it could (False off glibc).

    After the last backward on the CPU, the memory of the freed activations stays resident in the C heap;
    the engine's Go heap and the output factors would then come on top of it and raise the peak above the
    forward/backward passes'. Measured on a 134M Llama (8 batches, 1 thread): the trim released ~114 MB,
    and the peak of ``initialize`` stayed at the backward's (457-461 MB over the model) instead of rising to
    462-495 MB; the trim itself took 7 ms.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _batches(data: Iterable[Any], limit: int):
    """Yield ``(batch, is_last)`` for at most ``limit`` batches; looks one batch ahead to know the last."""
    it = iter(data)
    current = next(it, _END)
    if current is _END:
        raise ValueError("peft_loraone.initialize: `data` yielded no batches.")
    for index in range(limit):
        upcoming = _END if index == limit - 1 else next(it, _END)
        yield current, upcoming is _END
        if upcoming is _END:
            return
        current = upcoming


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.is_inference():  # made under torch.inference_mode(): autograd cannot save it for backward
            obj = obj.clone()
        return obj.to(device) if obj.device != device else obj
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _batch_size(batch: Any) -> Optional[int]:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.ndim:
            return int(v.shape[0])
    return None


def _loss(model: nn.Module, batch: Any, loss_fn: Optional[Callable[[Any, Any], Any]]) -> torch.Tensor:
    if isinstance(batch, Mapping):
        output = model(**batch)
    elif isinstance(batch, (list, tuple)):
        output = model(*batch)
    else:
        output = model(batch)
    if loss_fn is not None:
        loss = loss_fn(output, batch)
    else:
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError(
                "peft_loraone.initialize: the model output has no `loss`; put labels in the batches or pass "
                "LoraOneConfig(loss_fn=lambda output, batch: ...)."
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"peft_loraone.initialize: the loss must be a scalar tensor, got "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}."
        )
    if not loss.requires_grad:
        raise ValueError(
            "peft_loraone.initialize: the loss does not depend on any target weight (no grad_fn); check "
            "target_modules and that the forward pass uses them"
            + ("" if torch.is_grad_enabled() else ", and that the model's forward does not turn autograd off "
               "(torch.no_grad() inside forward or a loss_fn)")
            + "."
        )
    return loss.reshape(())


def _call_train_step(train_step: Callable[..., Any], model: nn.Module) -> None:
    try:
        inspect.signature(train_step).bind(model)
    except TypeError:
        train_step()  # PEFT's LoRA-GA convention: train_step()
    except ValueError:  # no signature available (builtins)
        train_step(model)
    else:
        train_step(model)


def _progress(iterable: Any, *, enabled: bool, **kwargs: Any):
    if enabled and torch.distributed.is_available() and torch.distributed.is_initialized():
        enabled = torch.distributed.get_rank() == 0
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def _device_of(layer: nn.Module) -> torch.device:
    for p in layer.get_base_layer().parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def _materialize(layer: nn.Module, adapter_name: str, peft_config: Any) -> bool:
    """Give meta adapter tensors (``low_cpu_mem_usage=True``) real storage at PEFT's default init."""
    device = _device_of(layer)
    changed = False
    for attr in ("lora_A", "lora_B"):
        modules = getattr(layer, attr, {})
        if adapter_name in modules and any(p.is_meta for p in modules[adapter_name].parameters()):
            modules[adapter_name].to_empty(device=device)
            changed = True
    for attr in ("lora_embedding_A", "lora_embedding_B"):
        params = getattr(layer, attr, {})
        if adapter_name in params and params[adapter_name].is_meta:
            old = params[adapter_name]
            params[adapter_name] = nn.Parameter(torch.empty_like(old, device=device), requires_grad=old.requires_grad)
            changed = True
    if changed:
        with torch.no_grad():
            layer.reset_lora_parameters(adapter_name, True)
    magnitudes = getattr(layer, "lora_magnitude_vector", {})
    if adapter_name in magnitudes and any(p.is_meta for p in magnitudes[adapter_name].parameters()):
        layer.lora_variant[adapter_name].init(layer, adapter_name=adapter_name, config=peft_config)
        changed = True
    return changed


def _meta_adapter_tensors(root: nn.Module, adapter_name: str) -> list[str]:
    """Names of the parameters and buffers of adapter ``adapter_name`` still on the meta device."""
    key = f".{adapter_name}"
    return [
        n
        for n, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]
        if t.is_meta and (key + "." in n or n.endswith(key))
    ]


def _adapter_layers(root: nn.Module, adapter_name: str) -> list[nn.Module]:
    """Every LoRA and trainable-token layer holding ``adapter_name``, nested ones included (MultiheadAttention's
    ``out_proj`` inside its LoRA wrapper; ``trainable_token_indices`` layers)."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    found = []
    for m in root.modules():
        if isinstance(m, LoraLayer) and adapter_name in m.r:
            found.append(m)
        elif isinstance(m, TrainableTokensLayer) and adapter_name in m.token_indices:
            found.append(m)
    return found


def _materialize_all(root: nn.Module, adapter_name: str, peft_config: Any, *, dry_run: bool = False) -> list[str]:
    """Give every meta tensor of the adapter (``get_peft_model(..., low_cpu_mem_usage=True)``) real storage at
    PEFT's default init, at every depth. Returns the names that would stay on the meta device; with ``dry_run``
    nothing is changed (``initialize`` calls it first, so it can refuse before touching the model)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    before = _meta_adapter_tensors(root, adapter_name)
    if not before:
        return []
    covered: set[int] = set()
    for layer in _adapter_layers(root, adapter_name):
        if isinstance(layer, TrainableTokensLayer):
            if layer.tied_adapter is not None:
                continue  # shares its delta with the layer it is tied to
            delta = layer.trainable_tokens_delta.get(adapter_name)
            if delta is not None and delta.is_meta and not layer.get_base_layer().weight.is_meta:
                covered.add(id(delta))
                if not dry_run:
                    with torch.no_grad():
                        layer.update_layer(adapter_name, token_indices=layer.token_indices[adapter_name], init_weights=True)
            continue
        for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
            modules = getattr(layer, attr, {})
            if adapter_name in modules:
                covered.update(id(p) for p in modules[adapter_name].parameters() if p.is_meta)
        for attr in ("lora_embedding_A", "lora_embedding_B"):
            params = getattr(layer, attr, {})
            if adapter_name in params and params[adapter_name].is_meta:
                covered.add(id(params[adapter_name]))
        if not dry_run:
            _materialize(layer, adapter_name, peft_config)
    if dry_run:
        tensors = dict([*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)])
        return [n for n in before if id(tensors[n]) not in covered]
    return _meta_adapter_tensors(root, adapter_name)


def _dora_magnitude(t: Target, adapter_name: str) -> torch.Tensor:
    """DoRA's magnitude at init: the row norms of W0 + s·B·A (PEFT's ``get_weight_norm``)."""
    layer = t.layer
    if t.kind in _QUANTIZED_KINDS:  # the dequantized weight, as PEFT's DoRA uses for quantized layers
        from peft.utils.integrations import dequantize_module_weight

        base = dequantize_module_weight(t.base).detach()
    else:
        base = _distributed.full(t.weight.detach())  # FSDP2: the whole weight of a sharded DTensor
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    w = (base.t() if t.fan_in_fan_out else base).to(dtype)  # Shape: (out_features, in_features)
    lora_a = _distributed.full(layer.lora_A[adapter_name].weight.detach()).to(dtype)
    lora_b = _distributed.full(layer.lora_B[adapter_name].weight.detach()).to(dtype)
    return torch.linalg.norm(w + t.scaling * (lora_b @ lora_a), dim=1)


def _write(done: list[Target], adapter_name: str) -> None:
    """Copy every computed factor into the adapter, in place and in the adapter's dtype."""
    staged = []
    for t in done:
        a_param = t.layer.lora_A[adapter_name].weight  # Shape: (r, in_features)
        b_param = t.layer.lora_B[adapter_name].weight  # Shape: (out_features, r)
        k = t.rank
        new_a = _distributed.full(a_param.detach()).clone()  # FSDP2 shards (DTensor): written whole, resharded
        new_a[:k].copy_(t.out_a)  # rows beyond min(r, out, in) keep PEFT's Kaiming init
        new_b = torch.zeros(b_param.shape, dtype=b_param.dtype, device=new_a.device)
        new_b[:, :k].copy_(t.out_b)
        staged.append((a_param, new_a, b_param, new_b))
    with torch.no_grad():
        for a_param, new_a, b_param, new_b in staged:
            a_param.copy_(_distributed.like(a_param, new_a))
            b_param.copy_(_distributed.like(b_param, new_b))
        for t in done:
            magnitudes = getattr(t.layer, "lora_magnitude_vector", {})
            if adapter_name in magnitudes:
                dora = magnitudes[adapter_name]
                dora.weight.copy_(_distributed.like(dora.weight, _dora_magnitude(t, adapter_name).to(dora.weight.dtype)))
                if hasattr(dora, "_cache_clear"):
                    dora._cache_clear()


# ---------------------------------------------------------------------------------------------------------
# provenance next to saved adapters
# ---------------------------------------------------------------------------------------------------------


class _SaveWithProvenance:
    """Instance attribute that shadows ``PeftModel.save_pretrained`` on an initialized model: saves as PEFT does,
    then writes the provenance file of each saved, LoRA-One-initialized adapter next to it. A plain object (not a
    bound method), so the model still deep-copies and pickles."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        import os

        model = self.model
        type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        reports: dict[str, InitReport] = model.__dict__.get(_REPORTS_ATTR, {})
        selected = kwargs.get("selected_adapters") or (args[1] if len(args) > 1 else None) or list(model.peft_config)
        for name in selected:
            if name in reports:
                reports[name].save(save_directory if name == "default" else os.path.join(save_directory, name))


def _remember(model: nn.Module, report: InitReport) -> None:
    from peft import PeftModel

    reports = model.__dict__.setdefault(_REPORTS_ATTR, {})
    reports[report.adapter_name] = report
    if isinstance(model, PeftModel) and "save_pretrained" not in model.__dict__:
        object.__setattr__(model, "save_pretrained", _SaveWithProvenance(model))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import peft

    try:
        own = version("peft-loraone")
    except PackageNotFoundError:
        own = "unknown"
    return {"peft_loraone": own, "peft": peft.__version__, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------


def _grad_enabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with autograd on, also when called under ``torch.no_grad()`` or ``torch.inference_mode()``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper


@_grad_enabled
def initialize(
    model: nn.Module,
    data: Data,
    *,
    adapter_name: str = "default",
    config: Optional[LoraOneConfig] = None,
    **config_overrides: Any,
) -> InitReport:
    r"""Initialize the LoRA adapter ``adapter_name`` of ``model`` with LoRA-One, in place.

    For each target layer with base weight $W_0$ (shape out x in) and LoRA rank r, scaling s:

        G = (1/N) sum_i dL(batch_i)/dW0            (all adapters disabled: the base model's gradient)
        U, S, V = top-r SVD of -G,  sigma1 = S[0]
        lora_B = U diag(sqrt(S)) / sqrt(gamma sigma1),   lora_A = diag(sqrt(S)) V^T / sqrt(gamma sigma1)

    so ``layer.get_delta_weight(adapter) == (s / (gamma sigma1)) [-G]_r`` (transposed for Conv1D). G is captured
    as ``LoraOneConfig.capture`` says: ``"dense"`` (default) from each base layer's input x and output gradient
    delta (G = mean of deltaᵀ x; no weight requires grad, so bitsandbytes 4-/8-bit, hqq and torchao bases work),
    ``"weight"`` from the target base weights' ``.grad``, or ``"sketch"`` (the same hooks as ``"dense"``, G never
    formed: randomized sketches of it, reconstructed by the engine with an error estimate; ``sketch_passes=2``
    replays the batches once more); either way accumulated in float32; every
    ``requires_grad`` flag, ``.grad``, the train/eval mode and the enabled adapters are restored afterwards,
    also on error. The factors are computed for all layers first and written (``copy_``, same Parameters,
    the adapter's dtype) only when all succeeded, so a failure leaves the model as it was. Autograd is switched on
    for the call, so it also works under ``torch.no_grad()`` or ``torch.inference_mode()`` (batches made under
    inference mode are cloned into ordinary tensors). Models whose LoRA layers were injected without a
    ``PeftModel`` (``peft.inject_adapter_in_model``, transformers' ``model.add_adapter``) are accepted too; adapter
    tensors left on the meta device by ``low_cpu_mem_usage=True`` (nested LoRA layers and trainable tokens included)
    get PEFT's default init where LoRA-One does not write them.

    Args:
        model: A ``PeftModel`` (or ``LoraModel``) whose adapter was created with ``init_lora_weights="loraone"``.
        data: An iterable of batches (a dict is passed as ``model(**batch)``, a tuple or list as
            ``model(*batch)``, anything else as ``model(batch)``; tensors are moved to the model's device; a single
            dict is refused with a ``TypeError``: pass ``[batch]``), or a
            ``train_step(model)`` / ``train_step()`` callable that runs forward and backward itself (called
            ``num_batches`` times).
        adapter_name: The adapter to initialize; other adapters are disabled during the gradient pass and not
            touched.
        config: A :class:`LoraOneConfig`; ``None`` means the defaults.
        **config_overrides: Fields of :class:`LoraOneConfig` to override (``gamma=64, num_batches=16``).

    Returns:
        An :class:`InitReport` (per module rank, sigma1, accuracy estimate, time, capture mode and the bytes its
        accumulator held; skipped modules and why).

    Raises:
        TypeError: ``model`` is not a PEFT LoRA model, ``config`` is not a ``LoraOneConfig``, ``data`` is neither
            iterable nor callable, or an unknown override is given.
        ValueError: unknown adapter, adapter not created with ``init_lora_weights="loraone"`` (or already
            initialized), a merged adapter, quantized target layers (any with ``capture="weight"``; of an unsupported
            backend in every mode), an unsupported LoRA variant, no Linear or
            Conv1D target, no batches, a loss that is missing or not a scalar, or an engine error (NaN/Inf
            gradient, ...).

    Example:
        ```python
        >>> cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
        ...                  init_lora_weights="loraone")
        >>> model = peft.get_peft_model(base, cfg)
        >>> report = peft_loraone.initialize(model, dataloader)
        >>> print(report)
        ```
    """
    start = time.perf_counter()
    # ---- validate everything before touching the model ----
    if config is None:
        config = LoraOneConfig()
    elif not isinstance(config, LoraOneConfig):
        raise TypeError(f"`config` must be a peft_loraone.LoraOneConfig or None, got {type(config).__name__}.")
    if config_overrides:
        known = {f.name for f in dataclasses.fields(LoraOneConfig)}
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise TypeError(f"peft_loraone.initialize got unknown LoraOneConfig field(s) {unknown}.")
        config = dataclasses.replace(config, **config_overrides)
    model = _distributed.unwrap(model)  # DistributedDataParallel: the pass runs on the module inside
    tuner = _tuner(model)
    if not isinstance(adapter_name, str) or adapter_name not in tuner.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found; the model has adapters {sorted(tuner.peft_config)}.")
    peft_config = tuner.peft_config[adapter_name]
    if not is_loraone(getattr(peft_config, "init_lora_weights", None)):
        already = adapter_name in model.__dict__.get(_REPORTS_ATTR, {})
        raise ValueError(
            f"Adapter {adapter_name!r} has init_lora_weights={peft_config.init_lora_weights!r}"
            + (" because it was already initialized by peft_loraone.initialize" if already else "")
            + "; LoRA-One initializes adapters created with LoraConfig(init_lora_weights='loraone')."
        )
    if isinstance(data, Mapping):
        raise TypeError(
            f"`data` is a single batch (a {type(data).__name__} with keys {list(data)[:5]}); initialize iterates "
            "`data`, which would yield the keys. Pass a list of batches (`[batch]` for one batch) or a DataLoader."
        )
    if _is_train_step(data):
        train_step: Optional[Callable[..., Any]] = data
    elif isinstance(data, (Iterable, torch.Tensor)) and not isinstance(data, (str, bytes)):
        train_step = None
    else:
        raise TypeError(f"`data` must be an iterable of batches or a train_step callable, got {type(data).__name__}.")
    if train_step is not None and config.capture == "sketch" and config.sketch_passes == 2:
        raise ValueError(
            "capture='sketch' with sketch_passes=2 replays the batches in a second pass, which a train_step callable "
            "cannot do (initialize never sees its batches). Pass the batches instead (a list, a DataLoader or any "
            "iterable: the first pass keeps them for the replay), or use sketch_passes=1."
        )

    merged = [n for n, m in _all_lora_layers(tuner.model) if m.merged]
    if merged:
        raise ValueError(
            f"Cannot initialize adapter {adapter_name!r}: the base weights of {merged} hold merged adapters, so "
            "the gradient would not be taken at W0. Call model.unmerge_adapter() first."
        )
    layers = _lora_layers(tuner, adapter_name)
    unmaterializable = _materialize_all(tuner.model, adapter_name, peft_config, dry_run=True)
    if unmaterializable:
        raise ValueError(
            f"Adapter {adapter_name!r} has tensors on the meta device that peft_loraone cannot give PEFT's default "
            f"init ({unmaterializable}), so the model would not run after initialize. Create the model without "
            "low_cpu_mem_usage=True, or load those tensors first."
        )
    kinds = {n: _layer_kind(m) for n, m in layers}
    quantized = [n for n, m in layers if kinds[n] == "quantized"]
    if quantized:
        types = sorted(
            {
                f"{type(m).__name__} over {type(m.get_base_layer()).__name__} "
                f"with a {type(_base_weight(m)).__name__} {getattr(_base_weight(m), 'dtype', '')} weight".rstrip()
                for n, m in layers
                if kinds[n] == "quantized"
            }
        )
        raise ValueError(
            f"LoRA-One cannot initialize quantized base layers ({quantized}): {'; '.join(types)}: not supported "
            "(LoRA-One supports bitsandbytes 4-bit and 8-bit, hqq and torchao bases, with capture='dense'). "
            "Initialize on a non-quantized (e.g. bfloat16) copy of the model, save the adapter and load it onto the "
            "quantized model."
        )
    frozen = [n for n in kinds if kinds[n] in _QUANTIZED_KINDS]
    if frozen and config.capture == "weight":
        raise ValueError(
            f"LoRA-One with capture='weight' cannot initialize quantized base layers ({frozen}): their weights cannot "
            "take a gradient. Use LoraOneConfig(capture='dense') (the default), which takes G from the layers' "
            "inputs and output gradients, i.e. the gradient with respect to the dequantized weight."
        )
    variants = [
        f"{n} ({type(m.lora_variant[adapter_name]).__name__})"
        for n, m in layers
        if adapter_name in getattr(m, "lora_variant", {})
        and type(m.lora_variant[adapter_name]).__name__ != "DoraLinearVariant"
        and kinds[n] in _SUPPORTED_KINDS
    ]
    if variants:
        raise ValueError(f"LoRA-One supports plain LoRA and DoRA only; unsupported variant on {variants}.")

    targets: list[Target] = []
    skipped: list[SkippedModule] = []
    for name, layer in layers:
        kind = kinds[name]
        if kind not in _SUPPORTED_KINDS:
            skipped.append(SkippedModule(name, kind, "layer type not supported by LoRA-One yet (default init)"))
            continue
        weight = _base_weight(layer)
        if weight.is_meta:
            raise ValueError(f"The base weight of {name!r} is on the meta device; load the model's weights first.")
        a_dtype = layer.lora_A[adapter_name].weight.dtype
        targets.append(
            Target(
                name=name,
                layer=layer,
                weight=weight,
                fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
                r=int(layer.r[adapter_name]),
                scaling=float(layer.scaling[adapter_name]),
                out_dtype=torch.float64 if a_dtype == torch.float64 else torch.float32,
                # G's shape from the adapter's own factors: a packed quantized weight's shape is not (out, in)
                out_features=int(layer.lora_B[adapter_name].weight.shape[0]),
                in_features=int(layer.lora_A[adapter_name].weight.shape[1]),
                kind=kind,
            )
        )
    if not targets:
        raise ValueError(
            f"Adapter {adapter_name!r} has no Linear or Conv1D layer for LoRA-One to initialize "
            f"(found: {[f'{s.name} ({s.layer_type})' for s in skipped] or 'no LoRA layers'})."
        )
    if skipped:
        warnings.warn(
            "LoRA-One initializes Linear and Conv1D layers only; these keep PEFT's default init (B = 0): "
            + ", ".join(f"{s.name} ({s.layer_type})" for s in skipped),
            LoraOneWarning,
            stacklevel=2,
        )

    # ---- gradient cache (cache_dir): the batches are drawn once, hashed, and run from that list on a miss ----
    cache = None
    if config.cache_dir is not None:
        from ._cache import GradientCache, take_batches

        if train_step is not None and config.cache_key is None:
            raise ValueError(
                "LoraOneConfig(cache_dir=...) with a train_step callable needs cache_key='...' naming its data: "
                "initialize never sees the batches a train_step uses, so it cannot hash them."
            )
        if train_step is None:
            data = take_batches(data, config.num_batches)
        cache = GradientCache.prepare(config, model, targets, data if train_step is None else None,
                                      targets[0].weight.device)

    # ---- gradient pass; on an accelerator the engine starts on each module as soon as its G is final ----
    device = targets[0].weight.device
    samples: Optional[int] = 0 if train_step is None else None
    session = _distributed.Session.current(config.dist_timeout)  # torch.distributed with >1 rank: G over every rank's batches
    overlap = engine_overlaps_backward(device) and session is None  # the sums are reduced before any job starts
    _distributed.check_supported(session, model, config.capture)
    logger.debug("LoRA-One: engine %s backward", "overlaps" if overlap else "runs after")
    capture = GradientCapture(
        model,
        targets,
        gamma=config.gamma,
        svd=config.svd_settings(),
        train_mode=config.train_mode,
        overlap=overlap,
        mode=config.capture,
        accumulate_on=config.accumulate_on,
        options=config.capture_options(replayable=train_step is None),
    )
    capture_start = time.perf_counter()
    with capture, _distributed.guard(session, capture):
        if cache is not None and cache.entry is not None:  # G (or its sketches) from the cache: no batches run
            samples = cache.restore(capture)
        elif train_step is not None:
            steps = _progress(range(config.num_batches), enabled=config.progress, desc="LoRA-One gradient", unit="step")
            for i in steps:
                capture.begin_batch(last=i == config.num_batches - 1)
                _call_train_step(train_step, model)
        else:
            bar = _progress(
                _batches(data, config.num_batches) if session is None else session.each_batch(
                    model, _batches(data, config.num_batches)
                ),
                enabled=config.progress,
                total=config.num_batches,
                desc="LoRA-One gradient",
                unit="batch",
            )
            # a two-pass sketch replays the same batches, kept as they came (a re-iterated DataLoader could shuffle)
            replay: Optional[list[Any]] = [] if capture.passes > 1 else None
            rng = None
            if replay is not None:
                rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None)
            for batch, last in bar:
                capture.begin_batch(last=last and replay is None)
                if replay is not None:
                    replay.append(batch)
                size = _batch_size(batch)
                samples = None if samples is None or size is None else samples + size
                _loss(model, _to_device(batch, device), config.loss_fn).backward()
            if replay is not None:
                if session is not None:
                    session.begin_pass(capture, samples)  # agreement, then pass 1's sketches all-reduced
                else:
                    capture.begin_pass()
                torch.set_rng_state(rng[0])  # the same dropout masks in train mode
                if rng[1] is not None:
                    torch.cuda.set_rng_state_all(rng[1])
                again = _progress(replay, enabled=config.progress, desc="LoRA-One sketch, pass 2", unit="batch")
                for i, batch in enumerate(again):
                    capture.begin_batch(last=i == len(replay) - 1)
                    _loss(model, _to_device(batch, device), config.loss_fn).backward()
                del replay
        if not overlap:
            return_freed_host_memory()  # the SVDs then run in the pages the activations freed
        no_grad = capture.finish() if session is None else session.finish(capture, samples)
    capture_seconds = time.perf_counter() - capture_start
    if capture.batches < config.num_batches and train_step is None:
        warnings.warn(
            f"`data` yielded {capture.batches} batches, fewer than num_batches={config.num_batches}; G is the "
            f"mean over {capture.batches}.",
            LoraOneWarning,
            stacklevel=2,
        )

    # ---- collect every result before writing anything ----
    from .errors import ZeroGradientError

    done: list[Target] = []
    modules: list[ModuleReport] = []
    zero: list[Target] = []
    pending = [t for t in targets if t.job is not None]
    try:
        capture.drain_stale()
        for t in _progress(pending, enabled=config.progress, desc="LoRA-One SVD", unit="module"):
            try:
                factors = t.job.result()
            except ZeroGradientError:
                zero.append(t)
                continue
            except Exception as exc:
                exc.add_note(f"peft_loraone: while computing the LoRA-One factors of {t.name!r}")
                raise
            finally:
                t.job = None
            seconds = time.perf_counter() - t.submitted_at
            done.append(t)
            modules.append(
                ModuleReport(
                    name=t.name,
                    shape=t.shape,
                    rank=t.rank,
                    r=t.r,
                    scaling=t.scaling,
                    sigma1=float(factors.sigma1),
                    accuracy=float(factors.accuracy),
                    passes=int(factors.passes),
                    converged=bool(factors.converged),
                    seconds=seconds,
                    capture=t.accumulator.mode,
                    accumulator_bytes=t.accumulator.nbytes,
                    accumulated_on=str(t.accumulator.device),
                    residual=getattr(factors, "residual", None),
                    sketch_size=getattr(factors, "sketch_size", None),
                    ambiguous=bool(getattr(factors, "ambiguous", False)),
                    gap_ratio=float(getattr(factors, "gap_ratio", 0.0)),
                    residual_excess=getattr(factors, "residual_excess", None),
                )
            )
    except BaseException:
        capture.cancel()
        raise
    finally:
        from .engine import release_memory

        release_memory()  # every job is done: the engine's reusable scratch memory goes back to the OS
    if not done:
        raise ValueError(
            f"No target weight of adapter {adapter_name!r} received a non-zero gradient, so LoRA-One has nothing "
            "to initialize from. Check that the loss uses the target modules; with gradient checkpointing, use "
            "use_reentrant=False or call model.enable_input_require_grads() first."
        )
    for t in no_grad:
        skipped.append(SkippedModule(t.name, "Linear", "no gradient: not used by the loss (B = 0 kept)"))
    for t in zero:
        skipped.append(SkippedModule(t.name, "Linear", "zero gradient (B = 0 kept)"))
    if zero or no_grad:
        warnings.warn(
            "LoRA-One: these modules got no or a zero gradient and keep B = 0 (placeholder init): "
            + ", ".join(t.name for t in [*no_grad, *zero]),
            LoraOneWarning,
            stacklevel=2,
        )

    if cache is not None:
        cache.store(capture, samples)  # after a pass that ran: what the accumulators hold, for the next call

    # ---- write: materialize meta adapters, copy factors, DoRA magnitudes ----
    left = _materialize_all(tuner.model, adapter_name, peft_config)
    if left:  # the dry run said these could be materialized; PEFT changed under us
        raise RuntimeError(f"peft_loraone: adapter tensors {left} are still on the meta device; please report this.")
    _write(done, adapter_name)
    for _, layer in _all_lora_layers(tuner.model):
        _peft_hook.clear_pending(layer, adapter_name)
    # the saved adapter config must load in stock PEFT; copy first, so the caller's LoraConfig object (which
    # PEFT stores as is) still says "loraone" and can create the next model
    peft_config = copy.deepcopy(peft_config)
    peft_config.init_lora_weights = True
    tuner.peft_config[adapter_name] = peft_config

    order = {t.name: i for i, t in enumerate(targets)}
    modules.sort(key=lambda m: order[m.name])
    report = InitReport(
        adapter_name=adapter_name,
        modules=modules,
        skipped=skipped,
        batches=capture.batches if session is None else session.batches,
        samples=samples if session is None else session.samples,
        config=config.to_dict(),
        capture_seconds=capture_seconds,
        total_seconds=time.perf_counter() - start,
        versions=_versions(),
        accumulator_bytes=sum(acc.nbytes for acc in capture.accumulators),
        cache=None if cache is None else cache.status(),
        **({} if session is None else session.report_fields()),
    )
    _remember(model, report)
    return report


def get_peft_model(
    base_model: nn.Module,
    peft_config: Any,
    *,
    train_data: Data,
    loraone_config: Optional[LoraOneConfig] = None,
    adapter_name: str = "default",
    return_report: bool = False,
    **peft_kwargs: Any,
):
    """``peft.get_peft_model`` followed by :func:`initialize`: a LoRA-One-initialized ``PeftModel`` in one call.

    Args:
        base_model: The model to adapt.
        peft_config: A ``peft.LoraConfig`` with ``init_lora_weights="loraone"`` (see :func:`peft_loraone.LoraConfig`).
        train_data: Batches or a ``train_step`` callable, as ``data`` of :func:`initialize`.
        loraone_config: A :class:`LoraOneConfig`, or ``None`` for the defaults.
        adapter_name: Name of the adapter.
        return_report: Also return the :class:`InitReport`.
        **peft_kwargs: Passed to ``peft.get_peft_model`` (``low_cpu_mem_usage``, ``autocast_adapter_dtype``, ...).

    Returns:
        The ``PeftModel``, or ``(model, report)`` when ``return_report`` is true.

    Raises:
        ValueError: ``peft_config`` does not select ``init_lora_weights="loraone"``; and everything
            :func:`initialize` raises.
    """
    import peft

    if not is_loraone(getattr(peft_config, "init_lora_weights", None)):
        raise ValueError(
            "peft_loraone.get_peft_model needs a LoraConfig with init_lora_weights='loraone', got "
            f"{getattr(peft_config, 'init_lora_weights', type(peft_config).__name__)!r}."
        )
    model = peft.get_peft_model(base_model, peft_config, adapter_name=adapter_name, **peft_kwargs)
    report = initialize(model, train_data, adapter_name=adapter_name, config=loraone_config)
    return (model, report) if return_report else model
