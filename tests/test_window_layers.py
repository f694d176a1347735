"""Per-layer attention windows (``attention.window_layers``): some layers slide, the others attend fully.

Every layer's attention equals a textbook per-head attention with that layer's own mask; the pattern
moves the logits (all-window and no-window models with the same weights differ); cached decoding past
the window, token by token or in chunks, with the growing or the rolling cache, equals the uncached
forward; the config validates and round-trips.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, MTPConfig, RouterConfig, load_config, save_config
from moelab.errors import ConfigError
from moelab.layers.rope import apply_rope
from moelab.model import build_model

W, T, V = 4, 16, 64  # window, sequence (4 windows long), vocabulary


def _config(window_layers=(1, 2), window=W, num_layers=4, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=32, num_layers=num_layers, max_seq_len=64, dense_ffn_dim=48,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2, sliding_window=window,
                                                 window_layers=window_layers),
                       moe=MoEConfig(num_experts=4, expert_ffn_dim=24, router=RouterConfig(top_k=2)), **kw)


def _sharp(model):
    """q/k x4, v/o x8, embeddings of std 1: attention is peaked and carries much of the residual
    stream, so which keys a query sees moves the logits (at init scale attention is nearly uniform)."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(8.0)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 1.0)  # decisive routing: no top-k choice on a near-tie
    return model.eval()


def _ids(n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


def _textbook_attention(attn, x_BTD, cos, sin, window: int | None) -> torch.Tensor:
    """Per-head loop in float64 with an explicit (T, T) mask built entry by entry:
    query i sees key j iff j <= i and (no window or i - j < window)."""
    B, T_, _ = x_BTD.shape
    H, G, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x_BTD).view(B, T_, H, Dh).transpose(1, 2)
    k = attn.k_proj(x_BTD).view(B, T_, G, Dh).transpose(1, 2)
    v = attn.v_proj(x_BTD).view(B, T_, G, Dh).transpose(1, 2).double()
    q, k = apply_rope(q, cos, sin).double(), apply_rope(k, cos, sin).double()
    allowed = torch.tensor([[j <= i and (window is None or i - j < window) for j in range(T_)] for i in range(T_)])
    heads = []
    for h in range(H):
        g = h // (H // G)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / Dh**0.5  # (B, T, T)
        heads.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, g])
    o = torch.stack(heads, 1).transpose(1, 2).reshape(B, T_, H * Dh).to(x_BTD.dtype)
    return attn.o_proj(o)


def test_layer_window_follows_the_pattern():
    assert [_config().layer_window(i) for i in range(4)] == [None, W, W, None]
    assert [_config(window_layers=None).layer_window(i) for i in range(4)] == [W] * 4
    assert [_config(window_layers=None, window=None).layer_window(i) for i in range(4)] == [None] * 4
    model = build_model(_config(window_layers=(2, 0)))  # any order; kept sorted
    assert model.config.attention.window_layers == (0, 2)
    assert [b.attn.window for b in model.blocks] == [W, None, W, None]


def test_every_layer_equals_a_textbook_attention_with_its_own_mask():
    model = _sharp(build_model(_config(window_layers=(1, 2))))
    seen = {}

    def hook(i):
        def fn(module, args, out):
            seen[i] = (args[0], args[1], args[2], out)  # x, cos, sin, attention output
        return fn

    handles = [b.attn.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(_ids())
        for i, block in enumerate(model.blocks):
            x, cos, sin, out = seen[i]
            own = _textbook_attention(block.attn, x, cos, sin, model.config.layer_window(i))
            other = _textbook_attention(block.attn, x, cos, sin, None if model.config.layer_window(i) else W)
            torch.testing.assert_close(out, own, rtol=1e-5, atol=1e-5)
            # the other mask (full instead of the window, or the window instead of full) is far off
            assert (out - other).abs().max() > 100 * (out - own).abs().max()
    for h in handles:
        h.remove()


def test_the_pattern_moves_the_logits():
    """Same weights, three patterns: per-layer, every layer windowed, none; all differ at T = 4 windows."""
    model = _sharp(build_model(_config()))
    logits = {}
    for name, changes in (("pattern", {}), ("all", {"window_layers": None}),
                          ("none", {"window_layers": None, "sliding_window": None})):
        cfg = dataclasses.replace(model.config, attention=dataclasses.replace(model.config.attention, **changes))
        other = build_model(cfg).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            logits[name] = other(_ids()).logits
    scale = logits["pattern"].abs().max()
    assert (logits["pattern"] - logits["all"]).abs().max() > 1e-2 * scale
    assert (logits["pattern"] - logits["none"]).abs().max() > 1e-2 * scale
    # the first W positions see the same keys under every pattern
    torch.testing.assert_close(logits["pattern"][:, :W], logits["none"][:, :W], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rolling", [False, True])
@pytest.mark.parametrize("chunk", [1, 5])
def test_cached_decoding_past_the_window_equals_the_uncached_forward(rolling, chunk):
    model = _sharp(build_model(_config(window_layers=(0, 2, 3))))
    ids = _ids(20)
    with torch.no_grad():
        ref = model(ids).logits  # (B, 20, V): position t sees tokens <= t
        cache = model.new_cache(rolling=rolling)
        out = [model(ids[:, :3], cache=cache).logits]  # a 3-token prompt, then 17 steps past the window
        for s in range(3, 20, chunk):
            out.append(model(ids[:, s:s + chunk], cache=cache).logits)
    torch.testing.assert_close(torch.cat(out, 1), ref, rtol=1e-5, atol=1e-5)
    # sliding layers roll (W keys), full layers keep all 20
    kinds = [type(layer).__name__ for layer in cache.layers]
    if rolling:
        assert kinds == ["RollingKVCache", "LayerKVCache", "RollingKVCache", "RollingKVCache"]
    else:
        assert kinds == ["LayerKVCache"] * 4


@pytest.mark.parametrize("make,match", [
    (lambda: AttentionConfig(window_layers=(0,)), "needs attention.sliding_window"),
    (lambda: AttentionConfig(sliding_window=4, window_layers=()), "lists no layer"),
    (lambda: AttentionConfig(sliding_window=4, window_layers=(1, 1)), "twice"),
    (lambda: AttentionConfig(sliding_window=4, window_layers=(-1,)), "layer indices >= 0"),
    (lambda: AttentionConfig(sliding_window=4, window_layers=(True,)), "layer indices >= 0"),
    (lambda: AttentionConfig(sliding_window=4, window_layers=3), "list of layer indices"),
    (lambda: _config(window_layers=(1, 4)), "must be < num_layers=4"),
    (lambda: _config(window_layers=(5,), mtp=MTPConfig(num_modules=1)), r"< num_layers=4 \+ mtp.num_modules=1"),
])
def test_bad_window_layers_name_the_field_and_the_fix(make, match):
    with pytest.raises(ConfigError, match="attention.window_layers") as e:
        make()
    assert e.match(match)


def test_mtp_blocks_are_layers_after_the_stack():
    cfg = _config(window_layers=(0, 4), mtp=MTPConfig(num_modules=2))
    assert [cfg.layer_window(i) for i in range(6)] == [W, None, None, None, W, None]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_window_layers_round_trip_through_a_config_file(tmp_path, suffix):
    cfg = _config(window_layers=(0, 3))
    save_config(cfg, tmp_path / f"c{suffix}")
    again = load_config(tmp_path / f"c{suffix}")
    assert again == cfg and again.attention.window_layers == (0, 3)
    assert ModelConfig.from_dict(_config(window_layers=None).to_dict()).attention.window_layers is None
