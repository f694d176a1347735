"""One file per router family; importing this package registers them all."""

from moelab.moe.routers import topk  # noqa: F401
