"""Preconditioned optimizers for LoRA factors (LoRA-One's "+ preconditioning", algorithm.md section 4).

For every LoRA pair of a PEFT model (``lora_B`` of shape ``(m, r)``, ``lora_A`` of shape ``(r, n)``) the
gradients are rescaled by ``r x r`` matrices before the base optimizer (SGD, AdamW, ...) takes its step:

    grad_A <- (B^T B + lambda I_r)^-1 grad_A
    grad_B <- grad_B (A A^T + lambda I_r)^-1

Two variants exist, and :func:`create_preconditioned_optimizer` serves both:

``variant="peft"`` (default)
    PEFT's own Riemannian-preconditioned optimizer, ``peft.optimizers.create_riemannian_optimizer``: both
    preconditioners are built from the factors *before* the step, damping ``reg = 1e-2`` unless given. This module
    only forwards to it. If the installed PEFT does not ship it, an equivalent local implementation with the same
    semantics is used instead (it solves the damped ``r x r`` systems instead of PEFT's ``pinv``).

``variant="reference"``
    What LoRA-One's reference code historically used and PEFT lacks: damping ``lambda = 1e-6`` unless given, and a
    *sequential* update: the base optimizer first steps ``A`` (and every non-LoRA parameter), then ``B``'s
    preconditioner is built from the *already-updated* ``A`` and the base optimizer steps ``B``. The reference's
    "scaled AdamW" also switched off Adam's bias correction; that part is *not* reproduced here (PyTorch's AdamW has
    no switch for it, and it only changes the effective learning rate of the first ~1/(1 - beta2) steps).

Both variants compute the ``r x r`` systems in at least float32 and cast the result back to the gradient's dtype, so
float16/bfloat16 adapters keep their dtype. Parameters that are not LoRA factors are updated by the base optimizer
unchanged. Use the returned optimizer like any other: in a loop (``loss.backward(); opt.step(); opt.zero_grad()``) or
in ``transformers.Trainer(..., optimizers=(opt, None))``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch.optim import Optimizer

__all__ = ["LoraPreconditioner", "create_preconditioned_optimizer"]

_DEFAULT_REG = {"peft": 1e-2, "reference": 1e-6}


def _lora_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """Trainable 2-D ``(lora_A, lora_B)`` weight pairs, matched by name (``.lora_A.`` <-> ``.lora_B.``)."""
    params = dict(model.named_parameters())
    pairs = []
    for name, a in params.items():
        if ".lora_A." not in name:
            continue
        b = params.get(name.replace(".lora_A.", ".lora_B."))
        if b is None or a.ndim != 2 or b.ndim != 2:
            continue
        if a.requires_grad and b.requires_grad:
            pairs.append((a, b))
    return pairs


class LoraPreconditioner:
    r"""Rescales LoRA gradients in place by the damped ``r x r`` preconditioners.

    For each pair (``A``: ``r x n``, ``B``: ``m x r``)

    .. math::
        g_A \leftarrow (B^\top B + \lambda I_r)^{-1} g_A, \qquad g_B \leftarrow g_B (A A^\top + \lambda I_r)^{-1}.

    Args:
        pairs: ``(lora_A, lora_B)`` parameter pairs (see ``_lora_pairs``).
        reg: the damping ``lambda``; must be > 0.

    The systems are solved in ``promote_types(dtype, float32)`` and the results are cast back into ``.grad``.
    """

    def __init__(self, pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]], reg: float) -> None:
        if not reg > 0:
            raise ValueError(f"`reg` must be > 0, got {reg!r}.")
        self.pairs = pairs
        self.reg = float(reg)

    def _solve(self, gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        return torch.linalg.solve(gram + self.reg * eye, rhs)

    @staticmethod
    def _compute_dtype(p: torch.Tensor) -> torch.dtype:
        return torch.promote_types(p.dtype, torch.float32)

    @torch.no_grad()
    def precondition_a(self, a: torch.nn.Parameter, b: torch.nn.Parameter) -> None:
        """``a.grad <- (BᵀB + λI)^-1 a.grad`` with ``B`` as it is now."""
        if a.grad is None:
            return
        dt = self._compute_dtype(a)
        bb = b.detach().to(dt)
        new = self._solve(bb.T @ bb, a.grad.to(dt))  # (r, n)
        a.grad.copy_(new.to(a.grad.dtype))

    @torch.no_grad()
    def precondition_b(self, a: torch.nn.Parameter, b: torch.nn.Parameter) -> None:
        """``b.grad <- b.grad (AAᵀ + λI)^-1`` with ``A`` as it is now (the Gram matrix is symmetric)."""
        if b.grad is None:
            return
        dt = self._compute_dtype(b)
        aa = a.detach().to(dt)
        new = self._solve(aa @ aa.T, b.grad.to(dt).T).T  # (m, r)
        b.grad.copy_(new.to(b.grad.dtype))

    def step(self) -> None:
        """Precondition every pair from the current (pre-step) factors."""
        for a, b in self.pairs:
            # compute both from the pre-step factors before touching any gradient
            self.precondition_a(a, b)
            self.precondition_b(a, b)


def _local_simultaneous(
    model: torch.nn.Module, optimizer_cls: type[Optimizer], pairs, *, lr: float, reg: float, **kwargs
) -> Optimizer:
    pre = LoraPreconditioner(pairs, reg)

    class PreconditionedOptimizer(optimizer_cls):  # type: ignore[misc, valid-type]
        @torch.no_grad()
        def step(self, closure: Callable | None = None):
            if closure is not None:
                raise ValueError("the preconditioned optimizer does not support closures")
            pre.step()
            return super().step()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = PreconditionedOptimizer(params, lr=lr, **kwargs)
    opt.preconditioner = pre
    return opt


def _reference_sequential(
    model: torch.nn.Module, optimizer_cls: type[Optimizer], pairs, *, lr: float, reg: float, **kwargs
) -> Optimizer:
    pre = LoraPreconditioner(pairs, reg)
    b_ids = {id(b) for _, b in pairs}

    class SequentialPreconditionedOptimizer(optimizer_cls):  # type: ignore[misc, valid-type]
        @torch.no_grad()
        def step(self, closure: Callable | None = None):
            if closure is not None:
                raise ValueError("the preconditioned optimizer does not support closures")
            params = [p for g in self.param_groups for p in g["params"]]
            # 1) A <- A - step(precond_B_old(grad_A)), together with every non-B parameter.
            for a, b in pairs:
                pre.precondition_a(a, b)
            held = {id(p): p.grad for p in params if id(p) in b_ids}
            for p in params:
                if id(p) in held:
                    p.grad = None  # torch optimizers skip parameters without a gradient
            try:
                super().step()
            finally:
                for p in params:
                    if id(p) in held:
                        p.grad = held[id(p)]
            # 2) B <- B - step(grad_B precond_A_new), with A already updated.
            for a, b in pairs:
                pre.precondition_b(a, b)
            held = {id(p): p.grad for p in params if id(p) not in b_ids}
            for p in params:
                if id(p) in held:
                    p.grad = None
            try:
                super().step()
            finally:
                for p in params:
                    if id(p) in held:
                        p.grad = held[id(p)]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = SequentialPreconditionedOptimizer(params, lr=lr, **kwargs)
    opt.preconditioner = pre
    return opt


def create_preconditioned_optimizer(
    model: torch.nn.Module,
    optimizer_cls: type[Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    reg: float | None = None,
    variant: Literal["peft", "reference"] = "peft",
    **kwargs,
) -> Optimizer:
    r"""Return ``optimizer_cls`` over ``model``'s trainable parameters, with LoRA gradients preconditioned.

    On every ``step()``, for each LoRA pair (``lora_A``: ``r x n``, ``lora_B``: ``m x r``):

        grad_A <- (BᵀB + reg·I_r)^-1 · grad_A
        grad_B <- grad_B · (AAᵀ + reg·I_r)^-1

    then the base optimizer step. See the module docstring for the two variants.

    Args:
        model: a PEFT model (or any module whose LoRA factors are named ``...lora_A...``/``...lora_B...``).
        optimizer_cls: the base optimizer class, e.g. ``torch.optim.AdamW`` or ``torch.optim.SGD``; it must not
            require a closure.
        lr: learning rate for the base optimizer.
        reg: the damping ``lambda`` (> 0). Default: 1e-2 for ``"peft"`` (PEFT's default), 1e-6 for
            ``"reference"`` (LoRA-One's reference).
        variant: ``"peft"``: PEFT's ``create_riemannian_optimizer`` (both preconditioners from the pre-step
            factors). ``"reference"``: LoRA-One's reference order (``A`` first, then ``B`` preconditioned by the
            updated ``A``).
        kwargs: forwarded to ``optimizer_cls`` (``weight_decay``, ``betas``, ``momentum``, ...).

    Returns:
        An instance of a subclass of ``optimizer_cls``.

    Raises:
        ValueError: unknown ``variant``, ``reg <= 0``, no trainable LoRA pair, or an optimizer that needs a closure.
        TypeError: ``optimizer_cls`` is not a ``torch.optim.Optimizer`` subclass.

    Example:
        ```python
        opt = create_preconditioned_optimizer(peft_model, torch.optim.AdamW, lr=2e-4, variant="reference")
        loss = peft_model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
        ```
    """
    if variant not in _DEFAULT_REG:
        raise ValueError(f"`variant` must be 'peft' or 'reference', got {variant!r}.")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(f"`optimizer_cls` must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}.")
    if optimizer_cls is torch.optim.LBFGS:
        raise ValueError("`optimizer_cls` LBFGS requires a closure; the preconditioner cannot wrap it.")
    reg = _DEFAULT_REG[variant] if reg is None else reg
    if not reg > 0:
        raise ValueError(f"`reg` must be > 0, got {reg!r}.")
    pairs = _lora_pairs(model)
    if not pairs:
        raise ValueError("no trainable lora_A/lora_B pair found in `model`; the preconditioner needs LoRA adapters.")

    if variant == "reference":
        return _reference_sequential(model, optimizer_cls, pairs, lr=lr, reg=reg, **kwargs)
    try:
        from peft.optimizers import create_riemannian_optimizer
    except ImportError:  # older PEFT: same semantics, local implementation
        warnings.warn(
            "peft.optimizers.create_riemannian_optimizer is not available in the installed PEFT; "
            "using peft_loraone's equivalent implementation.",
            UserWarning,
            stacklevel=2,
        )
        return _local_simultaneous(model, optimizer_cls, pairs, lr=lr, reg=reg, **kwargs)
    return create_riemannian_optimizer(model, optimizer_cls, lr=lr, reg=reg, **kwargs)
