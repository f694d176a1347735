"""torch.distributed on CPU (gloo), processes spawned from the test, each result compared with one
process doing the same work:

- expert parallelism: a MoE layer's outputs and every gradient, per router family;
- training: 3 steps with FSDP2, expert parallelism (replicated dense weights) and FSDP2 + EP on 4
  ranks give the losses, gradient norms and weights of one process on the same global batch,
  including DeepSeek-V3's aux-free bias and global-batch balance losses;
- distributed checkpoints: saved on 2 ranks, loaded on 1 and on 4 with identical weights, resumed
  to the same losses;
- failures: a rank that raises, vanishes or hangs stops every rank with an error, never a hang.
Tolerances: fp32, a different summation order (1e-5 relative for outputs, 1e-4 for gradients).
"""

import datetime
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.config import AoEConfig, AttentionConfig, ModelConfig, MoEConfig, MTPConfig, RouterConfig
from moelab.moe.layer import MoELayer
from tests.helpers import small_config

pytestmark = pytest.mark.slow

ROUTERS = {  # MoEConfig fields of each case
    "topk": {"router": RouterConfig(top_k=2)},
    "expert_choice": {"router": RouterConfig(type="expert_choice", top_k=2)},
    "deepseek_v3": {"router": RouterConfig(type="deepseek_v3", top_k=2, n_group=2, topk_group=1)},
    "top_p": {"router": RouterConfig(type="top_p", top_k=2)},
    "capacity": {"router": RouterConfig(top_k=2, capacity_factor=1.0)},
    "aoe": {"router": RouterConfig(top_k=2), "aoe": AoEConfig(d_low=8)},  # router-free: experts score tokens
    "aoe-router": {"router": RouterConfig(top_k=2), "aoe": AoEConfig(d_low=8, router_free=False)},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fn(rank, world, *args)
    open(os.path.join(done_dir, f"ok_{rank}"), "w").close()


def spawn(world: int, fn, *args, tmp_path) -> None:
    done = tmp_path / f"done_{fn.__name__}_{world}"
    done.mkdir(exist_ok=True)
    try:
        mp.spawn(_entry, args=(world, _free_port(), fn, args, str(done)), nprocs=world, join=True)
    except mp.ProcessExitedException:
        # NOTE: gloo's teardown occasionally aborts a process ("terminate called without an active
        # exception") after every assertion passed and the process group was destroyed; that is a
        # crash in process-group destruction, not a wrong result. Anything earlier fails the test.
        if not all((done / f"ok_{r}").exists() for r in range(world)):
            raise


# ---- expert parallelism of one layer ------------------------------------------------------------
def _layer(moe: dict) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(small_config(num_experts=4, **moe)).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g)


def _summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _ep_layer_worker(rank: int, world: int, router_name: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    from moelab.distributed.expert_parallel import apply_expert_parallel

    router = ROUTERS[router_name]
    ref = _layer(router)  # the reference: one process runs every rank's tokens through the whole layer
    ref_out, ref_gx = {}, {}
    for r in range(world):
        x, g = _inputs(r)
        x.requires_grad_(True)
        y, _ = ref(x)
        (y * g).sum().backward()
        ref_out[r], ref_gx[r] = y.detach(), x.grad
    ep = _layer(router)  # expert-parallel: each rank its own tokens, E / world experts
    assert apply_expert_parallel(ep) == 1
    x, g = _inputs(rank)
    x.requires_grad_(True)
    with torch.device("meta"):  # a tensor created without device= would land on meta and fail (issue 23.1)
        y, _ = ep(x)
        (y * g).sum().backward()
    torch.testing.assert_close(y.detach(), ref_out[rank], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_gx[rank], rtol=1e-5, atol=1e-5)
    for name, p in ep.experts.named_parameters():  # summed over all ranks' tokens, as in one process
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else _summed(p.grad)  # AoE's W_down
        torch.testing.assert_close(grad, getattr(ref.experts, name).grad, rtol=1e-4, atol=1e-5)
    if getattr(ep.router, "weight", None) is not None:  # the router sees only this rank's tokens: summed over ranks
        grad = ep.router.weight.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref.router.weight.grad, rtol=1e-4, atol=1e-5)
    stats = ep.experts.stats  # rows crossed ranks both ways (forward and backward)
    assert stats.rows_sent > 0 and stats.rows_received > 0 and stats.seconds > 0
    ep.eval()
    ref.eval()
    with torch.no_grad():  # eval / decoding (few tokens, no grad) still goes through the all-to-all
        x1 = x[:1, :1]
        torch.testing.assert_close(ep(x1)[0], ref(x1)[0], rtol=1e-5, atol=1e-5)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("router_name", list(ROUTERS))
def test_expert_parallel_layer_equals_single_process(router_name, tmp_path):
    spawn(2, _ep_layer_worker, router_name, tmp_path=tmp_path)


def _device_loss_worker(rank: int, world: int, scope: str) -> None:
    """DeepSeek-V2's expert-, device- and communication-level losses under EP: the mean of the ranks'
    losses equals one process's loss on all tokens with the experts' real devices (2 ranks), not the
    config's 4 groups."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    from moelab.distributed.expert_parallel import apply_expert_parallel
    from moelab.moe.balancing import global_statistics

    moe = {"router": RouterConfig(type="deepseek_v2", top_k=2, n_group=4, topk_group=2, expert_balance_coef=0.1,
                                  device_balance_coef=0.2, comm_balance_coef=0.3, balance_scope=scope)}
    ep = _layer(moe)
    apply_expert_parallel(ep)
    with global_statistics(dist.group.WORLD):
        _, routing = ep(_inputs(rank)[0])
    ref = _layer(moe)
    ref.device_groups = 2  # the real placement: experts 0-1 on rank 0, 2-3 on rank 1
    _, ref_routing = ref(torch.cat([_inputs(r)[0] for r in range(world)]))
    _, groups_routing = _layer(moe)(torch.cat([_inputs(r)[0] for r in range(world)]))  # 4 config groups
    for name in ("expert_balance", "device_balance", "comm_balance"):
        mean = _summed(routing.aux_losses[name].detach()) / world
        torch.testing.assert_close(mean, ref_routing.aux_losses[name].detach(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ref_routing.aux_losses["device_balance"], groups_routing.aux_losses["device_balance"])
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_device_level_losses_use_the_real_placement_and_global_statistics(scope, tmp_path):
    spawn(2, _device_loss_worker, scope, tmp_path=tmp_path)


# ---- training -------------------------------------------------------------------------------------
def _train_cfg(data: str, router: str = "topk", **parallel):
    from moelab.train import TrainConfig

    aoe = mtp = None
    if router == "mtp":  # DeepSeek-V3's multi-token prediction module on top (its block sharded too)
        router, mtp = "deepseek_v3", MTPConfig(num_modules=1)
    if router == "deepseek_v3":  # aux-free bias (fast rate to move it visibly), sequence-wise loss
        r = RouterConfig(type="deepseek_v3", top_k=2, n_group=2, topk_group=2, bias_update_rate=0.01,
                         seq_balance_coef=0.01)
    else:
        r = RouterConfig(top_k=2, load_balance_coef=0.05, z_loss_coef=1e-3)
        aoe = AoEConfig(d_low=8) if router == "aoe" else None
    model = ModelConfig(vocab_size=384, d_model=32, num_layers=2, max_seq_len=64, dense_ffn_dim=64,
                        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                        moe=MoEConfig(num_experts=4, expert_ffn_dim=32, router=r, aoe=aoe), mtp=mtp,
                        activation_checkpointing=router == "topk-ckpt")
    return TrainConfig(model=model, data=data, steps=3, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=1,
                       eval_every=0, eval_batches=2, grad_accum=2, grad_clip=0.5, progress=False,
                       parallel=dict(parallel))


def _train_worker(rank: int, world: int, data: str, run_dir: str, router: str, parallel: dict) -> None:
    from moelab.train import Trainer

    Trainer(_train_cfg(data, router, **parallel), run_dir).fit()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = []
    for i in range(120):
        if i % 2:
            a, b = (int(v) for v in torch.randint(0, 50, (2,), generator=g))
            lines.append(json.dumps({"text": f"What is {a} plus {b}? Answer: {a + b}. " * 4, "domain": "math"}))
        else:
            s = int(torch.randint(0, len(words), (1,), generator=g))
            lines.append(json.dumps({"text": " ".join(words[(s + k) % len(words)] for k in range(40)),
                                     "domain": "words"}))
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _train_records(run_dir) -> list[dict]:
    from moelab.train.trainer import read_metrics

    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single_runs(corpus, tmp_path_factory):
    """One process on the global batch: the reference of every distributed run below."""
    from moelab.train import train

    out = {}
    for router in ("topk", "deepseek_v3", "aoe", "mtp"):
        run = tmp_path_factory.mktemp(f"single_{router}") / "run"
        train(_train_cfg(corpus, router), run)
        out[router] = run
    return out


def _assert_same_run(run, ref) -> None:
    from moelab.loading import load

    got, want = _train_records(run), _train_records(ref)
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(got, want):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])
        assert a.get("mtp_loss", []) == pytest.approx(b.get("mtp_loss", []), rel=1e-5)
        for name in b["aux"]:
            assert a["aux"][name] == pytest.approx(b["aux"][name], rel=1e-4, abs=1e-7), (name, a["step"])
        for la, lb in zip(a["load"], b["load"]):  # global expert loads
            assert la == pytest.approx(lb, abs=1e-6)
    m, r = load(run), load(ref)  # the distributed checkpoint, read by one process
    ref_state = r.state_dict()
    for name, value in m.state_dict().items():  # weights and buffers (the aux-free bias among them)
        torch.testing.assert_close(value, ref_state[name], rtol=1e-4, atol=1e-5)  # Adam: lr-sized steps of tiny gradients


@pytest.mark.parametrize("router,world,parallel", [
    ("topk", 2, {"ep": 1, "shard": "fsdp"}),                 # FSDP2
    ("topk", 2, {"ep": 2, "shard": "replicate"}),            # EP, dense weights replicated (DDP)
    ("topk", 2, {"ep": 2, "shard": "fsdp"}),                 # EP + FSDP2 of the dense weights (1 x 2 mesh)
    ("topk", 4, {"ep": 2, "shard": "fsdp"}),                 # FSDP2 + EP on a 2 x 2 mesh
    ("deepseek_v3", 2, {"ep": 2, "shard": "fsdp"}),          # aux-free bias + sequence loss under EP
    ("aoe", 4, {"ep": 2, "shard": "fsdp"}),                  # AoE: W_down replicated, the rest split
    ("aoe", 2, {"ep": 2, "shard": "replicate"}),
    ("topk-ckpt", 2, {"ep": 2, "shard": "fsdp"}),            # activation checkpointing recomputes under EP
    ("mtp", 2, {"ep": 2, "shard": "fsdp"}),                  # DeepSeek-V3 MTP module, its experts split too
], ids=["fsdp", "ep-replicate", "fsdp+ep", "fsdp+ep-4ranks", "deepseek_v3-ep", "aoe-fsdp+ep-4ranks", "aoe-ep-replicate",
        "activation-checkpointing-ep", "mtp-ep"])
def test_training_equals_single_process(router, world, parallel, corpus, single_runs, tmp_path):
    run = tmp_path / "run"
    spawn(world, _train_worker, corpus, str(run), router, parallel, tmp_path=tmp_path)
    _assert_same_run(run, single_runs[router.split("-")[0]])  # checkpointing changes no number
    rec = _train_records(run)[-1]["parallel"]
    assert rec["world"] == world and rec["ep"] == parallel["ep"] and len(rec["a2a_s"]) == world
    if parallel["ep"] > 1:
        assert sum(rec["rows_sent"]) == sum(rec["rows_received"]) > 0
        assert sum(rec["expert_load"]) == pytest.approx(1.0)
    if router == "deepseek_v3":
        from moelab.loading import load

        bias = load(run).blocks[0].ffn.router.e_score_correction_bias
        assert bias.abs().sum() > 0  # it moved, and equals the single-process bias (checked above)


# ---- a rank whose share has no target (issue 23.2) ---------------------------------------------------
def _one_target_tail(cfg, rows: int = 4):
    """The run's data with ``rows`` full training rows and a last row holding one real token (a packed
    length of 1 mod seq_len): no LM or MTP target in it, so the rank that draws it has none."""
    from dataclasses import replace

    from moelab.data import PackedData
    from moelab.train.trainer import prepare_run_data

    data = prepare_run_data(cfg)
    tr = data.train
    ids, labels, dom = tr.input_ids[:rows + 1].clone(), tr.labels[:rows + 1].clone(), tr.domain_ids[:rows + 1].clone()
    ids[rows, 1:] = data.tokenizer.eos_id
    labels[rows, 1:] = -100
    dom[rows, 1:] = -1
    return replace(data, train=PackedData(ids, labels, dom, tr.domains))


def _empty_share_cfg(data: str, router: str, **parallel):
    cfg = _train_cfg(data, "mtp" if router == "mtp" else "topk", **parallel)
    if router == "no-balance":  # the objective is the LM loss alone: nothing else keeps the graph whole
        cfg.model.moe.router = RouterConfig(top_k=2)
    cfg.batch_size, cfg.grad_accum = 2, 1
    cfg.parallel.timeout_s = 30  # a desynchronised backward fails in 30 s, not 5 minutes
    return cfg


def _empty_share_worker(rank: int, world: int, data: str, run_dir: str, router: str, parallel: dict) -> None:
    from moelab.train import Trainer

    cfg = _empty_share_cfg(data, router, **parallel)
    Trainer(cfg, run_dir, data=_one_target_tail(cfg)).fit()


@pytest.mark.parametrize("router,parallel", [
    ("topk", {"ep": 2}), ("no-balance", {"ep": 2}), ("mtp", {"ep": 2}), ("topk", {"ep": 1, "shard": "replicate"}),
], ids=["ep-fsdp", "ep-no-balance-loss", "ep-mtp", "replicate"])
def test_a_rank_with_no_target_in_its_share_trains_as_one_process(router, parallel, corpus, tmp_path):
    """--nproc 2 --ep 2 --batch_size 2 --grad_accum 1 on data whose last row holds one token: the step
    that draws it gives one rank no target. That rank's backward runs the same collectives as the
    other's (it hung or raised before), its losses are 0 (MTP's were NaN) and the run equals one
    process on the same data."""
    from moelab.train import Trainer

    cfg = _empty_share_cfg(corpus, router)
    data = _one_target_tail(cfg)
    assert (data.train.labels[:, 1:] != -100).sum(1).tolist()[-1] == 0
    Trainer(cfg, tmp_path / "one", data=data).fit()
    spawn(2, _empty_share_worker, corpus, str(tmp_path / "run"), router, parallel, tmp_path=tmp_path)
    _assert_same_run(tmp_path / "run", tmp_path / "one")
    for rec in _train_records(tmp_path / "run"):
        assert all(math.isfinite(v) for v in (rec["loss"], rec["lm_loss"], *rec.get("mtp_loss", [])))


# ---- diagnosis under FSDP2 (issue 23.4) ---------------------------------------------------------------
def _diagnose_worker(rank: int, world: int, out_dir: str, reshard: bool) -> None:
    from moelab.distributed.runtime import init_from_env, parallelize
    from moelab.model import build_model
    from moelab.train.config import ParallelConfig
    from moelab.train.numerics import diagnose

    env = init_from_env(ParallelConfig(timeout_s=30, reshard_after_forward=reshard), 4)
    cfg = _train_cfg("unused").model
    torch.manual_seed(0)
    model = build_model(cfg)
    parallelize(model, env)
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if rank == 1:  # the NaNs sit in rank 1's shards only: rows 2-3 of the router, the last rows of the head
        params["blocks.1.ffn.router.weight"].to_local().data[0, 0] = float("nan")
        params["lm_head.weight"].grad.to_local()[-1, 0] = float("nan")  # a root parameter's
        # and rank 1's tokens alone make a non-finite output, early in the forward
        model.blocks[0].ffn_norm.register_forward_hook(lambda mod, args, out: out * float("nan"))
    # rank 0 holds 4 tokens: 8 assignments per MoE layer, the no-grad decode path (the experts module's
    # own forward does not run), rank 1 holds 16: the ranks run different modules
    ids = torch.randint(0, 384, (1, 4 if rank == 0 else 16), generator=torch.Generator().manual_seed(rank))
    info = diagnose(model, ids, ids, out_dir, 1, "test", write=rank == 0, env=env)
    with open(os.path.join(out_dir, f"info{rank}.json"), "w") as f:
        json.dump(info, f)
    # the parameters are sharded again, as the next training step expects
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    assert [n for n, _ in model.named_parameters()] == list(params)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "no-reshard-after-forward"])
def test_diagnose_under_fsdp_looks_at_every_ranks_shards(reshard, tmp_path):
    """A non-finite weight or gradient in another rank's shard, or an output on another rank's tokens, is
    found and named on every rank (rank 0 writes the diagnosis): a sharded parameter's local tensor is
    checked on each rank and the verdicts are reduced over the ranks, one per module or parameter
    (review item 3: per executed module, the lists of ranks that run different modules differed in
    length). Gradients are checked before the forward (review item 2: with ``reshard_after_forward:
    false`` FSDP2 holds gathered parameters after it, which have no gradient, and no bad gradient was
    found; they are sharded again after the diagnosis)."""
    spawn(2, _diagnose_worker, str(tmp_path), reshard, tmp_path=tmp_path)
    for rank in range(2):
        info = json.loads((tmp_path / f"info{rank}.json").read_text())
        assert info["first_nonfinite_parameter"] == "blocks.1.ffn.router.weight", info
        assert info["first_nonfinite_gradient"] == "lm_head.weight", info
        assert info["first_nonfinite_output"] == "blocks.0.ffn_norm", info
    assert json.loads((tmp_path / "step_000001" / "diagnosis.json").read_text())["first_nonfinite_parameter"] \
        == "blocks.1.ffn.router.weight"


def _nan_gradient_cfg(data: str, **parallel):
    cfg = _train_cfg(data, "topk", **parallel)
    cfg.nonfinite = "skip"
    cfg.parallel.timeout_s = 60
    return cfg


def _nan_before_clipping(trainer, step: int, name: str, on) -> None:
    """At step ``step`` the gradient of ``name`` gets a NaN in this rank's shard (where ``on()``) after the
    gradient reduction, just before clipping: how a sharded (FSDP2) gradient can be poisoned from outside."""
    import moelab.train.trainer as trainer_mod

    real = trainer_mod.clip_gradients

    def clip_gradients(model, max_norm, env=None):
        if trainer.step + 1 == step and on():
            grad = dict(model.named_parameters())[name].grad
            (grad.to_local() if hasattr(grad, "to_local") else grad)[0, 0] = float("nan")
        return real(model, max_norm, env)

    trainer_mod.clip_gradients = clip_gradients


def _nan_gradient_worker(rank: int, world: int, data: str, run_dir: str, parallel: dict) -> None:
    from moelab.train import Trainer
    from tests.test_train_guards import nan_gradient_at

    t = Trainer(_nan_gradient_cfg(data, **parallel), run_dir)
    if parallel.get("shard") == "replicate":  # plain dense weights: a hook on the parameter, before the all-reduce
        nan_gradient_at(t, 2, "blocks.1.attn.o_proj.weight", on=lambda: rank == 1)
    else:
        _nan_before_clipping(t, 2, "blocks.1.attn.o_proj.weight", on=lambda: rank == 1)
    t.fit()


@pytest.mark.parametrize("parallel", [{"ep": 2, "shard": "replicate"}, {"ep": 2, "shard": "fsdp"}],
                         ids=["ep-replicate", "ep-fsdp"])
def test_a_nonfinite_gradient_on_one_rank_is_named_and_the_skipped_step_logs_the_global_loss(parallel, corpus,
                                                                                             tmp_path):
    """Rank 1's gradient of one weight gets a NaN at step 2, with clipping on (grad_clip 0.5). Review item
    1: clip_grad_norm scaled every gradient by the NaN factor of the NaN norm, so the diagnosis named
    the model's first parameter; review item 6: the skipped step logged rank 0's share of the loss,
    not the global batch's. Both as one process with the same NaN; and the run goes on as one process
    does (under FSDP2 after the diagnosis resharded the parameters)."""
    from moelab.train import Trainer
    from moelab.train.trainer import read_metrics
    from tests.test_train_guards import nan_gradient_at

    one = Trainer(_nan_gradient_cfg(corpus), tmp_path / "one")
    nan_gradient_at(one, 2, "blocks.1.attn.o_proj.weight")
    with pytest.warns(UserWarning, match="first non-finite gradient: blocks.1.attn.o_proj.weight;"):
        one.fit()
    spawn(2, _nan_gradient_worker, corpus, str(tmp_path / "run"), parallel, tmp_path=tmp_path)
    for run in ("one", "run"):
        info = json.loads((tmp_path / run / "diagnostics" / "step_000002" / "diagnosis.json").read_text())
        assert info["first_nonfinite_gradient"] == "blocks.1.attn.o_proj.weight", (run, info)
    got, want = ([r for r in read_metrics(tmp_path / run) if r["kind"] in ("train", "skipped")] for run in ("run", "one"))
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want] == \
        [("train", 1), ("skipped", 2), ("train", 3)]
    assert got[1]["loss"] == pytest.approx(want[1]["loss"], rel=1e-5)
    _assert_losses([got[0], got[2]], [want[0], want[2]])


# ---- distributed checkpoints ----------------------------------------------------------------------
def _resume_worker(rank: int, world: int, data: str, run_dir: str, steps: int, check_against: str) -> None:
    from moelab.checkpoint.distributed import load_distributed_checkpoint
    from moelab.checkpoint.run import latest_checkpoint
    from moelab.distributed.runtime import init_from_env, parallelize
    from moelab.loading import load
    from moelab.model import build_model
    from moelab.train import Trainer

    cfg = _train_cfg(data, "topk", ep=2)
    env = init_from_env(cfg.parallel, 4)  # first: the checkpoint read into this layout, weight by weight
    model = build_model(cfg.model)
    parallelize(model, env)
    load_distributed_checkpoint(latest_checkpoint(run_dir), model)
    want = load(check_against).state_dict()
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        assert torch.equal(full, want[name]), name
    cfg.steps, cfg.save_every = steps, 2
    Trainer(cfg, run_dir, resume=True).fit()  # then the run continued
    dist.destroy_process_group()


def test_checkpoint_saved_on_2_ranks_loads_on_1_and_4(corpus, tmp_path):
    from moelab.checkpoint.run import checkpoint_dirs
    from moelab.loading import load
    from moelab.train import Trainer

    run = tmp_path / "run2"
    cfg = _train_cfg(corpus, "topk", ep=2)
    cfg.steps, cfg.save_every = 4, 2
    spawn(2, _train_worker_cfg, corpus, str(run), cfg.to_dict(), tmp_path=tmp_path)
    step2, step4 = checkpoint_dirs(run)
    assert (step2 / "dcp" / ".metadata").is_file() and not (step2 / "model.safetensors").exists()
    full = _train_records(run)

    def from_step2(name):
        d = tmp_path / name
        shutil.copytree(run, d)
        shutil.rmtree(d / "checkpoints" / step4.name)
        return d

    # the same layout: resumes exactly, bit for bit (as single-process resume does)
    same = from_step2("on2")
    spawn(2, _resume_same_worker, corpus, str(same), cfg.to_dict(), tmp_path=tmp_path)
    assert [(r["loss"], r["grad_norm"]) for r in _train_records(same)] == [(r["loss"], r["grad_norm"]) for r in full]
    # one process: moelab.load reads it as a normal model, and training resumes to the same losses
    one = from_step2("on1")
    ref_model = load(one)
    cfg1 = _train_cfg(corpus, "topk")  # the layout may change on resume
    cfg1.steps, cfg1.save_every = 4, 2
    Trainer(cfg1, one, resume=True).fit()
    _assert_losses(_train_records(one), full)
    assert (checkpoint_dirs(one)[-1] / "model.safetensors").is_file()  # a single-process checkpoint now
    # four ranks (2 x 2 mesh): identical weights after loading, then the same losses
    four = from_step2("on4")
    from moelab.checkpoint.model_files import save_model

    save_model(ref_model, tmp_path / "step2_model")
    spawn(4, _resume_worker, corpus, str(four), 4, str(tmp_path / "step2_model"), tmp_path=tmp_path)
    _assert_losses(_train_records(four), full)


def test_single_process_checkpoint_resumes_on_2_ranks(corpus, tmp_path):
    """1 -> N: a normal checkpoint (safetensors + trainer_state.pt) is sharded on load, optimizer state
    included, and the continued run equals the single-process continuation."""
    from moelab.train import Trainer

    cfg = _train_cfg(corpus, "topk")
    cfg.steps, cfg.save_every = 2, 0
    Trainer(cfg, tmp_path / "a").fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cfg.steps = 4
    Trainer(cfg, tmp_path / "a", resume=True).fit()
    spawn(2, _resume_plain_worker, corpus, str(tmp_path / "b"), tmp_path=tmp_path)
    _assert_losses(_train_records(tmp_path / "b"), _train_records(tmp_path / "a"))


def _spike_at(trainer, step: int) -> None:
    """Step ``step``'s loss x 10, once: the objective of one process (out.loss) and of a rank (built from
    the summed LM loss) alike."""
    real_step, fired = trainer.train_step, []

    def train_step(batches):
        if trainer.step + 1 != step or fired:
            return real_step(batches)
        fired.append(True)
        real_forward = trainer.model.forward

        def forward(*a, **kw):
            out = real_forward(*a, **kw)
            out.loss, out.lm_loss_sum = out.loss * 10, out.lm_loss_sum * 10
            return out

        trainer.model.forward = forward
        try:
            return real_step(batches)
        finally:
            del trainer.model.forward

    trainer.train_step = train_step


def _blind_at(trainer, step: int) -> None:
    """From step ``step`` on, this process lists no checkpoint (node-local disks, a stale network
    filesystem): only a decision rank 0 shares can make it roll back with the others."""
    real_step = trainer.train_step

    def train_step(batches):
        if trainer.step + 1 == step:
            import moelab.checkpoint.run as run_mod

            run_mod.checkpoint_dirs = lambda run_dir: []
        return real_step(batches)

    trainer.train_step = train_step


def _rollback_worker(rank: int, world: int, run_dir: str, cfg: dict, blind: bool) -> None:
    from moelab.train import TrainConfig, Trainer

    t = Trainer(TrainConfig.from_dict(cfg), run_dir, resume=True)
    _spike_at(t, 8)
    if blind and rank == world - 1:
        _blind_at(t, 8)
    t.fit()


@pytest.fixture(scope="module")
def rollback_reference(corpus, tmp_path_factory):
    """One process: a run checkpointed at step 2 (copied to ``base``), then resumed to step 9 with a spike
    at step 8 that rolls back to step 2. Returns (that config, base, the continued run)."""
    from moelab.train import Trainer

    root = tmp_path_factory.mktemp("rollback")
    cfg = _train_cfg(corpus, "topk")
    cfg.steps, cfg.save_every = 2, 0
    Trainer(cfg, root / "a").fit()
    shutil.copytree(root / "a", root / "base")
    cfg.steps, cfg.spike_factor, cfg.spike_action = 9, 3.0, "rollback"
    one = Trainer(cfg, root / "a", resume=True)
    _spike_at(one, 8)
    with pytest.warns(UserWarning, match="rolled back to step_000002"):
        one.fit()
    return cfg, root / "base", root / "a"


@pytest.mark.parametrize("world,parallel,blind", [
    (2, {"ep": 2}, False),                         # EP + FSDP2 (1 x 2 mesh)
    (2, {"ep": 2, "shard": "replicate"}, True),    # EP, replicated dense weights; rank 1 lists no checkpoint
    (4, {"ep": 2}, False),                         # EP + FSDP2 on a 2 x 2 mesh
], ids=["ep-fsdp", "ep-replicate-blind-rank", "2x2"])
def test_spike_rollback_on_n_ranks_to_a_single_process_checkpoint(world, parallel, blind, rollback_reference, tmp_path):
    """Issue 23.4: a run resumed on N ranks from a 1-process checkpoint rolls back to that checkpoint at a
    spike (it crashed loading the plain weights and optimizer state into the sharded model), and goes
    on as one process does. Review item 5: whether there is a checkpoint to roll back to is rank 0's
    finding, shared; a rank that listed none itself (``blind``) went on alone while the others waited
    for it in the checkpoint choice."""
    from moelab.train import TrainConfig
    from moelab.train.trainer import read_metrics

    ref_cfg, base, ref = rollback_reference
    cfg = TrainConfig.from_dict(ref_cfg.to_dict())
    for name, value in {**parallel, "timeout_s": 30}.items():
        setattr(cfg.parallel, name, value)
    run = tmp_path / "run"
    shutil.copytree(base, run)
    spawn(world, _rollback_worker, str(run), cfg.to_dict(), blind, tmp_path=tmp_path)
    rb = [r for r in read_metrics(run) if r["kind"] == "rollback"]
    assert [(r["from_step"], r["checkpoint"]) for r in rb] == [(8, "step_000002")]
    _assert_losses(_train_records(run), _train_records(ref))


def _resume_plain_worker(rank: int, world: int, data: str, run_dir: str) -> None:
    from moelab.train import Trainer

    cfg = _train_cfg(data, "topk", ep=2)
    cfg.steps = 4
    Trainer(cfg, run_dir, resume=True).fit()


def test_bf16_mixed_precision_trains_close_to_fp32(corpus, single_runs, tmp_path):
    """FSDP2 with bf16 compute (fp32 master weights and gradient reduction): the path GPUs use, checked
    on CPU for correctness within bf16 tolerance."""
    run = tmp_path / "run"
    spawn(2, _train_worker, corpus, str(run), "topk", {"ep": 2, "param_dtype": "bfloat16"}, tmp_path=tmp_path)
    got, want = _train_records(run), _train_records(single_runs["topk"])
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
        assert a["loss"] != b["loss"]  # it really computed in bf16


def _resume_same_worker(rank: int, world: int, data: str, run_dir: str, cfg: dict) -> None:
    from moelab.train import TrainConfig, Trainer

    Trainer(TrainConfig.from_dict(cfg), run_dir, resume=True).fit()


def _train_worker_cfg(rank: int, world: int, data: str, run_dir: str, cfg: dict) -> None:
    from moelab.train import TrainConfig, Trainer

    Trainer(TrainConfig.from_dict(cfg), run_dir).fit()


def _assert_losses(got, want) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]


def test_distributed_checkpoint_refuses_pickled_objects(tmp_path):
    """DCP would unpickle non-tensor entries and its metadata; moelab's reader refuses both."""
    import torch.distributed.checkpoint as dcp

    from moelab.checkpoint.distributed import SafeReader
    from moelab.errors import CheckpointError

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    dcp.save({"w": torch.ones(2), "obj": {"x": Evil()}}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="pickled objects"):
        SafeReader(str(tmp_path / "ck")).read_metadata()
    # metadata that names anything but DCP's own classes is refused before it is built
    import pickle

    (tmp_path / "ck2").mkdir()
    (tmp_path / "ck2" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="not a checkpoint metadata class"):
        SafeReader(str(tmp_path / "ck2")).read_metadata()
    assert not marker.exists()


# ---- failures ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["raise", "exit", "hang"])
def test_a_failing_rank_stops_every_rank(mode, corpus, tmp_path):
    env = {**os.environ, "MOELAB_FAULT": f"1:1:{mode}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moelab.cli", "train", "--config", str(_write_cfg(corpus, tmp_path)),
           "--nproc", "2", "--ep", "2", "--out", str(tmp_path / "run"), "--parallel.timeout-s", "15"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "training on 2 processes stopped" in proc.stderr and "Traceback" not in proc.stderr
    if mode == "raise":
        assert "[rank 1] injected fault" in proc.stderr
    if mode == "hang":
        assert "timed out" in proc.stderr
    assert not any(p.name.startswith("step_") for p in (tmp_path / "run" / "checkpoints").glob("*"))


def _write_cfg(corpus, tmp_path):
    import yaml

    cfg = _train_cfg(corpus, "topk")
    cfg.steps = 4
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path
