"""Build hook: ``pip install .`` compiles the Go engine with gopy (see pyext/build_engine.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "pyext"))
import build_engine  # noqa: E402


class GoExtension(Extension):
    """The gopy-built extension; it has no C sources of its own."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class BuildGoEngine(build_ext):
    """Runs gopy instead of a C compiler and puts the result inside ``peft_loraone/_engine``."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, GoExtension):
            return super().build_extension(ext)
        dest = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        written = build_engine.build_locked(dest)
        if self.inplace or getattr(self, "editable_mode", False):
            # Editable installs import the package from python/: the whole _engine
            # folder (wrappers and .so) must be there, not only the .so setuptools copies.
            source = Path(__file__).resolve().parent / "python" / "peft_loraone" / "_engine"
            if source != dest:
                source.mkdir(parents=True, exist_ok=True)
                for path in written:
                    shutil.copy2(path, source / path.name)


setup(
    ext_modules=[GoExtension("peft_loraone._engine._goengine")],
    cmdclass={"build_ext": BuildGoEngine},
)
