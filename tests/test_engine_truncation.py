"""The engine's accuracy on small and high-rank shapes, and its report of a non-unique truncation (issue 16).

Every check compares against numpy's exact SVD of the same float32 matrix.
"""

from __future__ import annotations

import numpy as np
import pytest

from peft_loraone.engine import lora_one

GAMMA = 128.0


def _matrix(m: int, n: int, s: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, len(s))))[0]
    v = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    return ((u * s) @ v.T).astype(np.float32)


def _exact(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(g.astype(np.float64), full_matrices=False)


def _rel_error(f, exact: tuple[np.ndarray, np.ndarray, np.ndarray], r: int) -> float:
    """||B A - T||_F / ||T||_F with T = -[G]_r / (gamma sigma1), from numpy's exact SVD of G."""
    u, s, vt = exact
    t = -(u[:, :r] * s[:r]) @ vt[:r] / (GAMMA * s[0])
    ba = np.asarray(f.B, dtype=np.float64) @ np.asarray(f.A, dtype=np.float64)
    return float(np.linalg.norm(ba - t) / np.linalg.norm(t))


@pytest.mark.parametrize(
    "m,n,decay,r",
    [
        (48, 32, 0.8, 6),  # small
        (256, 256, 0.95, 16),  # square
        (600, 160, 0.95, 64),  # tall, r = 0.4 min(m, n)
        (160, 600, 0.95, 64),  # wide
        (130, 100, 0.97, 90),  # r close to min(m, n)
        (384, 384, 0.96, 64),  # low-rank "gradient" (rank 156), MiniLM-like gap at r
    ],
)
def test_tolerance_met_on_small_shapes(m: int, n: int, decay: float, r: int) -> None:
    k = 156 if (m, n) == (384, 384) else min(m, n)
    g = _matrix(m, n, decay ** np.arange(k), seed=m + n + r)
    exact = _exact(g)
    for tol in (1e-2, 1e-3):
        f = lora_one(g, r, gamma=GAMMA, tol=tol)
        err = _rel_error(f, exact, r)
        assert f.converged, (m, n, r, tol, f.passes, f.accuracy)
        assert err <= tol, (m, n, r, tol, f.passes, f.accuracy, err)
        assert not f.ambiguous and f.residual_excess is None
        if r < min(m, n):
            s = exact[1]
            assert f.gap_ratio == pytest.approx(s[r] / s[r - 1], rel=1e-3)


def test_ambiguous_cluster_reported() -> None:
    """Singular values 5..150 in one cluster (relative spread 1e-7), r = 32 inside it: the truncation is not unique.

    The result must say so, and ``residual_excess`` must bound the true ``||G - X|| / ||G - G_r|| - 1``."""
    m, n, r = 400, 300, 32
    s = np.concatenate([[8.0, 7.0, 6.0, 5.0], 2.0 * (1 - 1e-7 * np.arange(4, 150)), 0.5 * 0.9 ** np.arange(50)])
    g = _matrix(m, n, s, seed=3)
    f = lora_one(g, r, gamma=GAMMA, tol=1e-3)
    assert f.ambiguous and f.gap_ratio > 0.999
    _, sv, _ = _exact(g)
    best = np.sqrt(np.sum(sv[r:] ** 2))
    # X = -gamma sigma1 B A is the engine's rank-r approximation of G
    x = -GAMMA * f.sigma1 * (np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64))
    excess = np.linalg.norm(g.astype(np.float64) - x) / best - 1
    assert f.residual_excess is not None
    assert excess <= f.residual_excess + 1e-6, (excess, f.residual_excess)
    assert f.residual_excess < 0.5

    # A clear gap at r: not flagged, no excess computed.
    g = _matrix(m, n, 0.9 ** np.arange(200), seed=4)
    f = lora_one(g, r, gamma=GAMMA, tol=1e-3)
    assert not f.ambiguous and f.residual_excess is None and 0.85 < f.gap_ratio < 0.95
    assert _rel_error(f, _exact(g), r) <= 1e-3


def test_report_marks_ambiguous_modules() -> None:
    from peft_loraone.report import InitReport, ModuleReport

    base = dict(shape=(4, 4), rank=2, r=2, scaling=1.0, sigma1=1.0, accuracy=1e-4, passes=5, converged=True, seconds=0.1)
    mods = [
        ModuleReport(name="q", ambiguous=True, gap_ratio=0.99999, residual_excess=2e-6, **base),
        ModuleReport(name="k", **base),
    ]
    text = str(InitReport(adapter_name="default", modules=mods))
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("q ", "k "))}
    assert rows["q"].split()[5].endswith("~") and not rows["k"].split()[5].endswith("~")
    assert "truncation not unique (1 modules)" in text and "<= 2.00e-06" in text and "0.999990" in text
    d = InitReport(adapter_name="default", modules=mods).to_dict()["modules"][0]
    assert d["ambiguous"] is True and d["residual_excess"] == 2e-6
