"""Training: run config, optimizer and schedule, checkpoints with exact resume, metrics, the loop."""

from moelab.train.config import TrainConfig
from moelab.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
