"""Sparse MeZO's ops, masked_perturb_ and masked_fused_step_ (docs/OPS.md, "Magnitude mask"), on every backend:
a whole step (+ε with a new mask, −2ε with the stored one, the fused step with and without the next mask) bit for
bit the reference's over dtypes and awkward layouts, strided thresholds and masks included; masks bit for bit;
one launch per dtype; invariant to chunking, grouping and order; the round trip at the threshold; opcheck."""
import itertools

import pytest
import torch
from conftest import backend_kernels
from op_cases import (BACKENDS, DTYPE_CASES, DTYPE_IDS, DTYPES, MASKED_CHUNKINGS, NEXT_SEED, NORMAL, RADEMACHER,
                      SEED, assert_bitwise, assert_launches, assert_margins_untouched, awkward_params, clones,
                      dtype_count, margins, reference_on_backend_z, stream_ids)

import zokern
from zokern.validation import mask_words

EPS, LR, GRAD = 0.37, 0.1, -1.5
CASES = [pytest.param(case, dist, id=f"{name}-{'normal' if dist == NORMAL else 'rademacher'}")
         for case, name in zip(DTYPE_CASES, DTYPE_IDS) for dist in (NORMAL, RADEMACHER)
         if name == "mixed" or dist == NORMAL]
UNTOUCHED_WORD = 7  # the mask buffer's words between the strided mask's words


def strided_thresholds(params) -> torch.Tensor:
    """magnitude_thresholds (about half of each tensor in the mask) as every other entry of a buffer."""
    h = zokern.magnitude_thresholds(params, 0.5)
    buffer = torch.full((2 * h.numel(),), 9.0, device=h.device)
    buffer[::2] = h
    return buffer[::2]


def masks_with_a_strided_one(params) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zeroed bitmasks, the last one every third word of a buffer (returned, to check the words between)."""
    masks = zokern.new_masks(params[:-1])
    buffer = torch.full((3 * mask_words(params[-1].numel()),), UNTOUCHED_WORD, dtype=torch.int32,
                        device=params[-1].device)
    return masks + [buffer[::3]], buffer


def step(params, masks, thresholds, backend, dist=NORMAL, ids=None, kernel=None, sizes=None):
    """A Sparse MeZO step, yielding (op, stage) after each pass; with `kernel`, its kernels called directly."""
    ids = stream_ids(len(params)) if ids is None else ids
    wds = [0.1 * (k % 3) for k in ids]
    if kernel is None:
        def perturb(scale, compute_mask):
            zokern.masked_perturb_(params, masks, thresholds, SEED, scale, stream_ids=ids, compute_mask=compute_mask,
                                   dist=dist, backend=backend)

        def fused(seed, next_seed):
            zokern.masked_fused_step_(params, masks, thresholds, seed, stream_ids=ids, restore=EPS, lr=LR, grad=GRAD,
                                      weight_decay=wds, next_seed=next_seed, next_scale=EPS, dist=dist,
                                      backend=backend)
    else:
        def perturb(scale, compute_mask):
            kernel.masked_perturb(params, masks, thresholds, ids, SEED, scale, compute_mask, dist, **sizes)

        def fused(seed, next_seed):
            kernel.masked_fused_step(params, masks, thresholds, ids, seed, EPS, LR, GRAD, wds,
                                     -1 if next_seed is None else next_seed, EPS, dist, **sizes)
    perturb(EPS, True)
    yield "masked_perturb_", "+eps, new mask"
    perturb(-2 * EPS, False)
    yield "masked_perturb_", "-2 eps, stored mask"
    fused(SEED, NEXT_SEED)
    yield "masked_fused_step_", "fused step, next mask"
    fused(NEXT_SEED, None)
    yield "masked_fused_step_", "fused step, no next"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case,dist", CASES)
def test_step_matches_reference_bitwise(backend, device, case, dist, monkeypatch, launches):
    params = awkward_params(case, device)
    thresholds = strided_thresholds(params)
    masks, mask_buffer = masks_with_a_strided_one(params)
    outside = margins(params)
    reference_on_backend_z(monkeypatch, backend, device)
    want_params, want_masks = clones(params, "cpu"), clones(masks, "cpu")
    wanted = [(clones(want_params), clones(want_masks))
              for _ in step(want_params, want_masks, thresholds.cpu(), "reference", dist)]
    launches.clear()
    for (op, stage), (want_p, want_m) in zip(step(params, masks, thresholds, backend, dist), wanted):
        assert_launches(launches, backend, op, {"sparse_kernel": dtype_count(params)})
        launches.clear()
        assert_bitwise(masks, want_m, f"{stage}: masks")
        assert_bitwise(params, want_p, stage)
    assert any(m.count_nonzero() for m in masks)
    untouched = torch.ones_like(mask_buffer, dtype=torch.bool)
    untouched[::3] = False
    assert (mask_buffer[untouched] == UNTOUCHED_WORD).all(), "a mask write outside the strided mask's words"
    assert_margins_untouched(params, outside)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_invariant_to_chunking_grouping_and_order(backend, device):
    """Chunks split tensors unevenly; a mask word is never split between two programs or threads."""
    params = awkward_params("mixed", device, seed=1)
    thresholds = zokern.magnitude_thresholds(params, 0.5)
    ids = stream_ids(len(params))
    base, base_masks = clones(params), zokern.new_masks(params)
    for _ in itertools.islice(step(base, base_masks, thresholds, backend), 3):  # up to the next mask
        pass
    kernel = backend_kernels(backend, device)
    for sizes in MASKED_CHUNKINGS[backend]:
        got, got_masks = [p.contiguous() for p in clones(params)], zokern.new_masks(params)
        for _ in itertools.islice(step(got, got_masks, thresholds, backend, kernel=kernel, sizes=sizes), 3):
            pass
        assert_bitwise(got_masks, base_masks, f"chunks {sizes}: masks")
        assert_bitwise(got, base, f"chunks {sizes}")
    got, got_masks = clones(params), zokern.new_masks(params)
    for k in range(len(params)):
        for _ in itertools.islice(step(got[k:k + 1], got_masks[k:k + 1], thresholds[k:k + 1], backend,
                                       ids=ids[k:k + 1]), 3):
            pass
    assert_bitwise(got_masks, base_masks, "one call per tensor: masks")
    assert_bitwise(got, base, "one call per tensor")
    got, got_masks = clones(params), zokern.new_masks(params)
    for _ in itertools.islice(step(got[::-1], got_masks[::-1], thresholds.flip(0), backend, ids=ids[::-1]), 3):
        pass
    assert_bitwise(got_masks, base_masks, "reversed: masks")
    assert_bitwise(got, base, "reversed")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mask_words_past_the_end_are_zero(backend, device):
    p = torch.zeros(33, device=device)  # every element is in the mask (|0| <= 0)
    mask = torch.full((2,), -1, dtype=torch.int32, device=device)
    zokern.masked_perturb_([p], [mask], torch.zeros(1, device=device), SEED, 0.0, stream_ids=[0], compute_mask=True,
                           backend=backend)
    assert mask.tolist() == [-1, 1]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_magnitude_mask_is_the_ops_mask_bitwise(backend, device):
    """magnitude_mask_ (the mask without a perturbation pass: probe mode's) writes the words masked_perturb_ with
    compute_mask writes, whole or a chunk at a time, and leaves the weights as they were: every dtype, the awkward
    layouts, ±0, NaN and values at the threshold (bit 31 set: negative words)."""
    for dtype in DTYPES:
        params = awkward_params(dtype, device)
        params[2].view(-1)[:6] = torch.tensor([0.0, -0.0, float("nan"), 0.5, -0.5, 0.25], dtype=dtype)
        thresholds = zokern.magnitude_thresholds(params, 0.5)
        thresholds[2] = 0.5
        expected = zokern.new_masks(params)
        zokern.masked_perturb_(clones(params), expected, thresholds, SEED, 1.0, stream_ids=stream_ids(len(params)),
                               compute_mask=True, backend=backend)
        assert any(int(m.min()) < 0 for m in expected if m.numel())
        before = clones(params)
        for chunk in (64, 1 << 20):
            got = [torch.full_like(m, -1) for m in expected]
            for m, p, h in zip(got, params, thresholds):
                zokern.magnitude_mask_(m, p, h, chunk=chunk)
            assert_bitwise(got, expected, f"chunk {chunk}")
        assert_bitwise(params, before, "the weights")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", [RADEMACHER, NORMAL], ids=["rademacher", "normal"])
def test_round_trip_at_the_threshold(backend, device, dist):
    """Weights exactly at h = 0.75, one ulp either side, their negatives and 0, in every dtype: +ε (mask from the
    unperturbed weights), −2ε (the stored mask) and the restore (lr = 0) all use that one mask, so every weight
    ends within rounding of its start. A mask re-taken from perturbed weights would leave edge weights displaced by
    ε·z. 70 elements: the edge values land on every bit position and a partial last word, and elements 31 and 63
    are −h and h, so bit 31 is set and the int32 words are negative."""
    h32 = 0.75
    params, in_mask = [], []
    for dtype in DTYPES:
        h = torch.tensor(h32, dtype=dtype)
        up = torch.nextafter(h, torch.tensor(2.0, dtype=dtype))
        down = torch.nextafter(h, torch.tensor(0.0, dtype=dtype))
        x = torch.stack([h, up, down, -h, -up, -down, torch.zeros((), dtype=dtype)]).repeat(10)
        params.append(x.to(device))
        in_mask.append(x.float().abs() <= h32)
    starts = clones(params)
    ids = stream_ids(len(params))
    thresholds = torch.full((len(params),), h32, device=device)
    masks = zokern.new_masks(params)
    zokern.masked_perturb_(params, masks, thresholds, 11, 0.125, stream_ids=ids, compute_mask=True, dist=dist,
                           backend=backend)
    for p, s, m, bits in zip(params, starts, masks, in_mask):
        assert torch.equal(zokern.unpack_mask(m, p).cpu(), bits), "the mask of the unperturbed weights"
        assert int(m[0]) < 0 and int(m[1]) < 0
        if dist == RADEMACHER:  # |z| = 1: every masked weight moves by at least an ulp, no other one moves
            assert (p != s)[bits.to(device)].all() and (p == s)[~bits.to(device)].all()
    zokern.masked_perturb_(params, masks, thresholds, 11, -0.25, stream_ids=ids, compute_mask=False, dist=dist,
                           backend=backend)
    zokern.masked_fused_step_(params, masks, thresholds, 11, stream_ids=ids, restore=0.125, lr=0.0, grad=5.0,
                              dist=dist, backend=backend)
    for p, s, m, bits in zip(params, starts, masks, in_mask):
        # Three roundings of values below 2, each at most half an ulp of 1: far less than the ε·|z| a weight was
        # displaced by.
        err = (p.float() - s.float()).abs().max().item()
        assert err <= 1.5 * torch.finfo(p.dtype).eps, (p.dtype, err)
        assert torch.equal(zokern.unpack_mask(m, p).cpu(), bits), "the fused step without next keeps the mask"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", ["masked_perturb_", "masked_fused_step_"])
def test_opcheck(backend, device, op):
    params = awkward_params("mixed", device)[1:4]
    ids = stream_ids(len(params))
    masks, thresholds = zokern.new_masks(params), zokern.magnitude_thresholds(params, 0.5)
    args = {"masked_perturb_": (params, masks, thresholds, ids, SEED, EPS, True, NORMAL, backend),
            "masked_fused_step_": (params, masks, thresholds, ids, SEED, EPS, LR, GRAD, [0.1, 0.0, 0.2], NEXT_SEED,
                                   EPS, NORMAL, backend)}[op]
    torch.library.opcheck(getattr(torch.ops.zokern, op), args)


META = dict(device="meta")


@pytest.mark.parametrize("op,args", [
    ("masked_fused_step_", ([torch.empty(4, **META)], [torch.zeros(1, dtype=torch.int32, **META)],
                            torch.ones(1, **META), [0], -1, 0.0, 1e-3, 1.0, [0.0], -1, 0.0, 0)),
    ("masked_perturb_", ([torch.empty(4, **META)], [torch.zeros(1, dtype=torch.int32, **META)],
                         torch.ones(1, **META), [0], 1, 1e39, True, 0)),
    ("masked_perturb_", ([torch.empty(40, **META)], [torch.zeros(1, dtype=torch.int32, **META)],
                         torch.ones(1, **META), [0], 1, 0.5, True, 0)),
], ids=["step seed", "perturb scale", "mask words"])
def test_fakes_run_the_same_checks(op, args):
    """Meta tensors (as under tracing) go to the fake implementations: they reject what the device
    implementations reject."""
    with pytest.raises((ValueError, TypeError)):
        getattr(torch.ops.zokern, op)(*args, "")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masks_sharing_memory_are_rejected(backend, device):
    x = torch.randn(16, device=device)
    buffer = torch.zeros(4, dtype=torch.int32, device=device)
    before, mask_before = x.clone(), buffer.clone()
    with pytest.raises(ValueError, match=r"masks\[0\] and masks\[1\] share memory"):
        zokern.masked_perturb_([x[:8], x[8:]], [buffer[0:1], buffer[0:1]], torch.ones(2, device=device), 1, 0.5,
                               stream_ids=[0, 1], compute_mask=True, backend=backend)
    assert torch.equal(x, before) and torch.equal(buffer, mask_before)
