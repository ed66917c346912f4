#!/usr/bin/env python
"""Algorithm study for issue 4: the engine's oversampling p and stopping tol vs GEMM work.

For each spectrum and rank, runs the engine (peft_loraone.engine.lora_one) with p in
{10, r/2, r, 2r (the default)} and tol in a ladder, and reports the true error of B@A and the
GEMM work in column-passes (passes x k, k = r + p): pass counts depend on the spectrum, not on
the matrix size, so 1024x1024 (t = 512 exact components, the benchmark's spectra) stands for the
4096-class shapes. Prints, per (spectrum, r), the cheapest (p, tol) reaching 1e-3 and 1e-4.
Usage: ``python bench/oversampling_study.py [--m 1024 --n 1024]``.
"""

from __future__ import annotations

import argparse
import json
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import run as bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from peft_loraone.engine import lora_one

    out = []
    for kind in ("decaying", "flat", "clustered"):
        case = bench.synthetic(args.m, args.n, kind, seed=11)
        for r in (8, 16, 64):
            pts = []
            for p in sorted({10, r // 2, r, 2 * r}):
                k = r + p
                for tol in (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5):
                    f = lora_one(case.g, r, oversampling=p, tol=tol)
                    e = bench.rel_error(f.B, f.A, case, r)
                    pts.append({"p": p, "k": k, "tol": tol, "passes": f.passes, "colpasses": f.passes * k, "err": e})
            line = [f"{kind:9s} r={r:2d}"]
            for target in (1e-3, 1e-4):
                ok = [q for q in pts if q["err"] <= target]
                best = min(ok, key=lambda q: q["colpasses"]) if ok else None
                dflt = [q for q in ok if q["p"] == max(10, 2 * r)]
                d = min(dflt, key=lambda q: q["colpasses"]) if dflt else None
                line.append(f"err<={target:g}: best p={best['p']} tol={best['tol']:g} {best['colpasses']} col-passes "
                            f"({best['passes']} passes)" if best else f"err<={target:g}: none")
                line.append(f"default p: {d['colpasses'] if d else None}")
            at_default = [q for q in pts if q["p"] == max(10, 2 * r) and q["tol"] == 1e-4]
            line.append(f"defaults (p=max(10,2r), tol=1e-4): {at_default[0]['colpasses']} col-passes, err {at_default[0]['err']:.1e}")
            print(" | ".join(line), flush=True)
            out.append({"spectrum": kind, "r": r, "points": pts})
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
