"""Training engine: the lockstep trainer, one student's step, run directories, checkpoints,
the non-finite guard, distributed helpers and schedules."""

from .checkpoint import load_checkpoint, save_atomic
from .guard import NonFiniteError
from .rundir import RunDirError
from .trainer import GroupError, StopRequested, Trainer, train_together

__all__ = ["Trainer", "train_together", "NonFiniteError", "GroupError", "StopRequested", "RunDirError",
           "save_atomic", "load_checkpoint"]
