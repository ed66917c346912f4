"""The benchmark script (bench/run.py) still runs, on tiny sizes.

No timing is asserted: only that the script completes and writes its tables, JSON and plot, and
that its accuracy measurement is right (it is what the equal-accuracy comparisons rest on).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("peft_loraone_bench_run", ROOT / "bench" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def restore_threads():
    from peft_loraone import _native

    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)
    _native.use_blas(None, threads=old)


def test_bench_tiny_runs(tmp_path, restore_threads):
    bench = _load_bench()
    assert bench.main(["--tiny", "--out", str(tmp_path), "--no-e2e", "--no-real"]) == 0
    tables = (tmp_path / "tables.md").read_text()
    for heading in ("## Machine and versions", "## SVD stage", "## Boundary costs", "| GEMM work torch/ours |"):
        assert heading in tables
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["svd"], "no SVD rows"
    for row in res["svd"]:
        assert row["ours_err"] < 1e-2 and math.isfinite(row["ours_s"])
        assert row["ours_passes"] >= 2
        assert row["ref_err"] < 1e-2
    assert res["boundary"]["tiny_call_us"] > 0
    png = tmp_path / "time_vs_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["decaying", "flat", "clustered"])
def test_rel_error_matches_dense(kind):
    bench = _load_bench()
    case = bench.synthetic(40, 30, kind, seed=3)
    r = 4
    t = -(case.u[:, :r] * case.s[:r]) @ case.v[:, :r].T / (bench.GAMMA * case.s[0])
    rng = np.random.default_rng(0)
    for scale in (0.0, 1e-6, 1e-3, 1e-1):
        b = -case.u[:, :r] * np.sqrt(case.s[:r] / (bench.GAMMA * case.s[0])) + scale * rng.standard_normal((40, r))
        a = np.sqrt(case.s[:r] / (bench.GAMMA * case.s[0]))[:, None] * case.v[:, :r].T
        a = a + scale * rng.standard_normal(a.shape)
        dense = np.linalg.norm(b @ a - t) / np.linalg.norm(t)
        assert bench.rel_error(b, a, case, r) == pytest.approx(dense, rel=1e-6, abs=1e-12)


def test_gemm_work_ratio_counts_columns_times_passes():
    """torch's q·(2·niter+2) against the engine's b·passes, b = max(r, 16) (a multiple of 16 with the
    AVX-512 kernels), at most min(m, n)."""
    bench = _load_bench()
    row = {"r": 64, "m": 1024, "n": 1024, "ours_at_passes": 6, "cheap_s": 0.03, "cheap_q": 192, "cheap_niter": 0}
    assert bench.gemm_work_ratio(row) == pytest.approx(192 * 2 / (64 * 6))
    row = {"r": 8, "m": 384, "n": 384, "ours_at_passes": 7, "cheap_s": 0.001, "cheap_q": 18, "cheap_niter": 2}
    assert bench.gemm_work_ratio(row) == pytest.approx(18 * 6 / (16 * 7))
    row = {"r": 4, "m": 12, "n": 10, "ours_at_passes": 2, "cheap_s": 0.001, "cheap_q": 10, "cheap_niter": 0}
    assert bench.gemm_work_ratio(row) == pytest.approx(10 * 2 / (10 * 2))  # b capped at min(m, n)
    assert bench.gemm_work_ratio({**row, "cheap_s": None}) is None
