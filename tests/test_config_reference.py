"""LoraOneConfig.reference(): the LoRA-One reference implementation's settings in one call."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plugin_models import mlp_batches

import peft_loraone
from peft_loraone import LoraOneConfig, LoraOneWarning


def test_reference_defaults_without_the_train_mode_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraOneWarning)
        cfg = LoraOneConfig.reference()
    assert (cfg.train_mode, cfg.gamma, cfg.num_batches) == (True, 128.0, 8)
    # everything else is this package's default (float32 sums, the engine's SVD)
    default = LoraOneConfig()
    for f in dataclasses.fields(LoraOneConfig):
        if f.name not in ("train_mode", "gamma", "num_batches"):
            assert getattr(cfg, f.name) == getattr(default, f.name), f.name
    assert isinstance(cfg, LoraOneConfig)


def test_reference_overrides_are_applied_and_validated():
    cfg = LoraOneConfig.reference(num_batches=64, gamma=64, progress=False, algorithm="subspace", power_iters=16)
    assert (cfg.num_batches, cfg.gamma, cfg.train_mode, cfg.algorithm, cfg.power_iters) == (64, 64.0, True, "subspace", 16)
    assert LoraOneConfig.reference(train_mode=False).train_mode is False
    with pytest.raises(ValueError, match="num_batches"):
        LoraOneConfig.reference(num_batches=0)
    with pytest.raises(TypeError):
        LoraOneConfig.reference(no_such_field=1)
    with pytest.warns(LoraOneWarning, match="gamma"):  # the other warnings still come
        LoraOneConfig.reference(gamma=0.5)


class _DropoutMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.lin1 = torch.nn.Linear(8, 6)
        self.modes: list[bool] = []

    def forward(self, x, y):
        self.modes.append(self.drop.training)
        out = self.lin1(self.drop(torch.tanh(self.lin0(x))))
        return {"loss": ((out - y) ** 2).mean()}


def _delta(model):
    layer = model.base_model.model.lin1
    return layer.get_delta_weight("default").detach().clone()


def test_reference_computes_g_in_train_mode():
    """The gradient pass runs with dropout active (the reference's model.train()); the default does not."""
    batches = mlp_batches(2)
    deltas = {}
    for name, cfg in (
        ("reference", LoraOneConfig.reference(progress=False, num_batches=2)),
        ("default", LoraOneConfig(progress=False, num_batches=2)),
    ):
        torch.manual_seed(0)
        base = _DropoutMLP().eval()
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights="loraone"))
        peft_loraone.initialize(model, batches, config=cfg)
        assert base.modes == [name == "reference"] * 2
        assert not base.training  # the model's own mode is restored
        deltas[name] = _delta(model)
    assert not torch.allclose(deltas["reference"], deltas["default"])
