"""ZO training on torch.distributed (docs/DISTRIBUTED.md).

Data parallel: every rank perturbs the same weights with the same seed, evaluates its share of the batch,
and one all-reduce of a few float64 scalars per step (`LossReduction`) gives every rank the same losses, so
every rank applies the same update. A rank whose closure fails or whose loss is not finite is carried by
that all-reduce, so all ranks skip the step together.

Sharded parameters (FSDP2's `fully_shard`, DTensor with Shard(0) placements): the optimizer works on each
rank's local shard (`DTensor.to_local()`), drawing z at the shard's global element indices (`local_shard`),
so a shard holds bitwise what the same elements of the unsharded run hold. The per-tensor quantities some
methods need — Sparse MeZO's magnitude thresholds, DiZO's distances — are reduced across the shard group
(`magnitude_thresholds`, `distance_norms`). Sharded checkpoints go through torch.distributed.checkpoint
(`save_checkpoint`, `load_checkpoint`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """A setup the distributed optimizer does not support, or ranks that disagree."""


@dataclass(frozen=True)
class Shard:
    """Where a rank's local tensor sits in its parameter: elements [offset, offset + local numel) of the
    flattened global tensor of `numel` elements and shape `shape`, split over the ranks of `group`."""
    offset: int
    numel: int
    shape: torch.Size
    group: object


def offsets(shards: Sequence["Shard | None"]) -> "list[int] | None":
    """The ops' `offsets` for tensors with these shards (None: whole): each one's global start, or None when
    none is sharded."""
    return [0 if s is None else s.offset for s in shards] if any(shards) else None


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def local_shard(param: torch.Tensor, name: str) -> "tuple[torch.Tensor, Shard | None]":
    """(the tensor the optimizer writes, its shard or None): a DTensor gives its local tensor, which FSDP2's
    all-gather reads, and where it starts in the flattened global tensor. Only row blocks are one contiguous
    range of global elements, so Shard(0) (on every sharded mesh dimension) and Replicate placements are
    accepted; anything else (tensor parallel's Shard(1), Partial) is refused."""
    if type(param).__name__ == "FlatParameter":
        raise DistributedError(f"parameter {name} is an FSDP1 FlatParameter; shard the model with FSDP2 "
                               "(torch.distributed.fsdp.fully_shard), whose parameters keep their own shapes")
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor import Shard as ShardPlacement

    if not isinstance(param, DTensor):
        return param, None
    placements = param.placements
    bad = [p for p in placements if not (isinstance(p, Replicate) or (type(p) is ShardPlacement and p.dim == 0))]
    if bad:
        raise DistributedError(f"parameter {name} has placements {placements}: zokern trains tensors sharded on "
                               "dim 0 (FSDP2's fully_shard) or replicated; tensor parallel (sharding on other dims, "
                               "Partial) is not supported")
    sharded = [d for d, p in enumerate(placements) if isinstance(p, ShardPlacement)]
    local = param.to_local()
    if not sharded:
        return local, None
    if len(sharded) > 1:
        raise DistributedError(f"parameter {name} is sharded on {len(sharded)} mesh dimensions; zokern reduces "
                               "per-tensor quantities over one shard group (FSDP2 or HSDP meshes)")
    mesh = param.device_mesh
    count = mesh.size(sharded[0])
    if count == 1:
        return local, None
    index = mesh.get_local_rank(sharded[0])
    # torch.chunk's split, which DTensor's and FSDP2's Shard(0) use: rows of ceil(d0 / count) per rank.
    rows = param.shape[0] if param.dim() else 1
    chunk = -(-rows // count)
    start = min(index * chunk, rows)
    row_numel = math.prod(param.shape[1:])
    if local.shape[0] != min(rows, start + chunk) - start or not local.is_contiguous():
        raise DistributedError(f"parameter {name}: local shard of shape {tuple(local.shape)} is not rows "
                               f"[{start}, {min(rows, start + chunk)}) of {tuple(param.shape)}")
    return local, Shard(start * row_numel, param.numel(), param.shape, mesh.get_group(sharded[0]))


class LossReduction:
    """The step's losses averaged over the ranks of a process group, weighted by each rank's share of the
    batch, in one all-reduce of float64 [Σ w·L per probe, Σ w per probe, failed ranks].

    A rank's loss is the mean over its share; a closure returns `(loss, count)` to weigh it by the share's
    size (uneven shares), or the loss alone (weight 1: equal shares). A rank that failed sends weight 0 and
    counts itself as failed; a non-finite loss makes the sum non-finite: every rank sees either and skips."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = dist.get_backend(group)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if "nccl" in str(backend) and torch.cuda.is_available() else torch.device("cpu"))

    def reduce(self, losses: dict, keys: Sequence[str], failed: bool) -> "tuple[dict, int]":
        """({key: weighted mean over ranks} for `keys`, failed ranks). `losses` maps key to `(loss, weight)`;
        keys missing on this rank (its closure failed first) count as weight 0."""
        local = []
        for key in keys:
            loss, weight = losses.get(key, (0.0, 0.0))
            local.append((torch.as_tensor(loss, dtype=torch.float64).detach().reshape(()).to(self.device),
                          float(weight)))
        sums = torch.stack([loss * weight if weight > 0 else torch.zeros((), dtype=torch.float64, device=self.device)
                            for loss, weight in local]
                           + [torch.tensor(weight, dtype=torch.float64, device=self.device) for _, weight in local]
                           + [torch.tensor(float(failed), dtype=torch.float64, device=self.device)])
        dist.all_reduce(sums, group=self.group)
        values = sums.tolist()
        n = len(keys)
        means = {key: (values[i] / values[n + i] if values[n + i] > 0 else math.nan) for i, key in enumerate(keys)}
        return means, int(values[-1])


def loss_reduction(process_group) -> "LossReduction | None":
    """The reduction for an optimizer's `process_group` option: None → the default group when torch.distributed
    is initialized with more than one rank; False → none (each process trains alone); a group → that group."""
    if process_group is False:
        return None
    if process_group is None:
        return LossReduction() if is_distributed() else None
    return LossReduction(process_group) if dist.get_world_size(process_group) > 1 else None


def check_same_on_ranks(fingerprint: dict, group, what: str) -> None:
    """Every rank of `group` must hold the same `fingerprint` (seed, method, trained tensors' names and global
    shapes): ranks that train different tensors (pipeline parallel) or differently seeded optimizers would
    diverge silently."""
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, fingerprint, group=group)
    for r, other in enumerate(gathered):
        if other != fingerprint:
            differ = sorted(k for k in fingerprint if other.get(k) != fingerprint.get(k))
            raise DistributedError(f"{what} differs between ranks ({', '.join(differ)} of rank {r} vs rank "
                                   f"{dist.get_rank(group)}): every rank must build the same optimizer over the same "
                                   "tensors, whole or sharded on dim 0 (pipeline parallel, where ranks hold different "
                                   "layers, is not supported)")


# --- per-tensor quantities of sharded tensors ------------------------------------------------------------


def _by_shard_group(shards: Sequence["Shard | None"]) -> tuple[list[int], list[list[int]]]:
    """The positions of whole tensors, and those of sharded ones per shard group (one collective per group)."""
    whole, groups = [], {}
    for i, s in enumerate(shards):
        if s is None:
            whole.append(i)
        else:
            groups.setdefault(id(s.group), []).append(i)
    return whole, list(groups.values())


def magnitude_thresholds(params: Sequence[torch.Tensor], shards: Sequence["Shard | None"], sparsity: float,
                         local_thresholds) -> torch.Tensor:
    """Per tensor, the k-th smallest |θ| of the whole tensor (k = max(1, ceil((1 − sparsity)·numel))), exactly
    the unsharded value. Whole tensors use `local_thresholds` (the op); sharded ones a radix select on the
    float32 bit patterns of |θ| (ordered like the values, being non-negative): 4 rounds of one all-reduce of
    a 256-bin int64 histogram per tensor (2 KiB per tensor and round), each round fixing 8 bits of the answer. No
    rank sees another's weights."""
    out = [None] * len(params)
    whole, groups = _by_shard_group(shards)
    if whole:
        for i, h in zip(whole, local_thresholds([params[i] for i in whole], sparsity)):
            out[i] = h
    for idx in groups:
        group = shards[idx[0]].group
        bits = [params[i].detach().reshape(-1).abs().float().view(torch.int32).to(torch.int64) for i in idx]
        remaining = torch.tensor([max(1, math.ceil((1.0 - sparsity) * shards[i].numel)) for i in idx],
                                 dtype=torch.int64)
        prefix = torch.zeros(len(idx), dtype=torch.int64)
        for shift in (24, 16, 8, 0):
            hist = torch.zeros(len(idx), 256, dtype=torch.int64, device=bits[0].device if bits else "cpu")
            for row, b in enumerate(bits):
                match = b[(b >> (shift + 8)) == prefix[row]] if shift < 24 else b
                hist[row] = torch.bincount((match >> shift) & 255, minlength=256)
            dist.all_reduce(hist, group=group)
            cumulative = hist.cpu().cumsum(1)
            digit = (cumulative < remaining.unsqueeze(1)).sum(1)  # first bin whose cumulative count reaches k
            below = torch.where(digit > 0, cumulative.gather(1, (digit - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
            remaining -= below
            prefix = (prefix << 8) | digit
        values = prefix.to(torch.int32).view(torch.float32)
        for row, i in enumerate(idx):
            out[i] = values[row].to(params[i].device)
    device = params[0].device if params else "cpu"
    return torch.stack(out) if out else torch.empty(0, device=device)


def distance_norms(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], shards: Sequence["Shard | None"],
                   local_norms) -> torch.Tensor:
    """‖θ − θ0‖ per tensor, float32: whole tensors by `local_norms` (the op), sharded ones from float64 sums of
    squares all-reduced over their shard group (one all-reduce per group). They equal the unsharded op's
    values up to its float32 accumulation's rounding, and are the same on every rank."""
    out = [None] * len(params)
    whole, groups = _by_shard_group(shards)
    if whole:
        for i, t in zip(whole, local_norms([params[i] for i in whole], [anchors[i] for i in whole])):
            out[i] = t
    for idx in groups:
        sums = torch.stack([(params[i].double() - anchors[i].double()).square().sum() for i in idx])
        dist.all_reduce(sums, group=shards[idx[0]].group)
        for row, i in enumerate(idx):
            out[i] = sums[row].sqrt().float()
    device = params[0].device if params else "cpu"
    return torch.stack(out) if out else torch.empty(0, device=device)


# --- entry points ------------------------------------------------------------------------------------------


def init_from_environment() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment), initialize the default process group if it is not
    yet (gloo for CPU tensors, nccl for CUDA ones when CUDA is there). Returns whether this call did so."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return True


def share(items: list, world: int, index: int) -> list:
    """Rank `index`'s contiguous share of a global batch: sizes differ by at most one."""
    n = len(items)
    return items[index * n // world:(index + 1) * n // world]


def broadcast_object(value, source: int = 0):
    """`value` of rank `source` on every rank (itself when not distributed)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """End the default process group `init_from_environment` started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- sharded checkpoints --------------------------------------------------------------------------------------


def save_checkpoint(path, model, optimizer) -> None:
    """A checkpoint of a sharded (or data-parallel) run in folder `path`: the model's state_dict through
    torch.distributed.checkpoint (with FSDP2 each rank writes its own shards), and each rank's optimizer state
    (its shards' method buffers: HiZOO's D, masks, anchors; seed, step, two-pass state) as
    optimizer-rank<r>.pt beside it. Every rank calls it."""
    import io

    import torch.distributed.checkpoint as dcp

    from zokern.fileio import atomic_write

    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    atomic_write(Path(path) / f"optimizer-rank{rank()}.pt", buffer.getvalue())
    barrier()


def load_checkpoint(path, model, optimizer) -> None:
    """Resume from `save_checkpoint`'s folder on the world size it was saved on (another is a ValueError from the
    optimizer's state check): bitwise the state that was saved. Every rank calls it."""
    import torch.distributed.checkpoint as dcp

    file = Path(path) / f"optimizer-rank{rank()}.pt"
    if not file.exists():
        raise DistributedError(f"{path} has no optimizer state for rank {rank()}: it was saved on fewer ranks "
                               f"than this run's {world_size()}; resume on the world size it was saved on")
    optimizer_state = torch.load(file, weights_only=True)
    if optimizer_state.get("zo", {}).get("world_size", 1) != world_size() and world_size() > 1:
        raise DistributedError(f"{path} was saved by a run on {optimizer_state['zo'].get('world_size', 1)} ranks; "
                               f"this one has {world_size()}: resume on the world size it was saved on")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(optimizer_state)
