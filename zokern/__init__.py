"""zokern: fused kernels for zeroth-order fine-tuning of large language models."""
from zokern import ops, random
from zokern.ops import *  # noqa: F401,F403  (the public ops)
from zokern.ops import __all__ as _ops_all
from zokern.random import Distribution, Domain

# After ops: the optimizers are built on it (torch and zokern.ops only, so importing them costs milliseconds).
from zokern import optim  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "optim", "random", "Distribution", "Domain", *_ops_all]
