"""peft_loraone.optim: the preconditioned optimizer (algorithm.md section 4)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft_loraone.optim import LoraPreconditioner, create_preconditioned_optimizer
from torch import nn


def _model(d_in=3, d_out=3, r=2, dtype=torch.float32, bias=False, seed=0, autocast_adapter_dtype=True, **cfg):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).to(dtype)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["0"], **cfg)
    return get_peft_model(base, config, autocast_adapter_dtype=autocast_adapter_dtype)


def _ab(model):
    layer = model.base_model.model[0]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _set(p, rows):
    with torch.no_grad():
        p.copy_(torch.tensor(rows, dtype=p.dtype))


# Hand-computed case, r = 2, lambda = 1:
#   B = [[1,0],[0,1],[1,1]]  ->  BᵀB + I = [[3,1],[1,3]],  inverse = (1/8)[[3,-1],[-1,3]]
#   A = [[1,0,1],[0,1,0]]    ->  AAᵀ + I = [[3,0],[0,2]],  inverse = diag(1/3, 1/2)
#   gA = [[8,0,8],[0,8,-8]]  ->  (BᵀB + I)^-1 gA = [[3,-1,4],[-1,3,-4]]
#   gB = [[3,2],[6,4],[0,0]] ->  gB (AAᵀ + I)^-1 = [[1,1],[2,2],[0,0]]
# SGD, lr 1:  A' = [[-2,1,-3],[1,-2,4]],  B' = [[0,-1],[-2,-1],[1,1]]
A0 = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
B0 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
GA = [[8.0, 0.0, 8.0], [0.0, 8.0, -8.0]]


def _hand_case(variant, gb):
    model = _model()
    a, b = _ab(model)
    _set(a, A0)
    _set(b, B0)
    opt = create_preconditioned_optimizer(model, torch.optim.SGD, lr=1.0, reg=1.0, variant=variant)
    a.grad = torch.tensor(GA)
    b.grad = torch.tensor(gb)
    opt.step()
    return a, b


def test_hand_computed_peft_variant():
    a, b = _hand_case("peft", [[3.0, 2.0], [6.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(a, torch.tensor([[-2.0, 1.0, -3.0], [1.0, -2.0, 4.0]]), atol=1e-6)
    assert torch.allclose(b, torch.tensor([[0.0, -1.0], [-2.0, -1.0], [1.0, 1.0]]), atol=1e-6)
    # .grad holds the preconditioned gradients afterwards
    assert torch.allclose(a.grad, torch.tensor([[3.0, -1.0, 4.0], [-1.0, 3.0, -4.0]]), atol=1e-6)


def test_hand_computed_reference_variant_uses_updated_a_for_b():
    # A' as above (B's preconditioner is from the old B).  A'A'ᵀ + I = [[15,-16],[-16,22]], det 74,
    # inverse (1/74)[[22,16],[16,15]];  gB = [[74,0],[0,74],[0,0]] -> gB (A'A'ᵀ + I)^-1 = [[22,16],[16,15],[0,0]]
    a, b = _hand_case("reference", [[74.0, 0.0], [0.0, 74.0], [0.0, 0.0]])
    assert torch.allclose(a, torch.tensor([[-2.0, 1.0, -3.0], [1.0, -2.0, 4.0]]), atol=1e-6)
    assert torch.allclose(b, torch.tensor([[-21.0, -16.0], [-16.0, -14.0], [1.0, 1.0]]), atol=1e-5)


def test_defaults_and_which_is_which():
    import peft.optimizers

    model = _model()
    peft_opt = create_preconditioned_optimizer(model, torch.optim.SGD, lr=0.1)
    ref_opt = create_preconditioned_optimizer(model, torch.optim.SGD, lr=0.1, variant="reference")
    if hasattr(peft.optimizers, "create_riemannian_optimizer"):
        assert type(peft_opt).__name__ == "RiemannianPreconditionedOptimizer"  # PEFT's own class
    assert ref_opt.preconditioner.reg == 1e-6
    assert isinstance(peft_opt, torch.optim.SGD) and isinstance(ref_opt, torch.optim.SGD)


def test_local_fallback_matches_peft(monkeypatch):
    # Without peft.optimizers.create_riemannian_optimizer (older PEFT) the "peft" variant uses the local
    # implementation, with a warning, and takes the same steps.
    import types

    import peft.optimizers

    if not hasattr(peft.optimizers, "create_riemannian_optimizer"):
        pytest.skip("the installed PEFT has no create_riemannian_optimizer to compare with")
    torch.manual_seed(0)
    model = _model(d_in=6, d_out=5, r=3)
    with torch.no_grad():
        _ab(model)[1].normal_()
    twin = copy.deepcopy(model)
    theirs = create_preconditioned_optimizer(model, torch.optim.AdamW, lr=0.01, reg=0.05)
    monkeypatch.setitem(sys.modules, "peft.optimizers", types.ModuleType("peft.optimizers"))
    with pytest.warns(UserWarning, match="create_riemannian_optimizer is not available"):
        ours = create_preconditioned_optimizer(twin, torch.optim.AdamW, lr=0.01, reg=0.05)
    assert isinstance(ours.preconditioner, LoraPreconditioner)
    x = torch.randn(8, 6)
    for _ in range(3):
        for m, o in ((model, theirs), (twin, ours)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(_ab(model), _ab(twin)):
        assert torch.allclose(p, q, atol=1e-5)


def _inv(m, reg):
    return torch.linalg.inv(m.double() + reg * torch.eye(m.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("variant", ["peft", "reference"])
@pytest.mark.parametrize(
    "opt_cls,kwargs",
    [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.AdamW, {"weight_decay": 0.01}), (torch.optim.Adam, {})],
)
def test_equals_base_optimizer_on_preconditioned_grads(opt_cls, kwargs, variant):
    # Two steps of the wrapped optimizer == the base optimizer stepped on gradients preconditioned by the formula:
    #   peft:      gA (BᵀB + λI)^-1-preconditioned with the pre-step B, gB with the pre-step A, one joint step;
    #   reference: A (and the rest) stepped first, then gB preconditioned with the *updated* A, then B stepped.
    torch.manual_seed(0)
    model = _model(d_in=6, d_out=5, r=3, bias=True)
    a, b = _ab(model)
    with torch.no_grad():
        b.normal_()  # a non-zero B so both preconditioners matter
    bias = model.base_model.model[0].base_layer.bias
    bias.requires_grad_(True)  # a non-LoRA trainable parameter: updated unchanged
    twin = copy.deepcopy(model)
    ta, tb = _ab(twin)
    tbias = twin.base_model.model[0].base_layer.bias
    reg = 0.1
    wrapped = create_preconditioned_optimizer(model, opt_cls, lr=0.05, reg=reg, variant=variant, **kwargs)
    plain = opt_cls([tbias, ta, tb], lr=0.05, **kwargs)
    x = torch.randn(16, 6)
    for _ in range(2):
        for m, o in ((model, wrapped), (twin, plain)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        wrapped.step()
        ga = (_inv(tb.T @ tb, reg) @ ta.grad.double()).float()
        if variant == "peft":
            gb = (tb.grad.double() @ _inv(ta @ ta.T, reg)).float()
            ta.grad, tb.grad = ga, gb
            plain.step()
        else:
            raw_gb = tb.grad
            ta.grad, tb.grad = ga, None
            plain.step()  # A and the bias
            gb = (raw_gb.double() @ _inv(ta.detach() @ ta.detach().T, reg)).float()
            ta.grad, tb.grad, tbias_grad = None, gb, tbias.grad
            tbias.grad = None
            plain.step()  # B only
            tbias.grad = tbias_grad
        assert torch.allclose(a, ta, atol=1e-6)
        assert torch.allclose(b, tb, atol=1e-6)
        assert torch.allclose(bias, tbias, atol=1e-6)
    if opt_cls is not torch.optim.SGD:  # Adam-type state: one step per parameter per call, also for "reference"
        assert int(wrapped.state[a]["step"]) == 2 and int(wrapped.state[b]["step"]) == 2


@pytest.mark.parametrize("variant", ["peft", "reference"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_training_loop_reduces_loss(opt_cls, variant):
    torch.manual_seed(0)
    model = _model(d_in=20, d_out=10, r=4)
    x = torch.randn(64, 20)
    y = torch.randn(64, 10)
    opt = create_preconditioned_optimizer(
        model, opt_cls, lr=0.05 if opt_cls is torch.optim.SGD else 1e-2, variant=variant, reg=1e-3
    )
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("variant", ["peft", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters(dtype, variant):
    model = _model(d_in=8, d_out=6, r=2, dtype=dtype, autocast_adapter_dtype=False)
    a, b = _ab(model)
    assert a.dtype == dtype and b.dtype == dtype
    torch.manual_seed(1)
    with torch.no_grad():
        b.copy_(torch.randn(b.shape).to(dtype))
    a32, b32 = a.detach().double(), b.detach().double()
    ga = torch.randn(a.shape).to(dtype)
    gb = torch.randn(b.shape).to(dtype)
    reg = 0.5
    opt = create_preconditioned_optimizer(model, torch.optim.SGD, lr=1.0, reg=reg, variant=variant)
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    assert a.dtype == dtype and b.dtype == dtype and a.grad.dtype == dtype and b.grad.dtype == dtype
    exp_a = a32 - _inv(b32.T @ b32, reg) @ ga.double()
    a_for_b = exp_a if variant == "reference" else a32
    exp_b = b32 - gb.double() @ _inv(a_for_b @ a_for_b.T, reg)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.allclose(a.double(), exp_a, rtol=tol, atol=tol)
    assert torch.allclose(b.double(), exp_b, rtol=tol, atol=tol * 4)


def test_loraone_then_preconditioned_training():
    # The intended pipeline: LoRA-One init through the public API, then the preconditioned optimizer.
    import peft_loraone

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 8, bias=False))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights="loraone"))
    x = torch.randn(32, 12)
    y = x @ torch.randn(12, 8) * 0.1
    peft_loraone.initialize(
        model,
        [(x,)],
        config=peft_loraone.LoraOneConfig(
            gamma=4.0, num_batches=1, progress=False, loss_fn=lambda out, batch: (out - y).pow(2).mean()
        ),
    )
    opt = create_preconditioned_optimizer(model, torch.optim.AdamW, lr=1e-2, variant="reference")
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first


def test_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 4, bias=False)

        def forward(self, x, labels=None):
            out = self.proj(x)
            return {"loss": (out - labels).pow(2).mean(), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(32, 6, generator=g)
            self.y = self.x @ torch.randn(6, 4, generator=g)

        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    torch.manual_seed(0)
    model = get_peft_model(Regressor(), LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]))
    a, b = _ab_named(model, "proj")
    b0 = b.detach().clone()
    opt = create_preconditioned_optimizer(model, torch.optim.AdamW, lr=1e-2, variant="reference")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None))
    trainer.train()
    assert not torch.equal(b.detach(), b0)
    assert int(opt.state[a]["step"]) == 4


def _ab_named(model, name):
    layer = model.get_submodule("base_model.model." + name)
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def test_preconditioner_class_directly():
    model = _model()
    a, b = _ab(model)
    _set(a, A0)
    _set(b, B0)
    a.grad = torch.tensor(GA)
    b.grad = torch.tensor([[3.0, 2.0], [6.0, 4.0], [0.0, 0.0]])
    LoraPreconditioner([(a, b)], reg=1.0).step()
    assert torch.allclose(a.grad, torch.tensor([[3.0, -1.0, 4.0], [-1.0, 3.0, -4.0]]), atol=1e-6)
    assert torch.allclose(b.grad, torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]), atol=1e-6)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="`variant`"):
        create_preconditioned_optimizer(model, torch.optim.SGD, lr=0.1, variant="scaled")
    with pytest.raises(ValueError, match="`reg` must be > 0"):
        create_preconditioned_optimizer(model, torch.optim.SGD, lr=0.1, reg=0.0)
    with pytest.raises(ValueError, match="`reg` must be > 0"):
        create_preconditioned_optimizer(model, torch.optim.SGD, lr=0.1, reg=-1.0, variant="reference")
    with pytest.raises(TypeError, match="`optimizer_cls`"):
        create_preconditioned_optimizer(model, object, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        create_preconditioned_optimizer(model, torch.optim.LBFGS, lr=0.1)
    with pytest.raises(ValueError, match="no trainable lora_A/lora_B"):
        create_preconditioned_optimizer(nn.Linear(3, 3), torch.optim.SGD, lr=0.1)
    opt = create_preconditioned_optimizer(model, torch.optim.SGD, lr=0.1, variant="reference")
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
