"""Benchmarks: measurements taken side by side in one process (ratios, never absolute claims)."""

from moelab.bench.sidebyside import measure_training_steps, ratios_to, saved_activation_bytes

__all__ = ["measure_training_steps", "ratios_to", "saved_activation_bytes"]
