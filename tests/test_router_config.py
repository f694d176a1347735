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
