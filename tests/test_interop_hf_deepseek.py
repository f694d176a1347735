"""DeepSeek-V2 / V3 config.json mapping both ways: the published configs map to the right moelab config
and count (REFERENCES §10, transformers' meta count), each field moelab cannot honour is an error
naming it, and export refuses what transformers would build differently. Logit parity:
tests/parity/test_hf_parity.py (variants) and tests/parity/test_hf_parity_deepseek.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.config import MTPConfig
from moelab.errors import ConfigError, MoelabError
from moelab.interop.hf import choose_family, hf_config_to_model_config
from moelab.params import count_params
from moelab.presets import get_preset

# The hub config.json files (deepseek-ai/DeepSeek-V2-Lite, DeepSeek-V2, DeepSeek-V3), written as remembered
# (auto_map left out). Their counts must reproduce REFERENCES §10, and transformers' meta count.
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}
V2 = dict(V2_LITE, aux_loss_alpha=0.003, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
          n_group=8, n_routed_experts=160, num_attention_heads=128, num_hidden_layers=60, num_key_value_heads=128,
          q_lora_rank=1536, routed_scaling_factor=16.0, topk_group=3, topk_method="group_limited_greedy")
V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}
PUBLISHED = {"deepseek-v2-lite": V2_LITE, "deepseek-v2": V2, "deepseek-v3": V3}
# REFERENCES.md §10 "our count" (billions; total, active, MTP) and the decimals it is given with.
REFERENCE_COUNTS = {"deepseek-v2-lite": (15.71, 2.66, 0.0, 2), "deepseek-v2": (235.7, 21.4, 0.0, 1),
                    "deepseek-v3": (671.0, 37.5, 11.6, 1)}
# A tiny V3 config.json (transformers-style, rope_parameters) for the field-by-field error tests.
TINY_V3 = {"model_type": "deepseek_v3", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
           "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
           "kv_lora_rank": 16, "q_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
           "n_routed_experts": 8, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_shared_experts": 2,
           "n_group": 2, "topk_group": 1, "max_position_embeddings": 64, "head_dim": 4, "qk_head_dim": 12,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
TINY_V2 = {**{k: v for k, v in TINY_V3.items() if k not in ("n_group", "topk_group")}, "model_type": "deepseek_v2"}


def _cfg(data: dict, counting_only: bool = False):
    return hf_config_to_model_config(data, counting_only=counting_only)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_counts(name, tmp_path, capsys):
    """`moelab params config.json` (the counting-only path: V3's fp8 quantization_config is tolerated)."""
    total, active, mtp, decimals = REFERENCE_COUNTS[name]
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    assert main(["params", str(tmp_path / "config.json"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ulp = 10.0 ** -decimals  # REFERENCES gives V3's 37.55B as 37.5: within one unit of the last decimal
    assert abs(result["total_params"] / 1e9 - total) < ulp
    assert abs(result["active_params"] / 1e9 - active) < ulp
    assert abs(result["mtp_params"] / 1e9 - mtp) < 0.1
    # the published configs and moelab's presets of the same models count the same
    assert result["total_params"] == count_params(get_preset(name)).total_params
    assert result["active_params"] == count_params(get_preset(name)).active_params


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_count_equals_transformers_meta(name, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    data = {k: v for k, v in PUBLISHED[name].items() if k != "quantization_config"}  # no fp8 quantizer on meta
    (tmp_path / "config.json").write_text(json.dumps(data))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    assert count_params(_cfg(data)).total_params == sum(p.numel() for p in model.parameters())


def test_published_configs_map_field_by_field():
    lite = _cfg(V2_LITE)
    a, m, r = lite.attention, lite.moe, lite.moe.router
    assert (a.mla.q_lora_rank, a.mla.kv_lora_rank, a.mla.qk_head_dim, a.mla.v_head_dim, a.mla.rope_interleave) == \
        (None, 512, 192, 128, True)
    assert (a.rope_type, a.yarn.factor, a.yarn.original_max_len, a.yarn.mscale, a.yarn.mscale_all_dim) == \
        ("yarn", 40.0, 4096, 0.707, 0.707)
    assert a.yarn.cos_sin_factor() == 1.0 and a.yarn.softmax_factor() == pytest.approx(
        (0.1 * 0.707 * math.log(40) + 1) ** 2)  # x1.590, REFERENCES §5
    assert (m.num_experts, m.expert_ffn_dim, m.num_shared_experts, m.shared_ffn_dim, m.first_k_dense) == \
        (64, 1408, 2, 2816, 1)
    assert lite.layer_types() == ["dense"] + ["moe"] * 26
    assert (r.type, r.top_k, r.n_group, r.topk_groups, r.norm_topk_prob, r.routed_scaling_factor) == \
        ("deepseek_v2", 6, 1, 1, False, 1.0)
    assert r.active_losses() == {"expert_balance": 0.001} and r.effective_balance_scope == "sequence"
    v2 = _cfg(V2).moe.router
    assert (v2.n_group, v2.topk_group, v2.effective_group_score, v2.routed_scaling_factor) == (8, 3, "max", 16.0)
    assert v2.active_losses() == {"expert_balance": 0.003}  # DeepSeek's code has no device / communication terms
    v3 = _cfg(V3, counting_only=True)
    r = v3.moe.router
    assert (r.type, r.top_k, r.n_group, r.topk_group, r.effective_group_score, r.norm_topk_prob,
            r.routed_scaling_factor) == ("deepseek_v3", 8, 8, 4, "sum_top2", True, 2.5)
    assert (v3.moe.first_k_dense, v3.mtp.num_modules, v3.attention.yarn.softmax_factor()) == \
        (3, 1, pytest.approx((0.1 * math.log(40) + 1) ** 2))  # x1.874


def test_quantized_checkpoint_is_refused_outside_counting():
    with pytest.raises(ConfigError, match="quantization_config.*fp8.*dequantise"):
        _cfg(V3)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_export_and_map_back(name):
    """The deepseek-v2 / v2-lite / v3 presets go to their family and back with the same architecture."""
    preset = get_preset(name)
    adapter, fields = choose_family(preset)
    assert adapter.model_type == PUBLISHED[name]["model_type"]
    for k in ("q_lora_rank", "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "topk_method",
              "n_group", "topk_group", "routed_scaling_factor"):
        assert fields[k] == PUBLISHED[name][k], k
    back = _cfg({"model_type": adapter.model_type, **fields})
    assert back.attention == preset.attention
    assert back.layer_types() == preset.layer_types()
    assert count_params(back).total_params == count_params(preset).total_params
    # the presets leave norm_topk_prob at the family default (None: False for V2, True for V3); config.json states it
    assert preset.moe.router.norm_topk_prob is None
    assert back.moe.router.norm_topk_prob is (preset.moe.router.type == "deepseek_v3")
    strip = dict(expert_balance_coef=None, device_balance_coef=None, comm_balance_coef=None, seq_balance_coef=None,
                 balance_scope=None, norm_topk_prob=None)
    assert dataclasses.replace(back.moe.router, **strip) == dataclasses.replace(preset.moe.router, **strip)
    assert (back.mtp is None) == (preset.mtp is None)


def test_v2_norm_topk_prob_follows_deepseek_code():
    """DeepSeek's V2 code renormalises the top-k gates instead of scaling them (when top_k > 1);
    transformers ignores norm_topk_prob for V2, so export refuses renormalised gates."""
    r = _cfg({**TINY_V2, "norm_topk_prob": True, "routed_scaling_factor": 16.0}).moe.router
    assert (r.norm_topk_prob, r.routed_scaling_factor) == (True, 1.0)
    r1 = _cfg({**TINY_V2, "norm_topk_prob": True, "routed_scaling_factor": 16.0, "num_experts_per_tok": 1}).moe.router
    assert (r1.norm_topk_prob, r1.routed_scaling_factor) == (False, 16.0)
    cfg = _cfg({**TINY_V2, "norm_topk_prob": True})
    with pytest.raises(MoelabError, match="renormalised top-k gates"):
        choose_family(cfg, family="deepseek_v2")


def test_moe_layer_freq_follows_deepseek_code_and_export_refuses_it():
    cfg = _cfg({**TINY_V2, "num_hidden_layers": 5, "moe_layer_freq": 2})
    assert cfg.layer_types() == ["dense", "dense", "moe", "dense", "moe"]  # i >= 1 and i % 2 == 0
    with pytest.raises(MoelabError, match="layer pattern"):
        choose_family(cfg, family="deepseek_v2")
    # an MTP layer must be an MoE layer too (transformers / DeepSeek: index >= first_k_dense_replace)
    three = _cfg({**TINY_V3, "num_hidden_layers": 2, "moe_layer_freq": 2, "first_k_dense_replace": 0})
    assert three.layer_types() == ["moe", "dense"]
    with pytest.raises(MoelabError, match="layer pattern"):
        choose_family(three, family="deepseek_v3")


def test_mtp_and_rope_fields():
    assert _cfg({**TINY_V3, "num_nextn_predict_layers": 2}).mtp == MTPConfig(num_modules=2)
    assert _cfg({**TINY_V3, "num_nextn_predict_layers": 0}).mtp is None
    assert _cfg(TINY_V3).mtp == MTPConfig(num_modules=1)  # the HF class default
    assert _cfg({**TINY_V3, "rope_interleave": False}).attention.mla.rope_interleave is False
    # HF reads a missing mscale as 0 when mscale_all_dim is set: cos/sin factor mscale(4) = 1.139, not 1
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
            "mscale_all_dim": 0.707}
    y = _cfg({**TINY_V3, "rope_parameters": yarn}).attention.yarn
    assert y.cos_sin_factor() == pytest.approx(0.1 * math.log(4) + 1)
    # a top-level original_max_position_embeddings wins over the block's (transformers' standardize_rope_params)
    y = _cfg({**TINY_V3, "rope_parameters": yarn, "original_max_position_embeddings": 8}).attention.yarn
    assert y.original_max_len == 8
    legacy = {k: v for k, v in TINY_V3.items() if k != "rope_parameters"}
    y = _cfg({**legacy, "rope_theta": 500.0, "rope_scaling": {"type": "yarn", "factor": 2, "beta_fast": 0}}).attention
    assert (y.rope_theta, y.yarn.factor, y.yarn.original_max_len, y.yarn.beta_fast) == (500.0, 2.0, 64, 32.0)


@pytest.mark.parametrize("family,change,field", [
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v3", {"topk_method": "group_limited_greedy"}, "topk_method"),
    ("deepseek_v2", {"scoring_func": "sigmoid"}, "scoring_func"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
    ("deepseek_v2", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "factor"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek_v3", {"head_dim": 8}, "head_dim"),
    ("deepseek_v3", {"qk_head_dim": 16}, "qk_head_dim"),
    ("deepseek_v2", {"mlp_bias": True}, "mlp_bias"),
    ("deepseek_v2", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek_v2", {"num_nextn_predict_layers": 1}, "num_nextn_predict_layers"),
    ("deepseek_v3", {"q_lora_rank": 0}, "q_lora_rank"),
    ("deepseek_v3", {"n_shared_experts": 0}, "n_shared_experts"),
    ("deepseek_v2", {"topk_method": "group_limited_greedy"}, "n_group"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("deepseek_v3", {"some_new_field": 1}, "some_new_field"),
])
def test_fields_moelab_cannot_honour_are_named(family, change, field):
    base = TINY_V3 if family == "deepseek_v3" else TINY_V2
    with pytest.raises(ConfigError, match=field):
        _cfg({**base, **change})


def test_v2_null_q_lora_and_greedy_groups():
    cfg = _cfg({**TINY_V2, "q_lora_rank": None, "n_group": 4, "topk_group": 2})  # greedy: groups unused
    assert cfg.attention.mla.q_lora_rank is None
    assert (cfg.moe.router.n_group, cfg.moe.router.topk_groups) == (1, 1)
    assert "blocks.1.attn.q_proj.weight" in moelab.build_model(cfg, device="meta").state_dict()


def test_export_refusals_name_the_feature():
    v3 = _cfg(TINY_V3)
    # an MLA model is no Llama-style family's, an MTP model no V2's
    with pytest.raises(MoelabError, match="mixtral: multi-head latent attention"):
        choose_family(v3, family="mixtral")
    with pytest.raises(MoelabError, match="MTP modules"):
        choose_family(dataclasses.replace(v3, moe=dataclasses.replace(
            v3.moe, router=dataclasses.replace(v3.moe.router, type="deepseek_v2", norm_topk_prob=None))),
            family="deepseek_v2")
    r = v3.moe.router
    with pytest.raises(MoelabError, match="group score max"):
        choose_family(dataclasses.replace(v3, moe=dataclasses.replace(
            v3.moe, router=dataclasses.replace(r, group_score="max"))), family="deepseek_v3")
    a = v3.attention
    with pytest.raises(MoelabError, match="latent_norm_eps"):
        choose_family(dataclasses.replace(v3, attention=dataclasses.replace(
            a, mla=dataclasses.replace(a.mla, latent_norm_eps=1e-5))), family="deepseek_v3")
    with pytest.raises(MoelabError, match="qkv_bias != out_bias"):
        choose_family(dataclasses.replace(v3, attention=dataclasses.replace(a, qkv_bias=True)), family="deepseek_v3")
    with pytest.raises(MoelabError, match="standard attention"):
        choose_family(get_preset("deepseek-moe-16b"), family="deepseek_v2")
    # a V3 export writes the MTP count it has (0 without MTP)
    assert choose_family(dataclasses.replace(v3, mtp=None))[1]["num_nextn_predict_layers"] == 0


def test_export_writes_training_fields_and_warns_about_the_rest(tmp_path):
    """aux_loss_alpha / seq_aux carry the loss DeepSeek's code has; the others are named in a warning."""
    cfg = _cfg({**TINY_V2, "aux_loss_alpha": 0.002, "seq_aux": False})
    r = cfg.moe.router
    assert (r.active_losses(), r.effective_balance_scope) == ({"expert_balance": 0.002}, "batch")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router=dataclasses.replace(
        r, n_group=2, topk_group=1, device_balance_coef=0.05, jitter_eps=0.1)))
    with pytest.warns(UserWarning) as caught:
        out = moelab.export_hf(moelab.build_model(cfg), tmp_path / "hf")
    assert sorted(str(w.message).split(" is training-only")[0] for w in caught) == [
        "router input jitter (jitter_eps 0.1)", "router loss device_balance (coef 0.05)"]
    config = json.loads((out / "config.json").read_text())
    assert (config["aux_loss_alpha"], config["seq_aux"], config["topk_method"], config["n_group"]) == \
        (0.002, False, "group_limited_greedy", 2)
    back = moelab.load(out).config.moe.router
    assert (back.n_group, back.topk_group, back.active_losses()) == (2, 1, {"expert_balance": 0.002})
