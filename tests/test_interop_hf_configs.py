"""Published HF configs (tests/data/hf_configs) map to moelab configs whose parameter counts equal
REFERENCES.md §10 and transformers' own meta-device count; ``moelab params`` reads config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.interop.hf import hf_config_to_model_config

DATA = Path(__file__).parent / "data" / "hf_configs"

# REFERENCES.md §10 "our count" column (billions; total, active), and the decimals it is given with.
REFERENCE_COUNTS = {
    "mixtral-8x7b": (46.70, 12.88, 2),
    "mixtral-8x22b": (140.6, 39.2, 1),
    "dbrx": (131.6, 36.5, 1),
    "olmoe-1b-7b": (6.92, 1.28, 2),
    "qwen1.5-moe-a2.7b": (14.32, 2.69, 2),
    "qwen3-30b-a3b": (30.53, 3.35, 2),
    "phi-3.5-moe": (41.87, 6.64, 2),
}


def _params_json(source: str, capsys) -> dict:
    assert main(["params", source, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_published_config_counts(name, capsys, tmp_path):
    total_ref, active_ref, decimals = REFERENCE_COUNTS[name]
    # config.json given as a file ...
    result = _params_json(str(DATA / f"{name}.json"), capsys)
    assert round(result["total_params"] / 1e9, decimals) == pytest.approx(total_ref)
    assert round(result["active_params"] / 1e9, decimals) == pytest.approx(active_ref)
    # ... or as a directory holding it, same numbers
    shutil.copy(DATA / f"{name}.json", tmp_path / "config.json")
    assert _params_json(str(tmp_path), capsys)["total_params"] == result["total_params"]


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_published_config_count_equals_transformers_meta(name, capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    shutil.copy(DATA / f"{name}.json", tmp_path / "config.json")
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    hf_total = sum(p.numel() for p in model.parameters())
    assert _params_json(str(tmp_path / "config.json"), capsys)["total_params"] == hf_total


def test_published_configs_map_their_routing():
    def load(name):
        return hf_config_to_model_config(json.loads((DATA / f"{name}.json").read_text()), counting_only=True)

    assert load("mixtral-8x7b").moe.router.softmax_order == "topk_then_softmax"
    q3 = load("qwen3-30b-a3b")
    assert (q3.head_dim, q3.attention.qk_norm, q3.moe.router.norm_topk_prob) == (128, "per_head", True)
    q15 = load("qwen1.5-moe-a2.7b")
    assert (q15.moe.shared_ffn_dim, q15.moe.shared_expert_gate) == (5632, True)
    assert not q15.moe.router.norm_topk_prob
    dbrx = load("dbrx")
    assert (dbrx.attention.rope_theta, dbrx.attention.clip_qkv, dbrx.norm_bias) == (5e5, 8.0, False)
    assert dbrx.moe.router.norm_topk_prob is True and dbrx.moe.router.top_k == 4
    phi = load("phi-3.5-moe")
    r = phi.moe.router
    assert (r.type, r.sparsemixer_eps, r.jitter_eps) == ("sparsemixer", 0.01, 0.01)
    assert phi.lm_head_bias and phi.attention.qkv_bias and phi.attention.out_bias and phi.norm == "layernorm"
    olmoe = load("olmoe-1b-7b")
    assert (olmoe.attention.qk_norm, olmoe.moe.expert_ffn_dim, olmoe.moe.router.top_k) == ("full", 1024, 8)
