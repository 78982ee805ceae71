"""Element offsets: a tensor cut into pieces, each processed with the stream index of its first element, gives
bitwise what the whole tensor gives, for every op that draws z per element, on every backend and dtype
(docs/RANDOM.md, "Addressing"; docs/OPS.md)."""
import pytest
import torch

import zokern
from conftest import available_pairs, backend_kernels

PAIRS = available_pairs()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STREAM, SEED, NEXT = 9, 0x0123456789ABCDEF, 77
# Uneven pieces with odd offsets: 37 elements, 1 element, then the rest.
CUTS = [0, 37, 38]


def _pieces(whole: torch.Tensor, cuts) -> list[torch.Tensor]:
    bounds = list(cuts) + [whole.numel()]
    return [whole.reshape(-1)[a:b].clone() for a, b in zip(bounds, bounds[1:])]


def _whole(numel: int, dtype, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g).to(device, dtype)


def _run(op: str, tensors: list, hessians: list, masks: list, h: torch.Tensor, offsets, backend: str, dist: str):
    """Runs `op` on `tensors` (all pieces of one tensor: one stream id), after what it needs (a mask)."""
    ids = [STREAM] * len(tensors)
    kw = dict(stream_ids=ids, offsets=offsets, dist=dist, backend=backend)
    step = dict(restore=1e-2, lr=3e-2, grad=-1.5, weight_decay=0.1, next_seed=NEXT, next_scale=1e-2)
    if op == "perturb_":
        zokern.perturb_(tensors, SEED, 0.25, **kw)
    elif op == "fused_step_":
        zokern.fused_step_(tensors, SEED, **step, **kw)
    elif op == "masked_perturb_":
        zokern.masked_perturb_(tensors, masks, h, SEED, 0.25, compute_mask=True, **kw)
    elif op == "masked_fused_step_":
        zokern.masked_perturb_(tensors, masks, h, SEED, 0.25, compute_mask=True, **kw)
        zokern.masked_fused_step_(tensors, masks, h, SEED, **step, **kw)
    elif op == "hessian_perturb_":
        zokern.hessian_perturb_(tensors, hessians, SEED, 0.25, **kw)
    else:
        zokern.hessian_step_(tensors, hessians, SEED, hess_scale=3.0, alpha=0.2, **step, **kw)


OPS = ["perturb_", "fused_step_", "masked_perturb_", "masked_fused_step_", "hessian_perturb_", "hessian_step_"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
@pytest.mark.parametrize("numel,start", [(103, 0), (61, 4 * 1000 + 3)], ids=["from-0", "offset-4003"])
def test_pieces_with_offsets_are_the_whole_tensor_bitwise(backend, device, dtype, op, dist, numel, start):
    """The whole tensor, itself at element offset `start`, against its pieces at start + cut."""
    whole = _whole(numel, dtype, device)
    whole_d = (_whole(numel, torch.float32, device, seed=1).abs() + 0.5).to(dtype)
    h = torch.tensor([0.8], device=device)
    whole_mask = zokern.new_masks([whole])
    parts, parts_d = _pieces(whole, CUTS), _pieces(whole_d, CUTS)
    parts_mask = zokern.new_masks(parts)
    _run(op, [whole], [whole_d], whole_mask, h, [start], backend, dist)
    _run(op, parts, parts_d, parts_mask, h.expand(len(parts)).contiguous(), [start + c for c in CUTS], backend,
         dist)
    assert torch.equal(_bits(torch.cat(parts)), _bits(whole))
    if op == "hessian_step_":
        assert torch.equal(_bits(torch.cat(parts_d)), _bits(whole_d))
    if op.startswith("masked"):
        got = torch.cat([zokern.unpack_mask(m, p) for m, p in zip(parts_mask, parts)])
        assert torch.equal(got, zokern.unpack_mask(whole_mask[0], whole))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_offset_moves_the_draws_along_the_stream(backend, device):
    """offset o: element l gets z of stream element o + l, the values zokern.draw gives there."""
    for offset in (0, 1, 2, 3, 4, 1 << 33 | 1):
        p = torch.zeros(23, device=device)
        zokern.perturb_([p], SEED, 1.0, stream_ids=[STREAM], offsets=[offset], backend=backend)
        assert torch.equal(p, zokern.draw(SEED, STREAM, 23, offset=offset, device=device, backend=backend))


def _kernel_pairs():
    return [p for p in available_pairs(include_reference=False)]


@pytest.mark.parametrize("backend,device", _kernel_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_offsets_across_small_chunks(backend, device, dtype):
    """Kernels called with small chunks (and Triton blocks): pieces that start and end inside chunks and
    blocks, at every phase, still give the whole tensor's bits."""
    kernels = backend_kernels(backend, device)
    sizes = {"chunk": 64, "block": 32} if backend == "triton" else {"chunk": 64}
    whole = _whole(300, dtype, device)
    cuts = [0, 37, 38, 171, 229]
    parts = _pieces(whole, cuts)
    masks_whole, masks_parts = zokern.new_masks([whole]), zokern.new_masks(parts)
    h = torch.tensor([0.8], device=device)
    hs = h.expand(len(parts)).contiguous()
    kernels.fused_step([whole], [STREAM], SEED, 1e-2, 3e-2, -1.5, [0.1], NEXT, 1e-2, 0, [5], **sizes)
    kernels.fused_step(parts, [STREAM] * len(parts), SEED, 1e-2, 3e-2, -1.5, [0.1] * len(parts), NEXT, 1e-2, 0,
                       [5 + c for c in cuts], **sizes)
    assert torch.equal(_bits(torch.cat(parts)), _bits(whole))
    kernels.masked_perturb([whole], masks_whole, h, [STREAM], SEED, 0.5, True, 0, [5], **sizes)
    kernels.masked_perturb(parts, masks_parts, hs, [STREAM] * len(parts), SEED, 0.5, True, 0, [5 + c for c in cuts],
                           **sizes)
    assert torch.equal(_bits(torch.cat(parts)), _bits(whole))
    d_whole = (_whole(300, torch.float32, device, seed=1).abs() + 0.5)
    d_parts = _pieces(d_whole, cuts)
    kernels.hessian_step([whole], [d_whole], [STREAM], SEED, 1e-2, 3e-2, -1.5, 3.0, 0.2, [0.1], NEXT, 1e-2, 0, [5],
                         **sizes)
    kernels.hessian_step(parts, d_parts, [STREAM] * len(parts), SEED, 1e-2, 3e-2, -1.5, 3.0, 0.2,
                         [0.1] * len(parts), NEXT, 1e-2, 0, [5 + c for c in cuts], **sizes)
    assert torch.equal(_bits(torch.cat(parts)), _bits(whole))
    assert torch.equal(torch.cat(d_parts), d_whole)


@pytest.mark.parametrize("offsets,error,match", [
    ([0], ValueError, "2 tensors but 1 offsets"),
    ([0, -1], ValueError, r"offsets\[1\] must be in"),
    ([0, (1 << 62) - 3], ValueError, r"offsets\[1\] must be in"),
    ([0, 1.5], TypeError, r"offsets\[1\] must be an int"),
    (3, TypeError, "offsets must be a list"),
])
def test_bad_offsets_are_rejected_and_nothing_changes(offsets, error, match):
    params = [torch.randn(5), torch.randn(7).to(torch.bfloat16)]
    before = [p.clone() for p in params]
    with pytest.raises(error, match=match):
        zokern.fused_step_(params, 1, stream_ids=[0, 1], restore=1e-3, lr=1e-3, grad=1.0, offsets=offsets)
    if error is ValueError:  # the op's own check, as a direct caller of torch.ops meets it (torch casts types)
        with pytest.raises(error, match=match):
            torch.ops.zokern.perturb_(params, [0, 1], 1, 1.0, 0, "", offsets)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck_with_offsets(backend, device, op):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(6, 5, generator=g).to(device), torch.randn(41, generator=g).to(device, torch.bfloat16)]
    hessians = [torch.rand(6, 5, generator=g).to(device) + 0.5, torch.rand(41, generator=g).to(device) + 0.5]
    masks, h = zokern.new_masks(params), torch.tensor([0.5, 0.7], device=device)
    step = (1e-3, 1e-2, 2.0)
    args = {
        "perturb_": (params, [1, 2], 7, 0.5, 0),
        "fused_step_": (params, [1, 2], 7, *step, [0.1, 0.0], 8, 1e-3, 0),
        "masked_perturb_": (params, masks, h, [1, 2], 7, 0.5, True, 0),
        "masked_fused_step_": (params, masks, h, [1, 2], 7, *step, [0.1, 0.0], 8, 1e-3, 0),
        "hessian_perturb_": (params, hessians, [1, 2], 7, 0.5, 0),
        "hessian_step_": (params, hessians, [1, 2], 7, *step, 3.0, 0.1, [0.1, 0.0], 8, 1e-3, 0),
    }[op]
    torch.library.opcheck(getattr(torch.ops.zokern, op), (*args, backend, [3, 1 << 40]))
