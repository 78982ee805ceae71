"""Integrations of zokern's optimizers with training frameworks (they need the framework installed)."""
from zokern.integration.hf_trainer import ZOTrainer

__all__ = ["ZOTrainer"]
