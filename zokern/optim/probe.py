"""Probe mode: the forward passes of a ZO step see θ ± εP(seed), but the stored trained tensors are never
written by them; only the update writes them (docs/OPTIMIZERS.md, "Probe mode").

`ModuleProbes` hooks the modules that hold an optimizer's trained tensors. While a probe is active, a module's
forward pre-hook swaps each trained tensor it holds for a transient copy the optimizer makes (`_probe`: the
method's own perturb op applied to a clone, so the same z as the in-place path), and its forward hook puts the
stored tensor back and drops the copy: one module's copies live at a time. An `nn.Embedding` gets only the rows
its input looks up (the stream is counter-based: element i of a tensor has a fixed z), and its input is
remapped onto them.

A trained tensor sharded by FSDP2 (`fully_shard`) is probed before its all-gather instead: a forward pre-hook on
the FSDP module, run ahead of FSDP's own, makes the probe copy of this rank's shard (z at the shard's global
element indices) and points the parameter's all-gather input at it; FSDP gathers the probe, the module computes
with it, FSDP frees it after the forward, and the post hook points the all-gather back at the stored shard.
Each rank perturbs only its 1/N of the tensor, with its own shard of the method's buffers (docs/DISTRIBUTED.md).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from zokern import ops
from zokern.distributed import DistributedError

# (bucket, index in the bucket, rows or None) -> the transient tensor a module computes with, or None to leave
# the stored tensor in place.
ProbeFn = Callable[[object, int, "torch.Tensor | None"], "torch.Tensor | None"]


def eager(hook):
    """`hook`, not traced by torch.compile: the hooks swap module attributes and call the ops eagerly, so a compiled
    model's graph breaks at each hooked module (docs/OPTIMIZERS.md). Applied when hooks are registered, not at
    import: torch.compiler.disable loads torch._dynamo, which `import zokern` must not pay for."""
    return torch.compiler.disable(hook)


def stream_copy(p: torch.Tensor, seed: int, stream: int, scale: float, rows: "torch.Tensor | None", *, dist,
                backend, offsets: "list[int] | None" = None) -> torch.Tensor:
    """θ + scale·z as a new tensor (or its `rows`), z the tensor's stream (at `offsets`, a shard's global start):
    `probe_copy` with the perturb op."""
    return probe_copy(p, rows, lambda copies, offsets: ops.perturb_(
        copies, seed, scale, stream_ids=[stream] * len(copies), offsets=offsets, dist=dist, backend=backend), offsets)


# Each piece of a perturb call costs a fixed host overhead (argument checks, its row in the kernel's table). On an
# H200 that is about 28 µs a piece (inferred from probe mode's step time with 4096 scattered token ids: about 110 ms
# a forward), while perturbing an element costs about 5 ps: runs of looked-up rows with at most this many elements
# between them are perturbed as one span, the rows between them included, and the rows are picked from it. On this
# project's CPU a piece costs about 9 µs and an element about 2 ns: merging runs 4096 elements apart sped up narrow
# tables and slowed wide ones (4096 ids over 128256 bf16 rows: 64 wide 34 → 13–17 ms, 2048 wide 47 → 50–63 ms,
# picking the rows out costing more than the pieces saved), so the CPU keeps exact runs.
SPAN_GAP_ELEMENTS = {"cpu": 0}
DEVICE_SPAN_GAP_ELEMENTS = 1 << 20  # any other device


def probe_copy(p: torch.Tensor, rows: "torch.Tensor | None", perturb: Callable,
               offsets: "list[int] | None" = None) -> torch.Tensor:
    """A probe of p as a new tensor: `perturb(copies, offsets)` is the method's perturb op, applied in place to a
    copy of p (at `offsets`: a shard's global start, or None) or to copies of pieces of it (each at the element
    offset of its first element in p).

    With `rows` (sorted, unique; p a whole row-major table, not a shard), only those rows: spans of consecutive
    table rows that cover them (runs of rows, merged where at most SPAN_GAP_ELEMENTS elements lie between them) are
    copied and perturbed in one call, each at offset first row·row length, and the rows are picked from them.
    Element i of the table draws from stream element i whatever the piece (docs/OPS.md, "Element offsets"), so the
    rows are bitwise those of the full tensor's probe."""
    if rows is None:
        copy = p.detach().clone(memory_format=torch.contiguous_format)
        perturb([copy], offsets)
        return copy
    if len(rows) == 0:
        return p.detach()[rows]
    row_len = p[0].numel()
    gap_rows = SPAN_GAP_ELEMENTS.get(p.device.type, DEVICE_SPAN_GAP_ELEMENTS) // max(row_len, 1)
    # The spans are worked out on the host: a few thousand ids, as the hook's own checks of them already wait.
    host = rows.cpu()
    first = torch.ones(len(host), dtype=torch.bool)  # a row that starts a span
    first[1:] = host[1:] - host[:-1] > gap_rows + 1
    last = torch.roll(first, -1)  # a row that ends one
    starts = host[first]
    lengths = host[last] - starts + 1
    at = torch.cumsum(lengths, 0) - lengths  # each span's first row in the copy
    # The copy's rows, span by span: table row = position − (span's place in the copy − its first table row).
    table_rows = torch.arange(int(lengths.sum())) - torch.repeat_interleave(at - starts, lengths)
    copy = p.detach()[table_rows.to(p.device)]
    perturb(list(copy.view(len(table_rows), row_len).split(lengths.tolist())), (starts * row_len).tolist())
    if len(table_rows) == len(host):
        return copy
    span = torch.cumsum(first, 0) - 1  # each row's span
    return copy[(host - starts[span] + at[span]).to(p.device)]


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


class ModuleProbes:
    """The hooks of probe mode on `model` for `optimizer` (a ZOOptimizer), installed at construction.

    Checked before any tensor is touched: every tensor the optimizer trains must be a parameter held by a
    module of `model` that has a forward; an `nn.Embedding` with `max_norm` (its forward rewrites the table)
    is refused. After each probed forward, `check_seen` names a trained tensor whose modules did not run."""

    def __init__(self, optimizer, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"probe mode needs the model (an nn.Module), got {type(model).__name__}")
        self.active: "ProbeFn | None" = None
        owner = {id(p): (b, i) for b in optimizer.buckets for i, p in enumerate(b.given)}
        names = {id(p): name for name, p in model.named_parameters()}  # a tied tensor by its first name
        # FSDP2 groups holding trained tensors: probed through their all-gathers, not their modules' attributes.
        self.gathered, self.fsdp_roots = fsdp_groups(model, owner)
        gathered = {id(b.given[i]) for _, _, entries in self.gathered for _, (b, i) in entries}
        held = set(gathered)
        self.holders: dict[nn.Module, list[tuple[str, tuple]]] = {}
        for module_name, module in model.named_modules(remove_duplicate=True):
            entries = [(attr, owner[id(p)]) for attr, p in module._parameters.items()
                       if p is not None and id(p) in owner and id(p) not in gathered]
            if not entries:
                continue
            label = module_name or type(model).__name__
            if not _has_forward(module):
                raise ValueError(f"probe mode: trained tensor {module_name}.{entries[0][0]} is held by "
                                 f"{type(module).__name__} {label!r}, which has no forward of its own, so no "
                                 "module's forward would see its probe; train it with the in-place path "
                                 "(construct the optimizer from parameters, not the model)")
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                raise ValueError(f"probe mode: embedding {label!r} has max_norm, whose forward renormalises the "
                                 "stored table in place")
            self.holders[module] = entries
            held.update(id(b.given[i]) for _, (b, i) in entries)
        missing = [(b, i) for b in optimizer.buckets for i, p in enumerate(b.given) if id(p) not in held]
        if missing:
            b, i = missing[0]
            label = b.names[i] or f"#{b.stream_ids[i]}"
            raise ValueError(f"probe mode: the optimizer trains {len(missing)} tensor(s) that are not parameters of "
                             f"the given model (first: {label!r}, shape {tuple(b.params[i].shape)}); attach the model "
                             "whose parameters the optimizer was built from")
        self.names = {(id(b), i): names.get(id(b.given[i])) or b.names[i] or f"#{b.stream_ids[i]}"
                      for b in optimizer.buckets for i in range(len(b.params))}
        self._stack: dict[nn.Module, list] = {}
        self._swaps: dict[object, list] = {}  # per FSDP group: frames of (FSDPParam, its stored all-gather input)
        self._seen: set = set()
        self._handles = []
        for module in self.holders:
            self._handles.append(module.register_forward_pre_hook(eager(self._pre), with_kwargs=True))
            self._handles.append(module.register_forward_hook(eager(self._post), always_call=True))
        for module, group, entries in self.gathered:
            # prepend: before FSDP's pre-forward, which all-gathers.
            self._handles.append(module.register_forward_pre_hook(
                eager(functools.partial(self._gather_pre, group, entries)), prepend=True))
            self._handles.append(module.register_forward_hook(
                eager(functools.partial(self._gather_post, group)), always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def probing(self, fn: "ProbeFn | None"):
        """Context: modules compute with `fn`'s copies inside the block."""
        return _Probing(self, fn)

    def check_seen(self, trained: list) -> None:
        """Every (bucket, index) in `trained` had a module run with its probe since `probing` began."""
        unseen = [key for key in trained if (id(key[0]), key[1]) not in self._seen]
        if unseen:
            b, i = unseen[0]
            raise ValueError(f"probe mode: trained tensor {self.names[(id(b), i)]!r} was used by no module during the "
                             f"forward ({len(unseen)} such tensor(s)): its modules never ran, or the model reads it "
                             "outside its module's forward, where probes cannot reach it; the weights are unchanged")

    # --- the hooks ----------------------------------------------------------------------------------------

    def _pre(self, module, args, kwargs):
        # A frame per call, pushed first: the always-called forward hook pops it even if this hook raises.
        stack = self._stack.setdefault(module, [])
        stack.append(None)
        fn = self.active
        if fn is None:
            return None
        rows = inverse = None
        if isinstance(module, nn.Embedding):
            ids = args[0] if args else kwargs["input"]
            rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            if len(rows) and (rows[0] < 0 or rows[-1] >= module.num_embeddings):  # as F.embedding would
                raise IndexError(f"index out of range in self: token ids in [{int(rows[0])}, {int(rows[-1])}], the "
                                 f"embedding has {module.num_embeddings} rows")
        saved = []
        try:
            for attr, (b, i) in self.holders[module]:
                probe = fn(b, i, rows if attr == "weight" else None)
                self._seen.add((id(b), i))
                if probe is not None:
                    saved.append((attr, module._parameters[attr]))
                    module._parameters[attr] = probe
        except BaseException:
            _put_back(module, (saved, None))
            raise
        padding = None
        if rows is not None and any(attr == "weight" for attr, _ in saved):
            # The table is now the looked-up rows; padding_idx only marks a row for backward, which a ZO step has
            # none of, and would be out of range of the smaller table.
            padding, module.padding_idx = module.padding_idx, None
            args, kwargs = ((inverse, *args[1:]), kwargs) if args else (args, {**kwargs, "input": inverse})
            stack[-1] = (saved, padding)
        else:
            stack[-1] = (saved, None)
        return args, kwargs

    def _post(self, module, args, output):
        stack = self._stack.get(module)
        if stack:
            frame = stack.pop()
            if frame is not None:
                _put_back(module, frame)
        return None

    def _gather_pre(self, group, entries, module, args):
        # As in _pre: a frame per call, pushed first, popped by the always-called post hook.
        stack = self._swaps.setdefault(group, [])
        stack.append([])
        fn = self.active
        if fn is None:
            return None
        if not group.is_sharded or group._all_gather_result is not None:
            raise DistributedError(f"probe mode: FSDP2 module {type(module).__name__} was gathered before its forward "
                                   "(an explicit unshard() or forward prefetch), so its probe cannot reach the "
                                   "all-gather; the weights are unchanged")
        for fsdp_param, (b, i) in entries:
            probe = fn(b, i, None)
            self._seen.add((id(b), i))
            if probe is not None:
                # The all-gather input is the padded shard: the probe fills its first elements, the padding stays.
                stored = fsdp_param._sharded_param_data
                scratch = stored.clone()
                scratch[:probe.numel()].copy_(probe.view(-1))
                stack[-1].append((fsdp_param, stored))
                fsdp_param._sharded_param_data = scratch
        return None

    def _gather_post(self, group, module, args, output):
        stack = self._swaps.get(group)
        if stack:
            _gather_from_stored(stack.pop())
        return None


def _gather_from_stored(frame) -> None:
    for fsdp_param, stored in reversed(frame):
        fsdp_param._sharded_param_data = stored


def fsdp_groups(model: nn.Module, owner: dict) -> "tuple[list, list]":
    """([(module, FSDP parameter group, [(FSDPParam, (bucket, index))])] for the groups of `model` that hold
    trained tensors (`owner`: id of a given parameter → its place), [the outermost FSDP modules]). Checked before
    anything changes: probes reach a group's all-gather only if it gathers before every forward from the stored
    shards. Then each group is lazily initialised, as FSDP's own `unshard()` does, so that its first forward does not
    re-pad a shard while the probe stands in for it."""
    if not any(type(b.given[i]).__name__ == "DTensor" for b, i in owner.values()):
        return [], []
    from torch.distributed.fsdp import FSDPModule

    sharded = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    roots = [m for name, m in sharded
             if not any(other != name and (other == "" or name.startswith(other + ".")) for other, _ in sharded)]
    found = []
    for name, module in sharded:
        state = module._get_fsdp_state()
        label = name or type(module).__name__
        for group in state._fsdp_param_groups:
            entries = [(fp, owner[id(fp.sharded_param)]) for fp in group.fsdp_params if id(fp.sharded_param) in owner]
            if not entries:
                continue
            if len(state._modules) > 1:
                raise DistributedError(f"probe mode: FSDP2 module {label!r} is one of {len(state._modules)} modules "
                                       "sharded together (fully_shard([...])); shard each module on its own")
            _, (b, i) = entries[0]
            if b.shards[i] is None:
                raise DistributedError(f"probe mode: trained tensor {b.names[i]!r} is sharded by FSDP2 "
                                       "over one rank; probe mode needs a shard group of two ranks or more (on one "
                                       "process, train the model without fully_shard)")
            keeps = group.post_forward_mesh_info is None or (state._auto_reshard_after_forward and module in roots)
            if keeps:
                raise DistributedError(f"probe mode: FSDP2 module {label!r} keeps its parameters gathered after its "
                                       "forward, so the next forward would see the last probe; call "
                                       "set_reshard_after_forward(True) on it (on the root too) before attaching")
            extension = [b.names[i] for fp, (b, i) in entries
                         if hasattr(fp._sharded_local_tensor, "fsdp_pre_all_gather")]
            if extension:
                raise DistributedError(f"probe mode: FSDP2 parameter {extension[0]!r} is a tensor subclass "
                                       "with its own all-gather (fsdp_pre_all_gather), which probes cannot reach")
            found.append((module, group, entries))
    for module, group, entries in found:
        group.lazy_init()
        for fp, (b, i) in entries:
            if b.params[i].numel() and (fp._sharded_param_data.untyped_storage().data_ptr()
                                        != b.params[i].untyped_storage().data_ptr()):
                raise DistributedError(f"probe mode: FSDP2 holds the shard of {b.names[i]!r} in other storage than "
                                       "the optimizer trains (its parameters were replaced after the optimizer was "
                                       "built); build the optimizer after loading the model's weights")
    return found, roots


def _put_back(module: nn.Module, frame) -> None:
    saved, padding = frame
    for attr, stored in reversed(saved):
        module._parameters[attr] = stored
    if padding is not None:
        module.padding_idx = padding


class _Probing:
    def __init__(self, probes: ModuleProbes, fn):
        self.module_probes, self.fn = probes, fn

    def __enter__(self):
        self.module_probes.active = self.fn
        self.module_probes._seen = set()
        return self.module_probes

    def __exit__(self, exc_type, *exc):
        probes = self.module_probes
        probes.active = None
        # The always-called forward hooks pop every frame, except where a forward was left by a BaseException that
        # is not an Exception (KeyboardInterrupt): put those stored tensors back too.
        for module, stack in probes._stack.items():
            while stack:
                frame = stack.pop()
                if frame is not None:
                    _put_back(module, frame)
        for stack in probes._swaps.values():
            while stack:
                _gather_from_stored(stack.pop())
        if exc_type is not None:
            # A forward that raised skipped FSDP's reshard: drop the gathered probes, so that no later forward
            # computes with them.
            for root in probes.fsdp_roots:
                root.reset_iter_state()
        return False
