"""The wheel installs and works without Go and without a C compiler.

Builds a platform wheel from a copy of the source tree (``pip wheel --no-deps --no-build-isolation``, with
``GOPROXY=off``: no network), repairs it with ``auditwheel`` when it is installed (a ``manylinux`` tag; the
extension's link to libpython is removed, which is what manylinux requires), installs it into a fresh virtual
environment that sees the system's torch/peft/transformers (``--system-site-packages``) but not the editable
checkout, and runs an engine check (``lora_one`` against ``torch.linalg.svd``) and a plugin check (a tiny MLP
through PEFT) there with ``go``, ``gcc`` and ``cc`` absent from ``PATH``.

Skips (and says why) when it cannot run offline here: no Go toolchain, no C compiler, no ``git`` checkout to copy,
the build requirements (setuptools, pybindgen) not importable, or Go modules missing from the module cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel check is written for Linux"),
]

CHECK = textwrap.dedent(
    r'''
    import json, os, shutil, sys, time
    t0 = time.perf_counter()
    missing = {tool: shutil.which(tool) for tool in ("go", "gcc", "cc")}
    assert not any(missing.values()), missing
    import torch
    import peft_loraone
    from peft_loraone import _native
    here = os.path.realpath(peft_loraone.__file__)
    assert here.startswith(os.path.realpath(sys.prefix) + os.sep), (here, sys.prefix)
    so = [f for f in os.listdir(os.path.join(os.path.dirname(here), "_engine")) if f.endswith(".so")]
    t_import = time.perf_counter() - t0

    # engine: B @ A == [-G]_r / (gamma sigma1) against an exact SVD
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(120, 30, generator=g, dtype=torch.float64) @ torch.randn(30, 80, generator=g, dtype=torch.float64)
    f = peft_loraone.lora_one(grad, 6, gamma=128.0, tol=1e-10)
    u, s, vh = torch.linalg.svd(-grad, full_matrices=False)
    expect = (u[:, :6] * s[:6]) @ vh[:6] / (128.0 * s[0])
    engine_err = float((f.B @ f.A - expect).norm() / expect.norm())
    assert engine_err < 1e-6, engine_err

    # plugin: a tiny MLP through PEFT, against plain autograd
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6))
    x, y = torch.randn(16, 10), torch.randn(16, 6)
    ref = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6))
    ref.load_state_dict(base.state_dict())
    ((ref(x) - y) ** 2).mean().backward()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights="loraone"))
    loss_fn = lambda out, batch: ((out - y) ** 2).mean()
    report = peft_loraone.initialize(model, [x], loss_fn=loss_fn, progress=False, tol=1e-12, power_iters=60)
    plugin_err = 0.0
    for name, lin in (("0", ref[0]), ("2", ref[2])):
        layer = model.base_model.model[int(name)]
        u, s, vh = torch.linalg.svd(-lin.weight.grad.double(), full_matrices=False)
        expect = 2.0 / (128.0 * s[0]) * (u[:, :2] * s[:2]) @ vh[:2]
        got = layer.get_delta_weight("default").double()
        plugin_err = max(plugin_err, float((got - expect).norm() / expect.norm()))
    assert plugin_err < 1e-5, plugin_err
    assert len(report.modules) == 2 and model.peft_config["default"].init_lora_weights is True
    print(json.dumps({"file": here, "so": so, "blas": _native.blas_info(), "engine_err": engine_err,
                      "plugin_err": plugin_err, "import_s": t_import, "total_s": time.perf_counter() - t0}))
    '''
)


def _run(cmd, *, env=None, cwd=None, timeout=600):
    proc = subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc.stdout


def _build_env(go: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOPROXY="off", GOFLAGS="-mod=mod", GO=go, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _copy_sources(dest: Path) -> None:
    """The files a fresh clone of the working tree would have (tracked + untracked, ignored ones left out)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git checkout to copy the sources from")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, stdout=subprocess.PIPE,
                         check=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def test_wheel_installs_and_runs_without_go(tmp_path):
    sys.path.insert(0, str(ROOT / "pyext"))
    try:
        import build_engine
    finally:
        sys.path.pop(0)
    try:
        go = build_engine.find_go()
    except build_engine.EngineBuildError as exc:
        pytest.skip(f"building the wheel needs Go: {exc}")
    if shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None:
        pytest.skip("building the wheel needs a C compiler")
    for module in ("setuptools", "pybindgen"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not importable: the offline build (--no-build-isolation) needs it")
    times: dict[str, float] = {}
    src = tmp_path / "src"
    _copy_sources(src)
    env = _build_env(go)
    offline = subprocess.run([go, "list", "-deps", "./bridge", "golang.org/x/tools/cmd/goimports",
                              "github.com/go-python/gopy"], cwd=src, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    if offline.returncode != 0:
        pytest.skip(f"Go modules are missing from the module cache and GOPROXY=off: {offline.stdout[-500:]}")

    # ---- build ----
    dist = tmp_path / "dist"
    t = time.perf_counter()
    _run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(dist), "--no-deps", "--no-build-isolation"],
         env=env, cwd=src)
    times["build"] = time.perf_counter() - t
    (wheel,) = dist.glob("peft_loraone-*.whl")
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name.endswith(f"-{py}-{py}-linux_x86_64.whl") or "-linux_" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert f"peft_loraone/_engine/_goengine{suffix}" in names
    assert {"peft_loraone/callback.py", "peft_loraone/py.typed"} <= set(names)

    # ---- manylinux: auditwheel repair (removes the libpython link; tags by the newest glibc symbol used) ----
    repaired = None
    try:
        import auditwheel  # noqa: F401

        have_auditwheel = shutil.which("patchelf") is not None
    except ImportError:
        have_auditwheel = False
    if have_auditwheel:
        t = time.perf_counter()
        house = tmp_path / "wheelhouse"
        _run([sys.executable, "-m", "auditwheel", "repair", str(wheel), "-w", str(house)], env=env)
        times["auditwheel"] = time.perf_counter() - t
        (repaired,) = house.glob("*.whl")
        assert "-manylinux_" in repaired.name, repaired.name
        wheel = repaired

    # ---- a fresh venv that sees the system's torch but not this checkout ----
    t = time.perf_counter()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    vpy = venv / "bin" / "python"
    # the system's pip, run by the venv's interpreter, installs into the venv; no index, no dependencies
    _run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)], env=env)
    times["venv+install"] = time.perf_counter() - t

    # ---- run with go, gcc and cc hidden ----
    tools = tmp_path / "path"
    tools.mkdir()
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GO", "CC", "GOROOT", "GOPATH")}
    run_env["PATH"] = os.pathsep.join([str(venv / "bin"), str(tools)])
    run_env["HF_HUB_OFFLINE"] = "1"
    t = time.perf_counter()
    out = _run([str(vpy), "-c", CHECK], env=run_env, cwd=tmp_path, timeout=300)
    times["checks"] = time.perf_counter() - t
    result = json.loads(out.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(venv.resolve()), result["file"]
    if repaired is not None:
        so = next((venv / "lib").rglob(f"_goengine{suffix}"))
        needed = _run(["readelf", "-d", str(so)]) if shutil.which("readelf") else ""
        assert "libpython" not in needed
    print(f"\nwheel {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB); times (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f"; venv checks: {result}")

    # the editable checkout this test runs from is untouched
    import peft_loraone

    assert Path(peft_loraone.__file__).resolve().is_relative_to(ROOT)
