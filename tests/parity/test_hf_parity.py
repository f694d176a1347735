"""Logit parity with transformers for every supported HF family: HF -> moelab.load, and
moelab -> export_hf -> transformers, on several tiny configs per family (see hf_models.VARIANTS)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import moelab
from moelab.interop.hf import read_hf_config
from moelab.params import count_params
from tests.parity.hf_models import VARIANTS, build_hf_model, hf_config, input_ids, max_rel_diff

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

BOUND = 1e-4  # max |logit difference| relative to the logit scale
IDS = [f"{f}-{v}" for f, v, _ in VARIANTS]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family-variant -> (HF directory, reference logits); built once per module."""
    out = {}
    for family, variant, kwargs in VARIANTS:
        model = build_hf_model(family, kwargs)
        d = tmp_path_factory.mktemp(f"{family}-{variant}")
        model.save_pretrained(d)
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "stub"}}')
        with torch.no_grad():
            out[f"{family}-{variant}"] = (d, model(input_ids()).logits)
    return out


def _first_choices(model: moelab.MoETransformer, ids: torch.Tensor) -> list[set[int]]:
    """Per MoE layer, the set of experts that are some token's first choice."""
    seen: list[set[int]] = []

    def hook(module, inputs, routing):
        seen.append(set(routing.expert_idx_A.view(routing.num_tokens, -1)[:, 0].tolist()))

    handles = [layer.router.register_forward_hook(hook) for layer in model.moe_layers()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("key", IDS)
def test_load_matches_transformers(saved, key):
    directory, ref = saved[key]
    model = moelab.load(directory)
    assert not model.training
    with torch.no_grad():
        out = model(input_ids()).logits
    assert out.shape == ref.shape
    assert max_rel_diff(out, ref) <= BOUND
    # decisive routing: in every MoE layer, tokens disagree on their first-choice expert
    assert all(len(s) >= 2 for s in _first_choices(model, input_ids()))


@pytest.mark.parametrize("key", IDS)
def test_export_reloads_in_transformers(saved, key, tmp_path):
    directory, ref = saved[key]
    model = moelab.load(directory)
    out_dir = moelab.export_hf(model, tmp_path / "exported")
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == read_hf_config(directory)["model_type"]
    assert (out_dir / "tokenizer.json").read_text() == (directory / "tokenizer.json").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        out = hf(input_ids()).logits
    assert max_rel_diff(out, ref) <= BOUND
    # and back again: the exported directory loads into the same moelab tensors
    again = moelab.load(out_dir)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("family,variant,kwargs", VARIANTS, ids=IDS)
def test_param_count_equals_transformers_meta(family, variant, kwargs):
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(family, kwargs))
    hf_total = sum(p.numel() for p in hf.parameters())
    cfg_dict = hf_config(family, kwargs).to_dict()
    cfg = moelab.interop.hf.hf_config_to_model_config(cfg_dict)
    assert count_params(cfg).total_params == hf_total


def test_dbrx_null_normalisation_is_not_the_default():
    """``moe_normalize_expert_weights: null`` turns renormalisation off; absent means p = 1."""
    base = {"model_type": "dbrx", "d_model": 32, "n_heads": 4, "n_layers": 2, "vocab_size": 64}
    off = moelab.interop.hf.hf_config_to_model_config({**base, "ffn_config": {"moe_normalize_expert_weights": None}})
    on = moelab.interop.hf.hf_config_to_model_config({**base, "ffn_config": {}})
    assert (off.moe.router.norm_topk_prob, on.moe.router.norm_topk_prob) == (False, True)
    two = moelab.interop.hf.hf_config_to_model_config({**base, "ffn_config": {"moe_normalize_expert_weights": 2}})
    assert (two.moe.router.norm_topk_prob, two.moe.router.topk_norm_p) == (True, 2.0)
    adapter, fields = moelab.interop.hf.choose_family(two)
    assert adapter.model_type == "dbrx" and fields["ffn_config"]["moe_normalize_expert_weights"] == 2.0
    with pytest.raises(moelab.MoelabError, match="p-norm with p = 2"):
        moelab.interop.hf.choose_family(two, family="qwen3_moe")


@pytest.mark.parametrize("key", ["dbrx-pnorm2", "dbrx-pnorm0.5-top3"])
def test_dbrx_p_norm_parity_with_large_expert_outputs(key, tmp_path):
    """Expert weights x8 so the MoE output dominates the residual stream: moelab matches transformers
    at p, and running the same weights with p = 1 misses by far more than the parity bound."""
    model = build_hf_model("dbrx", VARIANTS[IDS.index(key)][2])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.mul_(8.0)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = model.eval()(input_ids()).logits
    ours = moelab.load(tmp_path)
    r = ours.config.moe.router
    l1 = moelab.build_model(dataclasses.replace(ours.config, moe=dataclasses.replace(
        ours.config.moe, router=dataclasses.replace(r, topk_norm_p=1.0)))).eval()
    l1.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert max_rel_diff(ours(input_ids()).logits, ref) <= BOUND
        assert max_rel_diff(l1(input_ids()).logits, ref) > 100 * BOUND


@pytest.fixture(scope="module")
def longrope_models(tmp_path_factory):
    """The phimoe-longrope variant with q/k/v/o weights x10: attention is sharp and carries a large part of
    the residual stream, so rotary angles and mscale move the logits (at init scale they barely do)."""
    model = build_hf_model("phimoe", VARIANTS[IDS.index("phimoe-longrope")][2])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                p.mul_(10.0)
    d = tmp_path_factory.mktemp("phimoe-longrope-sharp")
    model.save_pretrained(d)
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval(), moelab.load(d)


@pytest.mark.parametrize("T,branch", [(8, "short"), (24, "long")])
def test_phimoe_longrope_both_mscale_branches(longrope_models, T, branch):
    """original_max_position_embeddings = 16: 8 tokens take short_mscale, 24 take long_mscale (HF runs
    short_factor at both lengths); moelab matches transformers on each side."""
    hf, model = longrope_models
    a = model.config.attention
    assert (a.rope_type, a.rope_original_max_len, a.rope_short_mscale, a.rope_long_mscale) == ("longrope", 16, 1.3, 1.7)
    ids = torch.randint(0, hf.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).logits
    assert max_rel_diff(out, ref) <= BOUND

    def logits_with(**changes):
        cfg = dataclasses.replace(model.config, attention=dataclasses.replace(a, **changes))
        other = moelab.build_model(cfg).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            return other(ids).logits

    # the branch matters: the other branch's mscale, or plain RoPE, moves the logits far outside the bound
    other = "long" if branch == "short" else "short"
    assert max_rel_diff(logits_with(**{f"rope_{branch}_mscale": getattr(a, f"rope_{other}_mscale")}), ref) > 100 * BOUND
    plain = dict(rope_type="default", rope_short_factor=(), rope_long_factor=(), rope_short_mscale=None,
                 rope_long_mscale=None, rope_original_max_len=None)
    assert max_rel_diff(logits_with(**plain), ref) > 100 * BOUND
