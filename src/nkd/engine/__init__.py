"""Training engine: trainer loop, checkpoints, distributed helpers, schedules."""

from .checkpoint import load_checkpoint, save_atomic
from .trainer import NonFiniteError, Trainer

__all__ = ["Trainer", "NonFiniteError", "save_atomic", "load_checkpoint"]
