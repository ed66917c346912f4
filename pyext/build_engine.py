"""Build the Go engine into the CPython extension ``peft_loraone._engine``.

This is the one place that knows how the extension is made:

1. ``go build`` the pinned ``goimports`` (a ``tool`` dependency in go.mod) into a
   private bin folder, because gopy runs ``goimports`` from PATH;
2. ``go tool gopy build -vm=<this python> -name=goengine <module>/bridge`` into
   ``pyext/_build/goengine`` (a folder whose name starts with ``_``, so
   ``go test ./...`` never walks it, yet inside the module so the generated cgo
   package finds go.mod);
3. copy the Python wrappers and the ``.so`` into the destination package folder.

It runs from ``setup.py`` (``pip install .`` / ``pip install -e .``) and can be run
by hand: ``python pyext/build_engine.py [DEST]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "github.com/peft-loraone/peft-loraone"
PACKAGE = f"{MODULE}/bridge"
NAME = "goengine"
MIN_GO = (1, 26)


class EngineBuildError(RuntimeError):
    """A step of the Go engine build failed; the message names the step and the fix."""


def _echo(cmd: list[str]) -> None:
    print("peft-loraone build: $ " + " ".join(cmd), file=sys.stderr, flush=True)


def _run(step: str, cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
    _echo(cmd)
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.stdout:
        print(proc.stdout, file=sys.stderr, end="", flush=True)
    # gopy prints "error dispatching command" yet may exit 0 on some failures: check both.
    if proc.returncode != 0 or "error dispatching command" in (proc.stdout or ""):
        raise EngineBuildError(
            f"peft-loraone: building the Go engine failed at step '{step}' (exit {proc.returncode}).\n"
            f"Command: {' '.join(cmd)}\nSee the output above; 'Common issues' in README.md lists the usual fixes."
        )


def find_go() -> str:
    """Return the path of a Go toolchain new enough to build the engine, or raise."""
    go = os.environ.get("GO") or shutil.which("go")
    if not go:
        for candidate in ("/usr/local/go/bin/go", os.path.expanduser("~/go/bin/go"), "/usr/lib/go/bin/go"):
            if os.path.exists(candidate):
                go = candidate
                break
    if not go:
        raise EngineBuildError(
            "peft-loraone: the Go toolchain was not found. Building the engine needs Go "
            f">= {MIN_GO[0]}.{MIN_GO[1]} and a C compiler (cgo). Install Go from your OS packages or the "
            "official Go downloads, make sure `go version` works (or set GO=/path/to/go), then rerun "
            "`pip install .`."
        )
    out = subprocess.run([go, "env", "GOVERSION"], stdout=subprocess.PIPE, text=True, check=False).stdout.strip()
    try:
        parts = out.removeprefix("go").split(".")
        version = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        version = MIN_GO  # unknown format (a devel build): let the build itself decide
    if version < MIN_GO:
        raise EngineBuildError(
            f"peft-loraone: {go} is {out}; the engine needs Go >= {MIN_GO[0]}.{MIN_GO[1]}. "
            "Upgrade Go (or set GO=/path/to/newer/go) and rerun `pip install .`."
        )
    return go


def build(dest: Path) -> list[Path]:
    """Build the extension and copy it into ``dest`` (the ``peft_loraone/_engine`` folder).

    Returns the files written.
    """
    go = find_go()
    if shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None:
        raise EngineBuildError(
            "peft-loraone: no C compiler found; cgo needs one to build the engine. "
            "Install gcc (for example `apt-get install gcc`) and rerun `pip install .`."
        )
    env = dict(os.environ)
    env["CGO_ENABLED"] = "1"
    env.setdefault("GOFLAGS", "-mod=mod")
    bindir = ROOT / "pyext" / "_build" / "bin"
    out = ROOT / "pyext" / "_build" / NAME
    bindir.mkdir(parents=True, exist_ok=True)
    env["PATH"] = str(bindir) + os.pathsep + str(Path(go).parent) + os.pathsep + env.get("PATH", "")

    _run("goimports", [go, "build", "-o", str(bindir / "goimports"), "golang.org/x/tools/cmd/goimports"], env)
    if out.exists():
        shutil.rmtree(out)
    _run(
        "gopy",
        [go, "tool", "gopy", "build", f"-output={out}", f"-vm={sys.executable}", f"-name={NAME}", PACKAGE],
        env,
    )

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    so = out / f"_{NAME}{suffix}"
    if not so.exists():
        found = sorted(p.name for p in out.glob("*.so"))
        raise EngineBuildError(
            f"peft-loraone: gopy did not produce {so.name} (found {found}). The extension must be built by "
            "the interpreter that imports it; run the build with that python."
        )
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for src in (so, out / "bridge.py", out / "go.py"):
        # Copy beside the target, then rename over it: a process that has the old
        # extension loaded keeps its (unlinked) file instead of reading a half-written one.
        tmp = dest / f".{src.name}.{os.getpid()}.tmp"
        shutil.copy2(src, tmp)
        os.replace(tmp, dest / src.name)
        written.append(dest / src.name)
    init = dest / "__init__.py"
    init.write_text('"""The Go engine built by gopy (generated at install time; never edit or commit)."""\n')
    written.append(init)
    return written


def build_locked(dest: Path) -> list[Path]:
    """``build`` under an exclusive lock on ``pyext/_build/.lock``: two builds at once
    (two shells, or ``pip install`` next to a hand build) would share the gopy output folder."""
    import fcntl

    lock = ROOT / "pyext" / "_build" / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            return build(dest)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "python" / "peft_loraone" / "_engine"
    for path in build_locked(target):
        print(path)
