"""Bad router / capacity options raise ConfigError naming the field; round trip of the new fields."""

import pytest

from moelab.config import ModelConfig, MoEConfig, RouterConfig, load_config, save_config
from moelab.errors import ConfigError


@pytest.mark.parametrize("build, field", [
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(type="expert_choice", top_k=4, capacity_factor=1.5)),
     "top_k"),
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(type="expert_choice", top_k=3, capacity_factor=2.0)),
     "capacity_factor"),
    (lambda: RouterConfig(type="top_p", top_p=0.0), "router.top_p"),
    (lambda: RouterConfig(type="top_p", top_p=1.5), "router.top_p"),
    (lambda: MoEConfig(num_experts=6, router=RouterConfig(type="deepseek_v3", n_group=4)), "n_group"),
    (lambda: RouterConfig(type="deepseek_v3", n_group=2, topk_group=3), "topk_group"),
    (lambda: MoEConfig(num_experts=8, router=RouterConfig(type="deepseek_v2", top_k=3, n_group=4, topk_group=1)),
     "topk_group"),
    (lambda: RouterConfig(capacity_factor=0.0), "router.capacity_factor"),
    (lambda: RouterConfig(capacity_factor=-1.0), "router.capacity_factor"),
    (lambda: RouterConfig(eval_capacity_factor=0.0), "router.eval_capacity_factor"),
    (lambda: RouterConfig(type="switch", top_k=2), "router.top_k"),
    (lambda: RouterConfig(type="topk", n_group=2, topk_group=1), "topk_group"),
    (lambda: RouterConfig(type="topk", bias_update_rate=1e-3), "bias_update_rate"),
    (lambda: RouterConfig(type="topk", noisy_load_loss_coef=0.1), "noisy_load_loss_coef"),
    (lambda: RouterConfig(drop_priority="random"), "drop_priority"),
    (lambda: RouterConfig(expert_choice_eval="peek"), "expert_choice_eval"),
    (lambda: RouterConfig(seq_balance_coef=-1e-4), "seq_balance_coef"),
    (lambda: RouterConfig(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (lambda: RouterConfig(type="deepseek_v3", group_score="mean"), "group_score"),
    (lambda: RouterConfig(noise_epsilon=-1e-2), "noise_epsilon"),
    (lambda: RouterConfig(topk_norm_p=0.0, norm_topk_prob=True, softmax_order="softmax_then_topk"), "topk_norm_p"),
    (lambda: RouterConfig(topk_norm_p=2.0), "topk_norm_p"),  # needs softmax_then_topk + norm_topk_prob
    (lambda: RouterConfig(load_balance_coef=-0.01), "load_balance_coef"),
])
def test_bad_router_options_name_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build()
    assert field in str(err.value)


def test_new_router_fields_round_trip(tmp_path):
    cfg = ModelConfig(moe=MoEConfig(num_experts=8, router=RouterConfig(
        type="deepseek_v3", top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, bias_update_rate=1e-3,
        seq_balance_coef=1e-4, capacity_factor=1.25, eval_capacity_factor=2.0, drop_priority="score")),
        activation_checkpointing=True)
    for suffix in (".yaml", ".json"):
        save_config(cfg, tmp_path / f"c{suffix}")
        assert load_config(tmp_path / f"c{suffix}") == cfg


def test_balancing_defaults_follow_each_router_paper():
    def active(**kw):
        return RouterConfig(**kw).active_losses()

    assert active(type="topk") == {"load_balance": 0.01}
    assert active(type="switch", top_k=1) == {"load_balance": 0.01}
    assert active(type="noisy_topk") == {"importance": 0.1, "noisy_load": 0.1}
    assert active(type="expert_choice") == {}  # uniform by construction: no loss, no constant 0.01
    assert active(type="top_p") == {"load_balance": 0.01, "entropy": 1e-4}
    assert active(type="deepseek_v3") == {"seq_balance": 1e-4}  # no batch-wise Switch loss 100x larger
    assert RouterConfig(type="deepseek_v3").effective_bias_update_rate == 1e-3
    assert RouterConfig(type="topk").effective_bias_update_rate == 0.0
    # V2: the device / communication losses exist only with more than one group
    assert active(type="deepseek_v2") == {"expert_balance": 0.003}
    assert active(type="deepseek_v2", n_group=4, topk_group=2) == {
        "expert_balance": 0.003, "device_balance": 0.05, "comm_balance": 0.02}
    assert RouterConfig(type="deepseek_v2").effective_balance_scope == "sequence"
    assert RouterConfig(type="topk").effective_balance_scope == "batch"


def test_explicit_coefficients_are_honoured_and_defaults_follow_the_type(tmp_path):
    import dataclasses

    assert RouterConfig(type="expert_choice", load_balance_coef=0.02).active_losses() == {"load_balance": 0.02}
    assert RouterConfig(type="deepseek_v3", seq_balance_coef=0.0, bias_update_rate=0.0).active_losses() == {}
    assert RouterConfig(type="deepseek_v3", bias_update_rate=0.0).effective_bias_update_rate == 0.0
    assert RouterConfig(type="topk", z_loss_coef=1e-3).active_losses() == {"load_balance": 0.01, "z_loss": 1e-3}
    # defaults are resolved on use, so changing the type changes them (nothing stale is stored)
    r = dataclasses.replace(RouterConfig(type="topk"), type="expert_choice")
    assert r.active_losses() == {}
    cfg = ModelConfig(moe=MoEConfig(router=RouterConfig(type="deepseek_v3")))
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.moe.router.load_balance_coef is None
    assert RouterConfig(type="deepseek_v3").balancing_summary() == "seq_balance 0.0001, aux-free bias gamma 0.001"


@pytest.mark.parametrize("router,expected", [
    (dict(type="deepseek_v3"), {"seq_balance"}),
    (dict(type="expert_choice", top_k=2), set()),
    (dict(type="topk", top_k=2), {"load_balance"}),
    (dict(type="noisy_topk", top_k=2), {"importance", "noisy_load"}),
])
def test_model_adds_exactly_the_default_losses(router, expected):
    import torch

    from moelab.model import build_model
    from tests.helpers import small_config

    model = build_model(small_config(router=RouterConfig(**router))).train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert set(model(ids, labels=ids).aux_losses) == expected
