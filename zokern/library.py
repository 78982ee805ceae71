"""The zokern custom ops: schemas, fake implementations and the device implementations, in one file.

Each op mutates its tensors in place (alias-annotated `Tensor(a!)`), or returns a new tensor, so it
passes `torch.library.opcheck` and stays opaque under `torch.compile`. The device implementation
checks the arguments, resolves the backend (`""` means automatic) and calls that backend's kernel;
the fake runs the same checks without touching memory. Kernels live in zokern/backends.
"""
from __future__ import annotations

import torch

from zokern import backends
from zokern.validation import (check_companions, check_disjoint, check_fill_args, check_lowrank, check_per_tensor,
                               check_step_args, check_tensor_list, mask_words)

DEVICE_TYPES = ("cpu", "cuda")
_STEP = "float restore, float lr, float grad, float[] weight_decays, int next_seed, float next_scale"
SCHEMAS = {
    "fill_random_": "(Tensor(a!) out, int seed, int stream, int offset, int domain, int dist, str backend) -> ()",
    "perturb_": "(Tensor(a!)[] params, int[] streams, int seed, float scale, int dist, str backend) -> ()",
    "fused_step_": f"(Tensor(a!)[] params, int[] streams, int seed, {_STEP}, int dist, str backend) -> ()",
    "lowrank_apply_": "(Tensor(a!)[] weights, Tensor[] us, Tensor[] vs, Tensor[] cores, str backend) -> ()",
    "masked_perturb_": ("(Tensor(a!)[] params, Tensor(b!)[] masks, Tensor thresholds, int[] streams, int seed, "
                        "float scale, bool compute_mask, int dist, str backend) -> ()"),
    "masked_fused_step_": ("(Tensor(a!)[] params, Tensor(b!)[] masks, Tensor thresholds, int[] streams, int seed, "
                           f"{_STEP}, int dist, str backend) -> ()"),
    "hessian_perturb_": ("(Tensor(a!)[] params, Tensor[] hessians, int[] streams, int seed, float scale, int dist, "
                         "str backend) -> ()"),
    "hessian_step_": ("(Tensor(a!)[] params, Tensor(b!)[] hessians, int[] streams, int seed, float restore, "
                      "float lr, float grad, float hess_scale, float alpha, float[] weight_decays, int next_seed, "
                      "float next_scale, int dist, str backend) -> ()"),
    "distance_norms": "(Tensor[] params, Tensor[] anchors, str backend) -> Tensor",
    "anchored_rescale_": ("(Tensor(a!)[] params, Tensor[] anchors, Tensor[]? sources, Tensor factors, "
                          "str backend) -> ()"),
}

for _name, _schema in SCHEMAS.items():
    torch.library.define(f"zokern::{_name}", _schema)


def _contiguous(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _write_back(originals: list[torch.Tensor], work: list[torch.Tensor]) -> None:
    """Kernels see contiguous stand-ins; the stream is indexed by logical (row-major) position, so a
    contiguous copy of a strided view sees the same z. Copy results back into the views (the op's check has
    made sure each can take it: no element addressed twice)."""
    for t, w in zip(originals, work):
        if w is not t:
            t.copy_(w)


def _backend(name: str, device_type: str):
    return backends.load(backends.resolve(name, device_type))


def _mask_shape(p, m):
    return (mask_words(p.numel()),)


def _hessian_dtypes(p):
    return (torch.float32, p.dtype)


def _own_dtype(p):
    return (p.dtype,)


# --- one check per op (its arguments but the backend), run by the device implementation and the fake alike,
# before any tensor is written; each returns the tensors' device type ---------------------------------------

def _check_step(params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist, **extra):
    check_step_args(seed=seed, dist=dist, restore=restore, lr=lr, grad=grad, next_scale=next_scale,
                    next_seed=next_seed, weight_decays=weight_decays, count=len(params), **extra)
    return check_tensor_list(params, streams)


def _check_masks(params, masks, thresholds):
    check_companions(params, masks, "masks", dtypes=(torch.int32,), shapes=_mask_shape)
    check_per_tensor(params, thresholds, "thresholds")
    check_disjoint({"params": params, "masks": masks}, {"thresholds": [thresholds]})


def _check_fill_random(out, seed, stream, offset, domain, dist):
    check_fill_args(out, seed, stream, offset, domain, dist)
    check_disjoint({"out": [out]})
    return out.device.type


def _check_perturb(params, streams, seed, scale, dist):
    check_step_args(seed=seed, dist=dist, scale=scale)
    device_type = check_tensor_list(params, streams)
    check_disjoint({"params": params})
    return device_type


def _check_fused_step(params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist):
    device_type = _check_step(params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist)
    check_disjoint({"params": params})
    return device_type


def _check_lowrank_apply(weights, us, vs, cores):
    device_type = check_tensor_list(weights, [0] * len(weights))
    check_lowrank(weights, us, vs, cores)
    check_disjoint({"weights": weights}, {"us": us, "vs": vs, "cores": cores})
    return device_type


def _check_masked_perturb(params, masks, thresholds, streams, seed, scale, compute_mask, dist):
    check_step_args(seed=seed, dist=dist, scale=scale)
    device_type = check_tensor_list(params, streams)
    _check_masks(params, masks, thresholds)
    return device_type


def _check_masked_fused_step(params, masks, thresholds, streams, seed, restore, lr, grad, weight_decays, next_seed,
                             next_scale, dist):
    device_type = _check_step(params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist)
    _check_masks(params, masks, thresholds)
    return device_type


def _check_hessian_perturb(params, hessians, streams, seed, scale, dist):
    check_step_args(seed=seed, dist=dist, scale=scale)
    device_type = check_tensor_list(params, streams)
    check_companions(params, hessians, "hessians", dtypes=_hessian_dtypes)
    check_disjoint({"params": params}, {"hessians": hessians}, in_place_reads=("hessians",))
    return device_type


def _check_hessian_step(params, hessians, streams, seed, restore, lr, grad, hess_scale, alpha, weight_decays,
                        next_seed, next_scale, dist):
    device_type = _check_step(params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist,
                              hess_scale=hess_scale, alpha=alpha)
    check_companions(params, hessians, "hessians", dtypes=_hessian_dtypes)
    check_disjoint({"params": params, "hessians": hessians})
    return device_type


def _check_distance_norms(params, anchors):
    device_type = check_tensor_list(params, [0] * len(params))
    check_companions(params, anchors, "anchors", dtypes=_own_dtype)
    return device_type  # writes nothing: its tensors may share memory


def _check_anchored_rescale(params, anchors, sources, factors):
    device_type = check_tensor_list(params, [0] * len(params))
    check_companions(params, anchors, "anchors", dtypes=_own_dtype)
    if sources is not None:
        check_companions(params, sources, "sources", dtypes=_own_dtype)
    check_per_tensor(params, factors, "factors")
    check_disjoint({"params": params}, {"anchors": anchors, "sources": sources or [], "factors": [factors]},
                   in_place_reads=("anchors", "sources"))
    return device_type


CHECKS = {"fill_random_": _check_fill_random, "perturb_": _check_perturb, "fused_step_": _check_fused_step,
          "lowrank_apply_": _check_lowrank_apply, "masked_perturb_": _check_masked_perturb,
          "masked_fused_step_": _check_masked_fused_step, "hessian_perturb_": _check_hessian_perturb,
          "hessian_step_": _check_hessian_step, "distance_norms": _check_distance_norms,
          "anchored_rescale_": _check_anchored_rescale}


# --- device implementations: the op's check, then the backend on contiguous stand-ins of every tensor -------

@torch.library.impl("zokern::fill_random_", DEVICE_TYPES)
def _fill_random(out, seed, stream, offset, domain, dist, backend):
    impl = _backend(backend, _check_fill_random(out, seed, stream, offset, domain, dist))
    work = _contiguous([out])
    impl.fill_random(work[0], seed, stream, offset, domain, dist)
    _write_back([out], work)


@torch.library.impl("zokern::perturb_", DEVICE_TYPES)
def _perturb(params, streams, seed, scale, dist, backend):
    impl = _backend(backend, _check_perturb(params, streams, seed, scale, dist))
    work = _contiguous(params)
    impl.perturb(work, list(streams), seed, scale, dist)
    _write_back(params, work)


@torch.library.impl("zokern::fused_step_", DEVICE_TYPES)
def _fused_step(params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist, backend):
    impl = _backend(backend, _check_fused_step(params, streams, seed, restore, lr, grad, weight_decays, next_seed,
                                               next_scale, dist))
    work = _contiguous(params)
    impl.fused_step(work, list(streams), seed, restore, lr, grad, list(weight_decays), next_seed, next_scale, dist)
    _write_back(params, work)


@torch.library.impl("zokern::lowrank_apply_", DEVICE_TYPES)
def _lowrank_apply(weights, us, vs, cores, backend):
    impl = _backend(backend, _check_lowrank_apply(weights, us, vs, cores))
    work = _contiguous(weights)
    impl.lowrank_apply(work, _contiguous(us), _contiguous(vs), _contiguous(cores))
    _write_back(weights, work)


@torch.library.impl("zokern::masked_perturb_", DEVICE_TYPES)
def _masked_perturb(params, masks, thresholds, streams, seed, scale, compute_mask, dist, backend):
    impl = _backend(backend, _check_masked_perturb(params, masks, thresholds, streams, seed, scale, compute_mask,
                                                   dist))
    work, work_masks = _contiguous(params), _contiguous(masks)
    impl.masked_perturb(work, work_masks, thresholds.contiguous(), list(streams), seed, scale, compute_mask, dist)
    _write_back(params, work)
    _write_back(masks, work_masks)


@torch.library.impl("zokern::masked_fused_step_", DEVICE_TYPES)
def _masked_fused_step(params, masks, thresholds, streams, seed, restore, lr, grad, weight_decays, next_seed,
                       next_scale, dist, backend):
    impl = _backend(backend, _check_masked_fused_step(params, masks, thresholds, streams, seed, restore, lr, grad,
                                                      weight_decays, next_seed, next_scale, dist))
    work, work_masks = _contiguous(params), _contiguous(masks)
    impl.masked_fused_step(work, work_masks, thresholds.contiguous(), list(streams), seed, restore, lr, grad,
                           list(weight_decays), next_seed, next_scale, dist)
    _write_back(params, work)
    _write_back(masks, work_masks)


@torch.library.impl("zokern::hessian_perturb_", DEVICE_TYPES)
def _hessian_perturb(params, hessians, streams, seed, scale, dist, backend):
    impl = _backend(backend, _check_hessian_perturb(params, hessians, streams, seed, scale, dist))
    work = _contiguous(params)
    impl.hessian_perturb(work, _contiguous(hessians), list(streams), seed, scale, dist)
    _write_back(params, work)


@torch.library.impl("zokern::hessian_step_", DEVICE_TYPES)
def _hessian_step(params, hessians, streams, seed, restore, lr, grad, hess_scale, alpha, weight_decays, next_seed,
                  next_scale, dist, backend):
    impl = _backend(backend, _check_hessian_step(params, hessians, streams, seed, restore, lr, grad, hess_scale,
                                                 alpha, weight_decays, next_seed, next_scale, dist))
    work, work_d = _contiguous(params), _contiguous(hessians)
    impl.hessian_step(work, work_d, list(streams), seed, restore, lr, grad, hess_scale, alpha, list(weight_decays),
                      next_seed, next_scale, dist)
    _write_back(params, work)
    _write_back(hessians, work_d)


@torch.library.impl("zokern::distance_norms", DEVICE_TYPES)
def _distance_norms(params, anchors, backend):
    impl = _backend(backend, _check_distance_norms(params, anchors))
    return impl.distance_norms(_contiguous(params), _contiguous(anchors))


@torch.library.impl("zokern::anchored_rescale_", DEVICE_TYPES)
def _anchored_rescale(params, anchors, sources, factors, backend):
    impl = _backend(backend, _check_anchored_rescale(params, anchors, sources, factors))
    work = _contiguous(params)
    impl.anchored_rescale(work, _contiguous(anchors), None if sources is None else _contiguous(sources),
                          factors.contiguous())
    _write_back(params, work)


# --- fakes: the op's check, and for distance_norms an output of the right shape ----------------------------

def _fake(check):
    def fake(*args):
        check(*args[:-1])  # the last argument is the backend
    return fake


for _name, _check in CHECKS.items():
    if _name != "distance_norms":
        torch.library.register_fake(f"zokern::{_name}")(_fake(_check))


@torch.library.register_fake("zokern::distance_norms")
def _distance_norms_fake(params, anchors, backend):
    _check_distance_norms(params, anchors)
    return params[0].new_empty(len(params), dtype=torch.float32)
