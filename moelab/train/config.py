"""The run config: training settings plus the model config, saved as ``config.yaml`` in every run.

Every field is a command-line flag (``--steps``, ``--lr``, ``--model.moe.num-experts`` ...), generated
from these dataclasses by tyro.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moelab.config import ModelConfig, from_dict
from moelab.errors import ConfigError
from moelab.fileio import write_atomic
from moelab.presets import tiny

RUN_CONFIG = "config.yaml"  # the resolved run config in a run directory

# Fields that may change when a run is resumed: they do not change the computation of past steps
# (the parallel layout included: distributed checkpoints reshard to any layout).
RESUMABLE_FIELDS = ("steps", "save_every", "eval_every", "keep_last", "tensorboard", "progress", "parallel",
                    "nonfinite", "max_skips", "spike_factor", "spike_window", "spike_action", "max_rollbacks")

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ParallelConfig:
    """How a run launched on several processes (``moelab train --nproc N`` or ``torchrun``) splits its
    work; ignored in a single process. Every rank takes ``batch_size / world`` rows of each global
    micro-batch, so the losses equal one process training on the same global batch.

    The ranks form a 2-D mesh (dp, ep) with dp * ep = world: the experts of every MoE layer are split
    over the ``ep`` ranks of a row, the rest of the model over all ranks."""

    ep: int = 1  # expert-parallel ranks: each keeps num_experts / ep experts of every MoE layer
    dp: int = 0  # data-parallel rows of the mesh; 0: world / ep
    # "fsdp": FSDP2 shards parameters, gradients and optimizer state (experts over dp, the rest over
    # every rank); "replicate": every rank keeps whole parameters and gradients are all-reduced (DDP)
    shard: str = "fsdp"
    param_dtype: str = "float32"  # FSDP2 mixed precision: compute dtype of the gathered parameters (not float16)
    reduce_dtype: str = "float32"  # ... and dtype of the gradient reduce-scatter
    reshard_after_forward: bool = True  # FSDP2: free gathered parameters after forward (ZeRO-3 style)
    timeout_s: float = 300.0  # a collective waiting longer than this fails every rank (a dead peer)
    backend: str = "auto"  # "auto": nccl on CUDA, gloo on CPU

    def __post_init__(self) -> None:
        if self.ep < 1:
            raise ConfigError("parallel.ep", self.ep, "must be >= 1")
        if self.dp < 0:
            raise ConfigError("parallel.dp", self.dp, "must be >= 0 (0: world size / ep)")
        if self.shard not in ("fsdp", "replicate"):
            raise ConfigError("parallel.shard", self.shard, "must be 'fsdp' or 'replicate'")
        if self.param_dtype not in DTYPES:
            raise ConfigError("parallel.param_dtype", self.param_dtype, f"must be one of {', '.join(DTYPES)}")
        if self.param_dtype == "float16":
            # fp16 gradients underflow without a loss scaler, and moelab has none: bf16 has fp32's range
            raise ConfigError("parallel.param_dtype", self.param_dtype, "needs a gradient scaler, which moelab "
                              "does not have; use bfloat16 (same memory, fp32's exponent range) or float32")
        if self.reduce_dtype not in ("float32", "bfloat16"):
            # NOTE: FSDP2 (torch 2.13) splits an fp16 reduction's division into pre- and post-factors
            # and, on a 1-rank mesh, also divides once more: the experts' gradients would be 1/world^2
            raise ConfigError("parallel.reduce_dtype", self.reduce_dtype, "must be float32 or bfloat16 (fp16 "
                              "gradient reduction is not supported)")
        if not self.timeout_s > 0:
            raise ConfigError("parallel.timeout_s", self.timeout_s, "must be > 0 seconds")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError("parallel.backend", self.backend, "must be auto, gloo or nccl")

    def mesh_shape(self, world: int, num_experts: int | None) -> tuple[int, int]:
        """(dp, ep) for ``world`` ranks, validated against the world size and the expert count."""
        if world % self.ep:
            raise ConfigError("parallel.ep", self.ep, f"must divide the world size {world} (--nproc)")
        if self.ep > 1 and num_experts is None:
            raise ConfigError("parallel.ep", self.ep, "needs an MoE model (model.moe is not set)")
        if num_experts is not None and num_experts % self.ep:
            raise ConfigError("parallel.ep", self.ep, f"must divide model.moe.num_experts={num_experts}")
        dp = self.dp or world // self.ep
        if dp * self.ep != world:
            raise ConfigError("parallel.dp", self.dp, f"dp x ep = {dp} x {self.ep} must equal the world size {world}")
        return dp, self.ep


@dataclass
class TrainConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``, gradient clipping and
    accumulation, periodic validation per domain and checkpoints."""

    model: ModelConfig = field(default_factory=tiny)
    data: str = "builtin"  # "builtin", a .txt file, a directory of text files, or a .jsonl with `text`
    steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8  # validation micro-batches per domain-wide evaluation
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2  # checkpoints kept on disk
    tensorboard: bool = False
    progress: bool = True
    # torch.compile every block (MoETransformer.compile_blocks): the first steps pay the compile
    # time; results equal eager within fp32 tolerance, not bit for bit
    compile: bool = False
    # numerics guards (moelab/train/numerics.py): a NaN/Inf loss or gradient "stop"s training with a
    # diagnostic or "skip"s the update (at most max_skips times); a loss above spike_factor x the
    # median of the last spike_window steps (0: off) is a spike: "warn", "stop" or "rollback" to the
    # last checkpoint (at most max_rollbacks times), continuing on the data after the spike
    nonfinite: str = "stop"
    max_skips: int = 10
    spike_factor: float = 0.0
    spike_window: int = 20
    spike_action: str = "warn"
    max_rollbacks: int = 3
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.parallel, dict):
            self.parallel = from_dict(ParallelConfig, self.parallel, "parallel")
        mtp = self.model.mtp
        if mtp is not None and self.seq_len < mtp.num_modules + 2:
            raise ConfigError("model.mtp.num_modules", mtp.num_modules,
                              f"depth k predicts token i + k + 1, so seq_len={self.seq_len} leaves the deepest "
                              f"module no target; use seq_len >= num_modules + 2 or fewer modules")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, getattr(self, name), "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError("nonfinite", self.nonfinite, "must be 'stop' or 'skip'")
        if self.spike_action not in ("warn", "stop", "rollback"):
            raise ConfigError("spike_action", self.spike_action, "must be 'warn', 'stop' or 'rollback'")
        if self.spike_factor < 0 or 0 < self.spike_factor <= 1:
            raise ConfigError("spike_factor", self.spike_factor, "must be 0 (off) or > 1 (x the recent median loss)")
        for name in ("max_skips", "max_rollbacks"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        if self.spike_window < 1:
            raise ConfigError("spike_window", self.spike_window, "must be >= 1 (steps in the median)")
        if not self.lr > 0:
            raise ConfigError("lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError("seq_len", self.seq_len, f"must be <= model.max_seq_len={self.model.max_seq_len}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "parallel")}
        d["parallel"] = dataclasses.asdict(self.parallel)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data, "")

    def save(self, path: Path) -> None:
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        if not Path(path).is_file():
            raise ConfigError("config", str(path), "file not found")
        data = yaml.safe_load(Path(path).read_text())
        if isinstance(data, dict) and "model" not in data and "vocab_size" in data:
            return cls(model=ModelConfig.from_dict(data))  # a bare model config
        return cls.from_dict(data)


def config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted names of the fields that differ between two run configs."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(prefix.rstrip("."))

    walk(a.to_dict(), b.to_dict(), "")
    return out


def non_resumable(differences: list[str]) -> list[str]:
    """The differences a resume may not make (fields outside RESUMABLE_FIELDS and their subfields)."""
    return [d for d in differences if d.split(".")[0] not in RESUMABLE_FIELDS]
