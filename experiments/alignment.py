"""Alignment of randomly initialized LoRA with the one-step gradient (paper's toy, algorithm.md section 5).

Standard LoRA init (``lora_A ~ N(0, sigma^2)``, ``lora_B = 0``) on the PEFT-wrapped ``nn.Linear(100, 100)``,
plain gradient descent (``torch.optim.SGD``, lr 1/64, 1500 steps) on the paper's loss, for
``sigma^2 in {1, 1e-1, 1e-2, 1e-3, 1e-4}``. At every step it records the training loss and the alignment angle

    ||U_perp(-G)ᵀ U_K(factor)||_2     (sine of the largest principal angle, 0 = aligned, 1 = orthogonal)

for the paper's factor A (PEFT ``lora_A``, input side: its top-K right singular vectors against those of -G).

The output side (``lora_B``) is not reported: in this noiseless toy, ``-G`` (PEFT orientation) is ``Theta·Sigma``
and every gradient of ``lora_B`` lies in ``col(Theta) + col(lora_B)``, so ``lora_B`` (starting at 0) lies in -G's
top-K left subspace exactly, at every step and for every sigma^2.

On the input side, -G's top-K subspace is that of ``Sigma·Theta_paper`` with ``Sigma = XᵀX/N``; it differs from
Theta's own subspace by sampling noise (angle ``angle_G_theta`` below). GD on noiseless labels ends at Theta, so a
well-aligned A first approaches -G's subspace, then drifts to Theta's: its final angle equals ``angle_G_theta``.

Run: ``python experiments/alignment.py`` (writes ``experiments/results/alignment.{png,md,json}``; the JSON holds the summaries).
"""

from __future__ import annotations

import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import toy

VARIANCES = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
LR = 1.0 / 64.0
STEPS = 1500
SEED = 0  # problem draw
INIT_SEED = 1  # draw of lora_A (same direction for every variance)
ALIGNED = 0.5  # an angle at or below this counts as "aligned" (sin 30 degrees)
STARTED = 0.9  # an angle below this counts as "aligning" (a random 4-dim subspace of R^100 sits near 1)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def first_step(values, pred):
    """First index whose value satisfies ``pred``, or None."""
    return next((i for i, v in enumerate(values) if pred(v)), None)


def run(variances=VARIANCES, steps: int = STEPS, lr: float = LR, seed: int = SEED, dtype=torch.float32) -> dict:
    """Train one LoRA per variance; return the traces and a per-variance summary (JSON-ready)."""
    problem = toy.make_problem(seed, dtype=dtype)
    ref_in = toy.top_right_vectors(problem.neg_grad, toy.K)  # paper's U_K(-G): input side
    theta_in = toy.top_right_vectors(problem.theta, toy.K)
    out = {
        "lr": lr,
        "steps": steps,
        "seed": seed,
        "dtype": str(dtype),
        "angle_G_theta": toy.subspace_angle(ref_in, theta_in),
        "runs": {},
    }
    for var in variances:
        model = toy.build_model(problem)
        toy.init_small_random(model, var, seed=INIT_SEED)
        B, A, _ = toy.factors(model)
        opt = torch.optim.SGD([A, B], lr=lr)
        losses, ang_a = [], []
        for t in range(steps + 1):
            ang_a.append(toy.subspace_angle(ref_in, toy.top_right_vectors(A, toy.K)))
            loss = toy.train_loss(model, problem)
            losses.append(loss.detach().item())
            if t == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        loss0 = losses[0]
        t_start = first_step(ang_a, lambda v: v < STARTED)
        t_align = first_step(ang_a, lambda v: v <= ALIGNED)
        t_half = first_step(losses, lambda v, l0=loss0: v <= 0.5 * l0)
        t_min = min(range(len(ang_a)), key=ang_a.__getitem__)
        out["runs"][repr(var)] = {
            "variance": var,
            "loss": losses,
            "angle_A": ang_a,
            "summary": {
                "loss_0": loss0,
                "loss_100": losses[min(100, steps)],
                "loss_300": losses[min(300, steps)],
                "loss_final": losses[-1],
                "angle_A_min": ang_a[t_min],
                "angle_A_min_step": t_min,
                "angle_A_final": ang_a[-1],
                "step_aligning": t_start,
                "loss_ratio_at_aligning": None if t_start is None else losses[t_start] / loss0,
                "step_aligned": t_align,
                "loss_ratio_at_aligned": None if t_align is None else losses[t_align] / loss0,
                "step_loss_halved": t_half,
            },
        }
    return out


def _step(t, ratio=None) -> str:
    if t is None:
        return "never"
    return f"{t}" if ratio is None else f"{t} ({ratio:.2f})"


def table(res: dict) -> str:
    rows = [
        (
            f"Plain GD (`torch.optim.SGD`), lr {res['lr']:.6g}, {res['steps']} steps, seed {res['seed']}, "
            f"{res['dtype']}. Angle = ||U_perp(-G)ᵀ U_K(A)||_2 for the paper's A (PEFT `lora_A`), K = 4. "
            f"'aligning' = first step with angle < {STARTED}; 'aligned' = first step with angle <= {ALIGNED}; "
            f"in parentheses: loss / loss at step 0 at that step. Angle between -G's and Theta's own top-4 input "
            f"subspaces (sampling noise of XᵀX/N): {res['angle_G_theta']:.3f}."
        ),
        "",
        (
            "| sigma^2 | loss step 0 | loss step 100 | loss step 300 | final loss | min angle (step) | final angle "
            "| step aligning | step aligned | step loss halved |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_ in res["runs"].values():
        s = run_["summary"]
        rows.append(
            f"| {run_['variance']:g} | {s['loss_0']:.4g} | {s['loss_100']:.4g} | {s['loss_300']:.4g} "
            f"| {s['loss_final']:.3e} | {s['angle_A_min']:.3f} ({s['angle_A_min_step']}) "
            f"| {s['angle_A_final']:.3f} | {_step(s['step_aligning'], s['loss_ratio_at_aligning'])} "
            f"| {_step(s['step_aligned'], s['loss_ratio_at_aligned'])} | {_step(s['step_loss_halved'])} |"
        )
    return "\n".join(rows) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = matplotlib.colormaps["plasma"]
    n = len(res["runs"])
    for i, run_ in enumerate(res["runs"].values()):
        c = cmap(i / max(n, 1))
        label = rf"$\sigma^2$ = {run_['variance']:g}"
        ax_l.semilogy(run_["loss"], color=c, label=label)
        ax_a.plot(run_["angle_A"], color=c, label=label)
    ax_l.set(xlabel="step", ylabel="training loss", title="LoRA (A ~ N(0, σ²), B = 0), plain GD")
    ax_a.axhline(ALIGNED, color="gray", lw=0.8, ls="--")
    ax_a.axhline(res["angle_G_theta"], color="black", lw=0.8, ls=":", label="angle(-G, Θ)")
    ax_a.set(
        xlabel="step",
        ylabel=r"$\|U_\perp(-G)^\top U_K(\cdot)\|_2$",
        title="alignment of A with -G's top-4 input subspace",
        ylim=(0, 1.05),
    )
    ax_l.legend(fontsize=8)
    ax_a.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(outdir: str = RESULTS) -> dict:
    return toy.run_and_save(
        outdir, "alignment", "Alignment of randomly initialized LoRA (paper's toy)", run, plot, table,
        lambda run: run["summary"],
    )


if __name__ == "__main__":
    r = main()
    print(table(r))
    print(f"{r['seconds']:.1f} s")
