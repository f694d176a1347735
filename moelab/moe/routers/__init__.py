"""One file per router family; importing this package registers them all."""

from moelab.moe.routers import sparsemixer, topk  # noqa: F401
from moelab.moe.routers import deepseek, expert_choice, noisy_topk, top_p  # noqa: F401
