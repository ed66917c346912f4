#!/usr/bin/env python
"""LoRA-One initialization across torch.distributed ranks (issue 13): bytes each rank sent and received, and wall
time, for 1 and 2 ranks, ``capture="dense"`` against ``"sketch"``, plus the arithmetic for Llama-2-7B on 8 ranks.
A benchmark, not a test (nothing here is asserted).

    python bench/distributed.py                 # 4 layers of TinyLlama-1.1B's shape (~0.3B parameters), ~10 min
    python bench/distributed.py --layers 1      # smoke run

Model: ``LlamaConfig`` with TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 heads, 4 kv heads, vocab 32000; see
``bench/capture_memory.py``) and ``--layers`` decoder layers, random weights (seed 0, so every rank builds the same
model), float32; adapter ``LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=
"loraone")``. Data: 8 global batches of 1 x 128 random token ids (labels = ids); with 2 ranks each gets 4.

Each world size is one launch (``torch.multiprocessing.spawn``, gloo over loopback; 1 rank runs in a plain process
without a process group), and runs ``dense`` then ``sketch`` on the same model (the adapter is marked ``loraone``
again between the two). Threads: 2 for one rank, 1 per rank for two (the machine has 2 cores). Per rank and mode:
wall time of ``initialize`` (after a barrier), the report's ``sent_bytes``/``received_bytes`` (the textbook volumes
of the collectives, see ``peft_loraone._distributed``), and, on rank 0, the loopback interface's byte counter
(``/proc/net/dev``, ``lo``: every rank's traffic plus gloo's framing, and anything else on the machine's loopback
meanwhile) as a cross-check. Rank 0 saves the factors of layer 0; the parent compares the 2-rank adapter with the
1-rank one (relative error of s·B·A per module).

Output: a table on stdout and ``--out`` (``distributed.md``, ``distributed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from capture_memory import RANK, SHAPE, llama_targets, sketch2_bytes, sketch_bytes  # noqa: E402

MODES = {"dense": {"capture": "dense"}, "sketch": {"capture": "sketch"}}
GLOBAL_BATCHES, SEQ = 8, 128
MiB = 2**20


def lo_bytes() -> int:
    """Bytes received on the loopback interface so far (= sent on it)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def build(layers: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SHAPE)).eval()
    lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", init_lora_weights="loraone")
    return get_peft_model(model, lora)


def batches() -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(GLOBAL_BATCHES):
        ids = torch.randint(0, SHAPE["vocab_size"], (1, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def worker(rank: int, world: int, port: int, layers: int, out_dir: str) -> None:
    threads = max(1, 2 // world)
    os.environ["PEFT_LORAONE_WORKERS"] = os.environ["PEFT_LORAONE_BLAS_THREADS"] = str(threads)
    import torch
    import torch.distributed as dist

    import peft_loraone
    from peft_loraone import LoraOneConfig

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = build(layers)
    data = batches()[rank::world]
    rows = {}
    for mode, kwargs in MODES.items():
        model.peft_config["default"].init_lora_weights = "loraone"
        if world > 1:
            dist.barrier()
        lo0, t0 = lo_bytes(), time.perf_counter()
        try:
            report = peft_loraone.initialize(
                model, data, config=LoraOneConfig(progress=False, num_batches=len(data), **kwargs)
            )
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            rows[mode] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        seconds = time.perf_counter() - t0
        if world > 1:
            dist.barrier()
        lo = lo_bytes() - lo0
        rows[mode] = {
            "seconds": seconds,
            "capture_seconds": report.capture_seconds,
            "sent": report.sent_bytes,
            "received": report.received_bytes,
            "lo_bytes": lo,
            "batches": report.batches,
            "accumulator_bytes": report.accumulator_bytes,
            "modes": sorted({m.capture for m in report.modules}),
        }
        if rank == 0:
            layer0 = {
                n: p.detach().clone()
                for n, p in model.named_parameters()
                if "lora_" in n and ".layers.0." in n
            }
            torch.save(layer0, Path(out_dir) / f"factors_w{world}_{mode}.pt")
    Path(out_dir, f"rows_w{world}_r{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def launch(world: int, layers: int, out_dir: str) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if world == 1:
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=worker, args=(0, 1, port, layers, out_dir))
        p.start()
        p.join()
        if p.exitcode:
            raise RuntimeError(f"1-rank run failed ({p.exitcode})")
    else:
        mp.spawn(worker, args=(world, port, layers, out_dir), nprocs=world, join=True)


def compare(out_dir: str) -> dict[str, float]:
    """Largest relative error of s·B·A over layer 0's modules, 2 ranks against 1 (scaling cancels)."""
    import torch

    out = {}
    for mode in MODES:
        files = [Path(out_dir) / f"factors_w{w}_{mode}.pt" for w in (1, 2)]
        if not all(f.exists() for f in files):
            continue
        one, two = (torch.load(f) for f in files)
        worst = 0.0
        for name in one:
            if "lora_A" not in name:
                continue
            b_name = name.replace("lora_A", "lora_B")
            d1 = one[b_name].double() @ one[name].double()
            d2 = two[b_name].double() @ two[name].double()
            worst = max(worst, float((d2 - d1).norm() / d1.norm()))
        out[mode] = worst
    return out


def arithmetic(ranks: int = 8) -> list[str]:
    """Per-rank bytes for Llama-2-7B (all-linear, r=16) on ``ranks`` ranks, by the volumes of the collectives."""
    layers, hidden, inter, heads, kv = 32, 4096, 11008, 32, 32
    targets = llama_targets(hidden, inter, heads, kv)
    dense = 4 * layers * sum(m * n for _, m, n in targets)
    factors = 4 * layers * sum(RANK * (m + n) for _, m, n in targets)
    sk1 = layers * sum(sketch_bytes(m, n) for _, m, n in targets)
    sk2 = layers * sum(sketch2_bytes(m, n) for _, m, n in targets)
    p = ranks
    ring = 2 * (p - 1) / p
    gb = 1e9
    rows = [
        ("all-reduce every dense G (the LoRA-GA reference's way)", ring * dense, ring * dense),
        ("dense, reduce to owner + broadcast factors (this package)", (p - 1) / p * dense + (p - 1) / p * factors,
         (p - 1) / p * dense + (p - 1) / p * factors),
        ("sketch, one pass: all-reduce Y, Z, W", ring * sk1, ring * sk1),
        ("sketch, two passes: all-reduce Y, Z then X", ring * sk2, ring * sk2),
        ("every rank recomputes G from all batches (the LoRA-One reference's way)", 0.0, 0.0),
    ]
    lines = [
        f"Llama-2-7B, all-linear (224 targets), r={RANK}, {ranks} ranks: dense G {dense / gb:.1f} GB in float32, "
        f"factors {factors / 1e6:.0f} MB, sketches {sk1 / 1e6:.0f} MB (one pass) / {sk2 / 1e6:.0f} MB (two passes) "
        "at the default sketch size. Bytes sent per rank (received: the same, on average over the ranks):",
        "",
        "| scheme | sent per rank | received per rank |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s / gb:.2f} GB | {r / gb:.2f} GB |" for name, s, r in rows]
    lines += [
        "",
        f"(ring all-reduce moves 2(P-1)/P = {ring:.2f} x the buffer per rank; reduce-to-owner moves (P-1)/P = "
        f"{(p - 1) / p:.3f} x on average, as every rank owns 1/P of the bytes. The recomputing reference sends nothing "
        f"but runs all the batches on every rank: {ranks}x the forward/backward work.)",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=None, help="folder for distributed.md / distributed.json")
    args = parser.parse_args(argv)
    params_per_layer = sum(m * n for _, m, n in llama_targets(SHAPE["hidden_size"], SHAPE["intermediate_size"],
                                                                SHAPE["num_attention_heads"],
                                                                SHAPE["num_key_value_heads"]))
    params = args.layers * params_per_layer + 2 * SHAPE["vocab_size"] * SHAPE["hidden_size"]
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, Any] = {"layers": args.layers, "params": params}
        for world in (1, 2):
            t0 = time.perf_counter()
            launch(world, args.layers, tmp)
            results[f"launch_w{world}_s"] = time.perf_counter() - t0
            results[f"w{world}"] = [json.loads(Path(tmp, f"rows_w{world}_r{r}.json").read_text()) for r in range(world)]
        results["rel_error_2_vs_1"] = compare(tmp)
    lines = [
        f"Model: TinyLlama-1.1B shape, {args.layers} layers (~{params / 1e6:.0f}M parameters, "
        f"{7 * args.layers} targets), r={RANK}, {GLOBAL_BATCHES} global batches of 1x{SEQ} tokens; gloo over loopback, shared 2-core machine.",
        "",
        "| ranks | mode | rank | initialize (s) | of which passes (s) | sent | received | loopback, all ranks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for world in (1, 2):
        for mode in MODES:
            for r, rows in enumerate(results[f"w{world}"]):
                row = rows[mode]
                if "error" in row:
                    lines.append(f"| {world} | {mode} | {r} | failed: {row['error']} | | | | |")
                    continue
                ran = "" if row["modes"] == [mode] else " (" + "/".join(row["modes"]) + ")"
                lines.append(
                    f"| {world} | {mode}{ran} | {r} | "
                    f"{row['seconds']:.1f} | {row['capture_seconds']:.1f} | {row['sent'] / MiB:.1f} MiB | "
                    f"{row['received'] / MiB:.1f} MiB | " + (f"{row['lo_bytes'] / MiB:.1f} MiB |" if r == 0 else "- |")
                )
    lines += ["", "2 ranks against 1, largest relative error of s·B·A over layer 0's modules: "
              + ", ".join(f"{m} {e:.1e}" for m, e in results["rel_error_2_vs_1"].items()), ""]
    lines += arithmetic()
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "distributed.md").write_text(text + "\n")
        (out / "distributed.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
