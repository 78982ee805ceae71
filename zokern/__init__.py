"""zokern: fused kernels for zeroth-order fine-tuning of large language models."""
from zokern import ops, random
from zokern.ops import fill_random_, fused_step_, perturb_
from zokern.random import Distribution, Domain, draw

__version__ = "0.1.0"
__all__ = ["ops", "random", "perturb_", "fused_step_", "fill_random_", "draw", "Distribution", "Domain"]
