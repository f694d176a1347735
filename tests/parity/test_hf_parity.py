"""Logit parity with transformers for every supported HF family: HF -> moelab.load, and
moelab -> export_hf -> transformers, on several tiny configs per family (see hf_models.VARIANTS)."""

from __future__ import annotations

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
