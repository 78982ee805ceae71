"""The zokern custom ops: schemas, fake implementations and the device implementations, in one file.

Each op mutates its tensors in place (alias-annotated `Tensor(a!)`), so it passes
`torch.library.opcheck` and stays opaque under `torch.compile`. The device implementation validates
the arguments, resolves the backend (`""` means automatic) and calls that backend's kernel; the
kernels themselves live in zokern/backends (reference, Triton, CPU C++, CUDA C++).
"""
from __future__ import annotations

import torch

from zokern import backends
from zokern.validation import check_fill_args, check_step_args, check_tensor_list

SCHEMAS = {
    "fill_random_": "(Tensor(a!) out, int seed, int stream, int offset, int domain, int dist, str backend) -> ()",
    "perturb_": "(Tensor(a!)[] params, int[] streams, int seed, float scale, int dist, str backend) -> ()",
    "fused_step_": ("(Tensor(a!)[] params, int[] streams, int seed, float restore, float lr, float grad, "
                    "float[] weight_decays, int next_seed, float next_scale, int dist, str backend) -> ()"),
}
DEVICE_TYPES = ("cpu", "cuda")

for _name, _schema in SCHEMAS.items():
    torch.library.define(f"zokern::{_name}", _schema)


def _contiguous_run(params: list[torch.Tensor], kernel) -> None:
    """Run `kernel` on contiguous stand-ins of non-contiguous tensors and copy the results back.

    The stream is indexed by logical (row-major) position, so a contiguous copy sees the same z."""
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    kernel(work)
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


@torch.library.impl("zokern::fill_random_", DEVICE_TYPES)
def _fill_random(out, seed, stream, offset, domain, dist, backend):
    check_fill_args(out, seed, stream, offset, domain, dist)
    impl = backends.load(backends.resolve(backend, out.device.type))
    _contiguous_run([out], lambda work: impl.fill_random(work[0], seed, stream, offset, domain, dist))


@torch.library.impl("zokern::perturb_", DEVICE_TYPES)
def _perturb(params, streams, seed, scale, dist, backend):
    device_type = check_tensor_list(params, streams)
    check_step_args(seed=seed, dist=dist, scale=scale)
    impl = backends.load(backends.resolve(backend, device_type))
    _contiguous_run(params, lambda work: impl.perturb(work, list(streams), seed, scale, dist))


@torch.library.impl("zokern::fused_step_", DEVICE_TYPES)
def _fused_step(params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist, backend):
    device_type = check_tensor_list(params, streams)
    check_step_args(seed=seed, dist=dist, restore=restore, lr=lr, grad=grad, next_scale=next_scale,
                    next_seed=next_seed, weight_decays=weight_decays, count=len(params))
    impl = backends.load(backends.resolve(backend, device_type))
    _contiguous_run(params, lambda work: impl.fused_step(work, list(streams), seed, restore, lr, grad,
                                                         list(weight_decays), next_seed, next_scale, dist))


# The fakes run the same checks (without reading memory), so bad input fails at trace time too, and a
# list mixing real and meta tensors, which dispatches here, is still rejected.
@torch.library.register_fake("zokern::fill_random_")
def _fill_random_fake(out, seed, stream, offset, domain, dist, backend):
    check_fill_args(out, seed, stream, offset, domain, dist)


@torch.library.register_fake("zokern::perturb_")
def _perturb_fake(params, streams, seed, scale, dist, backend):
    check_tensor_list(params, streams, check_aliasing=False)
    check_step_args(seed=seed, dist=dist, scale=scale)


@torch.library.register_fake("zokern::fused_step_")
def _fused_step_fake(params, streams, seed, restore, lr, grad, weight_decays, next_seed, next_scale, dist, backend):
    check_tensor_list(params, streams, check_aliasing=False)
    check_step_args(seed=seed, dist=dist, restore=restore, lr=lr, grad=grad, next_scale=next_scale,
                    next_seed=next_seed, weight_decays=weight_decays, count=len(params))
