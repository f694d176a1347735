import dataclasses
import json

import pytest
import torch

from moelab.cli import main
from moelab.config import ModelConfig
from moelab.model import build_model
from moelab.params import count_params
from moelab.presets import PRESETS, PUBLISHED, Published, get_preset

# Where the authors' rounding hides a different counting convention, the measured gap is recorded here
# (and asserted), instead of widening the tolerance for every model.
KNOWN_CONVENTION_GAPS = {
    # Qwen states 3.3B activated; embedding + head + attention + 8 of 128 experts + router is 3.353B.
    ("qwen3-30b-a3b", "active"): 0.02,
    # DeepSeek states 2.4B activated for V2-Lite; without the input embedding moelab counts 2.451B (with
    # it 2.661B). What else the authors left out to stay under 2.45B is not stated (the 26 routers'
    # 3.4M would do it); the gap is 2.1%.
    ("deepseek-v2-lite", "active"): 0.022,
}


def formula_count(cfg: ModelConfig) -> tuple[int, int]:
    """Parameter count written out by hand from the architecture, independent of the module tree."""
    D, V, L, a = cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.attention
    hd, H, G = cfg.head_dim, a.num_heads, a.kv_heads
    norm = D * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    if a.mla is None:
        attn = D * H * hd + 2 * D * G * hd + H * hd * D
        attn += (H * hd + 2 * G * hd) * a.qkv_bias + D * a.out_bias
        attn += {"none": 0, "per_head": 2 * hd, "full": H * hd + G * hd}[a.qk_norm]
    else:  # REFERENCES §5: W_DQ + norm + W_UQ (or W_Q), W_DKV + norm, W_UKV, W_O
        m = a.mla
        Q, C, qk = m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim + m.qk_rope_head_dim
        attn = (D * Q + Q + Q * H * qk) if Q else D * H * qk
        attn += D * (C + m.qk_rope_head_dim) + C + C * H * (m.qk_nope_head_dim + m.v_head_dim)
        attn += H * m.v_head_dim * D
        attn += ((Q or 0) + C + m.qk_rope_head_dim) * a.qkv_bias + D * a.out_bias
    total = active = V * D * (1 if cfg.tie_embeddings else 2) + V * cfg.lm_head_bias + norm
    for i in range(L):
        block = attn + norm * (4 if cfg.sandwich_norm else 2)
        total += block
        active += block
        if cfg.is_moe_layer(i):
            m = cfg.moe
            shared = 3 * D * m.shared_ffn_dim + D * m.shared_expert_gate
            if m.aoe is None:
                expert = 3 * D * m.expert_ffn_dim
                router = m.num_experts * D
                total += m.num_experts * expert + shared + router
                active += m.router.top_k * expert + shared + router
            else:  # AoE eq. 3: W_down, W_up, W_p, W_o; no router, every token runs all E W_down
                low, wide = m.aoe.d_low, cfg.aoe_d_wide
                expert = D * low + low * wide + 2 * D * wide
                total += m.num_experts * expert + shared
                active += m.router.top_k * expert + (m.num_experts - m.router.top_k) * D * low + shared
        else:
            total += 3 * D * cfg.dense_ffn_dim
            active += 3 * D * cfg.dense_ffn_dim
    return total, active


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_equal_module_and_formula(name):
    cfg = PRESETS[name]()
    count = count_params(cfg)
    model = build_model(cfg, device="meta")
    assert count.total_params + count.mtp_params == sum(p.numel() for p in model.parameters())
    assert (count.total_params, count.active_params) == formula_count(cfg)
    assert sum(count.breakdown.values()) == count.total_params


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_counts_match_published(name):
    """Within 1% of the published figure, or within the precision it was published with
    ("36B" covers 35.5B-36.5B), whichever is wider."""
    pub = PUBLISHED[name]
    count = count_params(PRESETS[name]())
    active = {"paper": count.active_params_paper, "moelab": count.active_params,
              "no_input_embedding": count.active_params - count.breakdown["embeddings"]}[pub.active_convention]
    for kind, ours, text in (("total", count.total_params, pub.total), ("active", active, pub.active)):
        if text is None:
            continue
        value, half_ulp = Published.value_and_half_ulp(text)
        gap = abs(ours - value)
        allowed = max(0.01 * value, half_ulp)
        if (name, kind) in KNOWN_CONVENTION_GAPS:
            allowed = KNOWN_CONVENTION_GAPS[(name, kind)] * value
        assert gap <= allowed, f"{name} {kind}: ours {ours:,} vs published {text} ({pub.source})"


def test_deepseek_v3_mtp_counted_apart():
    """The MTP module: eh_proj (2D x D) + 3 norms (enorm, hnorm, shared_head.norm) + one MoE decoder
    layer, the embedding and head shared. REFERENCES §4.3: 11.5B unique (the HF checkpoint's 685B =
    671B + MTP with its own copies of the embedding and head)."""
    cfg = PRESETS["deepseek-v3"]()
    c = count_params(cfg)
    D = cfg.d_model
    layer = formula_count(cfg)[0] - formula_count(dataclasses.replace(cfg, num_layers=60))[0]  # one MoE layer
    assert c.mtp_params == 2 * D * D + 3 * D + layer
    assert round(c.mtp_params / 1e9, 1) == 11.6
    # + the checkpoint's own copies of the embedding and head: 684.5B against the hub's "685B"
    assert abs(c.total_params + c.mtp_params + 2 * cfg.vocab_size * D - 685e9) < 0.001 * 685e9
    assert c.total_params == formula_count(cfg)[0] and round(c.total_params / 1e9) == 671


def test_mixtral_exact():
    c = count_params(PRESETS["mixtral-8x7b"]())
    assert c.total_params == 46_702_792_704
    assert c.active_params == 12_879_925_248


def test_params_cli_json(capsys):
    assert main(["params", "mixtral-8x7b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data["total_params"], int) and isinstance(data["active_params"], int)
    assert round(data["total_params"] / 1e9, 1) == 46.7 and round(data["active_params"] / 1e9, 1) == 12.9


def test_params_cli_text(capsys):
    assert main(["params", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46.7B total / 12.9B active" in out
    assert "experts" in out and "routers" in out and "lm_head" in out


def test_params_cli_config_file(tmp_path, capsys):
    from moelab.config import save_config
    cfg = PRESETS["deepseek-moe-16b"]()
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["params", str(tmp_path / "c.yaml"), "--json", "--out", str(tmp_path / "o")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == count_params(cfg).total_params
    assert json.loads((tmp_path / "o" / "result.json").read_text())["active_params"] == data["active_params"]


def test_params_cli_bad_source(capsys):
    assert main(["params", "mixtral-9x9b"]) == 2
    err = capsys.readouterr().err
    assert "mixtral-9x9b" in err and "mixtral-8x7b" in err and "Traceback" not in err


# presets whose load_balance_coef comes from an HF config.json's router_aux_loss_coef (HF's convention)
HF_AUX = {"mixtral-8x7b": 0.02, "mixtral-8x22b": 0.001, "dbrx": 0.05, "grok-1": 0.001, "olmoe-1b-7b": 0.01,
          "qwen3-30b-a3b": 0.001, "qwen1.5-moe-a2.7b": 0.001, "phi-3.5-moe": 0.001}


@pytest.mark.parametrize("name", sorted(HF_AUX))
def test_preset_balance_coefficient_gives_the_hf_loss(name):
    """Issue 22.11: moelab's summed per-layer loss with the preset's coefficient equals transformers'
    load_balancing_loss_func x router_aux_loss_coef on the same routing in every layer (mixtral-8x7b used
    0.02 in moelab's convention: 16x the HF loss)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from moelab.moe.balancing import switch_load_balance_loss

    cfg = get_preset(name)
    E, K = cfg.moe.num_experts, cfg.moe.router.top_k
    L = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    logits = torch.randn(64, E, generator=torch.Generator().manual_seed(0)) * 2
    probs = logits.softmax(-1)
    idx = probs.topk(K, dim=-1).indices.reshape(-1)
    moelab_loss = L * cfg.moe.router.loss_coefs()["load_balance"] * switch_load_balance_loss(probs, idx)
    hf_loss = HF_AUX[name] * load_balancing_loss_func(tuple([logits] * L), E, K)
    assert float(moelab_loss) == pytest.approx(float(hf_loss), rel=1e-5)
