"""The training system: configs, the loop, checkpoints, evaluation, DDP."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, config_from_dict, resolve
from .evaluate import TeacherGradients, evaluate
from .loading import load_data, load_model
from .recipes import list_recipes, recipe
from .results import evaluate_splits
from .step import NonFiniteError
from .trainer import train

__all__ = ["RunConfig", "ConfigError", "config_from_dict", "resolve", "train", "load_model", "load_data", "evaluate",
           "evaluate_splits", "TeacherGradients", "recipe", "list_recipes",
           "NonFiniteError", "CheckpointError", "load_checkpoint", "save_checkpoint"]
