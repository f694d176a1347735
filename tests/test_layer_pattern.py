import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model import build_model
from tests.helpers import small_config


def test_every_pth_layer():
    cfg = ModelConfig(num_layers=8, moe=MoEConfig(moe_every=2))
    assert cfg.layer_types() == ["dense", "moe"] * 4  # every 2nd layer, counting from 1 (Switch)
    cfg = ModelConfig(num_layers=8, moe=MoEConfig(moe_every=4, moe_offset=0))
    assert [i for i, t in enumerate(cfg.layer_types()) if t == "moe"] == [0, 4]


def test_first_k_dense_and_dense_layers():
    cfg = ModelConfig(num_layers=6, moe=MoEConfig(first_k_dense=1, dense_layers=(4,)))
    assert cfg.layer_types() == ["dense", "moe", "moe", "moe", "dense", "moe"]
    model = build_model(cfg, device="meta")
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["GatedMLP", "MoELayer", "MoELayer", "MoELayer", "GatedMLP", "MoELayer"]


def test_dense_model_has_no_moe():
    cfg = ModelConfig(num_layers=3, moe=None)
    assert cfg.layer_types() == ["dense"] * 3


def test_shared_experts_always_applied():
    """Output = routed part + shared expert output, for every token (DeepSeekMoE eq. 9)."""
    cfg = small_config(num_shared_experts=2, shared_expert_ffn_dim=16)
    lay = build_model(cfg).blocks[0].ffn
    assert lay.shared.up_proj.weight.shape == (32, cfg.d_model)  # 2 shared experts of F=16, run as one
    x = torch.randn(2, 5, cfg.d_model)
    y, _ = lay(x)
    shared = lay.shared(x.reshape(-1, cfg.d_model)).view_as(x)
    assert shared.abs().amax(dim=-1).min() > 0  # non-zero for every token
    with torch.no_grad():
        lay.shared.down_proj.weight.zero_()
    y_routed, _ = lay(x)
    torch.testing.assert_close(y - y_routed, shared, rtol=1e-5, atol=1e-6)


def test_shared_expert_sigmoid_gate():
    cfg = small_config(num_shared_experts=1, shared_expert_gate=True)
    lay = build_model(cfg).blocks[0].ffn
    x = torch.randn(1, 4, cfg.d_model)
    y, _ = lay(x)
    x_TD = x.reshape(-1, cfg.d_model)
    shared = torch.sigmoid(x_TD @ lay.shared_gate.weight.t()) * lay.shared(x_TD)
    with torch.no_grad():
        lay.shared.down_proj.weight.zero_()
    y_routed, _ = lay(x)
    torch.testing.assert_close((y - y_routed).reshape(-1, cfg.d_model), shared, rtol=1e-5, atol=1e-6)
