"""Small configs shared by the tests."""

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig


def small_config(**moe_kwargs) -> ModelConfig:
    moe_kwargs.setdefault("router", RouterConfig(top_k=2))
    moe_kwargs = {"num_experts": 4, "expert_ffn_dim": 24, **moe_kwargs}
    return ModelConfig(
        vocab_size=64, d_model=32, num_layers=2, max_seq_len=64, dense_ffn_dim=48,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=MoEConfig(**moe_kwargs),
    )
