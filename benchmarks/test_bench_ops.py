"""The perturb pass and the fused step, per backend, dtype and distribution, against the MeZO reference pass
and a copy of the same tensors.

Run: python -m pytest benchmarks/test_bench_ops.py --benchmark-json=benchmarks/results/<gpu>-<date>.json
"""
import pytest
import torch

import zokern
from bench_utils import BACKENDS, DTYPES, EPS, GRAD, LR, SHAPE_SETS, bench, make_params, record, skip_unavailable

DISTS = ["normal", "rademacher_bit"]


def mezo_reference_perturb(params, seed, scale):
    """The MeZO authors' pass: one global seed, torch.normal per tensor in the parameter's dtype."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data + scale * z


def mezo_reference_step_tail(params, seed):
    """What the fused step replaces, the MeZO way: restore pass, update pass, next step's perturb pass."""
    mezo_reference_perturb(params, seed, EPS)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data - LR * GRAD * z
    mezo_reference_perturb(params, seed + 1, EPS)


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb(benchmark, copy_bandwidth, shapes, backend, dist, dtype):
    skip_unavailable(backend)
    params = make_params(DTYPES[dtype], shapes)
    ids = list(range(len(params)))
    bench(benchmark, lambda: zokern.perturb_(params, 1, EPS, stream_ids=ids, dist=dist, backend=backend))
    record(benchmark, params, 1, copy_bandwidth, op="perturb", backend=backend, dtype=dtype, shapes=shapes, dist=dist)


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step(benchmark, copy_bandwidth, shapes, backend, dist, dtype):
    skip_unavailable(backend)
    params = make_params(DTYPES[dtype], shapes)
    ids = list(range(len(params)))
    bench(benchmark, lambda: zokern.fused_step_(params, 1, stream_ids=ids, restore=EPS, lr=LR, grad=GRAD,
                                                 next_seed=2, next_scale=EPS, dist=dist, backend=backend))
    record(benchmark, params, 1, copy_bandwidth, op="fused_step", backend=backend, dtype=dtype, shapes=shapes,
           dist=dist)


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_stochastic(benchmark, copy_bandwidth, shapes, backend, dtype):
    """test_fused_step with stochastic rounding of the stored update: one more Philox call per 4 elements."""
    skip_unavailable(backend)
    params = make_params(DTYPES[dtype], shapes)
    ids = list(range(len(params)))
    bench(benchmark, lambda: zokern.fused_step_(params, 1, stream_ids=ids, restore=EPS, lr=LR, grad=GRAD,
                                                 next_seed=2, next_scale=EPS, rounding="stochastic", backend=backend))
    record(benchmark, params, 1, copy_bandwidth, op="fused_step_stochastic", backend=backend, dtype=dtype,
           shapes=shapes)


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mezo_reference_perturb(benchmark, copy_bandwidth, shapes, dtype):
    params = make_params(DTYPES[dtype], shapes)
    bench(benchmark, lambda: mezo_reference_perturb(params, 1, EPS))
    record(benchmark, params, 1, copy_bandwidth, op="perturb", backend="mezo-reference", dtype=dtype, shapes=shapes,
           dist="normal")


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mezo_reference_step_tail(benchmark, copy_bandwidth, shapes, dtype):
    params = make_params(DTYPES[dtype], shapes)
    bench(benchmark, lambda: mezo_reference_step_tail(params, 1))
    # Counted as the one pass's worth of bytes the fused step moves, so GB/s compare as useful work per second.
    record(benchmark, params, 1, copy_bandwidth, op="fused_step", backend="mezo-reference", dtype=dtype, shapes=shapes,
           dist="normal")


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_foreach_perturb(benchmark, copy_bandwidth, shapes, dtype):
    """The best eager PyTorch can do: z drawn per tensor, then one torch._foreach_add_ over the list."""
    params = make_params(DTYPES[dtype], shapes)

    def run():
        torch.manual_seed(1)
        zs = [torch.randn_like(p) for p in params]
        torch._foreach_add_(params, zs, alpha=EPS)
    bench(benchmark, run)
    record(benchmark, params, 1, copy_bandwidth, op="perturb", backend="torch-foreach", dtype=dtype, shapes=shapes,
           dist="normal")


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_same_bytes(benchmark, copy_bandwidth, shapes, dtype):
    """The physical reference: a device copy of the same tensors (one read and one write per element); for a set
    smaller than the last-level cache it runs from the cache, unlike the streaming copy of copy_bandwidth."""
    params = make_params(DTYPES[dtype], shapes)
    targets = [torch.empty_like(p) for p in params]
    bench(benchmark, lambda: torch._foreach_copy_(targets, params))
    record(benchmark, params, 1, copy_bandwidth, op="perturb", backend="copy", dtype=dtype, shapes=shapes)
