"""Property test of the op checks: for random tensor lists (dtypes, devices, strided and overlapping views,
expands, empty shapes) and random scalars (nan, inf, 1e39, huge ints, bad seeds), each op either succeeds
and matches the reference backend, or raises a ValueError/TypeError and leaves every tensor bitwise as it
was. Tensors are built twice from one recipe (views of shared buffers included), once for the backend
under test and once for the reference, so both see the same memory layout."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import zokern
from conftest import available_pairs

CPU_BACKENDS = [p for p in available_pairs() if p.values[1] == "cpu"]
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
OTHER_DTYPES = [torch.int32, torch.int64, torch.complex64, torch.float64]
SHAPES = [(0,), (1,), (3,), (8,), (2, 3), (4, 4), (3, 0)]
BUFFER = 24
# Views of a buffer of BUFFER elements: some overlap ([0:6] and [2:8]), some interleave without
# overlapping ([::2] and [1::2]), some are strided 2-D.
VIEWS = {"head": lambda x: x[0:6], "shifted": lambda x: x[2:8], "even": lambda x: x[::2], "odd": lambda x: x[1::2],
         "block": lambda x: x[8:20].view(3, 4), "block_t": lambda x: x[8:20].view(3, 4).t(),
         "tail": lambda x: x[20:24], "whole": lambda x: x, "empty": lambda x: x[5:5]}


def mostly(good, bad, one_in: int):
    """`bad` in about one example of `one_in`, else `good`: most calls stay valid, so that both outcomes
    (rejected unchanged, accepted and equal to the reference) are exercised."""
    return st.integers(0, one_in - 1).flatmap(lambda k: bad if k == one_in // 2 else good)  # not 0, a favourite


NICE = [0.0, 1e-3, -0.5, 1.0, 2.0]
HOSTILE = [math.nan, math.inf, -math.inf, 1e39, -1e39, 1e38, 3.5e38, 10**400, 2**70]
scalars = mostly(st.sampled_from(NICE) | st.floats(-10, 10), st.sampled_from(HOSTILE), 12)
seeds = mostly(st.integers(0, 2**63 - 1), st.sampled_from([-1, 2**63, 2**64]), 12)
streams = mostly(st.integers(0, 1000), st.sampled_from([-1, 2**32, 2**40]), 20)
dists = mostly(st.sampled_from(["normal", "rademacher"]), st.just("cauchy"), 20)


# --- recipes: what to allocate and which views to take, built the same way twice -------------------------

@st.composite
def tensor_recipe(draw, dtypes=FLOATS):
    """('buffer', buffer index, view), ('fresh', dtype, shape) or ('expand', dtype)."""
    kind = draw(st.sampled_from(["buffer"] * 3 + ["fresh"] * 6 + ["expand"]))
    if kind == "buffer":
        return ("buffer", draw(st.integers(0, 1)), draw(st.sampled_from(sorted(VIEWS))))
    dtype = draw(mostly(st.sampled_from(dtypes), st.sampled_from(OTHER_DTYPES), 12))
    return ("fresh", dtype, draw(st.sampled_from(SHAPES))) if kind == "fresh" else ("expand", dtype)


@st.composite
def case(draw, companions=(), masks=False, per_tensor=(), lowrank=False):
    """A call's recipe: buffers, params, companion lists ('like' params: same shape, or anything), masks,
    per-tensor vectors, and the device."""
    count = draw(st.integers(1, 3))
    recipe = {"device": draw(st.sampled_from(["cpu"] * 7 + ["meta"])), "data": draw(st.integers(0, 2**31)),
              "buffers": [draw(st.sampled_from(FLOATS)) for _ in range(2)],
              "odd_device": draw(st.integers(0, 19)) == 0}
    if lowrank:
        recipe["params"] = [draw(st.one_of(st.just(("fresh", torch.float32, (4, 4))),
                                           st.sampled_from([("buffer", 0, "block"), ("buffer", 0, "block_t"),
                                                            ("buffer", 1, "block")]),
                                           tensor_recipe()))
                            for _ in range(count)]
        recipe["rank"] = draw(st.integers(1, 2))
        recipe["transposed"] = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    else:
        recipe["params"] = [draw(tensor_recipe()) for _ in range(count)]
    for name in companions:
        recipe[name] = [draw(mostly(st.sampled_from(["like"] * 6 + ["same", "expand_like"]), tensor_recipe(), 8))
                        for _ in range(count)]
    if masks:
        recipe["masks"] = [draw(st.sampled_from(["fresh"] * 4 + ["shared0", "shared1", "strided"]))
                           for _ in range(count)]
    for name in per_tensor:
        recipe[name] = draw(st.sampled_from(["plain"] * 6 + ["strided"] * 2 + ["expanded", "short", "float64"]))
    return recipe


class Built:
    """Tensors built from a recipe; `roots` are the allocations, whose bytes tell whether anything changed."""

    def __init__(self, recipe):
        self.device = recipe["device"]
        self.gen = torch.Generator().manual_seed(recipe["data"])
        self.roots = []
        self.buffers = [self.alloc((BUFFER,), dtype) for dtype in recipe["buffers"]]
        self.params = [self.tensor(r) for r in recipe["params"]]
        if recipe["odd_device"]:
            self.params[-1] = self.alloc((3,), torch.float32, device="meta" if self.device == "cpu" else "cpu")
        self.companions = {}
        for name in ("anchors", "sources", "hessians"):
            if name in recipe:
                self.companions[name] = [self.companion(r, p, positive=name == "hessians")
                                         for r, p in zip(recipe[name], self.params)]
        if "masks" in recipe:
            words = [(p.numel() + 31) // 32 for p in self.params]
            shared = self.alloc((64,), torch.int32)
            self.masks = [{"fresh": lambda n: self.alloc((n,), torch.int32), "shared0": lambda n: shared[0:n],
                           "shared1": lambda n: shared[1:1 + n], "strided": lambda n: shared[32::3][:n]}[r](n)
                          for r, n in zip(recipe["masks"], words)]
        for name in ("thresholds", "factors"):
            if name in recipe:
                setattr(self, name, self.per_tensor(recipe[name], len(self.params)))
        if "rank" in recipe:
            self.lowrank(recipe["rank"], recipe["transposed"])

    def alloc(self, shape, dtype, device=None):
        device = device or self.device
        if dtype.is_complex:
            t = torch.randn(shape, generator=self.gen, dtype=torch.complex64)
        elif dtype.is_floating_point:
            t = torch.randn(shape, generator=self.gen).to(dtype)
        else:
            t = torch.randint(-50, 50, shape, generator=self.gen).to(dtype)
        t = t.to(device) if device != "meta" else torch.empty(shape, dtype=dtype, device="meta")
        self.roots.append(t)
        return t

    def tensor(self, r):
        if r[0] == "buffer":
            return VIEWS[r[2]](self.buffers[r[1]])
        if r[0] == "fresh":
            return self.alloc(r[2], r[1])
        return self.alloc((3,), r[1]).expand(2, 3)

    def companion(self, r, p, positive):
        if r == "same":
            return p
        if r in ("like", "expand_like"):
            dtype = p.dtype if p.dtype in FLOATS else torch.float32
            t = self.alloc(p.shape if r == "like" else (1,) * p.dim(), dtype)
            if positive and self.device != "meta":
                t.abs_().add_(0.5)
            return t if r == "like" else t.expand(p.shape)
        return self.tensor(r)

    def per_tensor(self, r, n):
        if r == "strided":
            return self.alloc((2 * n,), torch.float32)[::2]
        if r == "expanded":
            return self.alloc((1,), torch.float32).expand(n)
        return self.alloc((n - (r == "short"),), torch.float64 if r == "float64" else torch.float32)

    def lowrank(self, rank, transposed):
        self.us, self.vs, self.cores = [], [], []
        for w in self.params:
            m, n = (w.shape[0], w.shape[1]) if w.dim() == 2 else (w.numel(), 1)
            u, v, c = (self.alloc((rank, rows), torch.float32).t() if flip else self.alloc((rows, rank), torch.float32)
                       for rows, flip in zip((m, n, rank), transposed))
            self.us.append(u)
            self.vs.append(v)
            self.cores.append(c)

    def snapshot(self):
        return [root.clone() for root in self.roots]


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def run_case(recipe, call, backend, scalars_in_play=(), result=False):
    """Run call(built, backend); on an error every root is bitwise unchanged, on success the roots (and the
    result) match the reference backend's within a tolerance scaled by the scalars' size."""
    built = Built(recipe)
    before = built.snapshot()
    try:
        out = call(built, backend)
    except (ValueError, TypeError) as error:
        assert str(error), "an error must say what is wrong"
        for root, old in zip(built.roots, before):
            if root.device.type != "meta":
                assert torch.equal(_bits(root), _bits(old)), f"{error!r} left a tensor modified"
        event(f"rejected: {type(error).__name__}: {str(error)[:40]}")
        return
    if built.device == "meta" or recipe["odd_device"]:
        event("accepted on meta")
        return
    expected = Built(recipe)
    want = call(expected, "reference")
    size = 1.0 + sum(abs(float(s)) for s in scalars_in_play)
    for got, ref in zip(built.roots + ([out] if result else []), expected.roots + ([want] if result else [])):
        if got.dtype.is_floating_point:
            rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(got.dtype, 1e-5)
            torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=rtol * 10 * size * size,
                                       equal_nan=True)
        else:
            assert torch.equal(got, ref)
    event("accepted, matches the reference")


# --- one property per op ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(), seed=seeds, scale=scalars, ids=st.lists(streams, min_size=3, max_size=3), dist=dists)
def test_perturb(backend, device, recipe, seed, scale, ids, dist):
    run_case(recipe, lambda b, name: zokern.perturb_(b.params, seed, scale, stream_ids=ids[:len(b.params)],
                                                      dist=dist, backend=name), backend, [scale])


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(), seed=seeds, values=st.lists(scalars, min_size=5, max_size=5), next_seed=st.none() | seeds,
       ids=st.lists(streams, min_size=3, max_size=3), dist=dists)
def test_fused_step(backend, device, recipe, seed, values, next_seed, ids, dist):
    restore, lr, grad, wd, next_scale = values
    run_case(recipe, lambda b, name: zokern.fused_step_(
        b.params, seed, stream_ids=ids[:len(b.params)], restore=restore, lr=lr, grad=grad, weight_decay=wd,
        next_seed=next_seed, next_scale=next_scale, dist=dist, backend=name), backend, values)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(masks=True, per_tensor=["thresholds"]), seed=seeds, scale=scalars,
       compute_mask=st.booleans(), ids=st.lists(streams, min_size=3, max_size=3), dist=dists)
def test_masked_perturb(backend, device, recipe, seed, scale, compute_mask, ids, dist):
    run_case(recipe, lambda b, name: zokern.masked_perturb_(
        b.params, b.masks, b.thresholds, seed, scale, stream_ids=ids[:len(b.params)], compute_mask=compute_mask,
        dist=dist, backend=name), backend, [scale])


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(masks=True, per_tensor=["thresholds"]), seed=seeds, values=st.lists(scalars, min_size=5,
                                                                                        max_size=5),
       next_seed=st.none() | seeds, ids=st.lists(streams, min_size=3, max_size=3), dist=dists)
def test_masked_fused_step(backend, device, recipe, seed, values, next_seed, ids, dist):
    restore, lr, grad, wd, next_scale = values
    run_case(recipe, lambda b, name: zokern.masked_fused_step_(
        b.params, b.masks, b.thresholds, seed, stream_ids=ids[:len(b.params)], restore=restore, lr=lr, grad=grad,
        weight_decay=wd, next_seed=next_seed, next_scale=next_scale, dist=dist, backend=name), backend, values)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(companions=["hessians"]), seed=seeds, scale=scalars,
       ids=st.lists(streams, min_size=3, max_size=3), dist=dists)
def test_hessian_perturb(backend, device, recipe, seed, scale, ids, dist):
    run_case(recipe, lambda b, name: zokern.hessian_perturb_(
        b.params, b.companions["hessians"], seed, scale, stream_ids=ids[:len(b.params)], dist=dist, backend=name),
        backend, [scale])


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(companions=["hessians"]), seed=seeds, values=st.lists(scalars, min_size=5, max_size=5),
       hess=st.tuples(st.sampled_from([0.5, 1.0, 2.0]) | scalars, st.sampled_from([0.0, 0.1, 0.5]) | scalars),
       next_seed=st.none() | seeds, ids=st.lists(streams, min_size=3, max_size=3), dist=dists)
def test_hessian_step(backend, device, recipe, seed, values, hess, next_seed, ids, dist):
    restore, lr, grad, wd, next_scale = values
    run_case(recipe, lambda b, name: zokern.hessian_step_(
        b.params, b.companions["hessians"], seed, stream_ids=ids[:len(b.params)], restore=restore, lr=lr,
        grad=grad, hess_scale=hess[0], alpha=hess[1], weight_decay=wd, next_seed=next_seed, next_scale=next_scale,
        dist=dist, backend=name), backend, [*values, *hess])


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(companions=["anchors"]))
def test_distance_norms(backend, device, recipe):
    run_case(recipe, lambda b, name: zokern.distance_norms(b.params, b.companions["anchors"], backend=name),
             backend, result=True)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(companions=["anchors", "sources"], per_tensor=["factors"]), with_sources=st.booleans())
def test_anchored_rescale(backend, device, recipe, with_sources):
    run_case(recipe, lambda b, name: zokern.anchored_rescale_(
        b.params, b.companions["anchors"], b.factors, sources=b.companions["sources"] if with_sources else None,
        backend=name), backend)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@SETTINGS
@given(recipe=case(lowrank=True))
def test_lowrank_apply(backend, device, recipe):
    run_case(recipe, lambda b, name: zokern.lowrank_apply_(b.params, b.us, b.vs, b.cores, backend=name), backend)


@pytest.mark.parametrize("call,name", [
    (lambda p: zokern.ops.perturb_(p, True, 1.0, stream_ids=[0]), "seed"),
    (lambda p: zokern.ops.perturb_(p, 1, True, stream_ids=[0]), "scale"),
    (lambda p: zokern.ops.fused_step_(p, 1, stream_ids=[0], restore=1.0, lr=True, grad=0.5), "lr"),
])
def test_a_bool_for_a_number_is_refused_by_name(call, name):
    """torch's schema cast would take True as 1: the public functions refuse it, naming the argument, and the
    tensors stay as they were."""
    p = [torch.ones(8)]
    with pytest.raises(TypeError, match=f"{name} must be a number, got bool"):
        call(p)
    assert torch.equal(p[0], torch.ones(8))
