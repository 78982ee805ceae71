"""SubZero's side path (docs/OPTIMIZERS.md, "SubZero's side path"): within a subspace window an `nn.Linear`
whose weight W (m×n, y = x·Wᵀ + b) is a SubZero matrix never has W copied or written by a step. Its forward
adds the low-rank term of W + U·C·Vᵀ instead:

    y = x·Wᵀ + b + ((x·V)·Cᵀ)·Uᵀ,    C = A + scale·μ·Z0(seed)

with A the matrix's float32 r×r accumulator of the window's updates (A += c_t·μ·Z0(s_t)), merged into W by one
`lowrank_apply_` pass at the window's end and before anyone reads the weights.

`SideHooks` installs the hooks on the attached model. On every module that holds a side-path matrix, a forward
pre-hook run outside a step merges the pending updates first (an evaluation forward reads merged weights), and
a `state_dict` pre-hook does the same (saving reads merged weights). During a step, the pre-hook of a plain
`nn.Linear` marks its weight as wanted on the side path, so the optimizer's probe (`SubZero._probe`) leaves
the stored W in place and hands the core C to the forward hook, which adds the term to the output; any other
holder of the matrix (a tied embedding) gets the probe's copy, which includes A.
"""
from __future__ import annotations

import torch
from torch import nn

from zokern.optim.probe import eager


def side_factors(u: torch.Tensor, v: torch.Tensor, core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, U·C) in float32, once per probe: the side term is then two matmuls per call."""
    return v.float(), u.float() @ core


def add_side_term(output: torch.Tensor, x: torch.Tensor, v: torch.Tensor, uc: torch.Tensor) -> torch.Tensor:
    """output + ((x·V)·Cᵀ)·Uᵀ = output + (x·V)·(U·C)ᵀ, x·(U·C·Vᵀ)ᵀ without the m×n product: O(tokens·(m+n)·r),
    in float32 and rounded once to the output's dtype. Few ops on purpose: each is a parallel region."""
    rows = output.reshape(-1, output.shape[-1]).float()
    return torch.addmm(rows, x.reshape(-1, x.shape[-1]).float() @ v, uc.t()).view(output.shape).to(output.dtype)


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is nn.Linear's (y = x·Wᵀ + b), the only form the side term is written for."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class SideCall:
    """One forward of a side-path Linear: the key of its weight, and what the probe decided for it."""
    __slots__ = ("key", "term")

    def __init__(self, key):
        self.key = key
        self.term = None  # side_factors(U, V, C) once the probe chose the side path


class SideHooks:
    """The side path's hooks on `model` for `optimizer` (a SubZero with side_path=True and probe mode's hooks
    installed). `side_keys` are the (id(bucket), index) of the side-path matrices."""

    def __init__(self, optimizer, model: nn.Module, side_keys: set):
        self.optimizer = optimizer
        self.entering: "SideCall | None" = None  # the side-path Linear whose pre-hooks are running
        self._calls: dict[nn.Module, list[SideCall]] = {}
        self._handles = []
        owner = {id(b.params[i]): (id(b), i) for b in optimizer.buckets for i in range(len(b.params))}
        for module in model.modules():
            keys = [owner[id(p)] for p in module._parameters.values() if p is not None and id(p) in owner]
            keys = [key for key in keys if key in side_keys]
            if not keys:
                continue
            weight = module._parameters.get("weight")
            linear_key = owner.get(id(weight)) if is_plain_linear(module) and weight is not None else None
            if linear_key not in side_keys:
                linear_key = None
            # First among the pre-hooks: probe mode's own pre-hook asks the optimizer for the probe next.
            self._handles.append(module.register_forward_pre_hook(
                self._pre_hook(linear_key), prepend=True, with_kwargs=True))
            if linear_key is not None:
                self._handles.append(module.register_forward_hook(eager(self._post), with_kwargs=True,
                                                                  always_call=True))
            self._handles.append(module.register_state_dict_pre_hook(self._before_state_dict))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls = {}
        self.entering = None

    def _pre_hook(self, linear_key):
        def pre(module, args, kwargs):
            self.entering = None
            probes = self.optimizer.module_probes
            if probes is None or probes.active is None:
                self.optimizer.merge()  # a forward outside a step: evaluation reads the merged weights
                if linear_key is not None:
                    self._calls.setdefault(module, []).append(SideCall(None))
                return None
            if linear_key is not None:
                call = SideCall(linear_key)
                self._calls.setdefault(module, []).append(call)
                self.entering = call
            return None
        return eager(pre)  # not traced by torch.compile, as probe mode's hooks

    def _post(self, module, args, kwargs, output):
        self.entering = None
        calls = self._calls.get(module)
        call = calls.pop() if calls else None
        if call is None or call.term is None:
            return None
        x = args[0] if args else kwargs["input"]
        return add_side_term(output, x, *call.term)

    def _before_state_dict(self, module, prefix, keep_vars) -> None:
        self.optimizer.merge()

    def take(self, key) -> "SideCall | None":
        """The pending side-path call for the matrix `key`, if the Linear now entering holds it; consumed."""
        call = self.entering
        if call is None or call.key != key:
            return None
        self.entering = None
        return call
