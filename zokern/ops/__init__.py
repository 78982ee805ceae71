"""Public functional ops: the API that optimizers (zokern's and other people's) call.

Each function is a thin wrapper over one registered custom op (zokern/library.py); the math is in
docs/OPS.md. `backend=None` picks the device's best backend, or $ZOKERN_BACKEND when set.
"""
import zokern.library  # noqa: F401  (registers torch.ops.zokern.*)
from zokern.ops.mezo import fused_step_, perturb_
from zokern.ops.random import draw, fill_random_
from zokern.ops.dizo import anchored_rescale_, distance_norms
from zokern.ops.hizoo import hessian_perturb_, hessian_step_
from zokern.ops.subzero import core_matrix, lowrank_apply_, lowrank_scale, lowrank_shape, subspace_factors
from zokern.ops.sparse import (magnitude_mask_, magnitude_thresholds, masked_fused_step_, masked_perturb_, new_masks,
                               unpack_mask)

__all__ = ["perturb_", "fused_step_", "fill_random_", "draw", "lowrank_apply_", "lowrank_shape", "subspace_factors",
           "lowrank_scale", "core_matrix", "magnitude_thresholds", "magnitude_mask_", "new_masks", "unpack_mask",
           "masked_perturb_", "masked_fused_step_", "hessian_perturb_", "hessian_step_", "distance_norms",
           "anchored_rescale_"]
