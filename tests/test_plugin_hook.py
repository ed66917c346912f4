"""The ``init_lora_weights="loraone"`` hook: placeholder init for every layer type, the warning, PEFT checks."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from plugin_models import MLP, Conv1DModel, Mixed, lora_layers, mlp_batches

import peft_loraone
from peft_loraone import LoraOneWarning, PeftCompatibilityError, _peft_hook


def _mixed_batch():
    return {"ids": torch.randint(0, 64, (2, 5)), "y": torch.randn(2, 4)}


@pytest.mark.parametrize(
    "factory,targets,kwargs",
    [
        (MLP, ["lin0", "lin1"], {}),
        (Conv1DModel, ["c_fc", "c_proj"], {"fan_in_fan_out": True}),
        (Mixed, ["emb", "conv", "mha", "lin", "head"], {}),
    ],
    ids=["linear", "conv1d", "embedding-conv-mha"],
)
def test_loraone_is_the_placeholder_init_for_every_layer_type(factory, targets, kwargs):
    base = factory()
    original = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            base, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights="loraone", **kwargs)
        )
    layers = lora_layers(model)
    # MultiheadAttention's LoRA layer wraps its out_proj in a LoRA Linear of its own
    assert set(layers) - {"mha.base_layer.out_proj"} == set(targets)
    for name, layer in layers.items():
        assert _peft_hook.pending_adapters(layer) == ["default"], name
        if name == "emb":
            assert not layer.lora_embedding_A["default"].any()
        else:
            assert not layer.lora_B["default"].weight.any(), name
            assert layer.lora_A["default"].weight.std() > 0, name  # A is PEFT's Kaiming init
    batch = _mixed_batch() if factory is Mixed else mlp_batches(1)[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraOneWarning)
        # (MultiheadAttention's LoRA forward merges weights, so rounding differs in the last bits)
        torch.testing.assert_close(model(**batch)["logits"], original(**batch)["logits"], rtol=0, atol=1e-6)


def test_stock_peft_rejects_loraone_without_the_hook(monkeypatch):
    wrapper = LoraLayer.reset_lora_parameters
    monkeypatch.setattr(LoraLayer, "reset_lora_parameters", wrapper.__wrapped__)
    with pytest.raises(ValueError, match="Unknown initialization"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights="loraone"))


def test_forward_before_initialize_warns_once():
    model = get_peft_model(Mixed(), LoraConfig(r=2, target_modules=["emb", "lin", "head"], init_lora_weights="loraone"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(**_mixed_batch())
    ours = [w for w in caught if issubclass(w.category, LoraOneWarning)]
    assert len(ours) == 1
    assert "'default'" in str(ours[0].message) and "peft_loraone.initialize" in str(ours[0].message)
    # a second model warns again, once
    other = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="loraone"))
    with pytest.warns(LoraOneWarning, match="not been initialized"):
        other(**mlp_batches(1)[0])


def test_no_warning_after_initialize_disable_or_loaded_weights():
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights="loraone"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraOneWarning)
        with model.disable_adapter():
            model(**mlp_batches(1)[0])
    peft_loraone.initialize(model, mlp_batches(2), num_batches=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraOneWarning)
        model(**mlp_batches(1)[0])
    # weights loaded into a placeholder adapter (B != 0) are not a placeholder any more
    fresh = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights="loraone"))
    peft.set_peft_model_state_dict(fresh, peft.get_peft_model_state_dict(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraOneWarning)
        fresh(**mlp_batches(1)[0])


def test_other_init_values_pass_through():
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="gaussian"))
    layer = model.base_model.model.lin0
    assert _peft_hook.pending_adapters(layer) == []
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(0.5, rel=0.5)  # N(0, 1/r)
    with pytest.raises(ValueError, match="Unknown initialization"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights="lora-one"))


def test_install_is_idempotent_and_reports_installed():
    assert _peft_hook.is_installed()
    method = LoraLayer.reset_lora_parameters
    _peft_hook.install()
    assert LoraLayer.reset_lora_parameters is method


def _unhook(monkeypatch):
    monkeypatch.setattr(LoraLayer, "reset_lora_parameters", LoraLayer.reset_lora_parameters.__wrapped__)
    assert not _peft_hook.is_installed()


def test_old_peft_is_refused(monkeypatch):
    _unhook(monkeypatch)
    monkeypatch.setattr(peft, "__version__", "0.18.1")
    with pytest.raises(PeftCompatibilityError, match=r"needs peft >= 0\.19\.0, found 0\.18\.1"):
        _peft_hook.install()


def test_missing_method_is_refused(monkeypatch):
    _unhook(monkeypatch)
    monkeypatch.delattr(LoraLayer, "reset_lora_parameters")
    with pytest.raises(PeftCompatibilityError, match="reset_lora_parameters no longer exists"):
        _peft_hook.install()


def test_changed_signature_is_refused(monkeypatch):
    _unhook(monkeypatch)
    monkeypatch.setattr(LoraLayer, "reset_lora_parameters", lambda self, name, init: None)
    with pytest.raises(PeftCompatibilityError, match="changed its signature"):
        _peft_hook.install()


def test_peft_handling_loraone_itself_is_refused(monkeypatch):
    _unhook(monkeypatch)
    monkeypatch.setattr(_peft_hook.inspect, "getsource", lambda obj: 'elif init_lora_weights == "loraone":')
    with pytest.raises(PeftCompatibilityError, match="handles init_lora_weights='loraone' itself"):
        _peft_hook.install()


def test_failed_probe_is_refused_and_unhooks(monkeypatch):
    _unhook(monkeypatch)
    original = LoraLayer.reset_lora_parameters

    def broken_probe():
        raise AssertionError("the Linear layer is not at the placeholder init (B = 0)")

    monkeypatch.setattr(_peft_hook, "_probe", broken_probe)
    with pytest.raises(PeftCompatibilityError, match="no longer reaches PEFT's placeholder init.*B = 0"):
        _peft_hook.install()
    assert LoraLayer.reset_lora_parameters is original


def test_probe_detects_a_dispatch_that_bypasses_the_hook(monkeypatch):
    """If PEFT stopped routing unknown strings to reset_lora_parameters, the probe notices."""
    _unhook(monkeypatch)
    original = LoraLayer.reset_lora_parameters
    # install() sees this as the method to wrap; simulate a PEFT whose update_layer never calls it
    from peft.tuners.lora import layer as lora_layer

    real_update = lora_layer.Linear.update_layer

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        cfg = copy.copy(config)
        cfg.init_lora_weights = False  # a different dispatch: random B, no hook call
        return real_update(self, adapter_name, r, lora_alpha, cfg, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "update_layer", update_layer)
    with pytest.raises(PeftCompatibilityError, match="Linear"):
        _peft_hook.install()
    assert LoraLayer.reset_lora_parameters is original


def test_shorthand_config():
    cfg = peft_loraone.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    assert type(cfg) is LoraConfig and cfg.init_lora_weights == "loraone" and cfg.use_rslora
    assert peft_loraone.LoraConfig(init="LoRAOne", target_modules=["x"]).init_lora_weights == "loraone"
    assert peft_loraone.LoraConfig(init=True, target_modules=["x"]).init_lora_weights is True
    with pytest.raises(TypeError, match="not both"):
        peft_loraone.LoraConfig(init="loraone", init_lora_weights=True)
