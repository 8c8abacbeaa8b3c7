"""Training engine: trainer loop, checkpoints, distributed helpers, schedules."""

from .checkpoint import load_checkpoint, save_atomic
from .trainer import NonFiniteError, StopRequested, Trainer

__all__ = ["Trainer", "NonFiniteError", "StopRequested", "save_atomic", "load_checkpoint"]
