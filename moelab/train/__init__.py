"""Training: run config, optimizer and schedule, checkpoints with exact resume, metrics, the loop.

``TrainConfig`` imports without torch (``moelab train --help`` stays fast); ``Trainer`` and ``train``
load the loop on first use."""

from moelab.train.config import TrainConfig

__all__ = ["TrainConfig", "Trainer", "train"]


def __getattr__(name: str):
    if name in ("Trainer", "train"):
        from moelab.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'moelab.train' has no attribute {name!r}")
