"""Every bad input raises its own, clear error; a failure in the middle of initialize changes nothing."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plugin_models import MLP, Mixed, assert_same_state, compute_loss, mlp_batches, state_snapshot

import peft_loraone
from peft_loraone import LoraOneConfig, LoraOneWarning, NonFiniteError

QUIET = LoraOneConfig(progress=False, num_batches=2)


def _model(**kwargs):
    kwargs.setdefault("target_modules", ["lin0", "lin1"])
    return get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, init_lora_weights="loraone", **kwargs))


# ---------------------------------------------------------------------------------------------------------
# LoraOneConfig
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("gamma", 0, r"`gamma` must be a positive finite number, got 0"),
        ("gamma", -1.0, r"`gamma` must be a positive finite number, got -1.0"),
        ("gamma", math.inf, r"`gamma` must be a positive finite number, got inf"),
        ("gamma", "128", r"`gamma` must be a positive finite number, got '128'"),
        ("gamma", True, r"`gamma` must be a positive finite number, got True"),
        ("num_batches", 0, r"`num_batches` must be an integer >= 1, got 0"),
        ("num_batches", 2.0, r"`num_batches` must be an integer >= 1, got 2.0"),
        ("oversampling", -1, r"`oversampling` must be None or an integer >= 0, got -1"),
        ("power_iters", 1.5, r"`power_iters` must be None or an integer >= 0, got 1.5"),
        ("power_iters", 1001, r"`power_iters` must be at most 1000 \(the engine's bound"),
        ("dist_timeout", 0, r"`dist_timeout` must be None or a positive number of seconds, got 0"),
        ("tol", 0.0, r"`tol` must be None or a number in \(0, 1\), got 0.0"),
        ("tol", 2, r"`tol` must be None or a number in \(0, 1\), got 2"),
        ("tol", math.nan, r"`tol` must be None or a number in \(0, 1\), got nan"),
        ("seed", -3, r"`seed` must be an integer in \[0, 2\*\*63\), got -3"),
        ("seed", 2**63, r"`seed` must be an integer in \[0, 2\*\*63\), got 9223372036854775808"),
        ("progress", 1, r"`progress` must be True or False, got 1"),
        ("train_mode", "yes", r"`train_mode` must be True or False, got 'yes'"),
        ("loss_fn", "mse", r"`loss_fn` must be None or a callable loss_fn\(output, batch\), got 'mse'"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        LoraOneConfig(**{field: value})


def test_config_warns_on_risky_values():
    with pytest.warns(LoraOneWarning, match="gamma`=0.5 < 1"):
        LoraOneConfig(gamma=0.5)
    with pytest.warns(LoraOneWarning, match="train_mode=True"):
        LoraOneConfig(train_mode=True)


def test_config_fields_are_documented():
    import dataclasses

    for f in dataclasses.fields(LoraOneConfig):
        assert f.metadata.get("help"), f.name
        assert f.name in LoraOneConfig.__doc__, f.name


# ---------------------------------------------------------------------------------------------------------
# initialize's arguments
# ---------------------------------------------------------------------------------------------------------


def test_not_a_peft_model():
    with pytest.raises(TypeError, match="expects a PEFT LoRA model.* got MLP"):
        peft_loraone.initialize(MLP(), mlp_batches(2))


def test_not_a_lora_model():
    from peft import IA3Config

    model = get_peft_model(MLP(), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="expects a PEFT LoRA model"):
        peft_loraone.initialize(model, mlp_batches(2))


def test_bad_config_type():
    with pytest.raises(TypeError, match="`config` must be a peft_loraone.LoraOneConfig or None, got dict"):
        peft_loraone.initialize(_model(), mlp_batches(2), config={"gamma": 1})


def test_unknown_override():
    with pytest.raises(TypeError, match=r"unknown LoraOneConfig field\(s\) \['gama'\]"):
        peft_loraone.initialize(_model(), mlp_batches(2), gama=1)


def test_bad_override_value():
    with pytest.raises(ValueError, match="`num_batches` must be an integer >= 1, got -2"):
        peft_loraone.initialize(_model(), mlp_batches(2), num_batches=-2)


def test_unknown_adapter():
    with pytest.raises(ValueError, match=r"Adapter 'other' not found; the model has adapters \['default'\]"):
        peft_loraone.initialize(_model(), mlp_batches(2), adapter_name="other")


def test_adapter_not_created_for_loraone():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="has init_lora_weights=True; LoRA-One initializes adapters created with"):
        peft_loraone.initialize(model, mlp_batches(2))


def test_already_initialized():
    model = _model()
    peft_loraone.initialize(model, mlp_batches(2), config=QUIET)
    with pytest.raises(ValueError, match="already initialized by peft_loraone.initialize"):
        peft_loraone.initialize(model, mlp_batches(2), config=QUIET)


@pytest.mark.parametrize("data", [42, None, "batches", object()])
def test_data_neither_iterable_nor_callable(data):
    with pytest.raises(TypeError, match="`data` must be an iterable of batches or a train_step callable"):
        peft_loraone.initialize(_model(), data, config=QUIET)


def test_empty_data():
    with pytest.raises(ValueError, match="`data` yielded no batches"):
        peft_loraone.initialize(_model(), [], config=QUIET)


def test_merged_adapter():
    model = _model()
    other = LoraConfig(r=2, target_modules=["lin1"], init_lora_weights=False)
    model.add_adapter("other", other)
    model.base_model.merge_adapter(["other"])
    with pytest.raises(ValueError, match=r"the base weights of \['lin1'\] hold merged adapters.*unmerge_adapter"):
        peft_loraone.initialize(model, mlp_batches(2), config=QUIET)


def test_quantized_base_layer():
    model = _model()
    # bitsandbytes' Params4bit carries a quant_state; simulate one on lin1's base weight
    model.base_model.model.lin1.base_layer.weight.quant_state = object()
    with pytest.raises(ValueError, match=r"cannot initialize quantized base layers \(\['lin1'\]\)"):
        peft_loraone.initialize(model, mlp_batches(2), config=QUIET)


def test_integer_base_weight_counts_as_quantized():
    model = _model()
    layer = model.base_model.model.lin0.base_layer
    layer.weight = torch.nn.Parameter(torch.zeros(8, 10, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"quantized base layers \(\['lin0'\]\)"):
        peft_loraone.initialize(model, mlp_batches(2), config=QUIET)


def test_no_supported_target():
    model = get_peft_model(Mixed(), LoraConfig(r=2, target_modules=["emb", "conv"], init_lora_weights="loraone"))
    with pytest.raises(ValueError, match=r"no Linear or Conv1D layer .*emb \(Embedding\).*conv \(Conv2d\)"):
        peft_loraone.initialize(
            model, [{"ids": torch.zeros(1, 2, dtype=torch.long), "y": torch.zeros(1, 4)}], config=QUIET
        )


def test_output_without_loss():
    batches = [{"x": b["x"]} for b in mlp_batches(2)]
    with pytest.raises(ValueError, match="the model output has no `loss`; put labels in the batches or pass"):
        peft_loraone.initialize(_model(), batches, config=QUIET)


def test_non_scalar_loss():
    with pytest.raises(ValueError, match=r"the loss must be a scalar tensor, got Tensor\(5, 6\)"):
        peft_loraone.initialize(_model(), mlp_batches(2), config=QUIET, loss_fn=lambda out, b: out["logits"])


def test_loss_without_gradient():
    with pytest.raises(ValueError, match="the loss does not depend on any target weight"):
        peft_loraone.initialize(_model(), mlp_batches(2), config=QUIET, loss_fn=lambda out, b: torch.tensor(1.0))


def test_unsupported_lora_variant():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # aLoRA's CAUSAL_LM notice
        model = _model(alora_invocation_tokens=[1])
    with pytest.raises(
        ValueError, match=r"plain LoRA and DoRA only; unsupported variant on \['lin0 \(ALoraLinearVariant\)'"
    ):
        peft_loraone.initialize(model, mlp_batches(2), config=QUIET)


def test_no_target_gets_a_gradient():
    model = _model()

    def step(m):  # the loss reaches the weights only through a zero factor
        b = mlp_batches(1)[0]
        (compute_loss(m, b) * 0.0).backward()

    before = state_snapshot(model)
    with pytest.raises(ValueError, match="No target weight of adapter 'default' received a non-zero gradient"):
        peft_loraone.initialize(model, step, config=QUIET)
    assert_same_state(before, state_snapshot(model))


def test_get_peft_model_needs_loraone_config():
    with pytest.raises(ValueError, match="needs a LoraConfig with init_lora_weights='loraone', got True"):
        peft_loraone.get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]), train_data=mlp_batches(2))


# ---------------------------------------------------------------------------------------------------------
# failures in the middle leave the model exactly as it was
# ---------------------------------------------------------------------------------------------------------


def _prepared_model():
    model = _model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin1"], init_lora_weights=False))
    model.train()
    model.base_model.model.lin1.eval()
    w = model.base_model.model.lin0.base_layer.weight
    w.grad = torch.ones_like(w)
    return model


def test_failure_in_the_data_changes_nothing():
    model = _prepared_model()
    before = state_snapshot(model)
    batches = mlp_batches(3)

    def gen():
        yield batches[0]
        yield batches[1]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        peft_loraone.initialize(model, gen(), config=QUIET, num_batches=3)
    assert_same_state(before, state_snapshot(model))
    assert model.peft_config["default"].init_lora_weights == "loraone"
    # and it still works afterwards
    peft_loraone.initialize(model, batches, config=QUIET, num_batches=3)
    assert model.base_model.model.lin0.lora_B["default"].weight.any()


def test_failure_in_the_engine_changes_nothing():
    """The last batch's loss is NaN: every module's job fails in the engine after the others were computed."""
    model = _prepared_model()
    before = state_snapshot(model)
    batches = mlp_batches(2)
    batches[1]["y"][0, 0] = math.nan
    with pytest.raises(NonFiniteError) as info:
        peft_loraone.initialize(model, batches, config=QUIET)
    assert isinstance(info.value, ValueError)
    assert any("while computing the LoRA-One factors of 'lin" in note for note in info.value.__notes__)
    assert_same_state(before, state_snapshot(model))


def test_failure_in_one_module_after_others_succeeded_changes_nothing():
    """lin1's gradient is finite, lin0's is not: lin1 is computed, then lin0 fails; nothing is written."""
    model = _prepared_model()
    before = state_snapshot(model)
    batches = mlp_batches(2)
    it = iter(batches)

    def step(m):
        compute_loss(m, next(it)).backward()

    # poison lin0's accumulated gradient through a hook on its activations
    def poison(module, args, output):
        output.register_hook(lambda g: torch.full_like(g, math.nan))

    handle = model.base_model.model.lin0.base_layer.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError) as info:
            peft_loraone.initialize(model, step, config=QUIET)
    finally:
        handle.remove()
    assert "'lin0'" in " ".join(info.value.__notes__)
    assert_same_state(before, state_snapshot(model))


def test_failure_in_train_step_changes_nothing():
    model = _prepared_model()
    before = state_snapshot(model)
    calls = []

    def step(m):
        calls.append(1)
        compute_loss(m, mlp_batches(1)[0]).backward()
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        peft_loraone.initialize(model, step, config=QUIET, num_batches=4)
    assert_same_state(before, state_snapshot(model))


def test_low_cpu_mem_usage_failure_keeps_meta_adapters():
    model = get_peft_model(
        MLP(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="loraone"), low_cpu_mem_usage=True
    )
    before = state_snapshot(model)
    batches = mlp_batches(2)
    batches[0]["y"][0, 0] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteError):
            peft_loraone.initialize(model, batches, config=QUIET)
    assert_same_state(before, state_snapshot(model))
