import pytest
import torch
import torch.nn.functional as F

from moelab.checkpoint.model_files import load_model, save_model
from moelab.config import AttentionConfig, ModelConfig, MoEConfig
from moelab.layers.attention import Attention
from moelab.layers.rope import apply_rope, rope_cos_sin
from moelab.model import build_model
from tests.helpers import small_config


def _naive_attention(attn: Attention, x, theta, window=None, softcap=None):
    """Per-head loop, explicit mask, no SDPA: the reference for every attention variant."""
    B, T, _ = x.shape
    H, G, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, G, Dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, G, Dh).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.arange(T), Dh, theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    outs = []
    for h in range(H):
        g = h // (H // G)
        s = q[:, h] @ k[:, g].transpose(-1, -2) / Dh**0.5
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        allowed = (j <= i) & ((i - j) < window if window else True)
        outs.append(s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, g])
    return attn.o_proj(torch.stack(outs, 1).transpose(1, 2).reshape(B, T, H * Dh))


@pytest.mark.parametrize("heads, kv, window, softcap", [
    (4, 4, None, None), (4, 2, None, None), (4, 1, None, None), (4, 2, 3, None), (4, 2, None, 5.0), (4, 1, 2, 5.0),
])
def test_attention_matches_naive(heads, kv, window, softcap):
    cfg = ModelConfig(d_model=32, attention=AttentionConfig(num_heads=heads, num_kv_heads=kv, sliding_window=window,
                                                            logit_softcap=softcap), moe=None)
    attn = Attention(cfg)
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.attention.rope_theta)
    out = attn(x, cos, sin, pos)
    ref = _naive_attention(attn, x, cfg.attention.rope_theta, window, softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_model_forward_shapes_and_loss():
    cfg = small_config()
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 11, cfg.vocab_size)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter gets a gradient"


def test_causality():
    model = build_model(small_config())
    ids = torch.randint(0, 64, (1, 12))
    a = model(ids).logits
    ids2 = ids.clone()
    ids2[0, 8:] = (ids2[0, 8:] + 1) % 64
    b = model(ids2).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)


def test_tied_embeddings_share_storage():
    cfg = ModelConfig(vocab_size=50, d_model=16, num_layers=1, tie_embeddings=True,
                      attention=AttentionConfig(num_heads=2), moe=MoEConfig(num_experts=2, expert_ffn_dim=8))
    model = build_model(cfg)
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("variant", ["plain", "tied_layernorm", "grok_like", "dense"])
def test_save_load_round_trip_bit_exact(tmp_path, variant):
    cfg = small_config(num_shared_experts=1, shared_expert_gate=True)
    if variant == "tied_layernorm":
        cfg.tie_embeddings, cfg.norm, cfg.lm_head_bias = True, "layernorm", True
        cfg.attention.qkv_bias = cfg.attention.out_bias = True
    elif variant == "grok_like":
        cfg.sandwich_norm, cfg.attention.logit_softcap, cfg.embedding_multiplier = True, 30.0, 3.0
        cfg.attention.qk_norm = "per_head"
    elif variant == "dense":
        cfg.moe = None
    model = build_model(cfg)
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config == cfg
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    assert torch.equal(model.eval()(ids).logits, back(ids).logits)


def test_load_reports_truncated_and_mismatched(tmp_path):
    from moelab.errors import CheckpointError
    model = build_model(small_config())
    save_model(model, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "m")
    save_model(build_model(small_config(expert_ffn_dim=12)), tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(w)
    with pytest.raises(CheckpointError, match="the manifest says"):  # another model's weights swapped in
        load_model(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()  # a hand-assembled directory: the shapes are still checked
    with pytest.raises(CheckpointError, match=r"experts\.down_EDF has shape \(4, 32, 12\), config expects \(4, 32, 24\)"):
        load_model(tmp_path / "m")


def test_bf16_forward_close_to_fp32():
    """The bf16 path (for GPUs) on a small input: router math stays fp32, logits stay close."""
    cfg = small_config()
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    ref = model(ids).logits
    low = build_model(cfg, dtype=torch.bfloat16).eval()
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    out = low(ids).logits
    assert out.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() <= 0.05 * scale
