"""The hot kernels once each, on a Llama-7B layer pair in bf16, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
        python benchmarks/profile_kernels.py [backend ...]

Each op runs once untimed first (compilation, extension load, launch tables), then once between
cudaProfilerStart and cudaProfilerStop, so only those launches are profiled. Default backends: cuda, triton.
"""
import sys

import torch

import zokern
from shapes import model_shapes

SHAPES, EPS, LR, GRAD, RANK = "llama7b-layer*2", 1e-3, 1e-6, 0.5, 16


def ops(backend: str, params: list, ids: list):
    matrices = [p for p in params if p.dim() == 2]
    factors = [zokern.subspace_factors(1, k, *w.shape, RANK, dtype=w.dtype, device=w.device) for k, w in
               enumerate(matrices)]
    cores = [torch.randn(RANK, RANK, device=params[0].device) for _ in matrices]
    masks, h = zokern.new_masks(params), zokern.magnitude_thresholds(params, 0.8)
    hessians = [torch.ones_like(p, dtype=torch.float32) for p in params]
    return {
        "perturb": lambda: zokern.perturb_(params, 1, EPS, stream_ids=ids, backend=backend),
        "fused_step": lambda: zokern.fused_step_(params, 1, stream_ids=ids, restore=EPS, lr=LR, grad=GRAD,
                                                 next_seed=2, next_scale=EPS, backend=backend),
        "masked_fused_step": lambda: zokern.masked_fused_step_(params, masks, h, 1, stream_ids=ids, restore=EPS,
                                                               lr=LR, grad=GRAD, next_seed=2, next_scale=EPS,
                                                               backend=backend),
        "hessian_step": lambda: zokern.hessian_step_(params, hessians, 1, stream_ids=ids, restore=EPS, lr=LR,
                                                     grad=GRAD, hess_scale=1.0, alpha=1e-6, backend=backend),
        "lowrank_apply": lambda: zokern.lowrank_apply_(matrices, [u for u, _ in factors], [v for _, v in factors],
                                                       cores, backend=backend),
    }


def main(backends: list[str]) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, generator=g, device="cuda").to(torch.bfloat16) for s in model_shapes(SHAPES)]
    ids = list(range(len(params)))
    runs = {b: ops(b, params, ids) for b in backends}
    for table in runs.values():
        for fn in table.values():
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for backend, table in runs.items():
        for name, fn in table.items():
            torch.cuda.nvtx.range_push(f"{backend}:{name}")
            fn()
            torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(sys.argv[1:] or ["cuda", "triton"])
