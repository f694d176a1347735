"""The parallel layout's validation and the pieces of distributed training that need no second
process (fast; tests/test_distributed.py spawns the processes)."""

import pytest
import torch
import torch.distributed as dist

from moelab.cli import main
from moelab.config import RouterConfig
from moelab.distributed.runtime import check_batch
from moelab.errors import ConfigError
from moelab.moe.balancing import devices_per_token, switch_load_balance_loss
from moelab.train.config import ParallelConfig, TrainConfig, config_differences, non_resumable


@pytest.mark.parametrize("kwargs,field", [
    ({"ep": 0}, "parallel.ep"), ({"dp": -1}, "parallel.dp"), ({"shard": "zero3"}, "parallel.shard"),
    ({"param_dtype": "fp8"}, "parallel.param_dtype"), ({"timeout_s": 0}, "parallel.timeout_s"),
    ({"backend": "mpi"}, "parallel.backend"),
])
def test_parallel_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ParallelConfig(**kwargs)


def test_mesh_shape_is_validated_against_world_and_experts():
    assert ParallelConfig(ep=2).mesh_shape(4, 8) == (2, 2)
    assert ParallelConfig(ep=4, dp=1).mesh_shape(4, 8) == (1, 4)
    with pytest.raises(ConfigError, match="must divide the world size 3"):
        ParallelConfig(ep=2).mesh_shape(3, 8)
    with pytest.raises(ConfigError, match="must divide model.moe.num_experts=6"):
        ParallelConfig(ep=4).mesh_shape(4, 6)
    with pytest.raises(ConfigError, match="dp x ep = 1 x 2 must equal the world size 4"):
        ParallelConfig(ep=2, dp=1).mesh_shape(4, 8)
    with pytest.raises(ConfigError, match="needs an MoE model"):
        ParallelConfig(ep=2).mesh_shape(2, None)
    with pytest.raises(ConfigError, match="batch_size"):
        check_batch(6, 4)
    assert check_batch(8, 4) == 2


def test_parallel_layout_round_trips_and_may_change_on_resume():
    cfg = TrainConfig(parallel=ParallelConfig(ep=2, shard="replicate"))
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.parallel == cfg.parallel
    diff = config_differences(TrainConfig(), cfg)
    assert diff == ["parallel.ep", "parallel.shard"] and non_resumable(diff) == []
    assert non_resumable(config_differences(TrainConfig(), TrainConfig(lr=1e-4))) == ["lr"]
    with pytest.raises(ConfigError, match="parallel.shard"):
        TrainConfig.from_dict({"parallel": {"shard": "nope"}})
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig.from_dict({"parallel": {"tp": 2}})


def test_cli_refuses_a_bad_layout_before_launching(tmp_path, capsys):
    rc = main(["train", "--preset", "tiny", "--nproc", "3", "--ep", "2", "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "parallel.ep" in err and "world size 3" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--preset", "tiny", "--nproc", "0", "--out", str(tmp_path / "r")]) == 2


def test_devices_per_token_follows_group_limited_routing():
    assert devices_per_token(RouterConfig(top_k=2), 4) == 2  # no groups: each expert may be elsewhere
    assert devices_per_token(RouterConfig(top_k=6), 4) == 4
    # 8 groups over 4 devices (2 per device), 3 groups per token: at most 3 devices
    v2 = RouterConfig(type="deepseek_v2", top_k=6, n_group=8, topk_group=3)
    assert devices_per_token(v2, 4) == 3
    # 2 groups of 4 devices each, 1 group per token: at most the group's 4 devices
    assert devices_per_token(RouterConfig(type="deepseek_v2", top_k=6, n_group=2, topk_group=1), 8) == 4


def _one_rank_group():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())


def test_global_statistics_of_one_rank_equal_local_and_expert_parallel_of_one_rank_is_the_layer():
    """With a 1-rank group the global statistics are the local ones and EP is the identity: the
    wiring (counts summed, all-to-all with one split, DTensor experts) without a second process."""
    from moelab.distributed.expert_parallel import apply_expert_parallel
    from moelab.moe.balancing import global_statistics
    from moelab.moe.layer import MoELayer
    from tests.helpers import small_config

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(10, 4), -1)
    idx = torch.randint(0, 4, (20,))
    local = switch_load_balance_loss(probs, idx)
    _one_rank_group()
    try:
        with global_statistics(dist.group.WORLD):
            assert torch.equal(switch_load_balance_loss(probs, idx), local)
        layer = MoELayer(small_config()).train()
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.3)
        ref = MoELayer(small_config()).train()
        ref.load_state_dict(layer.state_dict())
        apply_expert_parallel(layer)
        x = torch.randn(2, 5, 32, requires_grad=True)
        y, _ = layer(x)
        y_ref, _ = ref(x)
        torch.testing.assert_close(y, y_ref)
        y.sum().backward()
        g = layer.experts.gate_EFD.grad
        x.grad = None
        y_ref.sum().backward()
        torch.testing.assert_close(g.full_tensor(), ref.experts.gate_EFD.grad)
        assert layer.device_groups == 1
    finally:
        dist.destroy_process_group()


def test_aoe_experts_under_expert_parallelism_of_one_rank_are_the_layer():
    """AoE keeps W_down whole on every rank (a plain, replicated parameter) and splits the rest."""
    from torch.distributed.tensor import DTensor

    from moelab.config import AoEConfig
    from moelab.distributed.expert_parallel import apply_expert_parallel
    from moelab.moe.layer import MoELayer
    from tests.helpers import small_config

    _one_rank_group()
    try:
        torch.manual_seed(0)
        layer = MoELayer(small_config(aoe=AoEConfig(d_low=8))).train()
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.3)
        ref = MoELayer(small_config(aoe=AoEConfig(d_low=8))).train()
        ref.load_state_dict(layer.state_dict())
        apply_expert_parallel(layer)
        assert not isinstance(layer.experts.wdown_ELD, DTensor) and isinstance(layer.experts.wo_EDW, DTensor)
        x = torch.randn(2, 5, 32)
        torch.testing.assert_close(layer(x)[0], ref(x)[0])
        assert layer.active_expert_params() == ref.active_expert_params()
    finally:
        dist.destroy_process_group()


def test_expert_parallel_traffic_of_deepseek_v3_by_hand():
    """DeepSeek-V3 (61 layers, first 3 dense, d_model 7168, top-8 of 256) over 64 ranks, fp8 dispatch:
    per MoE layer 8 * 63/64 rows of 7168 values leave the rank, 1 byte out and 2 back, then 2 + 2
    bytes of gradients in backward."""
    from moelab.distributed.sizing import bandwidth_needed, expert_parallel_traffic
    from moelab.params import count_params
    from moelab.presets import get_preset

    cfg = get_preset("deepseek-v3")
    t = expert_parallel_traffic(cfg, 64, dispatch_bytes=1)
    rows = 8 * 63 / 64
    assert t["moe_layers"] == 58 and t["rows_off_rank_per_layer"] == rows
    assert t["forward_bytes_per_token"] == pytest.approx(58 * rows * 7168 * 3)  # 9.82 MB
    assert t["train_bytes_per_token"] == pytest.approx(58 * rows * 7168 * 7)  # 22.9 MB
    c = count_params(cfg)
    assert t["train_flops_per_token"] == 6 * (c.active_params - c.active_breakdown["embeddings"])
    assert bandwidth_needed(t, 400) == pytest.approx(400e12 / t["train_flops_per_token"] * t["train_bytes_per_token"])
    assert expert_parallel_traffic(cfg, 1)["train_bytes_per_token"] == 0  # one rank: nothing leaves it


def test_params_cli_sizes_expert_parallel_traffic(capsys):
    assert main(["params", "deepseek-v3", "--ep", "64", "--dispatch-bytes", "1"]) == 0
    out = capsys.readouterr().out
    assert "7.88 rows of 7168 values" in out and "9.8MB per token forward" in out and "GFLOP" in out
