"""Issue 11, plugin items: grad mode, a dict as data, meta tensors at every depth, injected adapters.

Each test failed on the code before the fix (the message it gave is in the test's docstring).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from plugin_models import MLP, Mixed, compute_loss, mlp_batches, tiny_llama, token_batches

import peft_loraone
from peft_loraone import LoraOneConfig, LoraOneWarning

QUIET = LoraOneConfig(progress=False, num_batches=2)


def _mlp_model():
    return get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone"))


def _reference_delta(model_fn, batches):
    """The delta weights of an ordinary (grad-enabled) initialize on an identical model."""
    model = model_fn()
    peft_loraone.initialize(model, batches, config=QUIET)
    return {n: m.get_delta_weight("default") for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}


def _deltas(model):
    return {n: m.get_delta_weight("default") for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_initialize_under_disabled_grad(mode):
    """Before: ValueError 'the loss does not depend on any target weight ... check target_modules'."""
    torch.manual_seed(0)
    expected = _reference_delta(_mlp_model, mlp_batches(2))
    torch.manual_seed(0)
    model = _mlp_model()
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        batches = mlp_batches(2)  # under inference_mode these are inference tensors
        report = peft_loraone.initialize(model, batches, config=QUIET)
        assert not torch.is_grad_enabled()  # the caller's grad mode is back
    assert len(report.modules) == 2
    got = _deltas(model)
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, rtol=0, atol=0)


def test_single_dict_as_data_is_refused_clearly():
    """Before: TypeError "linear(): argument 'input' (position 1) must be Tensor, not str" from inside the model."""
    model = _mlp_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"`data` is a single batch \(a dict with keys \['x', 'y'\]\).*\[batch\]"):
        peft_loraone.initialize(model, mlp_batches(1)[0], config=QUIET)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_injected_adapter_without_peft_model():
    """Before: TypeError 'peft_loraone.initialize expects a PEFT LoRA model ... got MLP'."""
    torch.manual_seed(0)
    base = MLP()
    expected_model = get_peft_model(
        _copy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone")
    )
    peft_loraone.initialize(expected_model, mlp_batches(2), config=QUIET)
    injected = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="loraone"), base
    )
    report = peft_loraone.initialize(injected, mlp_batches(2), config=QUIET)
    assert [m.name for m in report.modules] == ["lin0", "lin1"]
    assert injected.peft_config["default"].init_lora_weights is True  # the stored config now loads in stock PEFT
    got = _deltas(injected)
    want = {n.removeprefix("base_model.model."): d for n, d in _deltas(expected_model).items()}
    for name, delta in want.items():
        torch.testing.assert_close(got[name], delta, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="already initialized|init_lora_weights=True"):
        peft_loraone.initialize(injected, mlp_batches(2), config=QUIET)


def test_not_a_lora_model_still_refused():
    with pytest.raises(TypeError, match="expects a PEFT LoRA model.*got MLP"):
        peft_loraone.initialize(MLP(), mlp_batches(2), config=QUIET)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def _mixed_batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"ids": torch.randint(0, 64, (2, 5), generator=g), "y": torch.randn(2, 4, generator=g)} for _ in range(n)]


def test_low_cpu_mem_usage_nested_lora_layer_is_materialized():
    """Before: initialize succeeded but left MultiheadAttention's nested out_proj adapter on the meta device, and
    the next forward raised 'Tensor on device meta is not on the expected device cpu!'."""
    model = get_peft_model(
        Mixed(), LoraConfig(r=2, target_modules=["lin", "mha"], init_lora_weights="loraone"), low_cpu_mem_usage=True
    )
    assert any(p.is_meta for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraOneWarning)  # MultiheadAttention is skipped (default init)
        peft_loraone.initialize(model, _mixed_batches(), config=QUIET)
    assert [n for n, p in model.named_parameters() if p.is_meta] == []
    out_proj = model.base_model.model.mha.base_layer.out_proj
    assert torch.count_nonzero(out_proj.lora_B["default"].weight) == 0  # PEFT's default init: B = 0
    assert torch.isfinite(out_proj.lora_A["default"].weight).all()
    assert torch.count_nonzero(out_proj.lora_A["default"].weight) > 0
    loss = compute_loss(model, _mixed_batches(1)[0])
    assert torch.isfinite(loss)


def test_low_cpu_mem_usage_trainable_tokens_are_materialized():
    """Before: the next forward raised 'NotImplementedError: Cannot copy out of meta tensor; no data!'."""
    indices = [1, 2, 5]
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=indices, init_lora_weights="loraone"),
        low_cpu_mem_usage=True,
    )
    peft_loraone.initialize(model, token_batches(2), config=QUIET)
    assert [n for n, p in model.named_parameters() if p.is_meta] == []
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    (layer,) = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    embedding = layer.get_base_layer().weight
    # PEFT's default for trainable tokens: the delta starts at the original rows (output unchanged)
    torch.testing.assert_close(layer.trainable_tokens_delta["default"].detach(), embedding[indices].detach(), rtol=0, atol=0)
    loss = compute_loss(model, token_batches(1)[0])
    assert torch.isfinite(loss)


def test_meta_tensor_that_cannot_be_materialized_raises_before_touching_anything():
    model = _mlp_model()
    # a foreign meta parameter named like an adapter tensor: nothing in PEFT or peft_loraone knows its init
    model.base_model.model.lin0.register_parameter("extra_default", None)
    holder = torch.nn.Module()
    holder.register_parameter("default", torch.nn.Parameter(torch.empty(3, device="meta")))
    model.base_model.model.lin0.add_module("mystery", holder)
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(ValueError, match=r"meta device that peft_loraone cannot give PEFT's default init .*mystery\.default"):
        peft_loraone.initialize(model, mlp_batches(2), config=QUIET)
    for k, v in model.state_dict().items():
        if not v.is_meta:
            assert torch.equal(v, before[k]), k
    assert model.peft_config["default"].init_lora_weights == "loraone"


def test_capture_cancel_stops_queued_engine_jobs():
    """GradientCapture.cancel (the error path of initialize) asks every job to stop before waiting for it, so an
    error does not wait for SVDs that would run for seconds: a 2000-pass job ends in well under its run time."""
    import time
    import types

    from peft_loraone import CancelledError, engine
    from peft_loraone._capture import GradientCapture

    g = torch.randn(1500, 1500)
    jobs = [engine.submit_lora_one(g, 4, tol=0.0, power_iters=1000) for _ in range(2)]
    capture = object.__new__(GradientCapture)
    capture._accumulators = {}
    capture.targets = [types.SimpleNamespace(job=jobs[0], stale_jobs=[jobs[1]])]
    t0 = time.perf_counter()
    capture.cancel()
    elapsed = time.perf_counter() - t0
    assert capture.targets[0].job is None and capture.targets[0].stale_jobs == []
    for job in jobs:
        assert job.done()
        with pytest.raises(CancelledError):
            job.result()
    assert elapsed < 5.0, f"cancel() took {elapsed:.1f} s: the jobs ran instead of being cancelled"
