"""torch.optim optimizers for zeroth-order fine-tuning, each a thin layer over zokern's fused ops."""
from zokern.optim.base import NonFiniteLossError, ZOOptimizer
from zokern.optim.dizo import DiZO
from zokern.optim.hizoo import HiZOO
from zokern.optim.mezo import MeZO
from zokern.optim.sparse import SparseMeZO
from zokern.optim.subzero import SubZero

__all__ = ["ZOOptimizer", "NonFiniteLossError", "MeZO", "SubZero", "SparseMeZO", "HiZOO", "DiZO"]
