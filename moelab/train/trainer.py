"""The training loop: data, AdamW + warmup/cosine, accumulation, clipping, metrics, eval, checkpoints.

A run directory holds ``config.yaml`` (the run config), ``tokenizer.json``, ``metrics.jsonl`` (one
record per step and per evaluation) and ``checkpoints/step_NNNNNN/``. A run resumed from step s
continues bit-identically (on CPU) to one that never stopped: model, optimizer, scheduler, RNG and
data position are all restored, and metrics after step s are discarded before continuing.
"""

from __future__ import annotations

import errno
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from moelab.data import PackedData, Tokenizer, load_corpus, prepare_data, train_tokenizer, unigram_entropy
from moelab.errors import CheckpointError, ConfigError, MoelabError


class NumericsError(MoelabError):
    """Training stopped by a numerics guard (non-finite step, loss spike)."""
from moelab.checkpoint.atomic import MARKER, mark_output_dir
from moelab.checkpoint.layout import WEIGHTS
from moelab.checkpoint.model_files import load_state_strict, read_weights
from moelab.checkpoint.run import choose_checkpoint, is_distributed, recover_checkpoints
from moelab.checkpoint.trainer_state import DataPosition, load_trainer_state, restore_rng, save_checkpoint
from moelab.distributed.expert_parallel import expert_parallel_layers
from moelab.distributed.runtime import (
    check_batch,
    init_from_env,
    launched_world_size,
    parallelize,
    shutdown,
    sync_gradients,
)
from moelab.faults import maybe_inject_fault
from moelab.model import MoETransformer, build_model
from moelab.moe.balancing import global_statistics
from moelab.moe.layer import update_router_biases
from moelab.train.config import RESUMABLE_FIELDS, RUN_CONFIG, TrainConfig, config_differences, non_resumable
from moelab.train.metrics import MetricsLog, load_stats, parse_lines
from moelab.train.numerics import SpikeDetector, clip_gradients, describe, diagnose, global_verdict
from moelab.train.objective import Shares, mtp_target_counts, rank_loss  # noqa: F401 (mtp_target_counts: API)
from moelab.train.rollback import read_single_for_parallel
from moelab.train.resume import (
    DATA_KEY,
    check_data_unchanged,
    fingerprint_or_none,
    resume_checkpoint,
    resumed_config,
    resumed_tokenizer,
)

METRICS = "metrics.jsonl"
# Per-layer routing metrics of MoELayer.last_metrics logged every step (mean over MoE layers).
ROUTING_METRICS = ("dropped_frac", "experts_per_token_mean", "router_entropy", "load_entropy")
# ... and these per layer too (the AoE paper's Fig. 3 diagnostics), under record["layers"].
PER_LAYER_METRICS = ("router_entropy", "load_entropy")


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class Batches:
    """Deterministic sampling: epoch e visits rows in randperm(N, seed + e); the position is saved."""

    def __init__(self, data: PackedData, batch_size: int, seed: int, position: DataPosition):
        self.data, self.batch_size, self.seed, self.pos = data, batch_size, seed, position
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.pos.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.pos.epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data.input_ids), generator=g), self.pos.epoch
        return self._perm

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            perm = self._permutation()
            take = min(self.batch_size - len(rows), len(perm) - self.pos.index)
            rows.extend(perm[self.pos.index:self.pos.index + take].tolist())
            self.pos.index += take
            if self.pos.index >= len(perm):
                self.pos.epoch, self.pos.index = self.pos.epoch + 1, 0
        idx = torch.tensor(rows)
        return self.data.input_ids[idx], self.data.labels[idx]


@torch.no_grad()
def evaluate(model: MoETransformer, data: PackedData, batch_size: int, max_batches: int, env=None) -> dict:
    """Validation loss and perplexity, overall and per domain of the predicted token, on
    ``batch_size * max_batches`` rows evenly spaced over the validation set (all rows if fewer).
    ``env`` (multi-process): every rank scores an equal share of each batch (a batch that does not
    split evenly is scored whole by every rank) and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    n_dom = len(data.domains)
    loss_sum = torch.zeros(n_dom, dtype=torch.float64)
    count = torch.zeros(n_dom, dtype=torch.float64)
    shared_sum, shared_count = torch.zeros_like(loss_sum), torch.zeros_like(count)  # split over ranks
    n = len(data.input_ids)
    rows = min(n, batch_size * max_batches)
    # Rows evenly spaced over the validation set: documents are stored domain by domain, so the first
    # rows alone would miss whole domains.
    pick = torch.linspace(0, n - 1, rows).round().long() if rows < n else torch.arange(n)
    for start in range(0, rows, batch_size):
        idx = pick[start:start + batch_size]
        split = env is not None and len(idx) % env.world == 0
        if split:
            n_local = len(idx) // env.world
            idx = idx[env.rank * n_local:(env.rank + 1) * n_local]
        ids, labels, dom = data.input_ids[idx], data.labels[idx], data.domain_ids[idx]
        logits = model(ids.to(env.device) if env is not None else ids).logits[:, :-1].float().cpu()
        target, target_dom = labels[:, 1:], dom[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                             ignore_index=-100, reduction="none").double()
        valid = (target.reshape(-1) != -100) & (target_dom.reshape(-1) >= 0)
        d = target_dom.reshape(-1)[valid]
        (shared_sum if split else loss_sum).index_add_(0, d, ce[valid])
        (shared_count if split else count).index_add_(0, d, torch.ones_like(ce[valid]))
    if env is not None:
        env.all_reduce(shared_sum)
        env.all_reduce(shared_count)
    loss_sum, count = loss_sum + shared_sum, count + shared_count
    model.train(was_training)
    total = float(loss_sum.sum() / count.sum().clamp(min=1))
    per_domain = {name: {"loss": float(loss_sum[i] / count[i]), "ppl": math.exp(float(loss_sum[i] / count[i])),
                         "tokens": int(count[i])}
                  for i, name in enumerate(data.domains) if count[i] > 0}
    return {"val_loss": total, "val_ppl": math.exp(total), "domains": per_domain, "val_tokens": int(count.sum())}


@dataclass
class RunData:
    tokenizer: Tokenizer
    train: PackedData
    val: PackedData
    unigram_entropy: float  # nats per token of the training tokens


def prepare_run_data(cfg: TrainConfig, tokenizer: Tokenizer | None = None) -> RunData:
    """Load the corpus of ``cfg.data``, train the tokenizer on its training split (unless given), pack."""
    corpus = load_corpus(cfg.data, seed=cfg.seed)
    if tokenizer is None:
        tokenizer = train_tokenizer((d.text for d in corpus.train), cfg.model.vocab_size, seed=cfg.seed)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"the tokenizer has {tokenizer.vocab_size} tokens; raise model.vocab_size")
    train_data, val_data = prepare_data(corpus, tokenizer, cfg.seq_len)
    if len(train_data.input_ids) == 0:
        raise MoelabError(f"data {cfg.data!r}: no training sequences; the corpus is too small for seq_len")
    return RunData(tokenizer, train_data, val_data, unigram_entropy(train_data))


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    train_loss: float
    val: dict
    unigram_entropy: float


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, data: RunData | None = None,
                 allow_data_change: bool = False):
        """``data``: already prepared data to reuse (experiments train many models on the same tokens).
        Launched by torchrun with several processes, each process constructs a Trainer with the same
        arguments; :meth:`fit` joins the process group (``cfg.parallel``). ``allow_data_change``: resume
        even when the data files differ from the checkpoint's fingerprint (moelab.train.resume)."""
        self.cfg, self.run_dir, self.resume, self.data = cfg, Path(run_dir), resume, data
        self.resume_from, self.data_files = None, fingerprint_or_none(cfg.data, cfg.seed)
        self.allow_data_change = allow_data_change
        self.env = None
        self.skips = self.rollbacks = 0
        self.spikes = SpikeDetector(cfg.spike_factor, cfg.spike_window)
        if resume:
            self._check_resume(allow_data_change)
        elif launched_world_size() <= 1:
            self._check_new_run()

    def _check_new_run(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise MoelabError(f"{self.run_dir} is a file, not a directory; choose another --out")
        if _holds_files(self.run_dir):
            raise MoelabError(f"{self.run_dir} already exists and is not empty; pass --resume {self.run_dir} "
                              "to continue it, or choose another --out")

    def _check_resume(self, allow_data_change: bool = False, ckpt: Path | None = None) -> None:
        # the checkpoint's verified run_config.yaml, not the run's config.yaml (in no manifest); ``ckpt``:
        # the one chosen to load (_choose_resume), else the newest whose small files verify
        self.resume_from = resume_checkpoint(self.run_dir) if ckpt is None else ckpt
        saved, path = resumed_config(self.run_dir, self.resume_from)
        check_data_unchanged(self.resume_from, self.data_files or {"source": str(self.cfg.data), "files": {}},
                             allow_data_change)
        diff = non_resumable(config_differences(saved, self.cfg))
        if diff:
            raise ConfigError(", ".join(diff), "changed",
                              f"differs from the run being resumed ({path}); resume with the same config "
                              f"(only {', '.join(RESUMABLE_FIELDS)} may change) or start a new --out")

    def _choose_resume(self) -> None:
        """Recover interrupted saves, then choose the checkpoint to load, verified whole by every rank
        (choose_checkpoint), before the tokenizer is read: when it is not the one whose small files
        __init__ checked (a newer one's weights failed), config, data and tokenizer come from it too."""
        lines = recover_checkpoints(self.run_dir) if self.is_main else []
        if self.env is not None:
            self.env.barrier()
        for line in lines:
            warnings.warn(f"{self.run_dir}: {line}", stacklevel=3)
        ckpt = choose_checkpoint(self.run_dir, self.env, set_aside=True)
        if ckpt != self.resume_from:
            self._check_resume(self.allow_data_change, ckpt)

    @property
    def is_main(self) -> bool:
        return self.env is None or self.env.is_main

    # ---- setup -------------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        cfg = self.cfg
        moe = cfg.model.moe
        self.env = init_from_env(cfg.parallel, moe.num_experts if moe is not None else None)
        if self.env is None:
            return
        if cfg.compile:
            raise ConfigError("compile", True, "is not supported with several processes yet; drop --compile")
        self.local_batch = check_batch(cfg.batch_size, self.env.world)
        if not self.resume:  # every rank looks before rank 0 writes anything
            empty = torch.tensor([0 if _holds_files(self.run_dir) else 1])  # a plain file too
            self.env.all_reduce(empty, op=torch.distributed.ReduceOp.MIN)
            if not int(empty):
                self._check_new_run()
                raise MoelabError(f"{self.run_dir} is not empty; pass --resume {self.run_dir} or another --out")

    def _setup_data(self) -> None:
        if self.resume:  # the checkpoint to load, chosen first: the tokenizer comes from it
            self._choose_resume()
        if self.data is None:
            tok_path = (resumed_tokenizer(self.run_dir, self.resume_from) if self.resume  # the verified copy
                        else self.run_dir / "tokenizer.json")
            tokenizer = Tokenizer.load(tok_path) if self.resume and tok_path.is_file() else None
            if self.env is not None and tokenizer is None:  # rank 0 trains it, the others read it
                if self.is_main:
                    mark_output_dir(self.run_dir, "run")
                    self.data = prepare_run_data(self.cfg, None)
                    self.data.tokenizer.save(tok_path)
                self.env.wait_for_main()  # rank 0 may take long on a big corpus: not parallel.timeout_s
                tokenizer = Tokenizer.load(tok_path) if not self.is_main else None
            if self.data is None:
                self.data = prepare_run_data(self.cfg, tokenizer)
        self.tokenizer, self.train_data, self.val_data = self.data.tokenizer, self.data.train, self.data.val
        self.entropy = self.data.unigram_entropy

    def _setup_model(self) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = build_model(cfg.model)
        self.step, self.position = 0, DataPosition()
        ckpt = self.resume_from if self.resume else None  # chosen by _choose_resume (in _setup_data)
        # a single-process checkpoint's weights go in before parallelizing (its optimizer state is kept by
        # parameter name, to shard after)
        single = self._read_single(ckpt, shard_later=env is not None) if ckpt is not None and not is_distributed(ckpt) \
            else None
        if env is not None:
            self.model.to(env.device)
            parallelize(self.model, env)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        if ckpt is not None:
            meta = self._restore(ckpt, single)
            self.step, self.position = meta["step"], DataPosition(meta["epoch"], meta["index"])
            # the numerics guards' budgets span the whole run, not one process
            self.skips, self.rollbacks = int(meta.get("skips", 0)), int(meta.get("rollbacks", 0))
        if cfg.compile:
            self.model.compile_blocks()

    def _read_single(self, ckpt: Path, shard_later: bool) -> tuple[dict, dict, dict | None]:
        """A single-process checkpoint: its weights loaded into the model now; returns (trainer state,
        meta, the optimizer state by parameter name when ``shard_later``, else None)."""
        from moelab.checkpoint.distributed import full_optimizer_state

        state, meta = load_trainer_state(ckpt)
        load_state_strict(self.model, read_weights(ckpt / WEIGHTS), str(ckpt))
        full_optim = None
        if shard_later:
            plain = make_optimizer(self.model, self.cfg)
            plain.load_state_dict(state["optimizer"])
            full_optim = full_optimizer_state(self.model, plain)
        return state, meta, full_optim

    def _restore(self, ckpt: Path, single: tuple | None = None) -> dict:
        """Restore ``ckpt`` into the (parallelized) model, optimizer, scheduler and RNG, on resume and on a
        rollback alike; ``single``: what :meth:`_read_single` already read. Returns the checkpoint's meta."""
        from moelab.checkpoint.distributed import load_distributed_checkpoint, load_full_optimizer_state

        if is_distributed(ckpt):
            meta = load_distributed_checkpoint(ckpt, self.model, self.optimizer, self.scheduler,
                                               rank=self.env.rank if self.env is not None else 0)
        else:
            state, meta, full_optim = single if single is not None else self._read_single(ckpt, shard_later=False)
            if full_optim is not None:
                load_full_optimizer_state(self.model, self.optimizer, full_optim)
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            restore_rng(state)
        # new total steps may extend the schedule
        self.scheduler.lr_lambdas = [lr_lambda(self.cfg)] * len(self.optimizer.param_groups)
        return meta

    # ---- loop --------------------------------------------------------------------------------------
    def _micro_batch(self, batches: Batches) -> tuple[torch.Tensor, torch.Tensor, Shares]:
        """The next micro-batch (this rank's share of the global one) and the global target counts
        that turn this rank's summed losses into its share of the global means (ranks can hold
        different numbers of real targets, none at all, when rows end in padding)."""
        ids, labels = batches.next()
        depths = len(self.model.mtp) if getattr(self.model, "mtp", None) is not None else 0
        shares = Shares.of(labels, depths, self.env.world if self.env is not None else 1)
        if self.env is None:
            return ids, labels, shares
        lo = self.env.rank * self.local_batch
        ids, labels = ids[lo:lo + self.local_batch], labels[lo:lo + self.local_batch]
        return ids.to(self.env.device), labels.to(self.env.device), shares

    def train_step(self, batches: Batches) -> dict:
        cfg, model, env = self.cfg, self.model, self.env
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        per_layer: dict[str, list[float]] = {}
        counts = None
        if cfg.model.mtp is not None and model.mtp is not None:
            model.mtp_weight = cfg.model.mtp.weight_at(self.step, cfg.steps)
        mtp_sums: list[float] = []
        ep_layers = expert_parallel_layers(model)
        for layer in ep_layers:
            layer.stats.reset()
        fsdp = hasattr(model, "set_requires_gradient_sync")
        for micro in range(cfg.grad_accum):
            if fsdp:  # FSDP2 reduce-scatters the gradients once, after the last micro-batch
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            ids, labels, shares = self._micro_batch(batches)
            # balance-loss counts over every rank's tokens (the global batch's), in the forward and in
            # activation checkpointing's recompute during backward alike
            stats = global_statistics(torch.distributed.group.WORLD) if env is not None else nullcontext()
            with stats:
                out = model(ids, labels=labels)
                # the objective: summed losses x world / global targets, aux losses as they are; the same
                # graph on every rank, an empty share adds exactly 0 (moelab/train/objective.py). One
                # process: out.loss, equal bit for bit
                part = rank_loss(out, shares, model.mtp_weight)
                loss = part.loss if env is not None else out.loss
                (loss / cfg.grad_accum).backward()
            for name, value in [("loss", loss), ("lm_loss", part.lm), *out.aux_losses.items()]:
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
            for k, value in enumerate(part.mtp):  # unweighted, per depth (the rank's share of the global mean)
                if k == len(mtp_sums):
                    mtp_sums.append(0.0)
                mtp_sums[k] += float(value.detach()) / cfg.grad_accum
            layer_counts = [layer.last_counts_E.float() for layer in model.moe_layers()]
            counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
            for key in ROUTING_METRICS:  # mean over MoE layers, then over micro-batches
                vals = [float(m[key]) for m in (layer.last_metrics for layer in model.moe_layers()) if key in m]
                if vals:
                    sums[key] = sums.get(key, 0.0) + sum(vals) / len(vals) / cfg.grad_accum
                if key in PER_LAYER_METRICS and vals:
                    acc = per_layer.setdefault(key, [0.0] * len(vals))
                    per_layer[key] = [a + v / cfg.grad_accum for a, v in zip(acc, vals)]
        if env is not None:
            sync_gradients(model, env)
            for layer in self._all_moe_layers():  # the bias moves by the global load
                env.all_reduce(layer.load_accum_E)
        grad_norm = clip_gradients(model, cfg.grad_clip or float("inf"), env)  # a non-finite norm scales nothing
        lr = self.optimizer.param_groups[0]["lr"]
        skipped_loss = self._nonfinite_step(float(grad_norm), sums.get("loss", 0.0), ids, labels)
        if skipped_loss is not None:  # the global batch's loss, as a train record logs it
            return {"kind": "skipped", "step": self.step, "reason": "nonfinite", "loss": skipped_loss,
                    "grad_norm": float(grad_norm), "lr": lr}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_router_biases(model, self.step, cfg.steps)  # e.g. DeepSeek-V3's aux-loss-free bias, after the step
        self.step += 1
        step_s = time.perf_counter() - t0
        parallel = None
        if env is not None:
            sums, mtp_sums, per_layer, counts = self._reduce_metrics(sums, mtp_sums, per_layer, counts)
            parallel = self._parallel_stats(ep_layers, counts, step_s)
        tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        record = {"kind": "train", "step": self.step, **{k: sums[k] for k in ("loss", "lm_loss")},
                  "aux": {k: v for k, v in sums.items() if k not in ("loss", "lm_loss", *ROUTING_METRICS)},
                  **{k: sums[k] for k in ROUTING_METRICS if k in sums},
                  "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / step_s}
        if mtp_sums:
            record["mtp_loss"] = mtp_sums
            record["mtp_weight"] = model.mtp_weight
        record.update(load_stats(counts or []))
        if per_layer:
            record["layers"] = per_layer
        if parallel is not None:
            record["parallel"] = parallel
        maybe_inject_fault(self.step, env.rank if env is not None else 0)
        return record

    def _nonfinite_step(self, grad_norm: float, loss: float, ids, labels) -> float | None:
        """The global loss when this step's update was skipped (``nonfinite="skip"``), else None; raises
        for "stop". The decision is global (a NaN on any rank is a NaN for every rank) and so is the
        loss reported (the mean of the ranks' shares, not this rank's share)."""
        cfg, env = self.cfg, self.env
        bad, loss = global_verdict(grad_norm, loss, env)
        if not bad:
            return None
        step = self.step + 1
        reason = f"loss {loss:g}, gradient norm {grad_norm:g}"
        info = diagnose(self.model, ids, labels, self.run_dir / "diagnostics", step, reason, write=self.is_main,
                        env=self.env)
        if cfg.nonfinite == "stop" or self.skips >= cfg.max_skips:
            why = "nonfinite=stop" if cfg.nonfinite == "stop" else f"max_skips={cfg.max_skips} reached"
            raise NumericsError(f"step {step}: non-finite training step ({reason}); {describe(info)}. Stopped "
                                f"({why}); resume from the last checkpoint with a lower lr or longer warmup, or "
                                "set --nonfinite skip")
        self.skips += 1
        warnings.warn(f"step {step}: non-finite ({reason}), update skipped ({self.skips}/{cfg.max_skips}); "
                      f"{describe(info)}", stacklevel=2)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        for layer in self._all_moe_layers():  # this step's load moves no bias
            layer.load_accum_E.zero_()
        self.step += 1
        return loss

    def _after_step(self, record: dict, log) -> bool:
        """Loss-spike detection and its action (``spike_factor`` > 0); True when it rolled back."""
        cfg = self.cfg
        if record["kind"] != "train" or not cfg.spike_factor:
            return False
        median = self.spikes.check(record["loss"], record["step"])
        if median is None:
            return False
        record["spike"] = {"median": median, "factor": record["loss"] / median}
        what = (f"step {record['step']}: loss spike {record['loss']:.4f} = {record['loss'] / median:.2f}x the median "
                f"{median:.4f} of the last {cfg.spike_window} steps")
        if cfg.spike_action == "stop":
            if log is not None:
                log.write(record)
            raise NumericsError(f"{what}; stopped (spike_action=stop)")
        if cfg.spike_action == "warn":
            warnings.warn(what, stacklevel=2)
            return False
        return self._rollback(what, record, log)

    def _rollback(self, what: str, record: dict, log) -> bool:
        cfg = self.cfg
        # rank 0 lists, every rank gets its answer (none, or the same verified checkpoint): a rank that
        # decided from its own listing (node-local disks) went on while the others waited for it
        ckpt = choose_checkpoint(self.run_dir, self.env, missing_ok=True)
        if ckpt is None:
            warnings.warn(f"{what}; no checkpoint to roll back to yet (set --save-every)", stacklevel=3)
            return False
        if self.rollbacks >= cfg.max_rollbacks:
            raise NumericsError(f"{what}; max_rollbacks={cfg.max_rollbacks} already used: stopped")
        self.rollbacks += 1
        # N ranks back to a 1-process checkpoint (a run resumed in another layout): weights through a plain copy
        single = (read_single_for_parallel(ckpt, self.model, self.cfg, make_optimizer)
                  if self.env is not None and not is_distributed(ckpt) else None)
        meta = self._restore(ckpt, single)
        from_step, self.step = self.step, meta["step"]
        # the history holds the losses of the steps that had one (not a spike, not a skipped step): drop
        # those after the checkpoint, by step
        self.spikes.drop_after(self.step)
        warnings.warn(f"{what}; rolled back to {ckpt.name}, continuing on the data after the spike "
                      f"({self.rollbacks}/{cfg.max_rollbacks})", stacklevel=3)
        if log is not None:  # steps after the checkpoint are dropped from the log, the event is kept
            log.truncate(self.step)
            log.write({"kind": "rollback", "step": self.step, "from_step": from_step, "loss": record["loss"],
                       "median": record["spike"]["median"], "checkpoint": ckpt.name})
        return True

    def _all_moe_layers(self) -> list:
        from moelab.moe.layer import MoELayer

        return [m for m in self.model.modules() if isinstance(m, MoELayer)]

    def _reduce_metrics(self, sums: dict, mtp_sums: list, per_layer: dict, counts: list | None):
        """Every logged number as the global batch's: losses and metrics averaged over the ranks
        (each rank's lm loss is already its share of the global mean), expert counts summed. One
        all-reduce."""
        env = self.env
        keys = sorted(sums)
        layer_keys = sorted(per_layer)
        parts = [torch.tensor([sums[k] for k in keys], dtype=torch.float64),
                 torch.tensor(mtp_sums, dtype=torch.float64),
                 *[torch.tensor(per_layer[k], dtype=torch.float64) for k in layer_keys]]
        sizes = [p.numel() for p in parts]
        flat = torch.cat(parts) / env.world
        count_flat = torch.cat([c.double().cpu() for c in counts]) if counts else torch.zeros(0, dtype=torch.float64)
        both = torch.cat([flat, count_flat])
        env.all_reduce(both)
        flat, count_flat = both[:flat.numel()], both[flat.numel():]
        chunks = flat.split(sizes)
        sums = dict(zip(keys, chunks[0].tolist()))
        mtp_sums = chunks[1].tolist()
        per_layer = {k: c.tolist() for k, c in zip(layer_keys, chunks[2:])}
        if counts:
            counts = [c.float() for c in count_flat.split([c.numel() for c in counts])]
        return sums, mtp_sums, per_layer, counts

    def _parallel_stats(self, ep_layers: list, counts: list | None, step_s: float) -> dict:
        """Per-rank numbers of the step: expert load (share of the assignments the rank's experts
        computed), rows sent to / received from other ranks and seconds in all-to-all (summed over
        MoE layers, forward and backward), and the all-to-all share of the step time."""
        env = self.env
        sent = sum(layer.stats.rows_sent for layer in ep_layers)
        received = sum(layer.stats.rows_received for layer in ep_layers)
        a2a = sum(layer.stats.seconds for layer in ep_layers)
        rows = env.gather_floats([sent, received, a2a, step_s])
        out = {"world": env.world, "dp": env.dp, "ep": env.ep,
               "rows_sent": [int(r[0]) for r in rows], "rows_received": [int(r[1]) for r in rows],
               "a2a_s": [r[2] for r in rows], "a2a_frac": [r[2] / r[3] if r[3] else 0.0 for r in rows]}
        if counts and env.ep > 1:
            total = sum(counts)
            per_rank = total.view(env.ep, -1).sum(1)
            out["expert_load"] = [float(v) for v in per_rank / per_rank.sum().clamp_min(1)]
        return out

    def fit(self) -> RunResult:
        """Train to ``cfg.steps``. Several processes (torchrun): join the process group first; rank 0
        writes the config, metrics and the small checkpoint files, every rank its checkpoint shards."""
        owns_group = not torch.distributed.is_initialized()
        self._setup_distributed()
        try:
            return self._fit()
        finally:
            if self.env is not None and owns_group:
                shutdown()

    def _fit(self) -> RunResult:
        cfg = self.cfg
        created = not self.resume and not self.run_dir.exists()
        if self.is_main:  # durable in its parent (fileio.make_dirs), marked as moelab's (.moelab)
            mark_output_dir(self.run_dir, "run")
        try:
            self._setup_data()
            self._setup_model()
        except BaseException:
            if created and self.is_main:  # a new run that never started leaves no directory behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        if not self.resume and self.is_main:
            cfg.save(self.run_dir / RUN_CONFIG)
            self.tokenizer.save(self.run_dir / "tokenizer.json")
        log = (MetricsLog(self.run_dir / METRICS, truncate_after=self.step if self.resume else 0,
                          tensorboard=cfg.tensorboard) if self.is_main else None)
        self._log = log  # synced to disk before every checkpoint (_save)
        if not self.resume and log is not None:
            log.write({"kind": "meta", "step": 0, "unigram_entropy": self.entropy,
                       "train_sequences": len(self.train_data.input_ids), "val_sequences": len(self.val_data.input_ids),
                       "domains": self.train_data.domains, "attention": cfg.model.attention_kind(),
                       "kv_cache_bytes_per_token_fp32": cfg.model.kv_cache_bytes_per_token(4),
                       "balancing": cfg.model.moe.router.balancing() if cfg.model.moe is not None else None,
                       **({"parallel": {"world": self.env.world, "dp": self.env.dp, "ep": self.env.ep,
                                        "shard": cfg.parallel.shard}} if self.env is not None else {})})
        batches = Batches(self.train_data, cfg.batch_size, cfg.seed, self.position)
        bar = _progress(cfg, self.step) if self.is_main else None
        if bar is not None:
            m = cfg.model
            line = (f"attention {m.attention_kind()}, KV cache {m.kv_cache_bytes_per_token(4):,} bytes per token (fp32)"
                    + (f", MTP depth {m.mtp.num_modules}" if m.mtp is not None else ""))
            if m.moe is not None:
                line += f"; router {m.moe.router.type}, balancing: {m.moe.router.balancing_summary()}"
            if self.env is not None:
                line += (f"; {self.env.world} processes, mesh dp={self.env.dp} x ep={self.env.ep}, "
                         f"{cfg.parallel.shard}, {self.local_batch} sequences per rank")
            bar.write(line)
        record, val = None, {}
        try:
            while self.step < cfg.steps:
                record = self.train_step(batches)
                rolled_back = self._after_step(record, log)  # may mark a spike, stop, or roll back
                if log is not None and not rolled_back:
                    log.write(record)
                if record["kind"] != "train" or rolled_back:
                    if bar is not None:
                        bar.n = self.step
                        bar.refresh()
                    continue
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    val = self._eval(log)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self._save()
                if bar is not None:
                    bar.update(1)
                    post = dict(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                imb=f"{record.get('max_load', 0):.2f}",
                                **{k: f"{v:.4f}" for k, v in record["aux"].items()})
                    if "parallel" in record:
                        post["a2a"] = f"{max(record['parallel']['a2a_frac']):.0%}"
                    bar.set_postfix(**post)
            val = self._eval(log)
            self._save()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        last = record.get("lm_loss", float("nan")) if record else float("nan")
        return RunResult(self.run_dir, self.step, last, val, self.entropy)

    def _eval(self, log: MetricsLog | None) -> dict:
        val = evaluate(self.model, self.val_data, self.cfg.batch_size, self.cfg.eval_batches, env=self.env)
        if log is not None:
            log.write({"kind": "eval", "step": self.step, **val})
        return val

    def _guard_counts(self) -> dict:
        return {"skips": self.skips, "rollbacks": self.rollbacks,  # + the data's fingerprint (moelab.train.resume)
                **({DATA_KEY: self.data_files} if self.data_files is not None else {})}

    def _save(self) -> None:
        if getattr(self, "_log", None) is not None:  # the logged steps are durable before the checkpoint
            self._log.sync()
        if self.env is not None:
            from moelab.checkpoint.distributed import save_distributed_checkpoint

            save_distributed_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                                        self.position, self.cfg, self.tokenizer, self.cfg.keep_last, self.env,
                                        extra=self._guard_counts())
            return
        try:
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.position,
                            self.cfg, self.tokenizer, self.cfg.keep_last, extra=self._guard_counts())
        except (OSError, RuntimeError, SafetensorError) as e:  # the temp directory is gone, older ones intact
            from moelab.checkpoint.run import checkpoint_dirs

            if isinstance(e, RuntimeError) and not _looks_like_io(e):
                raise
            kept = checkpoint_dirs(self.run_dir)
            raise CheckpointError(
                f"could not write checkpoint step_{self.step:06d} in {self.run_dir / 'checkpoints'}: "
                f"{_save_failure(e, self.run_dir)} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                + (f"the previous checkpoint {kept[-1].name} is intact: fix the cause and --resume {self.run_dir}"
                   if kept else "no earlier checkpoint exists: fix the cause and train again")) from e


def _holds_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` exists and holds anything but moelab's marker (a plain file counts)."""
    return run_dir.exists() and (not run_dir.is_dir() or any(p.name != MARKER for p in run_dir.iterdir()))


def _looks_like_io(e: RuntimeError) -> bool:
    """torch.save reports write failures (a full disk included) as RuntimeError from its zip writer."""
    text = str(e)
    return any(w in text for w in ("inline_container", "unexpected pos", "file write failed", "PytorchStreamWriter",
                                   "No space", "Permission denied"))


def _save_failure(e: BaseException, run_dir: Path) -> str:
    """Why a save failed, in words: the errno when there is one, else what the filesystem says now
    (torch and safetensors turn a full disk into their own exceptions)."""
    words = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EROFS: "the filesystem is read-only"}
    if isinstance(e, OSError) and e.errno in words:
        return words[e.errno]
    root = run_dir / "checkpoints"
    try:
        if shutil.disk_usage(root if root.exists() else run_dir).free < 64 * 2**20:
            return "the disk is full"
    except OSError:
        pass
    if not os.access(root if root.exists() else run_dir, os.W_OK):
        return "permission denied"
    return "the write failed"


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, data: RunData | None = None,
          allow_data_change: bool = False) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume=True``; ``allow_data_change``: on
    data that differs from the checkpoint's fingerprint)."""
    return Trainer(cfg, run_dir, resume=resume, data=data, allow_data_change=allow_data_change).fit()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise MoelabError(f"{run_dir}: no {METRICS}; not a moelab run directory")
    return [rec for _, rec in parse_lines(path.read_text(), str(path))]
