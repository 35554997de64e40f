"""Training scripts for the models diffprobe ships (``tiny``)."""

from diffprobe.train.tiny import TinyConfig, train_tiny

__all__ = ["TinyConfig", "train_tiny"]
