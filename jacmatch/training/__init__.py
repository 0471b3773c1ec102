"""The training system: configs, the loop, checkpoints, evaluation, DDP."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, config_from_dict, resolve
from .evaluate import TeacherGradients, evaluate
from .trainer import NonFiniteError, evaluate_splits, load_data, load_model, train

__all__ = ["RunConfig", "ConfigError", "config_from_dict", "resolve", "train", "load_model", "load_data", "evaluate",
           "evaluate_splits", "TeacherGradients",
           "NonFiniteError", "CheckpointError", "load_checkpoint", "save_checkpoint"]
