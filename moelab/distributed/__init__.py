"""Parallelism applied from outside the single-device model (torch.distributed): expert parallelism."""
