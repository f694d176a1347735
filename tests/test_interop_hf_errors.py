"""Bad HF inputs give one clear error naming the problem, and no model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelab
from moelab.errors import CheckpointError, ConfigError
from moelab.interop.hf import hf_config_to_model_config
from tests.parity.hf_models import LLAMA, build_hf_model, input_ids

pytest.importorskip("transformers")

MIXTRAL = dict(LLAMA, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    build_hf_model("mixtral", MIXTRAL).save_pretrained(d)
    return d


@pytest.fixture
def copy_dir(hf_dir, tmp_path):
    import shutil

    shutil.copytree(hf_dir, tmp_path / "m")
    return tmp_path / "m"


def _config(d) -> dict:
    return json.loads((d / "config.json").read_text())


def _write_config(d, cfg: dict) -> None:
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type_lists_supported(copy_dir):
    _write_config(copy_dir, {**_config(copy_dir), "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="gpt2") as e:
        moelab.load(copy_dir)
    for family in ("dbrx", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"):
        assert family in str(e.value)


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path):
    model = build_hf_model("mixtral", MIXTRAL)
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (d / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        ref = model(input_ids()).logits
        out = moelab.load(d)(input_ids()).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing: .*{shards[1].name}"):
        moelab.load(d)


def test_shape_disagreeing_with_config_names_key_and_shapes(copy_dir):
    _write_config(copy_dir, {**_config(copy_dir), "intermediate_size": 20})
    expected = r"experts\.0\.w1\.weight has shape \(24, 32\), config.json implies \(20, 32\)"
    with pytest.raises(CheckpointError, match=expected):
        moelab.load(copy_dir)


def test_truncated_safetensors(copy_dir):
    f = copy_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        moelab.load(copy_dir)


def test_pickled_weights_are_refused_never_unpickled(copy_dir):
    (copy_dir / "model.safetensors").unlink()
    (copy_dir / "pytorch_model.bin").write_bytes(b"not a pickle; it must never be opened")
    with pytest.raises(CheckpointError, match="never unpickles.*safetensors"):
        moelab.load(copy_dir)


def test_missing_and_unexpected_keys_are_named(copy_dir):
    state = load_file(str(copy_dir / "model.safetensors"))
    state.pop("model.layers.1.block_sparse_moe.gate.weight")
    state["model.layers.0.block_sparse_moe.extra.weight"] = torch.zeros(2)
    save_file(state, str(copy_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.block_sparse_moe.gate.weight'\], "
                                              r"unexpected \['model.layers.0.block_sparse_moe.extra.weight'\]"):
        moelab.load(copy_dir)


BASE = {"model_type": "mixtral", **MIXTRAL}


@pytest.mark.parametrize("change,field", [
    ({"num_experts_per_tok": 5}, "top_k"),
    ({"hidden_size": -32}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"sliding_window": 0}, "sliding_window"),
])
def test_config_fields_out_of_range_or_unsupported(change, field):
    with pytest.raises(ConfigError, match=field):
        hf_config_to_model_config({**BASE, **change})


@pytest.mark.parametrize("data,field", [
    ({"model_type": "phimoe", **MIXTRAL, "num_experts_per_tok": 4}, "num_experts_per_tok"),
    ({"model_type": "dbrx", "d_model": 32, "n_heads": 4, "n_layers": 2, "vocab_size": 64,
      "ffn_config": {"moe_normalize_expert_weights": -2.0}}, "moe_normalize_expert_weights"),
    ({"model_type": "dbrx", "d_model": 32, "n_heads": 4, "n_layers": 2, "vocab_size": 64,
      "ffn_config": {"ffn_act_fn": {"name": "silu", "approximate": True}}}, "ffn_act_fn"),
    ({"model_type": "qwen2_moe", **LLAMA, "use_sliding_window": True, "sliding_window": None}, "sliding_window"),
    ({"model_type": "qwen2_moe", **LLAMA, "mlp_only_layers": [7]}, "mlp_only_layers"),
    ({"model_type": "olmoe", **LLAMA, "head_dim": 16}, "head_dim"),
])
def test_family_specific_fields_moelab_cannot_honour(data, field):
    with pytest.raises(ConfigError, match=field):
        hf_config_to_model_config(data)


def test_scaled_rope_counts_but_does_not_load():
    data = {**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    cfg = hf_config_to_model_config(data, counting_only=True)
    assert cfg.moe.num_experts == 4
