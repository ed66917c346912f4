"""The paper's linear toy problem (algorithm.md section 5), set up the way a PEFT user would.

The paper writes a row-vector model ``y = x·W`` with ``W`` of shape ``(d_in, d_out) = (100, 100)``, LoRA
``W0 + A·B`` (paper-A: ``d_in x r``, paper-B: ``r x d_out``) and the one-step direction
``-G = (1/N) Xᵀ (Y - X W0)`` of shape ``(d_in, d_out)``.

PEFT's ``nn.Linear`` stores ``weight`` as ``(out, in)`` and computes ``y = x · weightᵀ``. So, here:

    weight (PEFT)        = W0ᵀ                 (we copy the paper's W0 transposed into the base layer)
    s · lora_B · lora_A  = (paper-A · paper-B)ᵀ, i.e. lora_A = paper-Aᵀ (r x in), lora_B = paper-Bᵀ (out x r)
    -G (PEFT, out x in)  = (-G paper)ᵀ           (what autograd gives for the base weight, negated)

Consequences used by the experiments:

* the paper's random factor (paper-A ~ N(0, sigma^2), input side) is PEFT's ``lora_A``; the zero factor is
  ``lora_B``: exactly PEFT's own default layout;
* "the top-K subspace of paper-A vs the left singular vectors of -G (paper)" becomes "the top-K *right* singular
  vectors of ``lora_A`` vs the top-K *right* singular vectors of -G (PEFT)"; we also report the output side
  (left singular vectors of ``lora_B`` vs those of -G);
* the loss is the paper's ``(1/2N) ||X W - Y||_F^2`` (a sum over outputs, not ``nn.MSELoss``'s mean);
* ``lora_alpha = r`` so that the LoRA scaling ``s = 1`` and the adapted weight is ``W0 + B A`` as in the paper.

The relative risk is ``||W_eff - W*||_F^2 / ||Theta||_F^2`` with ``W_eff = weight + s·B·A`` (the base weight as
PEFT holds it, after any offset that LoRA-GA or PiSSA applied) and ``W* = (W0 + Theta)ᵀ``. For ``x ~ N(0, I)``
it is the population risk relative to that of the pretrained model, and it is 1 for every method whose adapted
weight equals ``W0`` at step 0 (LoRA, LoRA-GA, PiSSA).

LoRA-One uses ``peft_loraone.initialize`` (the public API). LoRA-GA (reference variant) and PiSSA are computed here
with ``torch.linalg.svd`` from their formulas in algorithm.md section 3, and written into the PEFT adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

D_IN = 100
D_OUT = 100
N_SAMPLES = 16 * D_IN  # 1600, as in the paper
RANK = 8  # LoRA rank r
K = 4  # rank of Theta


@dataclass
class Problem:
    """One draw of the toy problem, tensors in PEFT orientation unless named ``*_paper``."""

    X: torch.Tensor  # (N, d_in)
    Y: torch.Tensor  # (N, d_out)
    W0: torch.Tensor  # (d_out, d_in) = W0_paperᵀ, the "pretrained" base weight
    theta: torch.Tensor  # (d_out, d_in) = Theta_paperᵀ, rank K
    neg_grad: torch.Tensor  # (d_out, d_in) = -G (PEFT) = ((1/N) Xᵀ (Y - X W0_paper))ᵀ


def make_problem(seed: int, singular_values=None, dtype=torch.float32) -> Problem:
    """Draw Theta (rank K), W0 ~ N(0, 1), X ~ N(0, I) with N = 1600 rows, and noiseless labels.

    ``singular_values=None`` gives Theta = P_K Q_Kᵀ (all K singular values 1, the paper's alignment experiment);
    otherwise Theta = P_K diag(sv) Q_Kᵀ scaled to spectral norm 1 (the paper's preconditioning experiment uses
    4:3:2:1). Everything is drawn in float64 from one seeded generator, then cast to ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    raw = torch.randn(D_IN, D_OUT, generator=g, dtype=f64)
    P, _, Qh = torch.linalg.svd(raw)
    sv = torch.ones(K, dtype=f64) if singular_values is None else torch.as_tensor(singular_values, dtype=f64)
    theta_paper = P[:, :K] @ torch.diag(sv) @ Qh[:K]
    theta_paper = theta_paper / torch.linalg.matrix_norm(theta_paper, ord=2)
    W0_paper = torch.randn(D_IN, D_OUT, generator=g, dtype=f64)
    X = torch.randn(N_SAMPLES, D_IN, generator=g, dtype=f64)
    Y = X @ (W0_paper + theta_paper)
    neg_grad_paper = X.T @ (Y - X @ W0_paper) / N_SAMPLES
    return Problem(
        X=X.to(dtype),
        Y=Y.to(dtype),
        W0=W0_paper.T.contiguous().to(dtype),
        theta=theta_paper.T.contiguous().to(dtype),
        neg_grad=neg_grad_paper.T.contiguous().to(dtype),
    )


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run with ``n`` intra-op threads (the toy matrices are tiny; more threads only contend on a shared CPU)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def loss_fn(output: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The paper's loss ``(1/2N) ||output - Y||_F^2``."""
    return 0.5 * (output - Y).pow(2).sum() / output.shape[0]


def build_model(problem: Problem, init_lora_weights=True):
    """A PEFT-wrapped ``nn.Linear(100, 100, bias=False)`` holding W0, LoRA r = 8, alpha = 8 (s = 1).

    ``init_lora_weights="loraone"`` (for :func:`init_loraone`) needs ``import peft_loraone``, done here.
    """
    from peft import LoraConfig, get_peft_model

    if init_lora_weights == "loraone":
        import peft_loraone  # noqa: F401  (registers the value with PEFT)

    base = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False)).to(problem.W0.dtype)
    with torch.no_grad():
        base[0].weight.copy_(problem.W0)
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"], init_lora_weights=init_lora_weights)
    return get_peft_model(base, cfg)


def lora_layer(model):
    """The one LoRA layer of a model from :func:`build_model`."""
    return model.base_model.model[0]


def factors(model):
    """``(B, A, s)`` of the default adapter: B (out x r), A (r x in), scaling s."""
    layer = lora_layer(model)
    return layer.lora_B["default"].weight, layer.lora_A["default"].weight, layer.scaling["default"]


def effective_weight(model) -> torch.Tensor:
    """``weight + s·B·A`` as PEFT would merge it, shape (out, in)."""
    layer = lora_layer(model)
    return layer.get_base_layer().weight + layer.get_delta_weight("default")


def relative_risk(model, problem: Problem) -> float:
    target = problem.W0 + problem.theta
    with torch.no_grad():
        err = (effective_weight(model) - target).double().pow(2).sum()
        return float(err / problem.theta.double().pow(2).sum())


def train_loss(model, problem: Problem) -> torch.Tensor:
    return loss_fn(model(problem.X), problem.Y)


def subspace_angle(basis: torch.Tensor, factor_basis: torch.Tensor) -> float:
    """``||U_perpᵀ U_K(factor)||_2`` = sine of the largest principal angle between two K-dim subspaces.

    ``basis`` (n x K, orthonormal) spans the reference subspace; ``U_perp`` is its orthogonal complement, so
    ``U_perpᵀ V`` has the same singular values as ``(I - basis basisᵀ) V``.
    """
    b = basis.double()
    v = factor_basis.double()
    resid = v - b @ (b.T @ v)
    return float(torch.linalg.matrix_norm(resid, ord=2))


def top_right_vectors(m: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors of ``m`` as columns (n x k)."""
    return torch.linalg.svd(m.detach().double(), full_matrices=False)[2][:k].T


def top_left_vectors(m: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left singular vectors of ``m`` as columns (m x k)."""
    return torch.linalg.svd(m.detach().double(), full_matrices=False)[0][:, :k]


# ---------------------------------------------------------------------------------------------------------------
# Initializations
# ---------------------------------------------------------------------------------------------------------------


def init_small_random(model, variance: float, seed: int) -> None:
    """Standard LoRA: ``lora_A ~ N(0, variance)`` (the paper's A), ``lora_B = 0``.

    The draw depends on ``seed`` only, so runs with different variances share one direction.
    """
    B, A, _ = factors(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a = torch.randn(A.shape, generator=g, dtype=torch.float64) * math.sqrt(variance)
        A.copy_(a.to(A.dtype))
        B.zero_()


def init_loraone(model, problem: Problem, gamma: float) -> object:
    """LoRA-One through the public API: one full-batch gradient of the paper's loss, then the top-r SVD of -G.

    The model must come from ``build_model(problem, init_lora_weights="loraone")``. Result:
    ``s·B·A = (s / (gamma·sigma1)) [-G]_r``; W0 untouched. Returns ``peft_loraone.initialize``'s report.
    """
    import peft_loraone

    def train_step(m):
        loss_fn(m(problem.X), problem.Y).backward()

    cfg = peft_loraone.LoraOneConfig(gamma=gamma, num_batches=1, progress=False)
    return peft_loraone.initialize(model, train_step, config=cfg)


def init_lora_ga_reference(model, problem: Problem, gamma: float = 16.0) -> None:
    """LoRA-GA, reference variant (algorithm.md section 3), with ``torch.linalg.svd`` of **+G**.

    A = V[:, 0:r]ᵀ · m^(1/4)/sqrt(gamma)          (r x in)
    B = U[:, r:2r] · m^(1/4)/sqrt(gamma)          (out x r), m = out features
    W0 <- W0 - s·B·A                               (output unchanged at step 0)
    """
    B, A, s = factors(model)
    layer = lora_layer(model)
    G = -problem.neg_grad.double()
    U, _, Vh = torch.linalg.svd(G)
    r = A.shape[0]
    c = G.shape[0] ** 0.25 / math.sqrt(gamma)
    with torch.no_grad():
        a = Vh[:r] * c  # (r, in)
        b = U[:, r : 2 * r] * c  # (out, r)
        A.copy_(a.to(A.dtype))
        B.copy_(b.to(B.dtype))
        w = layer.get_base_layer().weight
        w.copy_((w.double() - s * (b @ a)).to(w.dtype))


def init_pissa(model, problem: Problem) -> None:
    """PiSSA with ``torch.linalg.svd`` of the weight: B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_rᵀ, W0 <- W0 - s·B·A."""
    B, A, s = factors(model)
    layer = lora_layer(model)
    w = layer.get_base_layer().weight
    U, S, Vh = torch.linalg.svd(w.detach().double())
    r = A.shape[0]
    root = torch.sqrt(S[:r] / s)
    with torch.no_grad():
        b = U[:, :r] * root
        a = root[:, None] * Vh[:r]
        A.copy_(a.to(A.dtype))
        B.copy_(b.to(B.dtype))
        w.copy_((w.double() - s * (b @ a)).to(w.dtype))


def run_and_save(outdir: str, name: str, title: str, run, plot, table, summarize_run) -> dict:
    """Run an experiment on one torch thread and write ``NAME.png``, ``NAME.md`` and ``NAME.json`` to ``outdir``.

    ``summarize_run`` maps one entry of ``res["runs"]`` to what the JSON keeps of it.
    """
    os.makedirs(outdir, exist_ok=True)
    t0 = time.perf_counter()
    with torch_threads(1):
        res = run()
    res["seconds"] = time.perf_counter() - t0
    plot(res, os.path.join(outdir, f"{name}.png"))
    with open(os.path.join(outdir, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n" + table(res))
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        summary = {k: v for k, v in res.items() if k != "runs"}
        summary["runs"] = {k: summarize_run(v) for k, v in res["runs"].items()}
        json.dump(summary, f, indent=1)
    return res
