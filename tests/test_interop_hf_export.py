"""Export of moelab-native models to the closest HF family, and the `moelab convert` command."""

from __future__ import annotations

import json

import pytest
import torch

import moelab
from moelab.checkpoint.model_files import save_model
from moelab.cli import main
from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.errors import MoelabError
from moelab.interop.hf import choose_family
from moelab.presets import get_preset
from tests.parity.hf_models import build_hf_model, input_ids, max_rel_diff

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _native(**kw) -> ModelConfig:
    moe = dict(num_experts=4, expert_ffn_dim=24, router=RouterConfig(top_k=2))
    moe.update(kw.pop("moe", {}))
    base = dict(vocab_size=96, d_model=32, num_layers=2, max_seq_len=64, dense_ffn_dim=40,
                attention=AttentionConfig(num_heads=4, num_kv_heads=2))
    return ModelConfig(**{**base, **kw}, moe=MoEConfig(**moe))


def _decisive(model: moelab.MoETransformer) -> moelab.MoETransformer:
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)
        for layer in model.moe_layers():
            layer.router.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("cfg,family", [
    (_native(), "mixtral"),
    (_native(moe=dict(router=RouterConfig(top_k=2, softmax_order="softmax_then_topk", norm_topk_prob=True))),
     "mixtral"),
    (_native(attention=AttentionConfig(num_heads=4, qk_norm="per_head"),
             moe=dict(router=RouterConfig(top_k=2, softmax_order="softmax_then_topk"))), "qwen3_moe"),
    (_native(attention=AttentionConfig(num_heads=4, qk_norm="full", clip_qkv=1.0),
             moe=dict(router=RouterConfig(top_k=2, softmax_order="softmax_then_topk"))), "olmoe"),
    (_native(attention=AttentionConfig(num_heads=4, qkv_bias=True), num_layers=4,
             moe=dict(num_shared_experts=2, shared_expert_gate=True, moe_every=2, dense_layers=(3,),
                      router=RouterConfig(top_k=2, softmax_order="softmax_then_topk"))), "qwen2_moe"),
    (_native(norm="layernorm", norm_bias=False, attention=AttentionConfig(num_heads=4, clip_qkv=0.1)), "dbrx"),
    (_native(norm="layernorm", attention=AttentionConfig(num_heads=4, qkv_bias=True, out_bias=True),
             lm_head_bias=True, moe=dict(router=RouterConfig(type="sparsemixer", top_k=2))), "phimoe"),
])
def test_native_model_exports_to_closest_family_with_parity(cfg, family, tmp_path):
    model = _decisive(moelab.build_model(cfg))
    out_dir = moelab.export_hf(model, tmp_path / "hf")
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        ref = model(input_ids()).logits
        out = hf(input_ids()).logits
    assert max_rel_diff(out, ref) <= 1e-4


def test_tiny_preset_exports_as_mixtral_with_its_tokenizer(tmp_path):
    model = _decisive(moelab.build_model(get_preset("tiny")))
    save_model(model, tmp_path / "tiny")
    (tmp_path / "tiny" / "tokenizer.json").write_text('{"model": "stub"}')
    loaded = moelab.load(tmp_path / "tiny")
    with pytest.warns(UserWarning, match="z-loss"):  # tiny trains with a z-loss, which HF configs lack
        out_dir = moelab.export_hf(loaded, tmp_path / "hf")
    assert (out_dir / "tokenizer.json").read_text() == '{"model": "stub"}'
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():
        assert max_rel_diff(hf(ids).logits, model(ids).logits) <= 1e-4


@pytest.mark.parametrize("cfg,feature", [
    (_native(moe=dict(router=RouterConfig(top_k=2, softmax_order="softmax_then_topk"))), "mixtral: router"),
    (_native(sandwich_norm=True), "sandwich_norm"),
    (_native(attention=AttentionConfig(num_heads=4, logit_softcap=30.0)), "logit_softcap"),
    (_native(moe=dict(num_shared_experts=1)), "shared experts"),
])
def test_no_family_fits_names_the_features(cfg, feature):
    with pytest.raises(MoelabError, match=f"no Hugging Face family.*{feature}"):
        choose_family(cfg)


def test_cli_convert_round_trip(tmp_path, capsys):
    hf_model = build_hf_model("olmoe", dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                            num_attention_heads=4, num_experts=4, num_experts_per_tok=2))
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ml"), "--to", "moelab"]) == 0
    assert (tmp_path / "ml" / "config.yaml").is_file()
    assert main(["convert", str(tmp_path / "ml"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    assert "olmoe" in capsys.readouterr().out
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        assert max_rel_diff(back(input_ids()).logits, hf_model(input_ids()).logits) <= 1e-4
    assert main(["convert", str(tmp_path / "ml"), str(tmp_path / "x"), "--to", "hf", "--family", "dbrx"]) == 2
    assert "dbrx" in capsys.readouterr().err
