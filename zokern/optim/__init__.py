"""torch.optim optimizers for zeroth-order fine-tuning, each a thin layer over zokern's fused ops."""
from zokern.optim.base import NonFiniteLossError, ZOOptimizer
from zokern.optim.dizo import DiZO
from zokern.optim.hizoo import HiZOO
from zokern.optim.mezo import MeZO
from zokern.optim.sparse import SparseMeZO
from zokern.optim.subzero import SubZero

# The methods by their command-line names (zokern finetune, ZOTrainer).
METHODS = {"mezo": MeZO, "subzero": SubZero, "sparse-mezo": SparseMeZO, "hizoo": HiZOO, "dizo": DiZO}

__all__ = ["ZOOptimizer", "NonFiniteLossError", "MeZO", "SubZero", "SparseMeZO", "HiZOO", "DiZO", "METHODS"]
