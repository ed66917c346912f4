"""The build hook's own errors: a missing or old Go toolchain is named, with the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pyext"))
import build_engine  # noqa: E402


def test_missing_go_says_so_and_how_to_get_it(monkeypatch):
    monkeypatch.delenv("GO", raising=False)
    monkeypatch.setattr(build_engine.shutil, "which", lambda name: None)
    monkeypatch.setattr(build_engine.os.path, "exists", lambda path: False)
    with pytest.raises(build_engine.EngineBuildError, match=r"Go toolchain was not found.*Go >= 1\.26.*pip install"):
        build_engine.find_go()


def test_old_go_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "go"
    fake.write_text("#!/bin/sh\necho go1.20.3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("GO", str(fake))
    with pytest.raises(build_engine.EngineBuildError, match=r"go1\.20\.3; the engine needs Go >= 1\.26"):
        build_engine.find_go()


def test_installed_go_is_found():
    assert Path(build_engine.find_go()).name == "go"
