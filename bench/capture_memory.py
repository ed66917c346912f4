#!/usr/bin/env python
"""Capture modes at ~1.1B parameters (issue 12): peak memory and time of ``initialize`` per capture mode, against
the same forward/backward passes of LoRA training alone. A benchmark, not a test (nothing here is asserted).

    python bench/capture_memory.py        # memory tables, float32 and 4-bit (~30 min on the shared 2 cores)
    python bench/capture_memory.py --modes '' --quant-modes '' --speed fwdbwd,dense,sketch,weight,fwdbwd  # speed only
    python bench/capture_memory.py --layers 2 --modes fwdbwd,sketch --quant-modes ''   # smoke run, ~2 min

Model: ``LlamaConfig`` with TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 kv heads, vocab
32000), random weights (seed 0), float32; no hub access. Adapter: ``peft.LoraConfig(r=16, lora_alpha=16,
target_modules="all-linear", init_lora_weights="loraone")`` (154 targets: every Linear of the 22 blocks; PEFT leaves
``lm_head`` out). Data: 8 batches of 1 x 128 random token ids, labels = ids.

Pipelines, each in a FRESH subprocess (so peaks do not mix; the random model is built once, saved with
``save_pretrained`` to a temporary folder, and every child loads it back):

* ``fwdbwd``: the 8 forward/backward passes of LoRA training alone (base frozen, the LoRA adapters enabled at their
  placeholder init B = 0, so A and B get gradients, accumulated over the 8 batches as with gradient accumulation);
* ``fwdbwd_base``: the same 8 passes with the adapters off and nothing requiring grad but the input embeddings: the
  graph ``initialize`` itself runs, without its hooks and accumulators (the floor of its passes; LoRA training holds
  more: the adapters' activations and gradients);
* ``weight``, ``dense``, ``sketch``: ``peft_loraone.initialize(model, batches, num_batches=8, capture=mode)`` (every
  other setting at its default; ``sketch`` at the default sketch size); ``sketch2`` (only when named): the same with
  ``sketch_passes=2`` (its own default size).

``--speed`` runs the named pipelines one after another in ONE process per thread count (fwd/bwd first and last), so
that the machine's slowly changing load hits them alike; the ratios of that table are the ones to quote.
``--merge`` folds the rows of an earlier run's JSON into the tables (marked †).

Memory, from ``/proc/self/status`` (the approach of ``bench/run.py``'s end-to-end children): ``model`` = VmRSS once
the PEFT model and the batches exist (after ``gc.collect()`` and glibc's ``malloc_trim(0)``, so the model build's
freed scratch is not counted in it nor reused by the timed phase unseen); then the kernel's high-water mark is reset
(``5`` -> ``/proc/self/clear_refs``) and ``peak`` = VmHWM after the timed phase; ``extra = peak - model``. VmHWM
rather than psutil sampling in a thread: the kernel updates it on every page fault, so a spike shorter than a
sampling interval (one layer's transient products last milliseconds) is not missed, it costs nothing while the
timed phase runs (a sampler thread would take a share of the 1-2 cores being timed), and the reset makes it the
peak of the timed phase alone. Where the reset is refused, ``peak`` falls back to ru_maxrss (whole process) and the
table says so.

Time: wall time of the timed phase (the 8 passes; for ``initialize`` the whole call, passes + engine), at 1 and 2
torch threads (``torch.set_num_threads``; the engine's BLAS is given the same count).

It also prints the accumulator bytes ``initialize`` reports (``InitReport.accumulator_bytes`` and each
``ModuleReport.accumulator_bytes``), checked against the formulas (dense: 4·m·n; sketch: 4·(p·(k+t) + l·q), p =
max(m, n), q = min(m, n), k and l from ``sketch_dims`` at the default ``sketch_size``), and the same arithmetic for
Llama-2-7B and Llama-2-70B. Then the same table on a bitsandbytes 4-bit (nf4, compute float32) base.
Output: the tables on stdout and ``--out`` (``capture_memory.md``, ``capture_memory.json``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import reset_hwm, vm  # noqa: E402  (bench/run.py: the same /proc peak-memory reading)

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=256)
RANK = 16
PIPELINES = ("fwdbwd", "fwdbwd_base", "weight", "dense", "sketch")
#: Optional pipelines (name: initialize's keyword arguments), run only when named in --modes/--quant-modes.
EXTRA = {"sketch2": {"capture": "sketch", "sketch_passes": 2}}
#: initialize's keyword arguments of each pipeline: "sketch" is pinned to one pass (the default, sketch_passes=None,
#: runs two passes over batches since issue 12's second session: that is "sketch2").
KWARGS = {"sketch": {"capture": "sketch", "sketch_passes": 1}, **EXTRA}
MiB = 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


# ----------------------------------------------------------------------------------------------- memory


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------- model


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, **SHAPE)


def save_model(layers: int, directory: str) -> dict[str, Any]:
    """Build the random float32 model (seed 0) and save it (safetensors); runs in its own child."""
    import torch
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(layers))
    built = time.perf_counter() - t0
    model.save_pretrained(directory)
    return {"params": sum(p.numel() for p in model.parameters()), "build_s": built,
            "save_s": time.perf_counter() - t0 - built}


def load_model(directory: str, base: str):
    import torch
    from transformers import AutoModelForCausalLM

    if base == "float32":
        # from_pretrained may keep safetensors memory-mapped (file pages): load every tensor into anonymous memory
        # first, then assign, so the model's RSS is its own, as when it is built from a config
        from safetensors.torch import load_file
        from transformers import LlamaForCausalLM

        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        state = {}
        for f in sorted(Path(directory).glob("*.safetensors")):
            state.update({k: v.clone() for k, v in load_file(str(f)).items()})
        if "lm_head.weight" not in state and config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        del state
        # non-persistent buffers (the rotary inverse frequencies) are not in the file: rebuild them on the CPU
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        return model.eval()
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=q, device_map="cpu",
                                                dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------- one pipeline


def child(which: str, directory: str, base: str, threads: int, batches: int, seq: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import peft
    import peft_loraone
    from peft_loraone import _native

    try:
        blas = _native.use_blas(None, threads=threads)
    except Exception as exc:  # noqa: BLE001 - informative only
        blas = f"default ({exc})"
    t0 = time.perf_counter()
    base_model = load_model(directory, base)
    load_s = time.perf_counter() - t0
    def logical_numel(p) -> int:  # a bitsandbytes Params4bit packs two values a byte: count the weight's own shape
        qs = getattr(p, "quant_state", None)
        return int(torch.Size(qs.shape).numel()) if qs is not None and hasattr(qs, "shape") else p.numel()

    params = sum(logical_numel(p) for p in base_model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in base_model.parameters())
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", init_lora_weights="loraone")
    model = peft.get_peft_model(base_model, lcfg)
    from peft.tuners.lora.layer import LoraLayer

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    shapes = {}
    for n, m in targets:
        shapes[n] = (m.out_features, m.in_features)
    target_numel = sum(a * b for a, b in shapes.values())
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (batches, seq))
    data = [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(batches)]
    out: dict[str, Any] = {
        "which": which, "base": base, "threads": threads, "blas": blas, "load_s": load_s, "params": params,
        "param_bytes": param_bytes, "fp32_param_bytes": params * 4, "targets": len(targets),
        "target_numel": target_numel, "target_fp32_bytes": target_numel * 4, "batches": batches, "seq": seq,
        "loadavg_start": os.getloadavg()[0],
    }
    trim()
    mem0 = vm()
    out["model_rss_mb"] = mem0["VmRSS"]
    out["model_rss_anon_mb"] = mem0.get("RssAnon")
    out["model_rss_file_mb"] = mem0.get("RssFile")
    out["hwm_before_reset_mb"] = mem0["VmHWM"]
    out["hwm_reset"] = reset_hwm()
    t0 = time.perf_counter()
    if which == "fwdbwd":
        model.train()  # LoRA training; dropout is 0 everywhere here, so train and eval compute the same
        for b in data:
            model(**b).loss.backward()
        out["lora_grad_bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                     if p.grad is not None)
    elif which == "fwdbwd_base":
        # the graph initialize's activation capture builds, without its hooks: adapters off, nothing requires grad
        # but the input embeddings (initialize makes the first target's input a grad leaf instead)
        emb = model.get_input_embeddings()
        with model.disable_adapter():
            for b in data:
                e = emb(b["input_ids"]).detach().requires_grad_(True)
                model(inputs_embeds=e, labels=b["labels"]).loss.backward()
    else:
        kwargs = KWARGS.get(which, {"capture": which})
        report = peft_loraone.initialize(model, data, num_batches=batches, progress=False, **kwargs)
        out["capture_seconds"] = report.capture_seconds
        out["total_seconds"] = report.total_seconds
        out["accumulator_bytes"] = report.accumulator_bytes
        out["modules"] = [
            {"name": m.name, "shape": list(m.shape), "bytes": m.accumulator_bytes, "k": m.sketch_size,
             "accuracy": m.accuracy, "capture": m.capture, "on": m.accumulated_on}
            for m in report.modules
        ]
        out["skipped"] = [f"{s.name}: {s.reason}" for s in report.skipped]
    out["seconds"] = time.perf_counter() - t0
    mem1 = vm()
    out["end_rss_mb"] = mem1["VmRSS"]
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_mb"] = mem1["VmHWM"] if out["hwm_reset"] else out["ru_maxrss_mb"]
    out["peak_source"] = "VmHWM after reset" if out["hwm_reset"] else "ru_maxrss (whole process)"
    out["extra_mb"] = out["peak_mb"] - out["model_rss_mb"]
    out["loadavg_end"] = os.getloadavg()[0]
    return out


def speed_child(directory: str, threads: int, batches: int, seq: int, order: list[str]) -> dict[str, Any]:
    """Speed only, in ONE process so that slow changes of the machine's load hit every pipeline alike: the steps of
    ``order`` one after another on the same float32 model (a fresh LoRA adapter for each ``initialize``: the previous
    one is unloaded), the fwd/bwd passes first and last. No memory is measured here."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import peft
    import peft_loraone
    from peft_loraone import _native

    _native.use_blas(None, threads=threads)
    base_model = load_model(directory, "float32")
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", init_lora_weights="loraone")
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (batches, seq))
    data = [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(batches)]
    steps = []
    for which in order:
        model = peft.get_peft_model(base_model, lcfg)
        trim()
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        step: dict[str, Any] = {"which": which}
        if which == "fwdbwd":
            model.train()
            for b in data:
                model(**b).loss.backward()
        else:
            kwargs = KWARGS.get(which, {"capture": which})
            report = peft_loraone.initialize(model, data, num_batches=batches, progress=False, **kwargs)
            step["capture_seconds"] = report.capture_seconds
        step["seconds"] = time.perf_counter() - t0
        step["loadavg_start"], step["loadavg_end"] = load0, os.getloadavg()[0]
        steps.append(step)
        log(f"[speed] {which}: {step['seconds']:.1f} s (load {load0:.2f} -> {step['loadavg_end']:.2f})")
        base_model = model.unload()
        del model
    return {"threads": threads, "steps": steps}


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__)), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout:.0f} s", "stderr": str(exc.stderr or "")[-1500:]}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        rc = proc.returncode
        if rc < 0:
            why = f"killed by signal {-rc}" + (" (SIGKILL: out of memory?)" if rc == -9 else "")
        else:
            why = f"exit {rc}"
        return {"error": why, "stderr": (proc.stderr or proc.stdout)[-3000:], "wall_s": wall}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


# ----------------------------------------------------------------------------------------------- arithmetic


def default_sketch() -> dict[str, Any]:
    """The one-pass sketch options (``capture="sketch", sketch_passes=1``: size, rows, test vectors, passes), read from
    ``LoraOneConfig`` itself so the arithmetic follows the package's default."""
    from peft_loraone.config import LoraOneConfig

    return LoraOneConfig(capture="sketch", sketch_passes=1).capture_options()


def sketch_dims_of(m: int, n: int, r: int = RANK, size: Any = None) -> tuple[int, int, int]:
    """(k, l, t) of an (m, n) G at ``size`` (default: the config's)."""
    from peft_loraone.config import sketch_dims

    opt = default_sketch()
    k, ell = sketch_dims(opt["size"] if size is None else size, opt["rows"], r, m, n)
    return k, ell, int(opt["test_vectors"])


def sketch2_bytes(m: int, n: int, r: int = RANK, elt: int = 4) -> int:
    """Bytes of a two-pass sketch at its default size (``sketch_passes=2``): Y/Q (p x k), Z (p x t), X (k x q)."""
    from peft_loraone.config import LoraOneConfig, sketch_dims

    opt = LoraOneConfig(capture="sketch", sketch_passes=2).capture_options()
    k, _ = sketch_dims(opt["size"], None, r, m, n)
    p, q = max(m, n), min(m, n)
    return elt * (p * (k + int(opt["test_vectors"])) + k * q)


def sketch_bytes(m: int, n: int, r: int = RANK, size: Any = None, elt: int = 4) -> int:
    """Bytes of a one-pass sketch of an (m, n) G at ``sketch_size`` (default: the config's), as SketchAccumulator
    holds them: Y (p x k), Z (p x t), W (l x q), p = max(m, n), q = min(m, n)."""
    k, ell, t = sketch_dims_of(m, n, r, size)
    p, q = max(m, n), min(m, n)
    return elt * (p * (k + t) + ell * q)


def sketch_transient(m: int, n: int, tokens: int, r: int = RANK) -> int:
    """One contribution's temporaries in SketchAccumulator.add (float32): [Omega, Omega_t] (q x (k+t)), v·Omega
    (T x (k+t)), Psi (l x p) and Psi·uᵀ (l x T)."""
    k, ell, t = sketch_dims_of(m, n, r)
    p, q = max(m, n), min(m, n)
    return 4 * (q * (k + t) + tokens * (k + t) + ell * p + ell * tokens)


def llama_targets(hidden: int, inter: int, heads: int, kv_heads: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of one decoder layer's linear targets."""
    kv = hidden // heads * kv_heads
    return [("q_proj", hidden, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden), ("o_proj", hidden, hidden),
            ("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)]


ARITH_MODELS = {
    # name: (layers, hidden, intermediate, heads, kv heads, vocab)
    "TinyLlama-1.1B shape (measured here)": (22, 2048, 5632, 32, 4, 32000),
    "Llama-2-7B": (32, 4096, 11008, 32, 32, 32000),
    "Llama-2-70B": (80, 8192, 28672, 64, 8, 32000),
}


def arithmetic() -> dict[str, dict[str, float]]:
    out = {}
    for name, (layers, hidden, inter, heads, kv, vocab) in ARITH_MODELS.items():
        tg = llama_targets(hidden, inter, heads, kv)
        target_numel = layers * sum(m * n for _, m, n in tg)
        params = target_numel + 2 * vocab * hidden + layers * 2 * hidden + hidden
        dense = 4 * target_numel
        sk = layers * sum(sketch_bytes(m, n) for _, m, n in tg)
        sk4 = layers * sum(sketch_bytes(m, n, size="4r") for _, m, n in tg)
        sk8 = layers * sum(sketch_bytes(m, n, size="8r") for _, m, n in tg)
        sk2 = layers * sum(sketch2_bytes(m, n) for _, m, n in tg)
        out[name] = {"layers": layers, "params": params, "fp32_bytes": 4 * params, "bf16_bytes": 2 * params,
                     "target_numel": target_numel, "dense_bytes": dense, "sketch_bytes": sk, "sketch4r_bytes": sk4,
                     "sketch8r_bytes": sk8, "sketch2_bytes": sk2,
                     "dense_per_layer": dense / layers, "sketch_per_layer": sk / layers}
    return out


# ----------------------------------------------------------------------------------------------- report


def fmt_mb(x: Any) -> str:
    return "—" if x is None else f"{x:.0f}"


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def table(results: dict[str, dict], base: str, threads: list[int]) -> list[str]:
    lines = []
    t1 = threads[0]
    first = next((v for v in results.values() if "params" in v), None)
    if first:
        lines.append(
            f"{first['params'] / 1e9:.3f}B parameters ({first['param_bytes'] / MiB:.0f} MiB as loaded; float32 "
            f"{first['fp32_param_bytes'] / MiB:.0f} MiB), {first['targets']} LoRA targets "
            f"({first['target_numel'] / 1e6:.0f}M weights; one float32 copy = {first['target_fp32_bytes'] / MiB:.0f} "
            f"MiB), r={RANK}, {first['batches']} batches of 1 x {first['seq']} tokens.\n")
    lines.append(f"| pipeline ({t1} thread{'s' if t1 > 1 else ''}) | model RSS MiB | peak MiB | extra MiB | extra over "
                 f"fwd/bwd MiB | reported accumulators MiB | seconds | ratio vs fwd/bwd |"
                 + "".join(f" seconds @{t} thr | ratio @{t} thr |" for t in threads[1:]))
    lines.append("|---|---|---|---|---|---|---|---|" + "---|---|" * (len(threads) - 1))
    fb = results.get(f"{base}/fwdbwd/{t1}", {})
    for which in (*PIPELINES, *EXTRA):
        v = results.get(f"{base}/{which}/{t1}")
        if v is None:
            continue
        nb = v.get("batches", 8)
        label = {"fwdbwd": f"{nb} fwd/bwd passes (LoRA training)",
                 "fwdbwd_base": f"{nb} fwd/bwd passes, adapters off (base model's backward only)",
                 "sketch": "initialize, capture='sketch', sketch_passes=1",
                 "sketch2": "initialize, capture='sketch', sketch_passes=2 (the default with batches)"}.get(
            which, f"initialize, capture={which!r}")
        if v.get("merged"):
            label += " †"
        if "error" in v:
            lines.append(f"| {label} | failed: {v['error']} | | | | | | |" + " | |" * (len(threads) - 1))
            continue
        over = v["extra_mb"] - fb["extra_mb"] if "extra_mb" in fb else None
        acc = v.get("accumulator_bytes")
        note = "" if v.get("hwm_reset", True) else " (ru_maxrss)"
        row = (f"| {label} | {v['model_rss_mb']:.0f} | {v['peak_mb']:.0f}{note} | {v['extra_mb']:.0f} | "
               f"{'—' if which == 'fwdbwd' or over is None else f'{over:+.0f}'} | "
               f"{'—' if acc is None else f'{acc / MiB:.0f}'} | {v['seconds']:.1f} | "
               + (f"{v['seconds'] / fb['seconds']:.2f}x |" if "seconds" in fb else "— |"))
        for t in threads[1:]:
            w = results.get(f"{base}/{which}/{t}", {})
            fbt = results.get(f"{base}/fwdbwd/{t}", {})
            if "seconds" in w and "seconds" in fbt:
                row += f" {w['seconds']:.1f} | {w['seconds'] / fbt['seconds']:.2f}x |"
            elif "error" in w:
                row += f" failed: {w['error']} | |"
            else:
                row += " not run | |"
        lines.append(row)
    lines.append("")
    return lines


def module_table(results: dict[str, dict], base: str, t1: int) -> list[str]:
    """Reported per-module bytes (layer 0's targets) against the formulas."""
    lines = ["| target (out x in) | dense reported | dense 4·m·n | sketch k | sketch reported | sketch formula "
             "| weight reported |", "|---|---|---|---|---|---|---|"]
    per = {}
    for which in ("weight", "dense", "sketch"):
        v = results.get(f"{base}/{which}/{t1}", {})
        for m in v.get("modules", []):
            if ".layers.0." not in m["name"] and "layers.0." not in m["name"][:20]:
                continue
            key = m["name"].rsplit(".", 1)[-1]
            per.setdefault(key, {"shape": m["shape"]})[which] = m
    for key, d in per.items():
        mm, nn = d["shape"]

        def b(w: str) -> str:
            return f"{d[w]['bytes'] / MiB:.2f} MiB" if w in d else "—"

        k = d.get("sketch", {}).get("k")
        lines.append(f"| {key} ({mm} x {nn}) | {b('dense')} | {4 * mm * nn / MiB:.2f} MiB | {k if k else '—'} | "
                     f"{b('sketch')} | {sketch_bytes(mm, nn) / MiB:.2f} MiB | {b('weight')} |")
    lines.append("")
    return lines


def verdicts(results: dict[str, dict], base: str, t1: int, seq: int) -> list[str]:
    lines = []
    fb = results.get(f"{base}/fwdbwd/{t1}", {})
    if "extra_mb" not in fb:
        return [f"- no verdict: the fwd/bwd baseline failed ({fb.get('error', 'not run')})"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    dn = results.get(f"{base}/dense/{t1}", {})
    if "extra_mb" in dn:
        over = dn["extra_mb"] - fb["extra_mb"]
        bound = dn["target_fp32_bytes"] / MiB
        lines.append(f"- dense: peak above the fwd/bwd peak {over:+.0f} MiB <= one float32 copy of the target weights "
                     f"{bound:.0f} MiB: {met(over <= bound)} (reported accumulators "
                     f"{dn['accumulator_bytes'] / MiB:.0f} "
                     f"MiB)")
        fbb = results.get(f"{base}/fwdbwd_base/{t1}", {})
        if "extra_mb" in fbb:
            ob = dn["extra_mb"] - fbb["extra_mb"]
            lines.append(f"  - against the adapters-off passes: {ob:+.0f} MiB ({met(ob <= bound)})")
    elif dn:
        lines.append(f"- dense: failed ({dn.get('error')})")
    for name in ("sketch", "sketch2"):
        label = "sketch" if name == "sketch" else "sketch (two passes)"
        sk = results.get(f"{base}/{name}/{t1}", {})
        if "extra_mb" in sk:
            over = sk["extra_mb"] - fb["extra_mb"]
            rep = sk["accumulator_bytes"] / MiB
            trans = max(sketch_transient(*m["shape"], tokens=seq) for m in sk["modules"]) / MiB
            lo, hi = 0.9 * rep, 1.1 * rep + trans
            lines.append(f"- {label} holds nothing but its sketches: peak above the fwd/bwd peak {over:+.0f} MiB "
                         f"against reported sketch bytes {rep:.0f} MiB (+10% and one batch's transient products, "
                         f"{trans:.1f} MiB "
                         f"for the widest target: [{lo:.0f}, {hi:.0f}] MiB): {met(over <= hi)}"
                         f"{'' if over >= lo else f' (below the reported bytes: {over / rep:.2f}x; see the notes)'}")
            fbb = results.get(f"{base}/fwdbwd_base/{t1}", {})
            if "extra_mb" in fbb:
                ob = sk["extra_mb"] - fbb["extra_mb"]
                lines.append("  - against the adapters-off passes (the same graph without LoRA, initialize's own "
                             "floor): "
                             f"{ob:+.0f} MiB = {ob / rep:.2f}x the reported sketch bytes ({met(ob <= hi)} for the same "
                             f"bound; the LoRA-training passes hold {fb['extra_mb'] - fbb['extra_mb']:+.0f} MiB more "
                             "than "
                             "these)")
            bound = 0.10 * sk["fp32_param_bytes"] / MiB
            lines.append(f"- {label} at its default size at most 10% of the model's parameter bytes above the "
                         "fwd/bwd peak: "
                         f"{over:+.0f} MiB <= {bound:.0f} MiB (10% of {sk['fp32_param_bytes'] / MiB:.0f} MiB float32): "
                         f"{met(over <= bound)}; reported sketch bytes alone {rep:.0f} MiB = "
                         f"{100 * rep / (sk['fp32_param_bytes'] / MiB):.1f}% of the float32 parameters"
                         + (f" ({100 * rep / (sk['param_bytes'] / MiB):.1f}% of the {sk['param_bytes'] / MiB:.0f} MiB "
                            "the 4-bit model holds)" if sk["param_bytes"] != sk["fp32_param_bytes"] else ""))
        elif sk:
            lines.append(f"- {label}: failed ({sk.get('error')})")
    for which in ("weight", "dense", "sketch", "sketch2"):
        v = results.get(f"{base}/{which}/{t1}", {})
        if "seconds" in v and "seconds" in fb:
            lines.append(f"- speed, {which}: initialize {v['seconds']:.1f} s (passes {v['capture_seconds']:.1f} s) / "
                         f"fwd/bwd alone {fb['seconds']:.1f} s = {v['seconds'] / fb['seconds']:.2f}x")
    lines.append("")
    return lines


def speed_table(speed: dict[str, dict]) -> list[str]:
    lines = []
    for key, res in speed.items():
        t = key.split("/", 1)[1]
        if "error" in res:
            lines += [f"- {t} thread(s): failed ({res['error']})", ""]
            continue
        fb = [s["seconds"] for s in res["steps"] if s["which"] == "fwdbwd"]
        ref = sum(fb) / len(fb) if fb else None
        lines.append(f"{t} thread(s); ratio = seconds / mean of the fwd/bwd steps ({', '.join(f'{x:.1f}' for x in fb)}"
                     " s)" + ("" if res.get("merged") is None else " †") + "\n")
        lines.append("| step | pipeline | seconds | passes s | ratio vs fwd/bwd | load avg start -> end |")
        lines.append("|---|---|---|---|---|---|")
        for i, s in enumerate(res["steps"], 1):
            label = "fwd/bwd passes (LoRA training)" if s["which"] == "fwdbwd" else f"initialize, {s['which']!r}"
            passes = f"{s['capture_seconds']:.1f}" if "capture_seconds" in s else "—"
            ratio = f"{s['seconds'] / ref:.2f}x" if ref else "—"
            lines.append(f"| {i} | {label} | {s['seconds']:.1f} | {passes} | {ratio} | "
                         f"{s['loadavg_start']:.2f} -> {s['loadavg_end']:.2f} |")
        lines.append("")
    return lines


def arithmetic_table(measured: dict[str, Any]) -> list[str]:
    ar = arithmetic()
    from peft_loraone.config import LoraOneConfig

    opt = default_sketch()
    opt2 = LoraOneConfig(capture="sketch", sketch_passes=2).capture_options()
    k, ell, t = sketch_dims_of(4096, 4096)
    lines = [f"Sketch at the default `sketch_size` ({opt['size']!r}, one pass: k = {k}, l = 2k+1 = {ell}, t = {t} test "
             "vectors at r=16, k and l clamped to the layer's sides for the narrow k/v projections); bytes = "
             "4·(p·(k+t) + l·q), p = max(m, n), q = min(m, n). Dense = 4·m·n (also what `\"weight\"` keeps as its "
             "sum).\n",
             f"| model, all linear layers, r=16 | params (float32 bytes) | dense G | sketch {opt['size']!r} (default) "
             f"| sketch '8r' | sketch '4r' | two passes, default {opt2['size']!r} (% of float32 params) "
             "| default sketch / dense | default sketch / float32 params "
             "| default sketch per layer | dense per layer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in ar.items():
        lines.append(f"| {name} | {a['params'] / 1e9:.2f}B ({gb(a['fp32_bytes'])}) | {gb(a['dense_bytes'])} | "
                     f"{gb(a['sketch_bytes'])} | {gb(a['sketch8r_bytes'])} | {gb(a['sketch4r_bytes'])} | "
                     f"{gb(a['sketch2_bytes'])} ({100 * a['sketch2_bytes'] / a['fp32_bytes']:.1f}%) | "
                     f"{a['sketch_bytes'] / a['dense_bytes']:.3f} | "
                     f"{100 * a['sketch_bytes'] / a['fp32_bytes']:.1f}% | {a['sketch_per_layer'] / MiB:.1f} MiB | "
                     f"{a['dense_per_layer'] / MiB:.0f} MiB |")
    lines.append("")
    tiny = ar["TinyLlama-1.1B shape (measured here)"]
    for which, key in (("dense", "dense_bytes"), ("sketch", "sketch_bytes"), ("sketch2", "sketch2_bytes")):
        if which in measured:
            lines.append(f"- check: {which} bytes reported by initialize at 1.1B {measured[which] / MiB:.1f} MiB, "
                         f"arithmetic {tiny[key] / MiB:.1f} MiB "
                         f"({'equal' if measured[which] == tiny[key] else 'differ'})")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--quant-layers", type=int, default=None, help="layers of the 4-bit model (default: --layers)")
    ap.add_argument("--threads", default="1", help="torch thread counts, the first one for the memory table")
    ap.add_argument("--modes", default=",".join(PIPELINES), help="pipelines on the float32 base")
    ap.add_argument("--threads2-modes", default="fwdbwd,weight,dense,sketch",
                    help="pipelines rerun (separate processes) at the other thread counts")
    ap.add_argument("--quant-modes", default="fwdbwd,fwdbwd_base,dense,sketch",
                    help="pipelines on the 4-bit base ('' to skip)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=600.0, help="per child, seconds")
    ap.add_argument("--out", default=str(ROOT / "bench" / "_out"))
    ap.add_argument("--merge", default=None, help="a capture_memory.json of an earlier run: its rows fill the "
                    "pipelines this run does not run (marked † in the tables)")
    ap.add_argument("--speed", default=None, help="speed only, one process per thread count: these pipelines in "
                    "this order on the float32 base, e.g. fwdbwd,dense,sketch,weight,fwdbwd (see speed_child)")
    ap.add_argument("--_speed-child", dest="speed_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_save", dest="save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", dest="dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_base", dest="base", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--_threads", dest="nthreads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.save:
        print(json.dumps(save_model(args.layers, args.save)))
        return 0
    if args.speed_child:
        print(json.dumps(speed_child(args.dir, args.nthreads, args.batches, args.seq, args.speed_child.split(","))))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.base, args.nthreads, args.batches, args.seq)))
        return 0

    t_start = time.perf_counter()
    threads = [int(t) for t in args.threads.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    quant_layers = args.quant_layers or args.layers
    from peft_loraone.config import CAPTURE_MODES

    meta: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                            "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                            "uptime_before": uptime(), "capture_modes": list(CAPTURE_MODES)}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        meta["commit"] = commit + (" (tree with uncommitted changes)" if dirty else "")
    except OSError:
        pass
    log(f"[capture_memory] {meta['uptime_before']}")
    results: dict[str, dict] = {}
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        meta["merged"] = {k: earlier["meta"].get(k) for k in ("command", "date (UTC)", "uptime_before", "uptime_after",
                                                               "total_s")}
        for key, res in earlier["results"].items():
            results[key] = {**res, "merged": True}
    tmp = tempfile.mkdtemp(prefix="capture_memory_")
    try:
        saved = {}
        sizes = ({args.layers} if args.modes or args.speed else set()) | ({quant_layers} if args.quant_modes else set())
        for layers in sorted(sizes):
            d = os.path.join(tmp, f"llama{layers}")
            log(f"[capture_memory] building and saving the {layers}-layer model ...")
            saved[layers] = run_child(["--_save", d, "--layers", str(layers)], args.timeout)
            saved[layers]["dir"] = d
            log(f"[capture_memory]   {saved[layers]}")
        meta["saved"] = saved
        plan = [("float32", args.layers, m, threads[0]) for m in modes]
        plan += [("float32", args.layers, m, t) for t in threads[1:] for m in args.threads2_modes.split(",") if m]
        plan += [("nf4", quant_layers, m, threads[0]) for m in args.quant_modes.split(",") if m]
        if not args.quant_modes and any(k.startswith("nf4/") for k in results):
            quant_layers = next(v["layers"] for k, v in results.items() if k.startswith("nf4/") and "layers" in v)
        if args.speed:
            for t in threads:
                log(f"[capture_memory] speed, {t} thread(s): {args.speed} ...")
                results[f"speed/{t}"] = run_child(["--_speed-child", args.speed, "--_dir", saved[args.layers]["dir"],
                                                   "--_threads", str(t), "--batches", str(args.batches), "--seq",
                                                   str(args.seq)], args.timeout * len(args.speed.split(",")))
        for base, layers, which, t in plan:
            key = f"{base}/{which}/{t}"
            if which not in ("fwdbwd", "fwdbwd_base", *EXTRA) and which not in CAPTURE_MODES:
                results[key] = {"error": f"capture={which!r} not in CAPTURE_MODES {CAPTURE_MODES}"}
                continue
            log(f"[capture_memory] {key} ({layers} layers) ...")
            res = run_child(["--_child", which, "--_dir", saved[layers]["dir"], "--_base", base, "--_threads", str(t),
                             "--batches", str(args.batches), "--seq", str(args.seq)], args.timeout)
            res["layers"] = layers
            results[key] = res
            if "error" in res:
                log(f"[capture_memory]   FAILED: {res['error']}\n{res.get('stderr', '')}")
            else:
                log(f"[capture_memory]   {res['seconds']:.1f} s, model {res['model_rss_mb']:.0f} MiB, peak "
                    f"{res['peak_mb']:.0f} MiB, extra {res['extra_mb']:.0f} MiB, reported "
                    f"{res.get('accumulator_bytes', 0) / MiB:.0f} MiB (load {res['load_s']:.0f} s, wall "
                    f"{res['wall_s']:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["uptime_after"] = uptime()
    meta["total_s"] = time.perf_counter() - t_start

    lines = [f"Command `{meta['command']}` ({meta.get('commit', '')}), {meta['date (UTC)']} UTC, total "
             f"{meta['total_s'] / 60:.1f} min.", f"uptime before: `{meta['uptime_before']}`",
             f"uptime after: `{meta['uptime_after']}`", ""]
    if "merged" in meta:
        mg = meta["merged"]
        lines.insert(3, f"Rows marked † come from the earlier run `{mg['command']}`, {mg['date (UTC)']} UTC, "
                        f"{(mg.get('total_s') or 0) / 60:.1f} min; uptime before `{mg['uptime_before']}`, after "
                        f"`{mg['uptime_after']}`.")
    if any(k.startswith("float32/") for k in results):
        lines.append(f"### float32 base ({args.layers} layers)\n")
        lines += table(results, "float32", threads)
        lines += verdicts(results, "float32", threads[0], args.seq)
        lines.append("Reported accumulator bytes per target (layer 0; every layer is the same):\n")
        lines += module_table(results, "float32", threads[0])
    if any(k.startswith("nf4/") for k in results):
        lines.append(f"### 4-bit base (bitsandbytes nf4, compute float32, {quant_layers} layers)\n")
        lines += table(results, "nf4", threads[:1])
        lines += verdicts(results, "nf4", threads[0], args.seq)
    speed = {k: v for k, v in results.items() if k.startswith("speed/")}
    if speed:
        lines.append(f"### Speed in one process (float32 base, {args.layers} layers; steps in the order run)\n")
        lines += speed_table(speed)
    measured = {w: results.get(f"float32/{w}/{threads[0]}", {}).get("accumulator_bytes")
                for w in ("dense", "sketch", "sketch2")}
    measured = {k: v for k, v in measured.items() if v}
    lines.append("### Arithmetic for larger models (float32 accumulators)\n")
    lines += arithmetic_table(measured if args.layers == 22 else {})
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_memory.md").write_text(text + "\n")
    (out / "capture_memory.json").write_text(json.dumps({"meta": meta, "results": results,
                                                         "arithmetic": arithmetic()}, indent=1, default=str))
    log(f"[capture_memory] wrote {out / 'capture_memory.md'} and capture_memory.json in {meta['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
