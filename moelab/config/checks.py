"""Field checks shared by every config dataclass: each raises a ConfigError naming the field and the fix."""

from __future__ import annotations

import math

from moelab.errors import ConfigError

MAX_SIZE = 2**31 - 1  # any one size (dimension, count, length): beyond it no tensor can be built


def check_positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero) or value != value:
        need = "a non-negative number" if allow_zero else "a positive number"
        raise ConfigError(name, value, f"must be {need}")
    if isinstance(value, float) and math.isinf(value):
        raise ConfigError(name, value, "must be finite")
    if isinstance(value, int) and value > MAX_SIZE:  # sizes; float settings (rope_theta ...) have no bound
        raise ConfigError(name, value, f"is too large (at most {MAX_SIZE:,})")


def check_choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(name, value, f"unknown value; choose one of {', '.join(options)}")

