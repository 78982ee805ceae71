"""Builds the C++ extensions at install (`pip install .`, `pip wheel .`, the editable install of
scripts/setup_env.sh) with torch.utils.cpp_extension, against the torch already installed (--no-build-isolation):
always the CPU one, and the CUDA one when torch is a CUDA build and a CUDA toolkit is found ($TORCH_CUDA_ARCH_LIST,
default 9.0, so no GPU is needed). What they are built from and with which flags is zokern/backends/_build.py;
everything else about the package is in pyproject.toml."""
import importlib.util
import itertools
import os
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
except ImportError:
    sys.exit("zokern builds its C++ extensions against the installed torch: install torch first (scripts/setup_env.sh "
             "pins it), then `pip install --no-build-isolation .`")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
# Loaded as a file: importing the zokern package would import what it needs at run time.
_spec = importlib.util.spec_from_file_location("zokern_build", ROOT / "zokern" / "backends" / "_build.py")
build = sys.modules["zokern_build"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def extension(source):
    """The setuptools extension of one build.ExtensionSource, as zokern/<name>.so."""
    kind = CUDAExtension if source.cuda else CppExtension
    return kind(f"{build.LIBRARY_PACKAGE}.{source.name}", [f"csrc/{s}" for s in source.sources],
                include_dirs=[str(ROOT / "csrc" / "include")],
                extra_compile_args={"cxx": list(build.CXX_FLAGS), "nvcc": list(build.NVCC_FLAGS)},
                extra_link_args=list(build.LDFLAGS))


class BuildStampedExtension(BuildExtension):
    """BuildExtension that writes each library's build stamp beside it (in the build folder, or in the source tree
    for an editable install), which the loader checks before using the library."""

    def build_extensions(self):
        # Python's own CFLAGS (-g -DNDEBUG -fwrapv -Wall ...) are not the extensions' flags: compile with those of
        # _build.py only, as the fallback does (no debug info either: a library 5x smaller).
        command = list(itertools.takewhile(lambda word: not word.startswith("-"), self.compiler.compiler_so))
        self.compiler.set_executable("compiler_so", [*command, "-fPIC"])  # the compiler (and any launcher)
        super().build_extensions()

    def run(self):
        if self.inplace:  # editable: object files kept in build/ (not a fresh temporary folder), so a reinstall
            self.build_temp = str(ROOT / "build" / "editable")  # with unchanged sources compiles nothing
        super().run()
        for ext in self.extensions:
            source = next(s for s in SOURCES if ext.name.endswith("." + s.name))
            source.write_stamp(Path(self.get_ext_fullpath(ext.name)), ROOT / "csrc", torch.__version__)


SOURCES = [build.CPU]
# A CPU-only torch never tries the CUDA build.
if torch.version.cuda is not None and CUDA_HOME is not None:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
    SOURCES.append(build.CUDA)

setup(ext_modules=[extension(s) for s in SOURCES],
      cmdclass={"build_ext": BuildStampedExtension.with_options(no_python_abi_suffix=True)})
