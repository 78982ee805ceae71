"""The method ops (low-rank, masked, Hessian, anchored rescale), per backend and dtype, against the
authors' style of eager reference: SubZero's materialised U@Z0@Vᵀ, Sparse MeZO's full-size boolean mask,
HiZOO's elementwise chain, DiZO's per-tensor norm and rescale.

Bytes counted are what each op must move: one read and write of W (low-rank; U, V are small), of θ plus
the mask bits (masked; the bits, numel/8 bytes, are left out), of θ and D (Hessian step), θ read with θ0 (norms), θ0 and θ read, θ written (rescale).
"""
import math

import pytest
import torch

import zokern
from bench_utils import (BACKENDS, DEVICE, DTYPES, EPS, GRAD, LR, SHAPE_SETS, bench, make_params, record,
                         skip_unavailable)

RANKS = [16, 64]  # SubZero's rank range: the targets hold up to r = 64


def _matrices(dtype, shapes):
    return [p for p in make_params(dtype, shapes) if p.dim() == 2]


# --- low-rank ---------------------------------------------------------------------------------------------

def _lowrank_inputs(dtype, shapes, rank):
    weights = _matrices(dtype, shapes)
    ranks = [min(rank, *w.shape) for w in weights]
    factors = [zokern.subspace_factors(1, k, *w.shape, r, dtype=dtype, device=DEVICE, backend="reference")
               for k, (w, r) in enumerate(zip(weights, ranks))]
    cores = [torch.randn(r, r, device=DEVICE) for r in ranks]
    return weights, [u for u, _ in factors], [v for _, v in factors], cores


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lowrank_apply(benchmark, copy_bandwidth, shapes, backend, rank, dtype):
    skip_unavailable(backend)
    weights, us, vs, cores = _lowrank_inputs(DTYPES[dtype], shapes, rank)
    bench(benchmark, lambda: zokern.lowrank_apply_(weights, us, vs, cores, backend=backend))
    record(benchmark, weights, 1, copy_bandwidth, op="lowrank_apply", backend=backend, dtype=dtype, shapes=shapes,
           rank=rank)


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", RANKS)
def test_lowrank_subzero_reference(benchmark, copy_bandwidth, shapes, rank, dtype):
    """SubZero's code: P = μ·U@Z0@Vᵀ materialised, then W += εP."""
    weights, us, vs, cores = _lowrank_inputs(DTYPES[dtype], shapes, rank)

    def run():
        for w, u, v, c in zip(weights, us, vs, cores):
            scale = math.sqrt(w.numel()) / c.shape[0]
            w.data = w.data + EPS * scale * (u @ c.to(u.dtype) @ v.t())
    bench(benchmark, run)
    record(benchmark, weights, 1, copy_bandwidth, op="lowrank_apply", backend="subzero-reference", dtype=dtype,
           shapes=shapes, rank=rank)


# --- masked -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_fused_step(benchmark, copy_bandwidth, shapes, backend, dtype):
    skip_unavailable(backend)
    params = make_params(DTYPES[dtype], shapes)
    ids, masks = list(range(len(params))), zokern.new_masks(params)
    h = zokern.magnitude_thresholds(params, 0.8)
    zokern.masked_perturb_(params, masks, h, 1, EPS, stream_ids=ids, compute_mask=True, backend=backend)
    bench(benchmark, lambda: zokern.masked_fused_step_(params, masks, h, 1, stream_ids=ids, restore=EPS, lr=LR,
                                                        grad=GRAD, next_seed=2, next_scale=EPS, backend=backend))
    record(benchmark, params, 1, copy_bandwidth, op="masked_fused_step", backend=backend, dtype=dtype, shapes=shapes)


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sparse_mezo_reference(benchmark, copy_bandwidth, shapes, dtype):
    """Sparse MeZO the straightforward way: a full-size boolean mask, restore and update passes, then the next
    step's masked perturbation (the fused step does that too, with next_seed), its mask taken from the new weights."""
    params = make_params(DTYPES[dtype], shapes)
    h = zokern.magnitude_thresholds(params, 0.8)

    def run():
        torch.manual_seed(1)
        for p, t in zip(params, h):
            mask = p.abs() <= t
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data = p.data + EPS * z * mask
            p.data = p.data - LR * GRAD * z * mask
        torch.manual_seed(2)
        for p, t in zip(params, h):
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data = p.data + EPS * z * (p.abs() <= t)
    bench(benchmark, run)
    record(benchmark, params, 1, copy_bandwidth, op="masked_fused_step", backend="sparse-mezo-reference", dtype=dtype,
           shapes=shapes)


# --- Hessian ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_step(benchmark, copy_bandwidth, shapes, backend, dtype):
    skip_unavailable(backend)
    params = make_params(DTYPES[dtype], shapes)
    ids, hessians = list(range(len(params))), [torch.ones_like(p, dtype=torch.float32) for p in params]
    bench(benchmark, lambda: zokern.hessian_step_(params, hessians, 1, stream_ids=ids, restore=EPS, lr=LR,
                                                   grad=GRAD, hess_scale=1.0, alpha=1e-6, backend=backend))
    record(benchmark, params + hessians, 1, copy_bandwidth, op="hessian_step", backend=backend, dtype=dtype,
           shapes=shapes)


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hessian_hizoo_reference(benchmark, copy_bandwidth, shapes, dtype):
    """HiZOO's code: the restore, Hessian and update as an elementwise chain of eager ops."""
    params = make_params(DTYPES[dtype], shapes)
    hessians = [torch.ones_like(p, dtype=torch.float32) for p in params]

    def run():
        torch.manual_seed(1)
        for p, d in zip(params, hessians):
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data = p.data + EPS * z / torch.sqrt(d)
            d.mul_(1 - 1e-6).add_(1e-6 * 1.0 * d * z.float() ** 2)
            p.data = p.data - LR * GRAD * z / torch.sqrt(d)
    bench(benchmark, run)
    record(benchmark, params + hessians, 1, copy_bandwidth, op="hessian_step", backend="hizoo-reference", dtype=dtype,
           shapes=shapes)


# --- DiZO ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_anchored_rescale(benchmark, copy_bandwidth, shapes, backend, dtype):
    skip_unavailable(backend)
    params = _matrices(DTYPES[dtype], shapes)
    anchors = [p + 0.01 for p in params]
    factors = torch.full((len(params),), 0.9, device=DEVICE)
    bench(benchmark, lambda: (zokern.distance_norms(params, anchors, backend=backend),
                               zokern.anchored_rescale_(params, anchors, factors, backend=backend)))
    # norms read θ and θ0; the rescale reads θ0 and θ and writes θ: 5 tensor-sized transfers in all
    record(benchmark, params, 2.5, copy_bandwidth, op="distance_and_rescale", backend=backend, dtype=dtype,
           shapes=shapes)


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_anchored_dizo_reference(benchmark, copy_bandwidth, shapes, dtype):
    params = _matrices(DTYPES[dtype], shapes)
    anchors = [p + 0.01 for p in params]

    def run():
        for p, a in zip(params, anchors):
            t = torch.norm(p.float() - a.float())
            p.data = a + (p - a) * (0.9 * t / t).to(p.dtype)
    bench(benchmark, run)
    record(benchmark, params, 2.5, copy_bandwidth, op="distance_and_rescale", backend="dizo-reference", dtype=dtype,
           shapes=shapes)
