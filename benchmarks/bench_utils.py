"""Shared benchmark helpers: device, tensor set, timing, and the results schema (extra_info).

Environment: ZOKERN_BENCH_DEVICE (cpu|cuda, default cuda when present), ZOKERN_BENCH_SHAPES (comma-separated
shape sets from shapes.py, each a parameter of every kernel benchmark; default llama7b-layer*2 on CUDA,
smollm2-layer on CPU).
"""
import glob
import os
import platform
import time
from datetime import datetime, timezone

import pytest
import torch

from shapes import model_shapes, shape_sets
from zokern import backends

DEVICE = os.environ.get("ZOKERN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SHAPE_SETS = shape_sets(os.environ.get("ZOKERN_BENCH_SHAPES",
                                        "llama7b-layer*2" if DEVICE == "cuda" else "smollm2-layer"))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The kernel benchmarks' backends; the Triton interpreter is a test vehicle, not something to time.
BACKENDS = [b for b in backends.SUPPORTED[DEVICE] if b != "reference" and (DEVICE, b) != ("cpu", "triton")]
EPS, LR, GRAD = 1e-3, 1e-6, 0.5  # a ZO step's scalars: only their being nonzero matters to the time


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# CPU features that choose zokern's kernels (docs/OPS.md) and torch's 16-bit eager paths alike.
CPU_FEATURES = {"avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16", "amx_bf16": "AMX-BF16"}


def cpu_model_and_features() -> tuple[str | None, list[str]]:
    """The CPU's model name and which of CPU_FEATURES it has, from /proc/cpuinfo (Linux); (None, []) elsewhere."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None, []
    fields = dict(line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name"), [name for flag, name in CPU_FEATURES.items() if flag in flags]


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    model, features = cpu_model_and_features()
    parts = [model or platform.processor() or platform.machine(), f"{os.cpu_count()} cores", *features]
    return f"CPU ({', '.join(parts)})"


def last_level_cache_bytes() -> int:
    """The largest CPU cache (sysfs), or for CUDA the device's L2; 0 where unknown."""
    if DEVICE == "cuda":
        return torch.cuda.get_device_properties(0).L2_cache_size
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]] if text[-1] in "KMG"
                     else int(text))
    return max(sizes, default=0)


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
           "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "llc_bytes": last_level_cache_bytes(), "threads": torch.get_num_threads()}
    if os.environ.get("ZOKERN_CPU_SIMD"):  # the C++ CPU kernels capped at a narrower SIMD level than the CPU's
        env["zokern_cpu_simd"] = os.environ["ZOKERN_CPU_SIMD"]
    return env


def median_seconds(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cpu_peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held during fn() beyond what it held before: the profiler records every
    allocation and free with its size, in order (its trace's "[memory]" events), and their running sum peaks
    there. One untimed call: the profiler's bookkeeping slows it."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    held = top = 0
    for event in sorted(events, key=lambda e: e["ts"]):
        held += event["args"]["Bytes"]
        top = max(top, held)
    return top


def bench(benchmark, fn):
    """Times fn (synchronised) after an untimed run: compilation, extension load and caches stay out."""
    def run():
        fn()
        synchronize()
    run()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


def skip_unavailable(backend):
    ok, why = backends.availability(backend, DEVICE)
    if not ok:
        pytest.skip(f"{backend} unavailable on {DEVICE}: {why}")


def make_params(dtype, shapes: str) -> list[torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(s, generator=g, device=DEVICE, dtype=torch.float32).to(dtype) for s in model_shapes(shapes)]


def record(benchmark, params, passes: float, copy_bandwidth: float, **info):
    """Attach bytes moved and achieved bandwidth (from the benchmark's median) to the results; info names the
    op, backend, dtype, shape set and, for ops that draw, the distribution. fraction_of_copy is against the
    streaming copy (conftest.copy_bandwidth); set_bytes against llc_bytes says whether the set could stay in
    the cache between passes."""
    numel = sum(p.numel() for p in params)
    set_bytes = sum(p.numel() * p.element_size() for p in params)
    moved = passes * 2 * set_bytes  # each pass reads and writes once
    if benchmark.stats is None:  # --benchmark-disable: the smoke run checks that it runs, times nothing
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({
        "elements": numel, "set_bytes": set_bytes, "bytes_moved": moved, "elements_per_s": numel / median, "gb_per_s": moved / median / 1e9,
        "copy_gb_per_s": copy_bandwidth / 1e9, "fraction_of_copy": moved / median / copy_bandwidth,
    })
