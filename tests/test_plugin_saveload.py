"""Save a LoRA-One adapter, load it in a fresh process that never imports peft_loraone: same outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plugin_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batches

import peft_loraone
from peft_loraone import LoraOneConfig

LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = sys.argv[1]
    cases = json.load(open(f"{root}/cases.json"))
    for name, auto in cases.items():
        cls = AutoModelForCausalLM if auto == "causal" else AutoModelForSequenceClassification
        base = cls.from_pretrained(f"{root}/{name}/base", dtype="auto")
        model = PeftModel.from_pretrained(base, f"{root}/{name}/adapter").eval()
        data = torch.load(f"{root}/{name}/io.pt")
        with torch.no_grad():
            got = model(**data["inputs"]).logits
            with model.disable_adapter():
                plain = model(**data["inputs"]).logits
        assert got.dtype == data["logits"].dtype, (name, got.dtype)
        assert torch.equal(got, data["logits"]), (name, (got - data["logits"]).abs().max())
        assert torch.equal(plain, data["base_logits"]), name
        assert not torch.equal(got, plain), name
        print("OK", name)
    assert "peft_loraone" not in sys.modules, "the loader must not import peft_loraone"
    """
)

CASES = {
    "llama": (tiny_llama, torch.float32, "causal", dict(target_modules="all-linear", use_rslora=True)),
    "llama-bf16": (tiny_llama, torch.bfloat16, "causal", dict(target_modules="all-linear")),
    "gpt2": (tiny_gpt2, torch.float32, "causal", dict(target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True)),
    "bert": (tiny_bert_classifier, torch.float32, "cls", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def test_save_then_load_in_stock_peft(tmp_path):
    for name, (factory, dtype, auto, kwargs) in CASES.items():
        base = factory(dtype)
        base.save_pretrained(tmp_path / name / "base")
        batches = token_batches(2, labels="lm" if auto == "causal" else "cls")
        inputs = {k: v for k, v in batches[0].items() if k != "labels"}
        with torch.no_grad():
            base_logits = base(**inputs).logits
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out notice for GPT-2
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights="loraone", **kwargs))
        report = peft_loraone.initialize(model, batches, config=LoraOneConfig(progress=False, num_batches=2, gamma=4.0))
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        assert not torch.equal(logits, base_logits)
        model.save_pretrained(tmp_path / name / "adapter")
        torch.save({"inputs": inputs, "logits": logits, "base_logits": base_logits}, tmp_path / name / "io.pt")

        cfg = json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text())
        assert cfg["init_lora_weights"] is True
        prov = json.loads((tmp_path / name / "adapter" / peft_loraone.report.PROVENANCE_FILE).read_text())
        assert prov["init"] == "loraone" and prov["gamma"] == 4.0 and prov["batches"] == 2 and prov["samples"] == 4
        assert set(prov["svd"]) == {"oversampling", "power_iters", "tol", "seed", "algorithm"}
        assert prov["versions"]["peft"] and prov["versions"]["peft_loraone"]
        assert [m["name"] for m in prov["modules"]] == [m.name for m in report.modules]
    (tmp_path / "cases.json").write_text(json.dumps({n: c[2] for n, c in CASES.items()}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [w for n in CASES for w in ("OK", n)]


def test_provenance_for_named_adapters_goes_to_their_subfolder(tmp_path):
    from plugin_models import MLP, mlp_batches

    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="loraone"))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["lin1"], init_lora_weights="loraone"))
    peft_loraone.initialize(model, mlp_batches(2), adapter_name="second", num_batches=2, progress=False)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / peft_loraone.report.PROVENANCE_FILE).exists()
    assert not (tmp_path / peft_loraone.report.PROVENANCE_FILE).exists()  # "default" was not initialized
    model.save_pretrained(tmp_path / "only", selected_adapters=["default"])
    assert not (tmp_path / "only" / "second").exists()


@pytest.mark.parametrize("safe", [True, False])
def test_saved_state_dict_holds_the_factors(tmp_path, safe):
    from peft import PeftModel
    from plugin_models import MLP, mlp_batches

    base = MLP()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights="loraone"))
    peft_loraone.initialize(model, mlp_batches(2), num_batches=2, progress=False)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    fresh = PeftModel.from_pretrained(MLP(), tmp_path)
    for (n, p), (m, q) in zip(model.named_parameters(), fresh.named_parameters()):
        if "lora_" in n:
            assert n == m and torch.equal(p, q), n


def test_initialized_model_deep_copies_and_pickles(tmp_path):
    import copy
    import pickle

    from plugin_models import MLP, mlp_batches

    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="loraone"))
    peft_loraone.initialize(model, mlp_batches(2), num_batches=2, progress=False)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.save_pretrained(tmp_path / "c")
        assert (tmp_path / "c" / peft_loraone.report.PROVENANCE_FILE).exists()
        assert clone.save_pretrained.model is clone
