"""Compiles every Triton kernel specialisation that zokern's launchers make, for a GPU target, on a machine
without a GPU, and reports each one's registers, stack frame, spills and shared memory.

    python scripts/compile_triton.py [--arch 90] [--json OUT.json]

The launchers (zokern/backends/triton.py and kernels/*.py) are called on CPU tensors over a set of calls
that covers every dtype, distribution, fused/next-step, mask, Hessian-dtype, alignment and low-rank-rank
branch; each launch is captured instead of run (its argument types and constexprs make the signature) and
compiled with triton.compile for the target, like the first launch on a GPU would, except that Triton's
run-time divisibility-by-16 specialisation is not applied. Run without TRITON_INTERPRET. Registers come from
the cuobjdump that Triton's NVIDIA backend carries. tests/test_triton_compile.py checks the result.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("compile_triton.py compiles for the GPU: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends import backends  # noqa: E402

if "nvidia" not in backends:  # exit code 3: the test reads it as "cannot compile here"
    print("this triton build has no NVIDIA backend", file=sys.stderr)
    sys.exit(3)

from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from zokern.backends import triton as tb  # noqa: E402  (zokern installed: zokern.kernels is kernels/)

COMPILE_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


class Capture:
    """Replaces JITFunction.run: records each launch's specialisation (signature, constexprs, divisibility
    attributes, options) as Triton's launcher would make it on a GPU (native_specialize_impl: pointers and
    ints divisible by 16, ints equal to 1 as constants)."""

    def __init__(self, backend):
        self.backend = backend
        self.launches: dict[tuple, tuple] = {}

    def __enter__(self):
        self._run = JITFunction.run
        capture = self

        def run(fn, *args, grid, warmup, **kwargs):
            capture.record(fn, args, kwargs)

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run

    def record(self, fn: JITFunction, args, kwargs) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in COMPILE_OPTIONS}
        bound = dict(zip(fn.arg_names, args), **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(fn.params):
            value = bound[param.name] if param.name in bound else param.default
            if param.is_constexpr:
                kind, attr = "constexpr", None
            else:
                kind, attr = native_specialize_impl(type(self.backend), value, param.is_const,
                                                    not param.do_not_specialize,
                                                    not param.do_not_specialize_on_alignment)
            signature[param.name] = kind
            if kind == "constexpr":
                constexprs[(i,)] = value
            elif isinstance(attr, str):
                attrs[(i,)] = self.backend.parse_attr(attr)
        key = (fn.__name__, tuple(signature.items()), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
               tuple(sorted(options.items())))
        self.launches.setdefault(key, (fn, signature, constexprs, attrs, options))


def representative_calls() -> None:
    """One call per branch of every launcher, on CPU tensors (nothing runs: launches are captured)."""
    seed, seed2 = 2024, 7
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        aligned = [torch.zeros(4096, dtype=dtype), torch.zeros(64, 96, dtype=dtype)]
        ragged = [torch.zeros(4099, dtype=dtype)[1:]]  # unaligned start, odd length
        for params in (aligned, ragged):
            streams, wds = list(range(len(params))), [0.0] * len(params)
            for dist in (0, 1):
                tb.perturb(params, streams, seed, 1e-3, dist)
                tb.fused_step(params, streams, seed, 1e-3, 1e-6, 0.5, wds, seed2, 1e-3, dist)
            tb.fused_step(params, streams, seed, 1e-3, 1e-6, 0.5, wds, -1, 0.0, 0)
            # Element offsets (multiples of 4 keep the aligned specialisations, others do not) and stochastic
            # rounding of the stored update.
            tb.fused_step(params, streams, seed, 1e-3, 1e-6, 0.5, wds, -1, 0.0, 0, [8] * len(params), 1)
            tb.fused_step(params, streams, seed, 1e-3, 1e-6, 0.5, wds, seed2, 1e-3, 0, [3] * len(params), 1)
            masks = [torch.zeros((p.numel() + 31) // 32, dtype=torch.int32) for p in params]
            thresholds = torch.ones(len(params))
            for compute_mask in (True, False):
                tb.masked_perturb(params, masks, thresholds, streams, seed, 1e-3, compute_mask, 0)
            for next_seed in (seed2, -1):
                tb.masked_fused_step(params, masks, thresholds, streams, seed, 1e-3, 1e-6, 0.5, wds, next_seed,
                                     1e-3, 0)
                tb.masked_fused_step(params, masks, thresholds, streams, seed, 1e-3, 1e-6, 0.5, wds, next_seed,
                                     1e-3, 0, [5] * len(params), 1)
            for d_dtype in {torch.float32, dtype}:
                hessians = [torch.ones(p.numel(), dtype=d_dtype) for p in params]
                tb.hessian_perturb(params, hessians, streams, seed, 1e-3, 0)
                for next_seed in (seed2, -1):
                    tb.hessian_step(params, hessians, streams, seed, 1e-3, 1e-6, 0.5, 10.0, 1e-8, wds, next_seed,
                                    1e-3, 0)
                tb.hessian_step(params, hessians, streams, seed, 1e-3, 1e-6, 0.5, 10.0, 1e-8, wds, -1, 0.0, 0,
                                [1] * len(params), 1)
            anchors = [torch.zeros_like(p) for p in params]
            tb.distance_norms(params, anchors)
            tb.anchored_rescale(params, anchors, None, torch.ones(len(params)))
            tb.anchored_rescale(params, anchors, [torch.zeros_like(p) for p in params], torch.ones(len(params)))
            tb.anchored_rescale(params, anchors, None, torch.ones(len(params)), streams, seed, [3] * len(params), 1)
        for factor_dtype in {dtype, torch.float32}:
            for (m, n), rank in itertools.product(((128, 256), (100, 300)), (1, 8, 32, 64)):  # LLM-like, awkward
                w = torch.zeros(m, n, dtype=dtype)
                u, v = torch.zeros(m, rank, dtype=factor_dtype), torch.zeros(n, rank, dtype=factor_dtype)
                tb.lowrank_apply([w], [u], [v], [torch.zeros(rank, rank)])
                tb.lowrank_apply([w], [u], [v], [torch.zeros(rank, rank)], [3], seed, [5], 1)
    for dist in (0, 1):
        tb.fill_random(torch.zeros(1000), seed, 3, 5, 0, dist)
    tb.philox_words(torch.zeros(100, 4, dtype=torch.int64), seed, 3, 0, 0)


def resource_usage(cubin: bytes) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for key, name in (("REG", "registers"), ("STACK", "stack_bytes"), ("SHARED", "static_shared_bytes"),
                      ("LOCAL", "local_bytes")):
        match = re.search(rf"\b{key}:(\d+)", text)
        usage[name] = int(match.group(1)) if match else None
    return usage


def access_bytes(ptx: str, op: str) -> int:
    """The widest global access of the kernel (ld or st) in bytes per thread and instruction."""
    widest = 0
    for vec, bits in re.findall(rf"\b{op}\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfus](\d+)\b", ptx):
        widest = max(widest, int(vec or 1) * int(bits) // 8)
    return widest


def compile_all(arch: int) -> list[dict]:
    target = GPUTarget("cuda", arch, 32)
    with Capture(make_backend(target)) as capture:
        representative_calls()
    rows = []
    for fn, signature, constexprs, attrs, options in capture.launches.values():
        start = time.time()
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options)
        names = list(signature)
        ptx = compiled.asm["ptx"]
        rows.append({
            "kernel": fn.__name__,
            "constexprs": {names[k[0]]: v for k, v in constexprs.items() if v is not None},
            "divisible_by_16": [names[k[0]] for k in attrs if attrs[k]],
            "options": options,
            **resource_usage(compiled.asm["cubin"]),
            "shared_bytes": compiled.metadata.shared,
            "approx_math": ".approx." in ptx,
            "fma_rn_f32": "fma.rn.f32" in ptx,
            "load_bytes": access_bytes(ptx, "ld"),
            "store_bytes": access_bytes(ptx, "st"),
            "seconds": round(time.time() - start, 2),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: sm_90)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = compile_all(args.arch)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "arch": f"sm_{args.arch}", "kernels": rows},
                                        indent=1) + "\n")
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(rows)} specialisations compiled")
    print(f"{'kernel':<24} {'regs':>4} {'stack':>5} {'shared':>6} {'ld B':>4} {'st B':>4}  constexprs")
    for r in rows:
        const = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        print(f"{r['kernel']:<24} {r['registers']:>4} {r['stack_bytes']:>5} {r['shared_bytes']:>6} "
              f"{r['load_bytes']:>4} {r['store_bytes']:>4}  {const}")


if __name__ == "__main__":
    main()
