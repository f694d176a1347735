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


def write_word_corpus(directory) -> str:
    """A 60-document JSONL corpus of rotated Greek-letter words (one domain) in ``directory``."""
    import json
    from pathlib import Path

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    lines = [json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(50)), "domain": "w"})
             for i in range(60)]
    path = Path(directory) / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def small_train_config(corpus: str, **kw):
    """A 4-step run of a 2-layer, 4-expert model saving every 2 steps (reliability tests)."""
    from moelab.train.config import TrainConfig

    model = ModelConfig(vocab_size=300, d_model=32, num_layers=2, max_seq_len=64, dense_ffn_dim=64,
                        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                        moe=MoEConfig(num_experts=4, expert_ffn_dim=32, router=RouterConfig(top_k=2)))
    base = dict(model=model, data=corpus, steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0,
                eval_batches=1, save_every=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)
