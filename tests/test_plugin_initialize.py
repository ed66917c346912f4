"""LoRA-One initialization through PEFT: the identity, the models, the dtypes and the PEFT options."""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from plugin_models import (
    MLP,
    Conv1DModel,
    Mixed,
    compute_loss,
    delta_oi,
    lora_layers,
    loraone_delta,
    mlp_batches,
    reference_grads,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    token_batches,
)

import peft_loraone
from peft_loraone import LoraOneConfig, LoraOneWarning

# tight SVD settings: the identity checks compare against an exact SVD
EXACT = LoraOneConfig(tol=1e-12, power_iters=60, progress=False, num_batches=2)


def _init(model, batches, **kwargs):
    return peft_loraone.initialize(model, batches, config=EXACT, num_batches=len(batches), **kwargs)


def _check_identity(model, base_copy, batches, gamma=128.0, atol_rel=1e-4, adapter="default"):
    layers = lora_layers(model, adapter)
    grads = reference_grads(base_copy, batches, layers)
    assert layers
    for name, layer in layers.items():
        expect = loraone_delta(grads[name], layer.r[adapter], layer.scaling[adapter], gamma)
        got = delta_oi(layer, adapter)
        scale = expect.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got, expect, rtol=0, atol=atol_rel * scale.item(), msg=name)
    return layers, grads


# ---------------------------------------------------------------------------------------------------------
# the LoRA-One identity on every model family
# ---------------------------------------------------------------------------------------------------------

CASES = {
    # name: (model factory, batches factory, LoraConfig kwargs)
    "mlp-linear": (MLP, lambda: mlp_batches(3), dict(target_modules=["lin0", "lin1"])),
    "conv1d": (Conv1DModel, lambda: mlp_batches(3), dict(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)),
    "llama-all-linear": (tiny_llama, lambda: token_batches(3), dict(target_modules="all-linear")),
    "gpt2-conv1d": (tiny_gpt2, lambda: token_batches(3), dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "bert-classifier": (
        tiny_bert_classifier,
        lambda: token_batches(3, labels="cls"),
        dict(target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_delta_equals_truncated_gradient_step(case):
    factory, make_batches, kwargs = CASES[case]
    base = factory()
    base_copy = copy.deepcopy(base)
    batches = make_batches()
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="loraone", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out notices from PEFT
        model = get_peft_model(base, cfg)
    report = _init(model, batches)
    layers, grads = _check_identity(model, base_copy, batches)
    assert {m.name for m in report.modules} == set(layers)
    for m in report.modules:
        assert m.sigma1 == pytest.approx(torch.linalg.svdvals(grads[m.name]).max().item(), rel=1e-5)
        assert m.rank == min(4, *m.shape)
    assert model.peft_config["default"].init_lora_weights is True
    if case == "bert-classifier":  # the randomly initialized head is trained, not adapted
        assert any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)
    # W0 untouched: disabling the adapter gives the base model exactly
    x = batches[0]
    with torch.no_grad(), model.disable_adapter():
        out = compute_loss(model, x)
    assert torch.equal(out, compute_loss(base_copy, x).detach())


@pytest.mark.parametrize("case", ["mlp-linear", "conv1d", "gpt2-conv1d"])
def test_full_rank_equals_one_gradient_step(case):
    """With r >= rank(G), the initialized model is the base model after W <- W - s/(gamma sigma1) G."""
    factory, make_batches, kwargs = CASES[case]
    base = factory()
    stepped = copy.deepcopy(base)
    original = copy.deepcopy(base)
    batches = make_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, init_lora_weights="loraone", **kwargs))
    _init(model, batches)
    layers = lora_layers(model)
    grads = reference_grads(stepped, batches, layers)
    modules = dict(stepped.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            g = grads[name]
            step = layer.scaling["default"] / (128.0 * torch.linalg.svdvals(g).max()) * g
            w = modules[name].weight
            w -= (step.t() if getattr(layer, "fan_in_fan_out", False) else step).to(w.dtype)
        for batch in batches:
            a = model(**batch)
            b = stepped(**batch)
            a = a["logits"] if isinstance(a, dict) else a.logits
            b = b["logits"] if isinstance(b, dict) else b.logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            c = original(**batch)
            assert not torch.allclose(a, c["logits"] if isinstance(c, dict) else c.logits, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_dtypes_keep_adapter_dtype(dtype, autocast):
    base = tiny_llama(dtype)
    base_copy = copy.deepcopy(base)
    batches = token_batches(2)
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="loraone"),
        autocast_adapter_dtype=autocast,
    )
    before = {n: (id(p), p.dtype) for n, p in model.named_parameters() if "lora_" in n}
    _init(model, batches)
    after = {n: (id(p), p.dtype) for n, p in model.named_parameters() if "lora_" in n}
    assert before == after  # same Parameter objects, same dtypes
    expected_dtype = torch.float32 if autocast else dtype
    assert {d for _, d in after.values()} == {expected_dtype}
    # G is accumulated in float32 from the half-precision gradients: compare at the adapter's precision
    tol = 1e-4 if expected_dtype == torch.float32 else 2e-2
    _check_identity(model, base_copy, batches, atol_rel=tol)
    for p in model.parameters():
        assert p.grad is None


# ---------------------------------------------------------------------------------------------------------
# PEFT options: rsLoRA, patterns, DoRA, several adapters, low_cpu_mem_usage
# ---------------------------------------------------------------------------------------------------------


def test_rslora_scaling_is_read_from_the_layer():
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(2)
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["lin0", "lin1"], init_lora_weights="loraone"),
    )
    report = _init(model, batches)
    for m in report.modules:
        assert m.scaling == pytest.approx(8 / math.sqrt(4))
    layers, grads = _check_identity(model, base_copy, batches)
    # the spectral norm of the initial update is s / gamma
    for name, layer in layers.items():
        assert torch.linalg.matrix_norm(delta_oi(layer), ord=2).item() == pytest.approx(4.0 / 128.0, rel=1e-6)


def test_rank_and_alpha_patterns():
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(2)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["lin0", "lin1"],
        init_lora_weights="loraone",
        rank_pattern={"lin1": 2},
        alpha_pattern={"lin1": 6},
    )
    model = get_peft_model(base, cfg)
    report = _init(model, batches)
    assert report["lin0"].r == 4 and report["lin0"].scaling == pytest.approx(2.0)
    assert report["lin1"].r == 2 and report["lin1"].scaling == pytest.approx(3.0)
    layers, _ = _check_identity(model, base_copy, batches)
    sv = torch.linalg.svdvals(delta_oi(layers["lin1"]).detach())
    assert layers["lin1"].lora_A["default"].weight.shape[0] == 2 and sv[2] < 1e-5 * sv[0]


def test_rank_above_layer_size_keeps_extra_directions_trainable():
    base = MLP(n_in=10, hidden=3, n_out=6)  # lin0 is 3 x 10: at most rank 3
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(2)
    model = get_peft_model(base, LoraConfig(r=5, lora_alpha=5, target_modules=["lin0"], init_lora_weights="loraone"))
    a_before = model.base_model.model.lin0.lora_A["default"].weight.detach().clone()
    report = _init(model, batches)
    assert report["lin0"].rank == 3 and report["lin0"].r == 5
    layer = model.base_model.model.lin0
    assert torch.equal(layer.lora_A["default"].weight[3:], a_before[3:])  # still PEFT's Kaiming rows
    assert not layer.lora_B["default"].weight[:, 3:].any()
    _check_identity(model, base_copy, batches)


@pytest.mark.parametrize("case", ["mlp-linear", "conv1d"])
def test_dora_recomputes_the_magnitude(case):
    factory, _, kwargs = CASES[case]
    base = factory()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(2)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights="loraone", **kwargs))
    mags = {n: layer.lora_magnitude_vector["default"].weight for n, layer in lora_layers(model).items()}
    stale = {n: m.detach().clone() for n, m in mags.items()}
    _init(model, batches)
    layers, _ = _check_identity(model, base_copy, batches)
    stepped = copy.deepcopy(base_copy)
    modules = dict(stepped.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            assert layer.lora_magnitude_vector["default"].weight is mags[name]  # in place
            assert not torch.allclose(mags[name], stale[name])
            conv1d = getattr(layer, "fan_in_fan_out", False)
            w0 = modules[name].weight.t() if conv1d else modules[name].weight  # (out, in)
            w = w0 + delta_oi(layer).float()
            torch.testing.assert_close(mags[name], torch.linalg.norm(w, dim=1), rtol=1e-6, atol=1e-7)
            modules[name].weight.copy_(w.t() if conv1d else w)
        # with the magnitude equal to ||W0 + sBA||, DoRA's output is that of W0 + sBA
        for batch in batches:
            torch.testing.assert_close(model(**batch)["logits"], stepped(**batch)["logits"], rtol=1e-5, atol=1e-6)


def test_two_adapters_only_the_named_one_changes():
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(2)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False)
    )
    model.add_adapter(
        "one", LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    # the other adapter is active and non-zero: G must still be the base model's gradient
    assert model.active_adapters == ["default"]
    other = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    _init(model, batches, adapter_name="one")
    _check_identity(model, base_copy, batches, adapter="one")
    for n, p in model.named_parameters():
        if n in other:
            assert torch.equal(p, other[n]), n
    assert model.active_adapters == ["default"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.peft_config["default"].init_lora_weights is False
    assert model.peft_config["one"].init_lora_weights is True


def test_low_cpu_mem_usage_materializes_meta_adapters():
    base = Mixed()
    base_copy = copy.deepcopy(base)
    batches = [{"ids": torch.randint(0, 64, (2, 5)), "y": torch.randn(2, 4)} for _ in range(2)]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "head", "emb"], init_lora_weights="loraone")
    model = get_peft_model(base, cfg, low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in model.named_parameters() if "lora_" in n)
    with pytest.warns(LoraOneWarning, match="emb"):
        _init(model, batches)
    assert not any(p.is_meta for p in model.parameters())
    layers = lora_layers(model)
    grads = reference_grads(base_copy, batches, ["lin", "head"])
    for name in ("lin", "head"):
        expect = loraone_delta(grads[name], 4, 2.0)
        torch.testing.assert_close(delta_oi(layers[name]), expect, rtol=0, atol=1e-4 * expect.abs().max().item())
    # the skipped embedding got PEFT's default init: A = 0, B ~ N(0, 1)
    emb = layers["emb"]
    assert not emb.lora_embedding_A["default"].any() and emb.lora_embedding_B["default"].std() > 0.1
    model(**batches[0])  # runs


def test_low_cpu_mem_usage_with_dora():
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(2)
    cfg = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    model = get_peft_model(base, cfg, low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in model.named_parameters() if "lora_" in n)
    _init(model, batches)
    layers, _ = _check_identity(model, base_copy, batches)
    modules = dict(base_copy.named_modules())
    for name, layer in layers.items():
        w = modules[name].weight + delta_oi(layer).float()
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, torch.linalg.norm(w, dim=1))


# ---------------------------------------------------------------------------------------------------------
# skipped layers, zero gradients, the report, data forms
# ---------------------------------------------------------------------------------------------------------


def test_embedding_conv_mha_keep_default_init_with_one_warning():
    base = Mixed()
    batches = [{"ids": torch.randint(0, 64, (2, 5)), "y": torch.randn(2, 4)} for _ in range(2)]
    model = get_peft_model(
        base,
        LoraConfig(
            r=2, lora_alpha=4, target_modules=["emb", "conv", "mha", "lin", "head"], init_lora_weights="loraone"
        ),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _init(model, batches)
    ours = [w for w in caught if issubclass(w.category, LoraOneWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    for name in ("emb (Embedding)", "conv (Conv2d)", "mha (MultiheadAttention)"):
        assert name in text
    assert {s.name for s in report.skipped} == {"emb", "conv", "mha"}
    assert {m.name for m in report.modules} == {"lin", "head"}
    layers = lora_layers(model)
    assert not layers["conv"].lora_B["default"].weight.any()
    assert not layers["mha"].lora_B["default"].weight.any()
    assert layers["lin"].lora_B["default"].weight.any()


def test_zero_gradient_module_keeps_b_zero_and_is_reported():
    model = get_peft_model(
        MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    with pytest.warns(LoraOneWarning, match="no or a zero gradient.*lin0"):
        report = peft_loraone.initialize(model, _zero_for_lin0(model, mlp_batches(2)), config=EXACT, num_batches=2)
    assert [s.name for s in report.skipped] == ["lin0"] and "zero gradient" in report.skipped[0].reason
    assert [m.name for m in report.modules] == ["lin1"]
    assert not model.base_model.model.lin0.lora_B["default"].weight.any()
    assert model.base_model.model.lin1.lora_B["default"].weight.any()
    assert "lin0" in str(report)


def test_module_unused_by_the_loss_is_reported():
    model = get_peft_model(
        MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    batches = mlp_batches(2)
    it = iter(batches)

    def only_lin1(m):  # lin0 never runs
        b = next(it)
        out = m.base_model.model.lin1(torch.tanh(b["x"][:, :8]))
        ((out - b["y"]) ** 2).mean().backward()

    with pytest.warns(LoraOneWarning, match="lin0"):
        report = peft_loraone.initialize(model, only_lin1, config=EXACT)
    assert [(s.name, s.reason) for s in report.skipped] == [("lin0", "no gradient: not used by the loss (B = 0 kept)")]
    assert not model.base_model.model.lin0.lora_B["default"].weight.any()


def _force_overlap(monkeypatch, overlap: bool) -> None:
    """Make initialize() overlap the engine with backward (as for a model on an accelerator) or not (the
    CPU default)."""
    monkeypatch.setattr(sys.modules["peft_loraone.initialize"], "engine_overlaps_backward", lambda device: overlap)


def test_cpu_model_runs_the_engine_after_backward():
    """On the CPU the engine waits for the last backward (it would compete with torch's threads)."""
    from peft_loraone._capture import engine_overlaps_backward

    assert not engine_overlaps_backward(torch.device("cpu"))
    assert engine_overlaps_backward(torch.device("cuda"))


@pytest.mark.parametrize("overlap", [True, False], ids=["accelerator", "cpu"])
def test_factors_are_submitted_during_backward(monkeypatch, overlap):
    """With overlap (a model on an accelerator), lin1's G is final (and handed to the engine) before
    backward reaches lin0; without it (the CPU default), both are handed over after backward."""
    from peft_loraone import engine

    _force_overlap(monkeypatch, overlap)

    events = []
    real_submit = engine.submit_lora_one

    def submit(grad, rank, **kw):
        events.append(("submit", tuple(grad.shape)))
        return real_submit(grad, rank, **kw)

    monkeypatch.setattr(engine, "submit_lora_one", submit)
    model = get_peft_model(
        MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )

    def on_forward(module, args, out):
        out.register_hook(lambda g: events.append(("backward reaches lin0", None)))

    hook = model.base_model.model.lin0.base_layer.register_forward_hook(on_forward)
    peft_loraone.initialize(model, mlp_batches(2), config=EXACT)
    hook.remove()
    if overlap:
        assert events[-3:] == [("submit", (6, 8)), ("backward reaches lin0", None), ("submit", (8, 10))]
    else:
        assert events[-3:] == [("backward reaches lin0", None), ("submit", (8, 10)), ("submit", (6, 8))]


def _zero_for_lin0(model, batches):
    """A train_step whose loss reaches lin0's weight with a zero gradient."""
    it = iter(batches * 4)

    def step(m):
        b = next(it)
        inner = m.base_model.model
        h = inner.lin0(b["x"]) * 0.0  # lin0.weight gets an exactly-zero gradient
        out = inner.lin1(torch.tanh(h + 1.0))
        ((out - b["y"]) ** 2).mean().backward()

    return step


def test_train_step_callable_and_report(capsys):
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(4)
    it = iter(batches)

    def train_step(model):
        compute_loss(model, next(it)).backward()

    model = get_peft_model(
        base, LoraConfig(r=3, lora_alpha=3, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    report = peft_loraone.initialize(model, train_step, config=EXACT, num_batches=4)
    assert report.batches == 4 and report.samples is None
    _check_identity(model, base_copy, batches)
    text = str(report)
    assert "lin0" in text and "sigma1" in text and "10" in text
    d = report.to_dict()
    assert d["gamma"] == 128.0 and d["batches"] == 4 and d["svd"]["tol"] == 1e-12
    assert d["modules"][0]["name"] == "lin0"


@pytest.mark.parametrize("overlap", [True, False], ids=["accelerator", "cpu"])
def test_train_step_with_several_backward_passes_per_step(monkeypatch, overlap):
    """Gradient accumulation inside train_step: with overlap, in the last step a weight's G is handed over
    at its first backward, then grows; it is handed over again and the stale job is dropped."""
    _force_overlap(monkeypatch, overlap)
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(6)
    halves = [(batches[2 * i], batches[2 * i + 1]) for i in range(3)]
    it = iter(halves)

    def train_step(model):
        first, second = next(it)
        compute_loss(model, first).backward()
        compute_loss(model, second).backward()

    model = get_peft_model(
        base, LoraConfig(r=3, lora_alpha=3, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    report = peft_loraone.initialize(model, train_step, config=EXACT, num_batches=3)
    grads = reference_grads(base_copy, batches, ["lin0", "lin1"])  # mean over 6 half-batches
    for name, layer in lora_layers(model).items():
        g = grads[name] * 2  # = mean over the 3 steps of (g_first + g_second)
        assert report[name].sigma1 == pytest.approx(torch.linalg.svdvals(g)[0].item(), rel=1e-5)
        expect = loraone_delta(g, 3, 1.0)
        torch.testing.assert_close(delta_oi(layer), expect, rtol=0, atol=1e-4 * expect.abs().max().item())


def test_train_step_without_arguments_peft_lora_ga_convention():
    base = MLP()
    batches = mlp_batches(2)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["lin0"], init_lora_weights="loraone"))
    it = iter(batches)
    report = peft_loraone.initialize(
        model, lambda: compute_loss(model, next(it)).backward(), config=EXACT, num_batches=2
    )
    assert report.batches == 2


def test_fewer_batches_than_num_batches_warns_and_averages_what_came():
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(3)
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    with pytest.warns(LoraOneWarning, match="yielded 3 batches"):
        report = peft_loraone.initialize(model, iter(batches), config=EXACT, num_batches=8)
    assert report.batches == 3 and report.samples == 15
    _check_identity(model, base_copy, batches)


def test_only_num_batches_are_consumed():
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(6)
    consumed = []

    def gen():
        for b in batches:
            consumed.append(b)
            yield b

    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["lin0"], init_lora_weights="loraone"))
    peft_loraone.initialize(model, gen(), config=EXACT, num_batches=2)
    assert len(consumed) == 2
    _check_identity(model, base_copy, batches[:2])


def test_tuple_and_tensor_batches_with_loss_fn():
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(2)
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    tuples = [(b["x"], b["y"]) for b in batches]
    _init(model, tuples, loss_fn=lambda out, batch: out["loss"])
    _check_identity(model, base_copy, batches)

    base2 = MLP()
    model2 = get_peft_model(base2, LoraConfig(r=2, lora_alpha=4, target_modules=["lin0"], init_lora_weights="loraone"))
    xs = [b["x"] for b in batches]
    report = _init(model2, xs, loss_fn=lambda out, x: out["logits"].square().mean())
    assert report.samples == 10


def test_state_is_restored_after_success():
    base = MLP()
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    model.train()
    model.base_model.model.lin1.eval()
    stale = torch.full_like(model.base_model.model.lin0.base_layer.weight, 7.0)
    model.base_model.model.lin0.base_layer.weight.grad = stale
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    _init(model, mlp_batches(2))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.base_model.model.lin0.base_layer.weight.grad is stale
    assert all(p.grad is None for n, p in model.named_parameters() if "lin0.base_layer.weight" not in n)
    assert not any(
        len(p._post_accumulate_grad_hooks or {})
        for p in model.parameters()
        if hasattr(p, "_post_accumulate_grad_hooks")
    )


def test_callers_lora_config_is_not_mutated():
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["lin0"], init_lora_weights="loraone")
    model = get_peft_model(MLP(), cfg)
    _init(model, mlp_batches(2))
    assert model.peft_config["default"].init_lora_weights is True
    assert cfg.init_lora_weights == "loraone"
    again = get_peft_model(MLP(), cfg)  # the same config makes the next LoRA-One model
    _init(again, mlp_batches(2))


def test_peft_loraone_get_peft_model_one_call():
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(2)
    cfg = peft_loraone.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    assert type(cfg) is LoraConfig and cfg.init_lora_weights == "loraone"
    model, report = peft_loraone.get_peft_model(base, cfg, train_data=batches, loraone_config=EXACT, return_report=True)
    assert len(report.modules) == 2
    _check_identity(model, base_copy, batches)


# ---------------------------------------------------------------------------------------------------------
# training after init
# ---------------------------------------------------------------------------------------------------------


def test_training_smoke_lowers_loss_and_changes_only_lora():
    base = tiny_llama()
    batches = token_batches(2)
    model = peft_loraone.get_peft_model(
        base,
        peft_loraone.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
        train_data=batches,
        loraone_config=LoraOneConfig(progress=False, gamma=16.0, num_batches=2),
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with torch.no_grad():
        start = sum(compute_loss(model, b).item() for b in batches)
    for _ in range(5):
        for b in batches:
            opt.zero_grad()
            compute_loss(model, b).backward()
            opt.step()
    with torch.no_grad():
        end = sum(compute_loss(model, b).item() for b in batches)
    assert end < start
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trainable[n]), n


def test_loraone_start_beats_default_init_after_one_step():
    """The initialized model already took (a truncated, normalized) gradient step: its loss is lower."""
    base = MLP()
    batches = mlp_batches(2)
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    _init(model, batches)
    with torch.no_grad():
        assert sum(compute_loss(model, b) for b in batches) < sum(compute_loss(plain, b) for b in batches)


def test_all_lora_layer_types_found():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights="loraone"))
    assert len([m for m in model.modules() if isinstance(m, LoraLayer)]) == 14


def test_initialize_returns_the_engine_scratch_memory():
    """The engine's jobs leave their workspaces for reuse; initialize() drops them when it is done."""
    from peft_loraone.engine import release_memory

    model = get_peft_model(
        MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    peft_loraone.initialize(model, mlp_batches(2), config=EXACT)
    assert release_memory() == 0


@pytest.mark.parametrize("overlap", [True, False], ids=["accelerator", "cpu"])
def test_freed_host_memory_is_returned_before_the_engine_runs(monkeypatch, overlap):
    """When the engine runs after backward (the CPU), the C heap's free pages go back to the OS first, so
    that the engine's memory does not come on top of the freed activations."""
    mod = sys.modules["peft_loraone.initialize"]
    _force_overlap(monkeypatch, overlap)
    calls = []
    real = mod.return_freed_host_memory
    monkeypatch.setattr(mod, "return_freed_host_memory", lambda: calls.append(1) or real())
    model = get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0"], init_lora_weights="loraone"))
    peft_loraone.initialize(model, mlp_batches(2), config=EXACT)
    assert len(calls) == (0 if overlap else 1)
    assert isinstance(real(), bool)
