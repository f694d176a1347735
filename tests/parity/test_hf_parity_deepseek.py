"""DeepSeek-V2 / V3 parity beyond the per-variant load / export checks of test_hf_parity.py: the
features that could match by accident at init scale are each shown to move the logits (V3's selection
bias, YaRN's softmax-scale rule, the RoPE layout), and MTP weights round-trip through an HF checkpoint
that transformers still loads and whose MTP layers transformers' MtpModel runs as moelab does."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelab
from moelab.config import MTPConfig
from moelab.errors import CheckpointError
from moelab.presets import get_preset
from tests.parity.hf_models import VARIANTS, build_hf_model, input_ids, max_rel_diff

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

BOUND = 1e-4  # as test_hf_parity.py
KWARGS = {f"{f}-{v}": kw for f, v, kw in VARIANTS if f.startswith("deepseek")}
# q/k/v/o weights x this: attention is sharp and carries much of the residual stream, so the RoPE
# angles and the softmax scale move the logits (at init scale they barely do).
SHARP = 6.0
ATTN_WEIGHTS = ("q_a_proj.weight", "q_b_proj.weight", "q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight",
                "o_proj.weight")


def _saved(key: str, directory, sharp: bool = False, loud_experts: bool = False):
    """(HF model, moelab model) of one variant, through save_pretrained. ``sharp``: attention weights x SHARP;
    ``loud_experts``: routed expert weights x8, so the MoE output dominates the residual stream."""
    family = key.split("-")[0]
    model = build_hf_model(family, KWARGS[key])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if sharp and name.endswith(ATTN_WEIGHTS):
                p.mul_(SHARP)
            if loud_experts and ".experts." in name:
                p.mul_(8.0)
    model.save_pretrained(directory)
    # transformers writes num_nextn_predict_layers = 1 (its default) but keeps no MTP weights
    names_mtp = family == "deepseek_v3" and KWARGS[key].get("num_nextn_predict_layers", 1) > 0
    with pytest.warns(UserWarning, match="loading without MTP") if names_mtp else contextlib.nullcontext():
        ours = moelab.load(directory)
    assert ours.config.mtp is None
    return model, ours


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids() if ids is None else ids).logits


def _experts(model: moelab.MoETransformer) -> list[torch.Tensor]:
    seen = []
    handles = [layer.router.register_forward_hook(lambda m, i, r: seen.append(r.expert_idx_A.clone()))
               for layer in model.moe_layers()]
    _logits(model)
    for h in handles:
        h.remove()
    return seen


def _rebuilt(model: moelab.MoETransformer, **attention_changes) -> moelab.MoETransformer:
    """The same weights in a model whose attention config differs."""
    cfg = model.config
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, **attention_changes))
    other = moelab.build_model(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_v3_selection_bias_is_loaded_and_matters(tmp_path):
    """e_score_correction_bias (random, nonzero) reaches moelab's router buffer; zeroing it changes which
    experts are chosen and moves the logits far outside the parity bound."""
    hf, ours = _saved("deepseek_v3-groups-renorm-yarn-interleaved", tmp_path, loud_experts=True)
    ref = _logits(hf)
    assert max_rel_diff(_logits(ours), ref) <= BOUND
    for i, layer in enumerate(ours.moe_layers(), start=1):
        bias = layer.router.e_score_correction_bias
        assert bias.dtype == torch.float32 and bias.abs().min() > 0
        assert torch.equal(bias, hf.model.layers[i].mlp.gate.e_score_correction_bias)
    before = _experts(ours)
    for layer in ours.moe_layers():
        layer.router.e_score_correction_bias.zero_()
    after = _experts(ours)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert max_rel_diff(_logits(ours), ref) > 100 * BOUND


@pytest.mark.parametrize("key,change", [
    ("deepseek_v2-qlora-groups-scaled", dict(topk_group=None)),  # group-limited routing off
    ("deepseek_v2-qlora-groups-scaled", dict(routed_scaling_factor=1.0)),
    ("deepseek_v3-groups-renorm-yarn-interleaved", dict(topk_group=None)),
    ("deepseek_v3-groups-renorm-yarn-interleaved", dict(norm_topk_prob=False)),
    ("deepseek_v3-no-renorm-half-split-tied", dict(norm_topk_prob=True)),
])
def test_each_routing_option_matters(key, change, tmp_path):
    """With the routed experts x8, moelab still matches transformers, and the same weights under a router
    without the option (group limit, gate scaling, renormalisation) miss by far more than the bound."""
    hf, ours = _saved(key, tmp_path, loud_experts=True)
    ref = _logits(hf)
    assert max_rel_diff(_logits(ours), ref) <= BOUND
    cfg = ours.config
    other = moelab.build_model(dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, router=dataclasses.replace(cfg.moe.router, **change)))).eval()
    other.load_state_dict(ours.state_dict())
    assert max_rel_diff(_logits(other), ref) > 100 * BOUND


@pytest.mark.parametrize("key", ["deepseek_v2-lite-yarn-bias-top3", "deepseek_v3-groups-renorm-yarn-interleaved",
                                 "deepseek_v3-lite-yarn-half-split-bias"])
def test_yarn_softmax_scale_and_rope_layout(key, tmp_path):
    """With sharp attention: moelab matches transformers; MLA's softmax scale is 1/sqrt(12) x mscale^2,
    mscale = 0.1 * 0.707 * ln 4 + 1 (HF applies it for any non-default RoPE); dropping that factor, or
    reading the RoPE dims in the other layout, misses by far more than the bound."""
    hf, ours = _saved(key, tmp_path, sharp=True)
    ref = _logits(hf)
    assert max_rel_diff(_logits(ours), ref) <= BOUND
    mscale = 0.1 * 0.707 * math.log(4.0) + 1.0
    attn = ours.blocks[0].attn
    assert attn.scale == pytest.approx(12 ** -0.5 * mscale ** 2, rel=1e-12)
    assert attn.interleave == KWARGS[key].get("rope_interleave", True)
    for block in ours.blocks:
        block.attn.scale = 12 ** -0.5
    assert max_rel_diff(_logits(ours), ref) > 100 * BOUND
    mla = ours.config.attention.mla
    flipped = _rebuilt(ours, mla=dataclasses.replace(mla, rope_interleave=not mla.rope_interleave))
    assert max_rel_diff(_logits(flipped), ref) > 100 * BOUND


def _mtp_export(tmp_path_factory, modules: int):
    """A V3 variant loaded by moelab, given ``modules`` random MTP modules, exported."""
    d = tmp_path_factory.mktemp("v3")
    key = "deepseek_v3-groups-renorm-yarn-interleaved"
    _, loaded = _saved(key, d)
    cfg = dataclasses.replace(loaded.config, mtp=MTPConfig(num_modules=modules))
    model = moelab.build_model(cfg).eval()
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mtp.") for k in missing)
    with torch.no_grad():
        for name, p in model.mtp.named_parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.add_(0.2 * torch.randn_like(p))
        for module in model.mtp:
            module.block.ffn.router.e_score_correction_bias.normal_(0.0, 0.5)
    out = moelab.export_hf(model, tmp_path_factory.mktemp("exported") / "hf")
    return model, out


@pytest.fixture(scope="module")
def mtp_export(tmp_path_factory):
    return _mtp_export(tmp_path_factory, 1)


def test_mtp_keys_round_trip(mtp_export):
    """The export holds model.layers.3.* in the released layout (with its own copies of the embedding and
    head) and num_nextn_predict_layers = 1; moelab loads every MTP tensor back unchanged."""
    model, out = mtp_export
    config = json.loads((out / "config.json").read_text())
    assert (config["num_nextn_predict_layers"], config["num_hidden_layers"]) == (1, 3)
    tensors = load_file(out / "model.safetensors")
    mtp_keys = {k for k in tensors if k.startswith("model.layers.3.")}
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.e_score_correction_bias",
              "mlp.experts.7.down_proj.weight", "mlp.shared_experts.up_proj.weight", "input_layernorm.weight"):
        assert f"model.layers.3.{k}" in mtp_keys
    assert torch.equal(tensors["model.layers.3.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors["model.layers.3.shared_head.head.weight"], tensors["lm_head.weight"])
    assert tensors["model.layers.3.eh_proj.weight"].shape == (32, 64)
    again = moelab.load(out)
    assert again.config.mtp.num_modules == 1
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("mtp.0.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the MTP module itself computes the same drafts
    ids = input_ids()
    with torch.no_grad():
        h = model(ids, return_hidden=True).hidden
        h2 = again(ids, return_hidden=True).hidden
        assert torch.equal(model.mtp_logits(h[:, :-1], ids[:, 1:], 0), again.mtp_logits(h2[:, :-1], ids[:, 1:], 0))


def test_transformers_loads_the_mtp_export(mtp_export):
    """DeepseekV3ForCausalLM builds no MTP layer and ignores its keys (its MtpModel reads them, below): the main
    model's logits still match."""
    model, out = mtp_export
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(hf.model.layers) == 3
    assert max_rel_diff(_logits(hf), _logits(model)) <= BOUND


def test_mtp_matches_transformers_mtp_model(tmp_path_factory):
    """Two MTP depths against transformers' MtpModel (modeling_layers.py, what generate(use_mtp=True) drafts
    with) on the export. MtpLayer.forward: eh_proj([enorm(Emb(t)) ; hnorm(h)]), the decoder block, then
    post_norm (the checkpoint's shared_head.norm); depth 1's h is the main model's last_hidden_state, AFTER the
    final norm, and depth 2's is depth 1's post-normed output. moelab's drafting (mtp_logits on
    ModelOutput.hidden) and training (mtp_losses) match it (measured: logits within 1.8e-7, losses equal); fed
    the pre-norm hidden state, depth 1 missed by 0.17 (max |logit| 0.47) and drafted 13 of 22 tokens alike."""
    from transformers.modeling_layers import MtpModel

    model, out = _mtp_export(tmp_path_factory, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    L = hf.config.num_hidden_layers
    # NOTE: DeepseekV3PreTrainedModel names its MTP keys after the released 61-layer checkpoint
    # (model\.layers\.61.*) and MtpModel.from_pretrained looks for those; point it at this model's layers.
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L + k}\..*" for k in range(2)]
    mtp = MtpModel.from_pretrained(hf).eval()
    ids = input_ids()
    B, T = ids.shape
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        ours = model(ids, labels=ids, return_hidden=True)
        assert max_rel_diff(ours.logits, ref.logits) <= BOUND
        h, ref_logits = ref.hidden_states[-1], []  # = last_hidden_state, after model.norm
        torch.testing.assert_close(ours.hidden, h, rtol=1e-5, atol=1e-5)
        for k in range(2):  # HF numbers depth k's positions by its tokens (h's + k + 1): RoPE is relative, no matter
            h = mtp.forward_layer(k, h[:, :-1], pos[:, k + 1:], None, input_ids=ids[:, k + 1:])
            ref_logits.append(mtp._project_to_logits(h))
        drafted = model.mtp_logits(ours.hidden[:, :-1], ids[:, 1:], 0)
    assert max_rel_diff(drafted, ref_logits[0]) <= BOUND
    assert torch.equal(drafted.argmax(-1), ref_logits[0].argmax(-1))
    V = ref.logits.shape[-1]
    for k, (loss, logits) in enumerate(zip(ours.mtp_losses, ref_logits), start=1):
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, k + 1:].reshape(-1))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mtp_copy_that_differs_is_an_error(mtp_export, tmp_path):
    _, out = mtp_export
    import shutil

    shutil.copytree(out, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.layers.3.shared_head.head.weight"] = tensors["model.layers.3.shared_head.head.weight"] + 1.0
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="shared_head.head.weight is a copy"):
        moelab.load(tmp_path / "m")


def test_native_deepseek_v3_tiny_exports_with_mtp(tmp_path):
    """The deepseek-v3-tiny preset (MLA, sigmoid router with bias, one MTP module) exports as deepseek_v3;
    transformers reproduces its logits and moelab reloads it exactly."""
    model = moelab.build_model(get_preset("deepseek-v3-tiny")).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)
        for layer in [*model.moe_layers(), model.mtp[0].block.ffn]:
            layer.router.weight.normal_(0.0, 1.0)
            layer.router.e_score_correction_bias.normal_(0.0, 0.5)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its losses (seq_balance) all have a config field
        out = moelab.export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_nextn_predict_layers"], config["topk_method"]) == \
        ("deepseek_v3", 1, "noaux_tc")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_rel_diff(_logits(hf, ids), _logits(model, ids)) <= BOUND
    again = moelab.load(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
