"""DiZO's projection: distances from the anchor weights, and the anchored rescale θ = θ0 + (θ − θ0)·f."""
from __future__ import annotations

from typing import Sequence

import torch

from zokern.library import call
from zokern.ops.mezo import rounding_keys
from zokern.validation import Rounding, check_is_tensor_list


def distance_norms(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], *,
                   backend: "str | None" = None) -> torch.Tensor:
    """‖θ − θ0‖_F per tensor as a float32 tensor on the tensors' device (no host synchronisation)."""
    params = check_is_tensor_list(list(params))
    if not params:
        return torch.empty(0)
    return torch.ops.zokern.distance_norms(params, list(anchors), backend or "")


def anchored_rescale_(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], factors: torch.Tensor, *,
                      sources: "Sequence[torch.Tensor] | None" = None, rounding: "str | Rounding" = "nearest",
                      seed: "int | None" = None, stream_ids: "Sequence[int] | None" = None,
                      offsets: "Sequence[int] | None" = None, backend: "str | None" = None) -> None:
    """θ = θ0 + (src − θ0)·f per tensor, src = `sources` (a saved copy, for exact probes) or θ itself.
    rounding, seed, stream_ids and offsets as for lowrank_apply_."""
    params = check_is_tensor_list(list(params))
    if not params:
        return
    keys = rounding_keys(rounding, seed, stream_ids, offsets)
    with torch.no_grad():
        call("anchored_rescale_", params, list(anchors), None if sources is None else list(sources), factors,
             backend or "", *keys)
