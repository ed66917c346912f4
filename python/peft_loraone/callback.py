"""LoRA-One inside ``transformers.Trainer`` / TRL's ``SFTTrainer``: :class:`LoraOneCallback`.

The callback runs :func:`peft_loraone.initialize` at ``on_train_begin``, the last event before the first batch.
At that point (transformers 5.x ``Trainer._inner_training_loop``) the model is already wrapped (DDP, ...), the
optimizer and scheduler exist, a checkpoint being resumed has been loaded, and the callback receives the model
(``Trainer.model``, the unwrapped PEFT model) and the prepared training dataloader (this rank's shard) in its
keyword arguments. ``initialize`` writes ``lora_A``/``lora_B`` in place (``copy_`` into the same Parameters), so
an optimizer created before or after holds the initialized factors; Adam-like optimizers create their moments
at the first step, and any state already held for the adapter's parameters is dropped.

This module imports ``transformers``; ``peft_loraone`` exports :class:`LoraOneCallback` lazily, so
``import peft_loraone`` does not import it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback

from . import _peft_hook
from ._peft_hook import is_loraone
from .config import LoraOneConfig
from .initialize import _REPORTS_ATTR
from .report import InitReport

logger = logging.getLogger(__name__)

__all__ = ["LoraOneCallback"]

_LOADER_ATTRS = ("base_dataloader", "dataloader", "sampler", "batch_sampler", "generator", "synchronized_generator")


def _generators(root: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a dataloader draws its order from (its own, its sampler's, accelerate's
    synchronized one, nested wrappers'), each once."""
    found: dict[int, torch.Generator] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found[id(obj)] = obj
            continue
        for attr in _LOADER_ATTRS:
            try:
                stack.append(getattr(obj, attr, None))
            except Exception:  # a property that raises: not ours to judge
                continue
    return list(found.values())


class _RandomState:
    """Saves torch's global RNGs and the dataloader's generators and puts them back, so the batches and dropout
    masks of training are those it would have had without the initialization pass."""

    def __init__(self, loader: Any) -> None:
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.generators = [(g, g.get_state()) for g in _generators(loader)]

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        for g, state in self.generators:
            g.set_state(state)


def _take(loader: Iterable[Any], n: int) -> list[Any]:
    """The first ``n`` batches of ``loader`` (fewer if it has fewer), leaving it as if it had not been iterated.

    accelerate's ``DataLoaderShard`` registers itself with the ``GradientState`` when iteration starts and
    unregisters only when it is exhausted; stopping early would leave it registered (``in_dataloader`` stays
    true), so it is unregistered here."""
    it = iter(loader)
    try:
        return list(itertools.islice(it, n))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        state = getattr(loader, "gradient_state", None)
        refs = getattr(state, "dataloader_references", None)
        if refs is not None and loader in refs and hasattr(loader, "end"):
            loader.end()


def _inner_optimizer(optimizer: Any) -> Any:
    """accelerate's ``AcceleratedOptimizer`` (and similar wrappers) keep the real optimizer in ``.optimizer``."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen and not isinstance(optimizer, torch.optim.Optimizer):
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def _adapter_params(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """``lora_A``/``lora_B`` (and DoRA magnitude) Parameters of ``adapter_name``: what ``initialize`` writes."""
    from peft.tuners.lora.layer import LoraLayer

    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
            holder = getattr(module, attr, {})
            if adapter_name in holder:
                for p in holder[adapter_name].parameters():
                    params[id(p)] = p
    return list(params.values())


class LoraOneCallback(TrainerCallback):
    r"""Initialize a PEFT model's ``"loraone"`` adapters with LoRA-One when ``Trainer.train()`` starts.

    Add it to a ``transformers.Trainer`` (or TRL's ``SFTTrainer``, any ``Trainer`` subclass) whose model has an
    adapter created with ``LoraConfig(init_lora_weights="loraone")``; no separate pre-pass is needed:

    ```python
    model = peft.get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights="loraone"))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LoraOneCallback()])
    trainer.train()   # on_train_begin: G from the first 8 training batches -> SVD -> lora_A/lora_B, then training
    ```

    At ``on_train_begin`` (before the first forward pass and the first optimizer step) it runs
    :func:`peft_loraone.initialize` on the first ``num_batches`` batches of the trainer's own training dataloader
    (or on ``data``), on every rank, then training goes on from the initialized adapter:

    - **Which batches.** The random state (torch's global RNGs and the dataloader's generators) is saved before
      and restored after the pass, so training sees the same batches, in the same order, as without the callback:
      G comes from the batches the first optimizer step(s) will train on. Batches are micro-batches
      (``per_device_train_batch_size``); gradient accumulation does not change them.
    - **The optimizer.** ``initialize`` writes the factors in place into the same Parameters, so an optimizer
      created before the callback runs (``Trainer(optimizers=(opt, sched))``) or by the Trainer holds them. State
      an optimizer already keeps for these Parameters (moments from earlier steps) is dropped, with a warning,
      so Adam starts from zero moments at the initialized factors.
    - **Idempotent.** Only adapters whose config still says ``init_lora_weights="loraone"`` are initialized;
      ``initialize`` sets it to ``True`` afterwards, so a second ``train()`` does not initialize again. When
      training resumes from a checkpoint (``trainer.train(resume_from_checkpoint=...)``, ``state.global_step > 0``),
      the Trainer has already loaded the trained adapter: nothing is computed, the adapter is only marked as
      initialized (``init_lora_weights=True``).
    - **Distributed.** Each rank runs ``initialize`` on its own shard of the data (``torchrun``, ``accelerate
      launch``); with ``sync_ranks=True`` (default) ``initialize`` computes G as the mean over every rank's batches
      (sketches all-reduced, or each dense G reduced to one owner rank that decomposes it and broadcasts the
      factors), so every replica starts from the same adapter: the one a single process would compute on the union
      of the shards.
    - **Gradient checkpointing.** The gradient pass runs in eval mode by default, where transformers' models do
      not checkpoint; with ``LoraOneConfig(train_mode=True)`` the model's own checkpointing applies (transformers
      5 uses ``use_reentrant=False`` and ``enable_input_require_grads`` by default, which both work).
    - **The loss.** G is the gradient of the model's own ``output.loss`` (the batches' ``labels``), averaged over
      the batches; a Trainer with a custom ``compute_loss`` should pass the same loss as
      ``LoraOneConfig(loss_fn=...)``.

    Args:
        config: A :class:`LoraOneConfig`. ``None``: the defaults, with progress bars following
            ``TrainingArguments.disable_tqdm``.
        num_batches: How many batches G is averaged over (overrides ``config.num_batches``).
        data: Batches (an iterable) or a ``train_step`` callable to compute G from instead of the trainer's
            training dataloader (see :func:`peft_loraone.initialize`).
        adapter_name: The adapter to initialize. ``None``: every adapter whose config says
            ``init_lora_weights="loraone"``.
        sync_ranks: Under ``torch.distributed``, compute G over all ranks' batches (every rank gets the same
            adapter). ``False``: each rank initializes from its own shard alone (replicas then differ).

    Attributes:
        reports: ``{adapter_name: InitReport}`` of the adapters this callback initialized.
    """

    def __init__(
        self,
        config: Optional[LoraOneConfig] = None,
        *,
        num_batches: Optional[int] = None,
        data: Union[Iterable[Any], Callable[..., Any], None] = None,
        adapter_name: Optional[str] = None,
        sync_ranks: bool = True,
    ) -> None:
        if config is not None and not isinstance(config, LoraOneConfig):
            raise TypeError(f"`config` must be a peft_loraone.LoraOneConfig or None, got {type(config).__name__}.")
        if num_batches is not None:
            # validated by LoraOneConfig itself
            config = dataclasses.replace(config if config is not None else LoraOneConfig(), num_batches=num_batches)
        if adapter_name is not None and not isinstance(adapter_name, str):
            raise TypeError(f"`adapter_name` must be a string or None, got {type(adapter_name).__name__}.")
        self.config = config
        self.data = data
        self.adapter_name = adapter_name
        self.sync_ranks = bool(sync_ranks)
        self.reports: dict[str, InitReport] = {}
        self._marked: set[str] = set()  # adapters marked initialized on resume

    # ------------------------------------------------------------------------------------------------------
    # the hook
    # ------------------------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            raise ValueError("LoraOneCallback: the Trainer passed no model to on_train_begin.")
        adapters = self._pending_adapters(model)
        if not adapters:
            logger.info("LoraOneCallback: no adapter awaits LoRA-One initialization; nothing to do.")
            return
        if getattr(state, "global_step", 0) > 0:
            # resume_from_checkpoint: the Trainer loaded the trained adapter before on_train_begin
            self._mark_initialized(model, adapters)
            logger.info(
                "LoraOneCallback: training resumes at step %d with the adapter weights of the checkpoint; LoRA-One "
                "initialization of %s skipped (marked as initialized).",
                state.global_step,
                adapters,
            )
            return

        config = self.config
        if config is None:
            config = LoraOneConfig(progress=not getattr(args, "disable_tqdm", False))
        data = self.data if self.data is not None else kwargs.get("train_dataloader")
        if data is None:
            raise ValueError(
                "LoraOneCallback: the Trainer has no training dataloader at on_train_begin; pass the batches with "
                "LoraOneCallback(data=...)."
            )
        from ._distributed import local_only
        from .initialize import initialize

        random_state = _RandomState(data)
        try:
            if not callable(data) or hasattr(data, "__iter__"):
                batches: Any = _take(data, config.num_batches)
                if not batches:
                    raise ValueError("LoraOneCallback: the training data yielded no batches.")
            else:
                batches = data  # a train_step callable
            for name in adapters:
                if self.sync_ranks:
                    report = initialize(model, batches, adapter_name=name, config=config)
                else:
                    with local_only():
                        report = initialize(model, batches, adapter_name=name, config=config)
                self.reports[name] = report
                if getattr(state, "is_world_process_zero", True):
                    logger.info("LoraOneCallback: adapter %r initialized with LoRA-One\n%s", name, report)
        finally:
            random_state.restore()

        for name in adapters:
            params = _adapter_params(model, name)
            self._check_optimizer(kwargs.get("optimizer"), params, name)

    # ------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------

    def _pending_adapters(self, model: nn.Module) -> list[str]:
        from .initialize import _tuner

        tuner = _tuner(model)  # TypeError naming the problem when the model is not a PEFT LoRA model
        configs = tuner.peft_config
        if self.adapter_name is not None:
            if self.adapter_name not in configs:
                raise ValueError(
                    f"LoraOneCallback: adapter {self.adapter_name!r} not found; the model has {sorted(configs)}."
                )
            names = [self.adapter_name]
        else:
            names = list(configs)
        pending = [n for n in names if is_loraone(getattr(configs[n], "init_lora_weights", None))]
        done = set(model.__dict__.get(_REPORTS_ATTR, {})) | self._marked
        if not pending and not done.intersection(names):
            logger.warning(
                "LoraOneCallback: no adapter of the model was created with init_lora_weights='loraone' (adapters: "
                "%s); the callback does nothing.",
                {n: getattr(configs[n], "init_lora_weights", None) for n in names},
            )
        return pending

    def _mark_initialized(self, model: nn.Module, adapters: list[str]) -> None:
        """What ``initialize`` records after writing, without writing: the config says ``init_lora_weights=True``
        (a copy, as ``initialize`` does, so the caller's LoraConfig is not mutated) and no layer warns that it
        awaits initialization."""
        from .initialize import _all_lora_layers, _tuner

        tuner = _tuner(model)
        for name in adapters:
            cfg = copy.deepcopy(tuner.peft_config[name])
            cfg.init_lora_weights = True
            tuner.peft_config[name] = cfg
            for _, layer in _all_lora_layers(tuner.model):
                _peft_hook.clear_pending(layer, name)
            self._marked.add(name)

    @staticmethod
    def _check_optimizer(optimizer: Any, params: list[nn.Parameter], adapter_name: str) -> None:
        if optimizer is None:
            return
        inner = _inner_optimizer(optimizer)
        held = {id(p) for group in getattr(inner, "param_groups", []) for p in group["params"]}
        trainable = [p for p in params if p.requires_grad]
        if trainable and not any(id(p) in held for p in trainable):
            logger.warning(
                "LoraOneCallback: the optimizer holds none of adapter %r's parameters; the initialized factors will "
                "not be trained by it. Create the optimizer from the PEFT model's parameters.",
                adapter_name,
            )
        state = getattr(inner, "state", None)
        if not state:
            return
        dropped = 0
        for p in params:
            if p in state:
                del state[p]
                dropped += 1
        if dropped:
            logger.warning(
                "LoraOneCallback: dropped the optimizer state of %d parameters of adapter %r (kept from before the "
                "LoRA-One initialization); it restarts at the initialized factors.",
                dropped,
                adapter_name,
            )
