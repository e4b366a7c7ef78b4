"""Training: recipes (``load_config``), the loop (``train``), checkpoints and multi-GPU.

from longreach.train import find_recipe, load_config, train
run_dir = train(load_config(find_recipe("tiny-swa"), ["train.steps=300"]))
"""

from longreach.train.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    validate_checkpoint,
)
from longreach.train.config import DataConfig, RunConfig, TrainConfig, find_recipe, load_config
from longreach.train.trainer import StoppedBySignal, TrainingDiverged, train

__all__ = [
    "CheckpointError",
    "DataConfig",
    "RunConfig",
    "StoppedBySignal",
    "TrainConfig",
    "TrainingDiverged",
    "find_latest_checkpoint",
    "find_recipe",
    "list_checkpoints",
    "load_config",
    "train",
    "validate_checkpoint",
]
