"""Compiles and links the CUDA extension (csrc/cuda/zo_cuda.cu) with nvcc against an unpacked torch wheel,
without importing that torch: on a machine with no GPU, for a GPU machine's torch.

    python scripts/build_cuda_extension.py --torch-root DIR/torch --out OUT [--arch 90]

DIR/torch is a torch package folder (include/, lib/, version.py), e.g. the GPU machine's torch wheel
fetched with `pip download --no-deps --only-binary=:all: --python-version 3.12 ... torch==2.11.0` and
unzipped. Writes OUT/zokern_cuda.so and its manifest OUT/zokern_cuda.so.json (torch version, sources digest,
arch, nvcc); ZOKERN_CUDA_LIBRARY=OUT/zokern_cuda.so on the GPU machine loads it instead of compiling there.
It is also a compile and link check of the binding against torch's real CUDA headers and libraries, which
CI's torch-free nvcc check cannot be. The flags are torch.utils.cpp_extension's for a CUDA library (no
Python module) plus zokern's own (zokern/backends/_extension.py).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

# The installed torch's nvcc defines (the same list in torch 2.11 and 2.13); the target torch is never imported.
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

from zokern.backends._extension import CUDA_EXTENSION, NVCC_FLAGS, source_dir

TORCH_LIBS = ["-lc10", "-lc10_cuda", "-ltorch_cpu", "-ltorch_cuda", "-ltorch"]


def torch_version(root: Path) -> str:
    match = re.search(r"^__version__\s*=\s*'([^']+)'", (root / "version.py").read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"no __version__ in {root / 'version.py'}")
    return match.group(1)


def cxx_standard(version: str) -> str:
    """torch.utils.cpp_extension's standard for that torch (the C++ ABI needs no flag: torch >= 2.7 and GCC
    both default to the new one)."""
    major, minor = (int(x) for x in version.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 13) else "-std=c++17"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-root", type=Path, required=True, help="an unpacked torch package folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90: Hopper)")
    parser.add_argument("--cuda-home", type=Path, default=Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")),
                        help="the CUDA toolkit (bin/nvcc, include/, lib64/); default $CUDA_HOME or /usr/local/cuda")
    parser.add_argument("--resource-usage", action="store_true",
                        help="print each kernel's registers, stack and spills (ptxas -v; the code is unchanged)")
    args = parser.parse_args()

    root = args.torch_root.resolve()
    version = torch_version(root)
    cuda_home, nvcc = args.cuda_home, str(args.cuda_home / "bin/nvcc")
    src = source_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    obj, lib = args.out / "zo_cuda.o", args.out / f"{CUDA_EXTENSION.name}.so"
    includes = [f"-I{src / 'include'}", "-isystem", str(root / "include"),
                "-isystem", str(root / "include/torch/csrc/api/include"), "-isystem", str(cuda_home / "include")]
    start = time.time()
    run([nvcc, "-c", str(src / CUDA_EXTENSION.sources[0]), "-o", str(obj),
         f"-DTORCH_EXTENSION_NAME={CUDA_EXTENSION.name}", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes,
         *COMMON_NVCC_FLAGS, f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}",
         f"-gencode=arch=compute_{args.arch},code=compute_{args.arch}",
         "--compiler-options", "-fPIC",
         cxx_standard(version), *NVCC_FLAGS, *(["-Xptxas=-v"] if args.resource_usage else [])])
    compiled = time.time() - start
    run(["c++", str(obj), "-shared", "-Wl,--no-undefined", "-o", str(lib), f"-L{root / 'lib'}", *TORCH_LIBS,
         f"-L{cuda_home / 'lib64'}", "-lcudart"])
    obj.unlink()
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
    CUDA_EXTENSION.write_manifest(lib, version, arch=f"sm_{args.arch}",
                                  nvcc=nvcc_version.splitlines()[-1] if nvcc_version else None,
                                  built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(f"built {lib} for torch {version}, sm_{args.arch}: nvcc {compiled:.0f} s")


if __name__ == "__main__":
    main()
