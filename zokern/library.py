"""The zokern custom ops: schemas, fake implementations, device implementations and the one dispatch table.

Each op mutates its tensors in place (alias-annotated `Tensor(a!)`), or returns a new tensor, so it
passes `torch.library.opcheck` and stays opaque under `torch.compile`. The device implementation
checks the arguments, resolves the backend (`""` means automatic) and calls IMPLEMENTATIONS[(op, device
type, backend)]; the fake runs the same checks without touching memory.

The C++ kernels implement `zokern::native_<op>`: the op's schema without `str backend`, plus `int chunk=0`
where the kernel works in chunks (0: its default size), defined here once. The CPU extension registers its
kernels for it under the CPU dispatch key, the CUDA extension under CUDA (csrc/include/zokern/backend_ops.h).
Arguments added to an op after its first release follow `str backend`, with defaults, so that calls written
before them keep their meaning.
"""
from __future__ import annotations

import torch

from zokern import backends
from zokern.backends import reference
from zokern.random import check_seed, check_stream
from zokern.validation import (check_companions, check_disjoint, check_fill_args, check_lowrank, check_per_tensor,
                               check_step_args, check_tensor_list, mask_words, parse_rounding)

DEVICE_TYPES = ("cpu", "cuda")
# The stream index of each tensor's element 0 (docs/RANDOM.md); empty: 0 for every tensor.
_OFFSETS = "int[] offsets=[]"
# How the stored update is rounded to 16-bit storage (validation.Rounding): 0 nearest even, 1 stochastic.
_ROUNDING = "int rounding=0"
# The rounding keys of the ops that had no seed and stream ids: their stream ids (empty: all 0) and seed.
_KEYS = f"int[] streams=[], int seed=0, {_OFFSETS}, {_ROUNDING}"
_STEP = "float restore, float lr, float grad, float[] weight_decays, int next_seed, float next_scale"
SCHEMAS = {
    "philox_words_": "(Tensor(a!) out, int seed, int stream, int domain, int first_call, str backend) -> ()",
    "fill_random_": "(Tensor(a!) out, int seed, int stream, int offset, int domain, int dist, str backend) -> ()",
    "perturb_": f"(Tensor(a!)[] params, int[] streams, int seed, float scale, int dist, str backend, {_OFFSETS}) -> ()",
    "fused_step_": (f"(Tensor(a!)[] params, int[] streams, int seed, {_STEP}, int dist, str backend, {_OFFSETS}, "
                    f"{_ROUNDING}) -> ()"),
    "lowrank_apply_": f"(Tensor(a!)[] weights, Tensor[] us, Tensor[] vs, Tensor[] cores, str backend, {_KEYS}) -> ()",
    "masked_perturb_": ("(Tensor(a!)[] params, Tensor(b!)[] masks, Tensor thresholds, int[] streams, int seed, "
                        f"float scale, bool compute_mask, int dist, str backend, {_OFFSETS}) -> ()"),
    "masked_fused_step_": ("(Tensor(a!)[] params, Tensor(b!)[] masks, Tensor thresholds, int[] streams, int seed, "
                           f"{_STEP}, int dist, str backend, {_OFFSETS}, {_ROUNDING}) -> ()"),
    "hessian_perturb_": ("(Tensor(a!)[] params, Tensor[] hessians, int[] streams, int seed, float scale, int dist, "
                         f"str backend, {_OFFSETS}) -> ()"),
    "hessian_step_": ("(Tensor(a!)[] params, Tensor(b!)[] hessians, int[] streams, int seed, float restore, "
                      "float lr, float grad, float hess_scale, float alpha, float[] weight_decays, int next_seed, "
                      f"float next_scale, int dist, str backend, {_OFFSETS}, {_ROUNDING}) -> ()"),
    "distance_norms": "(Tensor[] params, Tensor[] anchors, str backend) -> Tensor",
    "anchored_rescale_": ("(Tensor(a!)[] params, Tensor[] anchors, Tensor[]? sources, Tensor factors, "
                          f"str backend, {_KEYS}) -> ()"),
}

# These kernels split their work by shape (one draw per element, tiles of W), so they take no chunk size.
_UNCHUNKED = ("philox_words_", "fill_random_", "lowrank_apply_")


def native_schema(name: str) -> str:
    """The schema of zokern::native_<name>, which the C++ kernels implement: the op's without `str backend`,
    plus `int chunk=0` where the kernel splits its tensors into chunks (testable chunk sizes)."""
    schema = SCHEMAS[name].replace(", str backend", "")
    return schema if name in _UNCHUNKED else schema.replace(") ->", ", int chunk=0) ->", 1)


for _name, _schema in SCHEMAS.items():
    torch.library.define(f"zokern::{_name}", _schema)
    torch.library.define(f"zokern::native_{_name}", native_schema(_name))


def _mask_shape(p, m):
    return (mask_words(p.numel()),)


def _hizoo_dtypes(p):
    return (torch.float32, p.dtype)


def _own_dtype(p):
    return (p.dtype,)


# --- one check per op (its arguments but the backend, by name), run by the device implementation and the fake
# alike, before any tensor is written; each returns the tensors' device type. A check reads the arguments the
# schema names, so it restates no signature. ----------------------------------------------------------------

class Arguments(dict):
    """An op call's arguments by schema name (backend excluded, defaults filled in): `a.seed` is `a["seed"]`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _check_step(a, **extra):
    check_step_args(seed=a.seed, dist=a.dist, restore=a.restore, lr=a.lr, grad=a.grad, next_scale=a.next_scale,
                    next_seed=a.next_seed, weight_decays=a.weight_decays, count=len(a.params), **extra)
    parse_rounding(a.rounding)
    return check_tensor_list(a.params, a.streams, a.offsets)


def _check_perturbation(a):
    """The arguments every perturbation shares: seed, dist, scale, and the parameters with their stream ids."""
    check_step_args(seed=a.seed, dist=a.dist, scale=a.scale)
    return check_tensor_list(a.params, a.streams, a.offsets)


def _check_keys(params, a):
    """The rounding keys of lowrank_apply_ and anchored_rescale_: stream ids (or none), seed, offsets."""
    check_seed(a.seed)
    parse_rounding(a.rounding)
    return check_tensor_list(params, a.streams or [0] * len(params), a.offsets)


def _check_sparse_masks(a):
    check_companions(a.params, a.masks, "masks", dtypes=(torch.int32,), shapes=_mask_shape)
    check_per_tensor(a.params, a.thresholds, "thresholds")
    check_disjoint({"params": a.params, "masks": a.masks}, {"thresholds": [a.thresholds]})


def _check_philox_words(a):
    out = a.out
    if not isinstance(out, torch.Tensor) or out.dtype != torch.int64:
        raise TypeError(f"out must be an int64 tensor, got {getattr(out, 'dtype', type(out).__name__)}")
    if out.dim() != 2 or out.shape[1] != 4:
        raise ValueError(f"out must have shape (n, 4), one row of four words per call, got {tuple(out.shape)}")
    check_seed(a.seed)
    check_stream(a.stream)
    check_stream(a.domain, "domain")
    if a.first_call < 0 or a.first_call + out.shape[0] > 1 << 62:
        raise ValueError(f"first_call must be in [0, 2**62 - n], got {a.first_call}")
    check_disjoint({"out": [out]})
    return out.device.type


def _check_fill_random(a):
    check_fill_args(a.out, a.seed, a.stream, a.offset, a.domain, a.dist)
    check_disjoint({"out": [a.out]})
    return a.out.device.type


def _check_perturb(a):
    device_type = _check_perturbation(a)
    check_disjoint({"params": a.params})
    return device_type


def _check_fused_step(a):
    device_type = _check_step(a)
    check_disjoint({"params": a.params})
    return device_type


def _check_lowrank_apply(a):
    device_type = _check_keys(a.weights, a)
    check_lowrank(a.weights, a.us, a.vs, a.cores)
    check_disjoint({"weights": a.weights}, {"us": a.us, "vs": a.vs, "cores": a.cores})
    return device_type


def _check_masked_perturb(a):
    device_type = _check_perturbation(a)
    _check_sparse_masks(a)
    return device_type


def _check_masked_fused_step(a):
    device_type = _check_step(a)
    _check_sparse_masks(a)
    return device_type


def _check_hessian_perturb(a):
    device_type = _check_perturbation(a)
    check_companions(a.params, a.hessians, "hessians", dtypes=_hizoo_dtypes)
    check_disjoint({"params": a.params}, {"hessians": a.hessians}, in_place_reads=("hessians",))
    return device_type


def _check_hessian_step(a):
    device_type = _check_step(a, hess_scale=a.hess_scale, alpha=a.alpha)
    check_companions(a.params, a.hessians, "hessians", dtypes=_hizoo_dtypes)
    check_disjoint({"params": a.params, "hessians": a.hessians})
    return device_type


def _check_distance_norms(a):
    device_type = check_tensor_list(a.params, [0] * len(a.params))
    check_companions(a.params, a.anchors, "anchors", dtypes=_own_dtype)
    return device_type  # writes nothing: its tensors may share memory


def _check_anchored_rescale(a):
    device_type = _check_keys(a.params, a)
    check_companions(a.params, a.anchors, "anchors", dtypes=_own_dtype)
    if a.sources is not None:
        check_companions(a.params, a.sources, "sources", dtypes=_own_dtype)
    check_per_tensor(a.params, a.factors, "factors")
    check_disjoint({"params": a.params}, {"anchors": a.anchors, "sources": a.sources or [], "factors": [a.factors]},
                   in_place_reads=("anchors", "sources"))
    return device_type


CHECKS = {"philox_words_": _check_philox_words, "fill_random_": _check_fill_random, "perturb_": _check_perturb,
          "fused_step_": _check_fused_step, "lowrank_apply_": _check_lowrank_apply,
          "masked_perturb_": _check_masked_perturb, "masked_fused_step_": _check_masked_fused_step,
          "hessian_perturb_": _check_hessian_perturb, "hessian_step_": _check_hessian_step,
          "distance_norms": _check_distance_norms, "anchored_rescale_": _check_anchored_rescale}


# --- the dispatch table: (op, device type, backend) -> a callable with the op's arguments but the backend ------

def _native(name: str):
    return getattr(torch.ops.zokern, f"native_{name}")


IMPLEMENTATIONS = {
    **{(name, device_type, "reference"): getattr(reference, name.rstrip("_"))
       for name in SCHEMAS for device_type in DEVICE_TYPES},
    **{(name, "cpu", "cpp"): _native(name) for name in SCHEMAS},
    **{(name, "cuda", "cuda"): _native(name) for name in SCHEMAS},
}


def implementation(name: str, device_type: str, backend: str):
    """IMPLEMENTATIONS[(name, device_type, backend)]. The Triton launchers join the table when first asked for:
    importing zokern never imports triton, whose interpreter mode must be chosen before it is imported."""
    if backend == "triton" and (name, device_type, backend) not in IMPLEMENTATIONS:
        from zokern.backends import triton

        IMPLEMENTATIONS.update({(op, dt, "triton"): getattr(triton, op.rstrip("_"))
                                for op in SCHEMAS for dt in DEVICE_TYPES})
    return IMPLEMENTATIONS[(name, device_type, backend)]


def _contiguous(arg):
    """A contiguous stand-in for a tensor or each tensor of a list; other arguments as they are."""
    if isinstance(arg, torch.Tensor):
        return arg.contiguous()
    if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
        return [t.contiguous() for t in arg]
    return arg


def _listed(arg) -> list:
    return [arg] if isinstance(arg, torch.Tensor) else list(arg)


def _write_back(originals, work) -> None:
    """Kernels see contiguous stand-ins; the stream is indexed by logical (row-major) position, so a
    contiguous copy of a strided view sees the same z. Copy results back into the views (the op's check has
    made sure each can take it: no element addressed twice)."""
    for t, w in zip(_listed(originals), _listed(work)):
        if w is not t:
            t.copy_(w)


def _arguments(name: str) -> list:
    return torch._C.parse_schema(f"zokern::{name}{SCHEMAS[name]}").arguments


def _without_backend(name: str):
    """Splits a call's arguments into (the backend, Arguments of all others in schema order, defaults filled
    in): torch passes the Python kernels only the arguments the caller gave."""
    arguments = _arguments(name)

    def split(args, kwargs) -> tuple:
        given = dict(zip((a.name for a in arguments), args), **kwargs)
        values = Arguments((a.name, given[a.name] if a.name in given else a.default_value) for a in arguments)
        return values.pop("backend"), values

    return split


def _device_implementation(name: str):
    """The op's check, then its backend's kernel on contiguous stand-ins of every tensor, written back."""
    check, split = CHECKS[name], _without_backend(name)
    arguments = [a for a in _arguments(name) if a.name != "backend"]
    written = [i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write]

    def device_implementation(*args, **kwargs):
        backend, named = split(args, kwargs)
        device_type = check(named)
        kernel = implementation(name, device_type, backends.resolve(backend, device_type))
        args = list(named.values())
        if written and not any(t.numel() for i in written for t in _listed(args[i])):
            return None  # nothing to write: no kernel to launch
        work = [_contiguous(a) for a in args]
        result = kernel(*work)
        for i in written:
            _write_back(args[i], work[i])
        return result

    return device_implementation


for _name in SCHEMAS:
    torch.library.impl(f"zokern::{_name}", DEVICE_TYPES)(_device_implementation(_name))


def call(name: str, *args):
    """torch.ops.zokern.<name>(*args), for the public functions (zokern/ops): the op checks its arguments, once.
    torch's schema cast refuses what it cannot convert (an int beyond int64, a float or a str for an int) before
    the op's check runs, with a message that names nothing: then the op's check says which argument is wrong.
    The cast would also take a bool for a number (True as 1), which is refused here, by the argument's name."""
    for arg_name, value in zip(_NUMBER_ARGUMENTS[name], args):
        if arg_name is not None and isinstance(value, bool):
            raise TypeError(f"{arg_name} must be a number, got bool")
    try:
        return getattr(torch.ops.zokern, name)(*args)
    except RuntimeError:
        CHECKS[name](_without_backend(name)(args, {})[1])
        raise


# Per op, the name of each int or float argument of its schema (None for the others), in order.
_NUMBER_ARGUMENTS = {name: [a.name if str(a.type) in ("int", "float") else None
                            for a in getattr(torch.ops.zokern, name).default._schema.arguments] for name in CHECKS}


# --- fakes: the op's check, and for an op that returns a tensor an output of the right shape -----------------

# The outputs of the ops that return a tensor, from their arguments.
_FAKE_OUTPUTS = {"distance_norms": lambda a: a.params[0].new_empty(len(a.params), dtype=torch.float32)}


def _fake(name: str):
    check, split, output = CHECKS[name], _without_backend(name), _FAKE_OUTPUTS.get(name)

    def fake(*args, **kwargs):
        named = split(args, kwargs)[1]
        check(named)
        return None if output is None else output(named)
    return fake


for _name in CHECKS:
    torch.library.register_fake(f"zokern::{_name}")(_fake(_name))
