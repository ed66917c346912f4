"""A fine-tune where no layer the loss depends on is random: a small byte-level GPT-2, pretrained here on English
prose (Debian's ``fortunes``), then LoRA-fine-tuned on Python source code (the interpreter's own standard library).

Why this setting (issue 17): the paper's LLM experiments fine-tune a *pretrained causal LM through its own output
layer* (next-token cross-entropy; no new head) on a shifted domain (math, code, chat), and its claim is mostly
about speed: fewer steps to a given loss, and a better loss at a fixed small budget. Here every layer the loss
goes through (embeddings, the transformer blocks, the tied LM head) comes out of pretraining, the fine-tune is a
domain shift (English -> Python), and the metric is held-out next-byte loss (nats per byte) over the steps. The
alternative the issue offered (a contrastive objective on all-MiniLM-L6-v2) has no random layer either, but its
loss is not the model's own pretraining output, and the previous MiniLM experiment (``finetune.py``) already
showed how little room a 6-layer sentence encoder leaves at CPU scale.

Everything is offline and deterministic given the seed:

* **Tokenizer**: bytes (vocabulary 256), nothing to download.
* **Model**: ``transformers.GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64))``, GPT-2's
  standard dropout 0.1 (embeddings, attention, residual) while fine-tuning, LM head tied to the token embedding.
  About 0.44 M parameters: what a few CPU minutes can pretrain.
* **Pretraining** (part of every run, kept in memory only): all Debian ``fortunes`` files (``apt-get install -y
  fortunes``; 43 categories, ~2.5 MB of English), the last 5 % held out; ``PRE_STEPS`` steps of AdamW (lr 3e-3,
  weight decay 0.01), batch 32 windows of 64 bytes, warm-up then cosine decay, dropout 0 (the model underfits;
  dropout only slowed it in a pilot), seed 0: the same pretrained model for every method and fine-tune seed.
* **Fine-tuning data**: the top-level ``*.py`` files of the running interpreter's standard library
  (``os.path.dirname(os.__file__)``), split by file: index % 10 == 0 test, == 1 validation, the rest train (sorted
  names). Training batches: 16 random 64-byte windows of the train stream (seeded by the run seed). Validation and
  test: 64 fixed, evenly spaced windows each. Validation picks the learning rate; test is what is reported.
* **LoRA**: r = 8, alpha = 16, rsLoRA, on every linear layer but the LM head (``c_attn``, ``c_proj``, ``c_fc``:
  PEFT's Conv1D, ``fan_in_fan_out=True``), LoRA dropout 0: the reference's settings.
* **Training**: AdamW (weight decay 0), warm-up 3 % then cosine decay to 0 (the paper's schedule), ``STEPS`` steps.
  Held-out loss every ``EVAL_EVERY`` steps, in eval mode.

Methods (same rank, data order, steps and schedule; the init's gradient comes from the run's own first training
batches, as the reference takes the first training examples):

* ``LoRA``: PEFT's default init (Kaiming-uniform A, B = 0).
* ``LoRA-GA``: PEFT's ``init_lora_weights="lora_ga"`` (default ``LoraGAConfig``) via ``peft.preprocess_loraga``
  over the first 8 batches.
* ``PiSSA``: PEFT's ``init_lora_weights="pissa"``.
* ``LoRA-One``: ``peft_loraone.initialize`` with the package defaults (eval mode, gamma 128, dense capture) over
  the first 8 batches of 16.
* ``LoRA-One (ref)``: ``LoraOneConfig.reference()``: train mode (dropout on while G is taken), gamma 128, the first
  8 training examples at batch size 1, as the reference code does.
* ``LoRA-One sketch``: as ``LoRA-One`` with ``capture="sketch"`` (default size 10r, one pass): G never formed.
* ``LoRA-One+P peft`` / ``LoRA-One+P ref``: the ``LoRA-One`` init trained with
  ``peft_loraone.create_preconditioned_optimizer(model, torch.optim.AdamW, variant=...)``.

Protocol: every method at every learning rate of ``LRS`` with seed 0; each method's learning rate is the one with
the lowest final *validation* loss; seeds 1 and 2 then run at that learning rate only. Reported (test split, mean ±
sd over the 3 seeds): the loss at step 0, at a quarter of the budget and at the end, and the steps to reach a
target (LoRA's own final mean test loss, i.e. "how soon does a method get where standard LoRA ends").

Run::

    python experiments/finetune_lm.py               # the sweep: finetune_lm.{json,md,png} (~30 min, shared 2 cores)
    python experiments/finetune_lm.py --report      # rebuild finetune_lm.md from the JSON (keeps the findings)
    python experiments/finetune_lm.py --quick --outdir /tmp/q   # smoke run, ~1 min

``tests/test_experiments.py`` runs a shortened version (``QUICK``) in-process and asserts the claims that held.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
import time
import warnings

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import toy
from experiments.finetune import FORTUNES_DIR, FORTUNES_INSTALL, NOTES_BEGIN, NOTES_END, _stats

logger = logging.getLogger("finetune_lm")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# model
N_LAYER, N_EMBD, N_HEAD, CTX = 2, 128, 4, 64
DROPOUT = 0.1
# pretraining
PRE_STEPS, PRE_BATCH, PRE_LR, PRE_HOLDOUT = 900, 32, 3e-3, 0.05
PRE_DROPOUT = 0.0  # a few CPU minutes underfit: dropout would only slow pretraining down
# fine-tuning
RANK, ALPHA = 8, 16
TARGETS = ["c_attn", "c_proj", "c_fc"]
BATCH = 16
STEPS = 120
EVAL_EVERY = 10
EVAL_WINDOWS = 64
WARMUP_RATIO = 0.03
LRS = (1e-3, 3e-3, 1e-2)
SEEDS = (0, 1, 2)
GAMMA = 128.0
GRAD_BATCHES = 8
METHODS = (
    "LoRA",
    "LoRA-GA",
    "PiSSA",
    "LoRA-One",
    "LoRA-One (ref)",
    "LoRA-One sketch",
    "LoRA-One+P peft",
    "LoRA-One+P ref",
)
LORAONE_METHODS = tuple(m for m in METHODS if m.startswith("LoRA-One"))


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------


def fortunes_files() -> list[str]:
    """Every Debian fortunes category file (the plain-text ones: no ``.dat``/``.u8`` suffix), sorted."""
    if not os.path.isdir(FORTUNES_DIR):
        return []
    return sorted(
        p for p in glob.glob(os.path.join(FORTUNES_DIR, "*")) if os.path.isfile(p) and "." not in os.path.basename(p)
    )


def fortunes_available() -> bool:
    return len(fortunes_files()) > 0


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def pretrain_corpus(holdout: float = PRE_HOLDOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte streams of all fortunes files concatenated (the last ``holdout`` fraction held out).

    Raises ``FileNotFoundError`` naming the install command when Debian's fortunes are not installed."""
    files = fortunes_files()
    if not files:
        raise FileNotFoundError(f"no fortunes files under {FORTUNES_DIR}: install them with `{FORTUNES_INSTALL}`")
    text = b"\n".join(open(p, "rb").read() for p in files)
    data = _bytes(text)
    cut = int(len(data) * (1 - holdout))
    return data[:cut], data[cut:]


def code_files() -> list[str]:
    """The top-level ``*.py`` files of the running interpreter's standard library, sorted by name."""
    return sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))


def code_corpus() -> dict[str, torch.Tensor]:
    """Train / val / test byte streams of the stdlib source, split by file (index % 10: 0 test, 1 val, else train)."""
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for i, p in enumerate(code_files()):
        split = "test" if i % 10 == 0 else "val" if i % 10 == 1 else "train"
        parts[split].append(open(p, "rb").read())
    if not parts["test"] or not parts["val"] or not parts["train"]:
        raise FileNotFoundError(f"too few *.py files under {os.path.dirname(os.__file__)} for the code corpus")
    return {k: _bytes(b"\n\n".join(v)) for k, v in parts.items()}


def fixed_windows(stream: torch.Tensor, n: int = EVAL_WINDOWS, ctx: int = CTX) -> torch.Tensor:
    """``n`` evenly spaced windows of ``ctx`` bytes: (n, ctx)."""
    starts = torch.linspace(0, len(stream) - ctx - 1, n).long()
    return torch.stack([stream[s : s + ctx] for s in starts])


def random_batches(stream: torch.Tensor, steps: int, batch: int, seed: int, ctx: int = CTX) -> list[torch.Tensor]:
    """``steps`` batches of ``batch`` random windows of ``ctx`` bytes, from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - ctx, (steps, batch), generator=g)
    offs = torch.arange(ctx)
    return [stream[s[:, None] + offs] for s in starts]


# ------------------------------------------------------------------------------------------------------------
# model and pretraining
# ------------------------------------------------------------------------------------------------------------


def make_model(n_layer: int = N_LAYER, n_embd: int = N_EMBD, seed: int = 0, dropout: float = DROPOUT):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # GPT2Config's default bos/eos ids (50256) are irrelevant to a byte model
    cfg = GPT2Config(
        vocab_size=256,
        n_positions=CTX,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=N_HEAD,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        loss_type="ForCausalLM",
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def _cosine(steps: int, warm: int):
    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))

    return f


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 64) -> float:
    """Mean next-byte cross-entropy (nats per byte) over ``windows``, in eval mode (mode restored)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        tot += float(model(input_ids=x, labels=x).loss) * len(x)
        n += len(x)
    model.train(was)
    return tot / n


def pretrain(steps: int = PRE_STEPS, n_layer: int = N_LAYER, n_embd: int = N_EMBD, log=None) -> dict:
    """Pretrain the byte-level GPT-2 on fortunes (dropout ``PRE_DROPOUT``); returns ``{"state": state_dict, ...}``."""
    train, held = pretrain_corpus()
    model = make_model(n_layer, n_embd, seed=0, dropout=PRE_DROPOUT)
    opt = torch.optim.AdamW(model.parameters(), lr=PRE_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps, max(1, steps // 20)))
    held_w = fixed_windows(held, 128)
    t0 = time.perf_counter()
    model.train()
    losses = []
    for step, x in enumerate(random_batches(train, steps, PRE_BATCH, seed=10_000), start=1):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == steps):
            log(f"pretrain step {step}/{steps}: train loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    seconds = time.perf_counter() - t0
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "steps": steps,
        "seconds": seconds,
        "train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_loss": heldout_loss(model, held_w),
        "n_layer": n_layer,
        "n_embd": n_embd,
        "params": sum(p.numel() for p in model.parameters()),
    }


# ------------------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------------------


def _common() -> dict:
    return {
        "r": RANK,
        "lora_alpha": ALPHA,
        "use_rslora": True,
        "target_modules": TARGETS,
        "fan_in_fan_out": True,
        "lora_dropout": 0.0,
    }


def build(pre: dict, method: str, seed: int, grad_batches: list[torch.Tensor], first_examples: torch.Tensor):
    """A fresh PEFT model for ``method`` on the pretrained weights; returns ``(model, init_seconds, init_report)``.

    ``grad_batches``: the batches LoRA-GA and LoRA-One take their gradient over; ``first_examples``: the first
    training examples (LoRA-One (ref) takes them one at a time)."""
    from peft import LoraConfig, get_peft_model

    base = make_model(pre["n_layer"], pre["n_embd"])
    base.load_state_dict(pre["state"])
    torch.manual_seed(seed)  # PEFT's Kaiming init of lora_A (LoRA), dropout masks
    t0 = time.perf_counter()
    report = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        if method == "LoRA":
            model = get_peft_model(base, LoraConfig(**_common()))
        elif method == "PiSSA":
            model = get_peft_model(base, LoraConfig(init_lora_weights="pissa", **_common()))
        elif method == "LoRA-GA":
            from peft import LoraGAConfig
            from peft.tuners.lora import preprocess_loraga

            cfg = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **_common())

            def train_step():
                for x in grad_batches:
                    base(input_ids=x, labels=x).loss.backward()

            base.eval()
            preprocess_loraga(base, cfg, train_step)
            model = get_peft_model(base, cfg)
        elif method in LORAONE_METHODS:
            import peft_loraone
            from peft_loraone import LoraOneConfig

            model = get_peft_model(base, LoraConfig(init_lora_weights="loraone", **_common()))
            if method == "LoRA-One (ref)":
                cfg = LoraOneConfig.reference(progress=False)
                data = [{"input_ids": x[None], "labels": x[None]} for x in first_examples[: cfg.num_batches]]
            else:
                extra = {"capture": "sketch"} if method == "LoRA-One sketch" else {}
                cfg = LoraOneConfig(gamma=GAMMA, num_batches=len(grad_batches), progress=False, **extra)
                data = [{"input_ids": x, "labels": x} for x in grad_batches]
            report = peft_loraone.initialize(model, data, config=cfg)
        else:
            raise ValueError(f"unknown method {method!r}")
    return model, time.perf_counter() - t0, report


def train_one(pre: dict, corpus: dict, windows: dict, method: str, lr: float, seed: int, steps: int = STEPS,
              eval_every: int = EVAL_EVERY) -> dict:
    """Fine-tune one (method, lr, seed); held-out losses at step 0 and every ``eval_every`` steps."""
    from peft_loraone import create_preconditioned_optimizer

    batches = random_batches(corpus["train"], steps, BATCH, seed=seed)
    n_grad = min(GRAD_BATCHES, steps)
    model, init_s, report = build(pre, method, seed, batches[:n_grad], torch.cat(batches[:1]))
    model.train()
    if method.startswith("LoRA-One+P"):
        variant = "peft" if method.endswith("peft") else "reference"
        opt = create_preconditioned_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, variant=variant)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps, max(1, round(WARMUP_RATIO * steps))))
    evals = [(0, heldout_loss(model, windows["val"]), heldout_loss(model, windows["test"]))]
    train_losses: list[float] = []
    t0 = time.perf_counter()
    for step, x in enumerate(batches, start=1):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        train_losses.append(loss.item())
        if not math.isfinite(train_losses[-1]):
            evals.append((step, math.inf, math.inf))
            break
        if step % eval_every == 0 or step == steps:
            evals.append((step, heldout_loss(model, windows["val"]), heldout_loss(model, windows["test"])))
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "train_loss": train_losses,
        "evals": evals,  # (step, val loss, test loss)
        "final_val": evals[-1][1],
        "final_test": evals[-1][2],
        "init_seconds": init_s,
        "train_seconds": time.perf_counter() - t0,
        "sketch_accuracy": None
        if report is None or method != "LoRA-One sketch"
        else [m.accuracy for m in report.modules if getattr(m, "accuracy", None) is not None],
    }


# ------------------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------------------


def prepare(pre_steps: int = PRE_STEPS, eval_windows: int = EVAL_WINDOWS, log=None) -> tuple[dict, dict, dict]:
    """(pretrained model, code corpus, fixed val/test windows)."""
    corpus = code_corpus()
    windows = {k: fixed_windows(corpus[k], eval_windows) for k in ("val", "test")}
    pre = pretrain(pre_steps, log=log)
    return pre, corpus, windows


def run(methods=METHODS, lrs=LRS, seeds=SEEDS, steps=STEPS, eval_every=EVAL_EVERY, pre_steps=PRE_STEPS, log=None,
        partial_path=None, resume=None) -> dict:
    """Pretrain, sweep the learning rate with seed 0, then the other seeds at each method's best lr.

    ``resume``: runs of an interrupted sweep (its partial JSON) to keep instead of rerunning; pretraining is
    deterministic (seed 0, one thread), so they were made on the same pretrained weights. A run that raises is
    recorded under ``failed`` (with the error) and its method is left out of the summaries if nothing succeeded."""
    t0 = time.perf_counter()
    pre, corpus, windows = prepare(pre_steps, log=log)
    if log:
        log(f"pretrained {pre['params']} parameters in {pre['seconds']:.0f} s: held-out fortunes loss "
            f"{pre['heldout_loss']:.6f}")
    runs: list[dict] = []
    failed: list[dict] = []
    kept = {(r["method"], r["lr"], r["seed"]): r for r in (resume or [])}

    def record(m, lr, seed):
        if (m, lr, seed) in kept:
            runs.append(kept[(m, lr, seed)])
            return
        try:
            r = train_one(pre, corpus, windows, m, lr, seed, steps, eval_every)
        except Exception as e:  # a broken method must not take the others down; reported in the results
            failed.append({"method": m, "lr": lr, "seed": seed, "error": f"{type(e).__name__}: {e}"})
            if log:
                log(f"{m} lr {lr:g} seed {seed} FAILED: {type(e).__name__}: {e}")
            return
        runs.append(r)
        if log:
            log(f"{r['method']:16s} lr {r['lr']:g} seed {r['seed']}: val {r['evals'][0][1]:.3f} -> {r['final_val']:.3f}"
                f" test -> {r['final_test']:.3f} ({r['init_seconds']:.1f}+{r['train_seconds']:.1f} s)")
        if partial_path:
            with open(partial_path, "w") as f:
                json.dump({"runs": runs, "pretrain_heldout": pre["heldout_loss"]}, f)

    for m in methods:
        for lr in lrs:
            record(m, lr, seeds[0])
    ok = [m for m in methods if any(r["method"] == m for r in runs)]
    best = {m: min((r for r in runs if r["method"] == m and r["seed"] == seeds[0]), key=lambda r: r["final_val"])["lr"]
            for m in ok}
    for seed in seeds[1:]:
        for m in ok:
            record(m, best[m], seed)
    pre_stats = {k: v for k, v in pre.items() if k != "state"}
    methods = [m for m in ok if len(runs_at_best({"runs": runs, "best_lr": best}, m)) == len(seeds)]
    return {
        "failed": failed,
        "resumed_runs": len([k for k in kept if k[0] in methods]),
        "model": {"n_layer": pre["n_layer"], "n_embd": pre["n_embd"], "n_head": N_HEAD, "ctx": CTX,
                  "dropout": DROPOUT, "params": pre["params"]},
        "pretrain": pre_stats,
        "corpus_bytes": {k: len(v) for k, v in corpus.items()},
        "code_files": len(code_files()),
        "python": sys.version.split()[0],
        "rank": RANK,
        "alpha": ALPHA,
        "batch": BATCH,
        "steps": steps,
        "eval_every": eval_every,
        "eval_windows": EVAL_WINDOWS,
        "lrs": list(lrs),
        "seeds": list(seeds),
        "methods": list(methods),
        "gamma": GAMMA,
        "grad_batches": GRAD_BATCHES,
        "best_lr": best,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------------------


def runs_at_best(res: dict, method: str) -> list[dict]:
    return [r for r in res["runs"] if r["method"] == method and r["lr"] == res["best_lr"][method]]


def loss_at(r: dict, step: int, col: int = 2) -> float:
    """Held-out loss (col 1 val, 2 test) at the last eval at or before ``step``."""
    return [e[col] for e in r["evals"] if e[0] <= step][-1]


def steps_to(r: dict, target: float, col: int = 2):
    """First eval step whose held-out loss is <= ``target`` (None: never)."""
    return next((e[0] for e in r["evals"] if e[col] <= target), None)


def target_loss(res: dict) -> float:
    """The fixed target: standard LoRA's mean final test loss at its best lr."""
    return _stats([r["final_test"] for r in runs_at_best(res, "LoRA")])[0]


def summary(res: dict) -> dict:
    """Per method at its best lr: mean/sd over seeds of test loss at step 0, 1/4, 1/2 budget, end; steps to target."""
    tgt = target_loss(res)
    quarter = res["steps"] // 4
    out = {}
    for m in res["methods"]:
        rs = runs_at_best(res, m)
        reach = [steps_to(r, tgt) for r in rs]
        hit = [s for s in reach if s is not None]
        out[m] = {
            "lr": res["best_lr"][m],
            "n": len(rs),
            "step0": _stats([r["evals"][0][2] for r in rs]),
            "quarter": _stats([loss_at(r, quarter) for r in rs]),
            "half": _stats([loss_at(r, res["steps"] // 2) for r in rs]),
            "final": _stats([r["final_test"] for r in rs]),
            "steps_to_target": reach,
            "steps_to_target_mean": _stats(hit) if len(hit) == len(rs) else None,
            "init_seconds": _stats([r["init_seconds"] for r in rs])[0],
        }
    return out


def table(res: dict) -> str:
    s = summary(res)
    tgt = target_loss(res)
    q = res["steps"] // 4
    rows = [
        f"Test loss in nats per byte (mean ± sd over {len(res['seeds'])} seeds) at each method's best lr; steps to "
        f"target: first eval (every {res['eval_every']} steps) with test loss <= {tgt:.4f} (LoRA's final mean), per "
        "seed.",
        "",
        f"| method | best lr | step 0 | step {q} | step {res['steps'] // 2} | step {res['steps']} (final) "
        "| steps to target (per seed) | mean steps to target | init s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in res["methods"]:
        v = s[m]
        reach = ", ".join("never" if x is None else str(x) for x in v["steps_to_target"])
        st = v["steps_to_target_mean"]
        mean = "—" if st is None else f"{st[0]:.0f} ± {st[1]:.0f}"
        rows.append(
            f"| {m} | {v['lr']:g} | {v['step0'][0]:.4f} ± {v['step0'][1]:.4f} | {v['quarter'][0]:.4f} ± "
            f"{v['quarter'][1]:.4f} | {v['half'][0]:.4f} ± {v['half'][1]:.4f} | {v['final'][0]:.4f} ± "
            f"{v['final'][1]:.4f} | {reach} | {mean} "
            f"| {v['init_seconds']:.1f} |"
        )
    rows += [
        "",
        "Learning-rate sweep, seed 0: final validation loss (the selection criterion; * = chosen).",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in res["lrs"]) + " |",
        "|---|" + "---|" * len(res["lrs"]),
    ]
    for m in res["methods"]:
        cells = []
        for lr in res["lrs"]:
            seed0 = [r for r in res["runs"] if r["method"] == m and r["lr"] == lr and r["seed"] == res["seeds"][0]]
            r = seed0[0] if seed0 else None
            cells.append("—" if r is None else f"{r['final_val']:.4f}" + ("*" if lr == res["best_lr"][m] else ""))
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(res: dict, path: str) -> None:
    """Test loss over steps at each method's best lr (mean ± sd over seeds), full and zoomed on the early steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    cmap = matplotlib.colormaps["tab10"]
    tgt = target_loss(res)
    for i, m in enumerate(res["methods"]):
        rs = runs_at_best(res, m)
        ne = min(len(r["evals"]) for r in rs)
        steps = [e[0] for e in rs[0]["evals"][:ne]]
        vals = [[r["evals"][j][2] for r in rs] for j in range(ne)]
        mean = [sum(v) / len(v) for v in vals]
        sd = [_stats(v)[1] for v in vals]
        for ax in axes:
            ax.plot(steps, mean, marker="o", ms=3, color=cmap(i), label=f"{m} (lr {res['best_lr'][m]:g})")
            ax.fill_between(steps, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                            color=cmap(i), alpha=0.12)
    for ax in axes:
        ax.axhline(tgt, color="k", ls=":", lw=1, label="target (LoRA's final)")
        ax.set(xlabel="step", ylabel="test loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"byte GPT-2 (fortunes-pretrained) LoRA on Python code, {len(res['seeds'])} seeds")
    lo = min(r["final_test"] for r in res["runs"] if math.isfinite(r["final_test"]))
    first = [r["evals"][1][2] for m in res["methods"] for r in runs_at_best(res, m) if len(r["evals"]) > 1]
    axes[1].set_ylim(lo - 0.02, max(first) + 0.02)
    axes[1].set_title("zoom (from the first eval after step 0)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def failures(res: dict) -> list[str]:
    """Report lines on resumed and failed runs (nothing when there were none)."""
    out = []
    if res.get("resumed_runs"):
        out.append(
            f"{res['resumed_runs']} of the runs above were kept from earlier attempts of the same sweep (`--resume`; "
            "pretraining is deterministic, and the held-out pretraining loss was checked to agree); the timing above "
            "is the last attempt's."
        )
    for f in res.get("failed", []):
        out.append(f"- **failed**: {f['method']} lr {f['lr']:g} seed {f['seed']}: `{f['error']}`")
    return out + [""] if out else []


def write_report(outdir: str = RESULTS, name: str = "finetune_lm") -> str:
    """(Re)write ``<name>.md`` from ``<name>.json``, keeping the hand-written findings of an existing report."""
    with open(os.path.join(outdir, name + ".json")) as f:
        res = json.load(f)
    md_path = os.path.join(outdir, name + ".md")
    notes = f"{NOTES_BEGIN}\n(no findings written yet)\n{NOTES_END}"
    if os.path.exists(md_path):
        old = open(md_path).read()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN) : old.index(NOTES_END) + len(NOTES_END)]
    p, mdl = res["pretrain"], res["model"]
    parts = [
        "# Fine-tuning a pretrained causal LM: byte-level GPT-2, English (fortunes) -> Python source",
        "",
        f"Generated by `python experiments/finetune_lm.py` ({res['seconds']:.0f} s for this run, one torch thread, "
        "on a 2-core machine shared with other jobs; see the script's docstring for every setting).",
        "",
        f"Model: GPT-2 ({mdl['n_layer']} layers, width {mdl['n_embd']}, {mdl['n_head']} heads, context "
        f"{mdl['ctx']} bytes, dropout {mdl['dropout']}, tied LM head; {mdl['params']} parameters), pretrained here "
        f"for {p['steps']} steps ({p['seconds']:.0f} s) on Debian's fortunes: held-out loss {p['heldout_loss']:.3f} "
        f"nats/byte. Fine-tune: Python {res['python']} standard library ({res['code_files']} files; "
        f"{res['corpus_bytes']['train']} / {res['corpus_bytes']['val']} / {res['corpus_bytes']['test']} bytes "
        f"train / val / test, split by file), LoRA r={res['rank']}, alpha={res['alpha']}, rsLoRA on c_attn, c_proj, "
        f"c_fc; {res['steps']} steps of {res['batch']} x {mdl['ctx']} bytes, AdamW, warm-up 3 % + cosine; lr "
        f"sweep {', '.join(f'{x:g}' for x in res['lrs'])} with seed 0 (chosen on validation), then seeds "
        f"{', '.join(str(s) for s in res['seeds'][1:])} at the chosen lr. LoRA-One: gamma {res['gamma']:g}, G over "
        f"the run's first {res['grad_batches']} batches (the `(ref)` variant: train mode, first 8 examples at "
        "batch size 1).",
        "",
        table(res),
        *failures(res),
        f"![curves]({name}.png)",
        "",
        "## Findings",
        "",
        notes,
        "",
    ]
    with open(md_path, "w") as f:
        f.write("\n".join(parts))
    return md_path


QUICK = {"lrs": (3e-3,), "seeds": (0,), "steps": 30, "eval_every": 10, "pre_steps": 150}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (one lr, one seed, 30 steps, short pretraining)")
    ap.add_argument("--outdir", default=RESULTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only rebuild finetune_lm.md from the JSON")
    ap.add_argument("--resume", metavar="PARTIAL_JSON", help="keep the runs of an interrupted sweep (its partial JSON)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    name = "finetune_lm_quick" if args.quick else "finetune_lm"
    if args.report:
        with open(os.path.join(args.outdir, name + ".json")) as f:
            plot(json.load(f), os.path.join(args.outdir, name + ".png"))
        print(open(write_report(args.outdir, name)).read())
        return {}
    if not fortunes_available():
        raise SystemExit(f"finetune_lm.py: no fortunes under {FORTUNES_DIR}: `{FORTUNES_INSTALL}`")
    os.makedirs(args.outdir, exist_ok=True)
    kw = dict(QUICK) if args.quick else {}
    if args.resume:
        with open(args.resume) as f:
            kw["resume"] = json.load(f)["runs"]
    with toy.torch_threads(args.threads):
        res = run(log=logger.info, partial_path=os.path.join("/tmp", name + ".partial.json"), **kw)
    res["threads"] = args.threads
    with open(os.path.join(args.outdir, name + ".json"), "w") as f:
        json.dump(res, f)
    plot(res, os.path.join(args.outdir, name + ".png"))
    write_report(args.outdir, name)
    partial = os.path.join("/tmp", name + ".partial.json")
    if os.path.exists(partial):
        os.remove(partial)
    print(table(res))
    return res


if __name__ == "__main__":
    main()
