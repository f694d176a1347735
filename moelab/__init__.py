"""moelab: Mixture-of-Experts language models in PyTorch.

The public names below are imported on first use (PEP 562), so ``moelab --help`` and the command
parsers start without importing torch; ``import moelab; moelab.build_model(...)`` works as usual.
"""

from __future__ import annotations

import importlib as _importlib


def _version() -> str:
    try:  # the installed package's metadata (pyproject.toml), so the two cannot disagree
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("moelab")
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    return "0.1.0"  # a source tree that was never installed


__version__ = _version()

# name -> the module that defines it (docs/architecture.md says which folder owns what)
_EXPORTS = {
    "AoEConfig": "moelab.config", "AttentionConfig": "moelab.config", "ModelConfig": "moelab.config",
    "MoEConfig": "moelab.config", "RouterConfig": "moelab.config", "load_config": "moelab.config",
    "save_config": "moelab.config",
    "CheckpointError": "moelab.errors", "ConfigError": "moelab.errors", "DataError": "moelab.errors",
    "MoelabError": "moelab.errors",
    "ModelOutput": "moelab.model", "MoETransformer": "moelab.model", "build_model": "moelab.model",
    "count_params": "moelab.params", "get_preset": "moelab.presets",
    "load": "moelab.loading", "load_tokenizer": "moelab.loading",
    "save_model": "moelab.checkpoint.model_files", "export_hf": "moelab.interop.hf",
    "TrainConfig": "moelab.train.config",
    "generate": "moelab.inference.generate", "generate_batch": "moelab.inference.engine",
    "Completion": "moelab.inference.engine",
    "analyze": "moelab.analysis.analyze",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the public API and the module's dunders; not the helpers (_version) or what this file imports
    return sorted(set(__all__) | {"__version__", "__all__", "__doc__", "__name__", "__file__", "__path__"})
