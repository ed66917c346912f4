#!/usr/bin/env python
"""Algorithm study for issue 4 (numpy, float64): passes over G to reach a true error <= 1e-3.

Compares, on the benchmark's synthetic spectra, with the engine's stopping rule (relative change
of the rank-r estimate between consecutive estimates):

* subspace iteration as the engine runs it (block k = r + max(10, 2r), an estimate after every
  pass, QR each pass);
* block Krylov (block Lanczos bidiagonalization with full re-orthogonalization, block size b;
  the rank-r estimate comes from the SVD of the small projected matrix Q^T G P after every pass
  with G).

Counts are passes (products of G or G^T with a block) and column-passes (passes x block width,
what the GEMM time is proportional to). Usage: ``python bench/krylov_proto.py [--m 1024 --n 1024]``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import run as bench  # noqa: E402


def true_err(u, s, v, case, r):
    sc = np.sqrt(s[:r] / (bench.GAMMA * s[0]))
    return bench.rel_error(-u[:, :r] * sc, sc[:, None] * v[:, :r].T, case, r)


def change(prev, cur):
    if prev is None:
        return np.inf
    (u0, s0, v0), (u1, s1, v1) = prev, cur
    tr = np.trace(np.diag(s0) @ (u0.T @ u1) @ np.diag(s1) @ (v1.T @ v0))
    nc, np_ = np.sum(s1**2), np.sum(s0**2)
    return np.sqrt(max(nc + np_ - 2 * tr, 0) / nc)


def subspace(g, case, r, tols, max_passes=62, seed=0):
    m, n = g.shape
    k = min(r + max(10, 2 * r), min(m, n))
    rng = np.random.default_rng(seed)
    qz = np.linalg.qr(rng.standard_normal((n, k)))[0]
    prev, out, first_ok = None, {}, None
    for p in range(1, max_passes + 1):
        if p % 2:
            qy, rr = np.linalg.qr(g @ qz)
            a, s, bt = np.linalg.svd(rr)
            est = (qy @ a[:, :r], s[:r], qz @ bt[:r].T)
        else:
            qz, rr = np.linalg.qr(g.T @ qy)
            a, s, bt = np.linalg.svd(rr)
            est = (qy @ bt[:r].T, s[:r], qz @ a[:, :r])
        e = true_err(*est, case, r)
        if first_ok is None and e <= 1e-3:
            first_ok = p
        c = change(prev, est)
        prev = est
        for t in tols:
            if t not in out and c <= t:
                out[t] = (p, e)
        if len(out) == len(tols) and first_ok is not None:
            break
    return k, first_ok, out


def krylov(g, case, r, b, tols, max_passes=62, seed=0):
    m, n = g.shape
    rng = np.random.default_rng(seed)
    P = np.linalg.qr(rng.standard_normal((n, b)))[0]
    Q = np.zeros((m, 0))
    GP = np.zeros((m, 0))
    prev, out, first_ok = None, {}, None
    p = 0
    while p < max_passes and Q.shape[1] + b <= min(m, n):
        pj = P[:, -b:]
        y = g @ pj
        p += 1
        GP = np.hstack([GP, y])
        for _ in range(2):
            y = y - Q @ (Q.T @ y)
        qj = np.linalg.qr(y)[0]
        Q = np.hstack([Q, qj])
        T = Q.T @ GP  # (bj x bj): G P = Q T
        a, s, bt = np.linalg.svd(T)
        est = (Q @ a[:, :r], s[:r], P @ bt[:r].T)
        e = true_err(*est, case, r)
        if first_ok is None and e <= 1e-3:
            first_ok = p
        c = change(prev, est)
        prev = est
        for t in tols:
            if t not in out and c <= t:
                out[t] = (p, e)
        if len(out) == len(tols) and first_ok is not None:
            break
        z = g.T @ qj
        p += 1
        for _ in range(2):
            z = z - P @ (P.T @ z)
        P = np.hstack([P, np.linalg.qr(z)[0]])
    return first_ok, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    args = ap.parse_args()
    tols = (1e-2, 1e-3, 1e-4)
    rows = []
    for kind in ("decaying", "flat", "clustered"):
        case = bench.synthetic(args.m, args.n, kind, seed=7)
        g = case.g.double().numpy()
        for r in (8, 16, 64):
            k, ok, out = subspace(g, case, r, tols)
            row = {"spectrum": kind, "r": r, "subspace": {"k": k, "passes_to_1e-3": ok,
                   "colpasses_to_1e-3": None if ok is None else ok * k,
                   "stop": {str(t): {"passes": v[0], "colpasses": v[0] * k, "err": v[1]} for t, v in out.items()}}}
            for b in sorted({r, r + 10, 2 * r}):
                ok, out = krylov(g, case, r, b, tols)
                row[f"krylov b={b}"] = {"passes_to_1e-3": ok, "colpasses_to_1e-3": None if ok is None else ok * b,
                                        "stop": {str(t): {"passes": v[0], "colpasses": v[0] * b, "err": v[1]}
                                                 for t, v in out.items()}}
            rows.append(row)
            best_k = min((v["colpasses_to_1e-3"] for kk, v in row.items() if kk.startswith("krylov")
                          and v["colpasses_to_1e-3"]), default=None)
            print(f"{kind:9s} r={r:2d}  subspace k={k}: {row['subspace']['colpasses_to_1e-3']} col-passes to 1e-3 "
                  f"(tol 1e-4 stop: {row['subspace']['stop'].get('0.0001')});  best krylov: {best_k}; "
                  + "; ".join(f"{kk}: {v['colpasses_to_1e-3']} (tol 1e-4 stop {v['stop'].get('0.0001')})"
                              for kk, v in row.items() if kk.startswith("krylov")), flush=True)
    json.dump(rows, open("/tmp/krylov_proto.json", "w"), indent=1)


if __name__ == "__main__":
    main()
