import json

import pytest

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig, load_config, save_config
from moelab.errors import ConfigError
from moelab.moe.routers import ROUTERS, build_router
from moelab.presets import PRESETS


@pytest.mark.parametrize("build, field", [
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(top_k=5)), "top_k"),
    (lambda: ModelConfig(d_model=30, attention=AttentionConfig(num_heads=4)), "num_heads"),
    (lambda: AttentionConfig(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (lambda: ModelConfig(d_model=-8), "d_model"),
    (lambda: ModelConfig(vocab_size=0), "vocab_size"),
    (lambda: MoEConfig(expert_ffn_dim=-1), "expert_ffn_dim"),
    (lambda: MoEConfig(num_experts=0), "num_experts"),
    (lambda: RouterConfig(type="nonsense"), "router.type"),
    (lambda: RouterConfig(softmax_order="sideways"), "softmax_order"),
    (lambda: ModelConfig(norm="batchnorm"), "norm"),
    (lambda: ModelConfig(activation="relu2"), "activation"),
    (lambda: AttentionConfig(sliding_window=0), "sliding_window"),
    (lambda: AttentionConfig(qk_norm="sometimes"), "qk_norm"),
    (lambda: RouterConfig(jitter_eps=1.5), "jitter_eps"),
    (lambda: RouterConfig(balance_scope="device"), "balance_scope"),
    (lambda: RouterConfig(load_balance_coef=-0.1), "load_balance_coef"),
    (lambda: MoEConfig(moe_every=2, moe_offset=2), "moe_offset"),
    (lambda: MoEConfig(shared_expert_gate=True), "shared_expert_gate"),
    (lambda: ModelConfig(num_layers=2, moe=MoEConfig(first_k_dense=2)), "moe"),
    (lambda: ModelConfig(num_layers=2, moe=MoEConfig(dense_layers=(5,))), "dense_layers"),
])
def test_bad_values_name_the_field(build, field):
    with pytest.raises(ValueError) as err:
        build()
    assert field in str(err.value)
    assert isinstance(err.value, ConfigError)


def test_unknown_key_is_an_error():
    data = ModelConfig().to_dict()
    data["moe"]["router"]["topk"] = 2
    with pytest.raises(ConfigError, match="moe.router.topk"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_round_trip_exact(tmp_path, preset, suffix):
    cfg = PRESETS[preset]()
    path = tmp_path / f"c{suffix}"
    save_config(cfg, path)
    back = load_config(path)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    if suffix == ".json":
        assert json.loads(path.read_text()) == cfg.to_dict()


def test_round_trip_odd_floats(tmp_path):
    cfg = ModelConfig(norm_eps=1.0000000000000002e-06, embedding_multiplier=78.38367176906169,
                      moe=MoEConfig(dense_layers=(0,), router=RouterConfig(z_loss_coef=1 / 3)))
    for suffix in (".yaml", ".json"):
        save_config(cfg, tmp_path / f"x{suffix}")
        assert load_config(tmp_path / f"x{suffix}") == cfg


def test_dense_model_round_trip(tmp_path):
    cfg = ModelConfig(moe=None)
    save_config(cfg, tmp_path / "d.yaml")
    assert load_config(tmp_path / "d.yaml") == cfg


def test_router_registry_matches_config_names():
    from moelab.config import ROUTER_TYPES
    build_router(RouterConfig(), 8, 4)  # fills the registry
    assert set(ROUTERS) == set(ROUTER_TYPES)
