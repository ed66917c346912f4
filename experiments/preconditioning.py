"""Initializations under plain and preconditioned GD (paper's toy, algorithm.md section 5).

Theta has singular values ``linspace(kappa, 1, 4)`` (4:3:2:1 for kappa = 4; 100:67:34:1 for kappa = 100), scaled
to spectral norm 1. Four initializations of the PEFT-wrapped ``nn.Linear(100, 100)`` (r = 8, s = 1):

* ``LoRA``: ``lora_A ~ N(0, 1e-3)``, ``lora_B = 0`` (small random);
* ``LoRA-GA``: the reference variant (A = V[:, :r]ᵀ, B = U[:, r:2r] of +G, both times m^(1/4)/sqrt(16), W0 offset),
  computed with ``torch.linalg.svd`` in ``toy.init_lora_ga_reference``;
* ``PiSSA``: top-r SVD of W0 (W0 offset), ``toy.init_pissa``;
* ``LoRA-One``: ``peft_loraone.initialize`` with gamma = 1, i.e. ``s·B·A = [-G]_r / sigma1(-G)``.

Each is trained with lr 0.5 by

* preconditioned GD, 100 steps: ``peft_loraone.optim.create_preconditioned_optimizer(model, torch.optim.SGD,
  lr=0.5, reg=1e-3)`` (PEFT's Riemannian preconditioner: both r x r preconditioners from the pre-step factors, as in
  the paper's notebook), and
* plain GD, 300 steps: ``torch.optim.SGD(lr=0.5)``.

The metric is the relative risk ``||W_eff - W*||_F^2 / ||Theta||_F^2`` (see ``toy``). A run whose risk becomes
non-finite is recorded as diverged and stopped.

Run: ``python experiments/preconditioning.py`` (writes ``experiments/results/preconditioning.{png,md,json}``).
"""

from __future__ import annotations

import math
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import toy

KAPPAS = (4, 100)
METHODS = ("LoRA", "LoRA-GA", "PiSSA", "LoRA-One")
LR = 0.5
LAMBDA = 1e-3
STEPS = {"preconditioned": 100, "plain": 300}
SMALL_VARIANCE = 1e-3
LORA_ONE_GAMMA = 1.0
LORA_GA_GAMMA = 16.0
SEED = 0
INIT_SEED = 1
TARGET = 1e-8
REPORT_STEPS = (0, 10, 25, 50, 100, 300)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def singular_values(kappa: float) -> list[float]:
    return torch.linspace(float(kappa), 1.0, toy.K, dtype=torch.float64).tolist()


def init(model, problem: toy.Problem, method: str):
    if method == "LoRA":
        toy.init_small_random(model, SMALL_VARIANCE, seed=INIT_SEED)
    elif method == "LoRA-GA":
        toy.init_lora_ga_reference(model, problem, gamma=LORA_GA_GAMMA)
    elif method == "PiSSA":
        toy.init_pissa(model, problem)
    elif method == "LoRA-One":
        return toy.init_loraone(model, problem, gamma=LORA_ONE_GAMMA)
    else:
        raise ValueError(f"unknown method {method!r}")
    return None


def train(problem: toy.Problem, method: str, optimizer: str, steps: int) -> dict:
    from peft_loraone.optim import create_preconditioned_optimizer

    model = toy.build_model(problem, init_lora_weights="loraone" if method == "LoRA-One" else True)
    report = init(model, problem, method)
    B, A, _ = toy.factors(model)
    if optimizer == "preconditioned":
        opt = create_preconditioned_optimizer(model, torch.optim.SGD, lr=LR, reg=LAMBDA)
    else:
        opt = torch.optim.SGD([A, B], lr=LR)
    risks = [toy.relative_risk(model, problem)]
    for _ in range(steps):
        opt.zero_grad()
        toy.train_loss(model, problem).backward()
        opt.step()
        risks.append(toy.relative_risk(model, problem))
        if not math.isfinite(risks[-1]):
            break
    diverged = not math.isfinite(risks[-1])
    risks += [float("nan")] * (steps + 1 - len(risks))
    hit = next((t for t, v in enumerate(risks) if v < TARGET), None)
    return {
        "risk": risks,
        "diverged": diverged,
        "first_step_below_target": hit,
        "final": risks[-1],
        "min": min((v for v in risks if math.isfinite(v)), default=float("nan")),
        "init_report": None if report is None else str(report),
    }


def run(kappas=KAPPAS, methods=METHODS, steps=None, seed: int = SEED, dtype=torch.float32) -> dict:
    steps = dict(STEPS if steps is None else steps)
    out = {"lr": LR, "lambda": LAMBDA, "steps": steps, "seed": seed, "dtype": str(dtype), "target": TARGET, "runs": {}}
    for kappa in kappas:
        problem = toy.make_problem(seed, singular_values(kappa), dtype=dtype)
        for optimizer, n in steps.items():
            for method in methods:
                out["runs"][f"kappa={kappa}|{optimizer}|{method}"] = {
                    "kappa": kappa,
                    "optimizer": optimizer,
                    "method": method,
                    **train(problem, method, optimizer, n),
                }
    return out


def _fmt(v: float) -> str:
    return "diverged" if not math.isfinite(v) else f"{v:.2e}"


def table(res: dict) -> str:
    cols = [s for s in REPORT_STEPS if s <= max(res["steps"].values())]
    rows = [
        (
            f"Relative risk ||W_eff - W*||_F^2 / ||Theta||_F^2; lr {res['lr']}, lambda {res['lambda']} "
            f"(preconditioned), steps {res['steps']}, seed {res['seed']}, {res['dtype']}. "
            f"'< {res['target']:g} at' = first step below {res['target']:g}."
        ),
        "",
        "| kappa | optimizer | init | " + " | ".join(f"step {s}" for s in cols) + f" | min | < {res['target']:g} at |",
        "|---|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for r in res["runs"].values():
        n = len(r["risk"]) - 1
        cells = [_fmt(r["risk"][s]) if s <= n else "" for s in cols]
        hit = r["first_step_below_target"]
        rows.append(
            f"| {r['kappa']} | {r['optimizer']} | {r['method']} | "
            + " | ".join(cells)
            + f" | {_fmt(r['min'])} | {hit if hit is not None else 'never'} |"
        )
    return "\n".join(rows) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kappas = sorted({r["kappa"] for r in res["runs"].values()})
    opts = list(res["steps"])
    fig, axes = plt.subplots(len(kappas), len(opts), figsize=(5.5 * len(opts), 3.8 * len(kappas)), squeeze=False)
    cmap = matplotlib.colormaps["plasma"]
    methods = list(dict.fromkeys(r["method"] for r in res["runs"].values()))
    for r in res["runs"].values():
        ax = axes[kappas.index(r["kappa"])][opts.index(r["optimizer"])]
        c = cmap(methods.index(r["method"]) / len(methods))
        ax.semilogy(r["risk"], color=c, label=r["method"] + (" (diverged)" if r["diverged"] else ""))
    for i, kappa in enumerate(kappas):
        for j, opt in enumerate(opts):
            ax = axes[i][j]
            ax.axhline(res["target"], color="gray", lw=0.8, ls="--")
            ax.set(title=f"{opt} GD, κ = {kappa}", xlabel="step", ylabel="relative risk")
            ax.set_ylim(1e-16, 1e2)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(outdir: str = RESULTS) -> dict:
    return toy.run_and_save(
        outdir, "preconditioning", "Initializations under plain and preconditioned GD (paper's toy)", run, plot, table,
        lambda run: {k: v for k, v in run.items() if k != "risk"},
    )


if __name__ == "__main__":
    r = main()
    print(table(r))
    print(f"{r['seconds']:.1f} s")
