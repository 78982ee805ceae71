"""The registered custom ops: torch.compile, the dispatch table, and rejection of bad input with nothing modified
(opcheck runs per op family in tests/ops/)."""
import math

import pytest
import torch

import zokern
from conftest import available_pairs

PAIRS = available_pairs()


def test_compile_fullgraph():
    """A ZO step written with the ops compiles into one graph and matches eager."""
    def step(params, grad):
        zokern.fused_step_(params, 1, stream_ids=[0, 1], restore=1e-3, lr=1e-2, grad=grad, next_seed=2,
                           next_scale=1e-3)
        return params[0].sum() + params[1].sum()

    eager = [torch.randn(8, 4), torch.randn(3)]
    compiled_params = [p.clone() for p in eager]
    expected = step(eager, 0.5)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_params, 0.5)
    torch.testing.assert_close(got, expected)
    for a, b in zip(compiled_params, eager):
        assert torch.equal(a, b)


BAD_CALLS = [
    ("integer tensor", lambda ps: zokern.perturb_(ps + [torch.arange(4)], 1, 1.0, stream_ids=[0, 1, 2]),
     TypeError, "dtype torch.int64"),
    ("complex tensor", lambda ps: zokern.perturb_(ps + [torch.randn(4, dtype=torch.complex64)], 1, 1.0,
                                                  stream_ids=[0, 1, 2]), TypeError, "complex64"),
    ("other device", lambda ps: zokern.perturb_(ps + [torch.empty(4, device="meta")], 1, 1.0, stream_ids=[0, 1, 2]),
     ValueError, "one device"),
    ("non-tensor", lambda ps: zokern.perturb_(ps + [3.0], 1, 1.0, stream_ids=[0, 1, 2]), TypeError, "params[2]"),
    ("nan scale", lambda ps: zokern.perturb_(ps, 1, math.nan, stream_ids=[0, 1]), ValueError, "scale must be finite"),
    ("inf grad", lambda ps: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=1e-3, lr=1e-3, grad=math.inf),
     ValueError, "grad must be finite"),
    ("nan weight decay", lambda ps: zokern.fused_step_(ps, 1, stream_ids=[0, 1], restore=1e-3, lr=1e-3, grad=1.0,
                                                       weight_decay=[0.0, math.nan]), ValueError, "weight_decay"),
    ("stream count", lambda ps: zokern.perturb_(ps, 1, 1.0, stream_ids=[0]), ValueError, "stream ids"),
    ("stream range", lambda ps: zokern.perturb_(ps, 1, 1.0, stream_ids=[0, 1 << 32]), ValueError, "stream_ids[1]"),
    ("negative seed", lambda ps: zokern.perturb_(ps, -1, 1.0, stream_ids=[0, 1]), ValueError, "seed"),
    ("same tensor twice", lambda ps: zokern.perturb_([ps[0], ps[0]], 1, 1.0, stream_ids=[0, 1]), ValueError,
     "share memory"),
    ("unknown backend", lambda ps: zokern.perturb_(ps, 1, 1.0, stream_ids=[0, 1], backend="npu"), ValueError,
     "unknown backend"),
    ("backend for other device", lambda ps: zokern.perturb_(ps, 1, 1.0, stream_ids=[0, 1], backend="cuda"),
     RuntimeError, "not available on cpu"),
    ("unknown distribution", lambda ps: zokern.perturb_(ps, 1, 1.0, stream_ids=[0, 1], dist="cauchy"),
     ValueError, "distribution"),
    ("fill into bf16", lambda ps: zokern.fill_random_(torch.empty(3, dtype=torch.bfloat16), 1, 0), TypeError,
     "float32"),
]


@pytest.mark.parametrize("what,call,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_and_nothing_changes(what, call, error, message):
    params = [torch.randn(5, 3), torch.randn(7).to(torch.bfloat16)]
    before = [p.clone() for p in params]
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(params)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_empty_list_is_a_no_op():
    zokern.perturb_([], 1, 1.0, stream_ids=[])
    zokern.fused_step_([], 1, stream_ids=[], restore=1.0, lr=1.0, grad=1.0)


def test_requires_grad_leaf_parameters_are_updated():
    layer = torch.nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    zokern.perturb_(list(layer.parameters()), 1, 0.1, stream_ids=[0, 1])
    assert not torch.equal(layer.weight.detach(), before) and layer.weight.requires_grad


def test_required_backends_available():
    """CI names the backends that must work on its machine, so a broken build fails instead of skipping."""
    import os

    from zokern import backends

    for name in filter(None, os.environ.get("ZOKERN_REQUIRE_BACKENDS", "").split(",")):
        ok, why = backends.availability(name, "cpu")
        assert ok, f"backend {name} must be available in this run: {why}"


def test_dispatch_table_has_every_op_on_every_device_and_backend():
    from zokern import backends, library

    for device_type, names in backends.SUPPORTED.items():
        for name in names:
            if not backends.availability(name, device_type)[0]:
                continue  # an unavailable backend is reported with its reason, never served
            for op in library.SCHEMAS:
                assert callable(library.implementation(op, device_type, name)), (op, device_type, name)


def test_native_ops_are_the_public_ops_without_backend():
    """One schema per op: the C++ kernels' op is derived from it, not written again."""
    from zokern import library

    for op, schema in library.SCHEMAS.items():
        native = str(getattr(torch.ops.zokern, f"native_{op}").default._schema)
        public = str(getattr(torch.ops.zokern, op).default._schema)
        assert native.replace(f"zokern::native_{op}", "").replace(", int chunk=0)", ")") == \
            public.replace(f"zokern::{op}", "").replace(", str backend)", ")"), op


def test_cpp_kernels_register_under_the_cpu_key_of_the_native_ops():
    from zokern import backends, library

    ok, why = backends.availability("cpp", "cpu")
    if not ok:
        pytest.skip(f"cpp backend unavailable: {why}")
    for op in library.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"zokern::native_{op}", "CPU"), op


@pytest.mark.parametrize("backend,device", PAIRS)
def test_one_table_call_per_op(backend, device, launches):
    params = [torch.randn(6, 5, device=device), torch.randn(11, device=device, dtype=torch.bfloat16)]
    zokern.fused_step_(params, 7, stream_ids=[1, 2], restore=1e-3, lr=1e-2, grad=2.0, backend=backend)
    zokern.perturb_([torch.empty(0, device=device)], 7, 0.5, stream_ids=[0], backend=backend)  # nothing to write
    assert launches.calls == {(backend, "fused_step_"): 1}


@pytest.mark.parametrize("out,error,match", [
    (torch.zeros(3, 4, dtype=torch.int32), TypeError, "int64"),
    (torch.zeros(3, 5, dtype=torch.int64), ValueError, r"shape \(n, 4\)"),
    (torch.zeros(12, dtype=torch.int64), ValueError, r"shape \(n, 4\)"),
])
def test_philox_words_rejects_bad_out_untouched(out, error, match):
    before = out.clone()
    with pytest.raises(error, match=match):
        torch.ops.zokern.philox_words_(out, 1, 2, 3, 0, "")
    assert torch.equal(out, before)


@pytest.mark.parametrize("args,match", [((-1, 2, 3, 0), "seed"), ((1, 1 << 32, 3, 0), "stream"),
                                        ((1, 2, -3, 0), "domain"), ((1, 2, 3, -1), "first_call"),
                                        ((1, 2, 3, (1 << 62) - 1), "first_call")])
def test_philox_words_rejects_bad_arguments_untouched(args, match):
    out = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        torch.ops.zokern.philox_words_(out, *args, "")
    assert not out.any()
