"""Per-layer sliding windows against transformers: Qwen2-MoE's ``use_sliding_window`` /
``sliding_window`` / ``max_window_layers`` / ``layer_types``.

transformers 5 slides the layers that ``layer_types`` marks ``sliding_attention``; without
``layer_types`` its config derives them: the even layers 0, 2, 4 ... below ``max_window_layers``, and
only with ``use_sliding_window``. Both its eager and sdpa paths apply the window through the mask.
The models here are 4 layers deep with a window of 4 over 16 tokens and sharpened attention, so the
window moves the logits far outside the parity bound.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import moelab
from moelab.errors import ConfigError, MoelabError
from moelab.interop.hf import choose_family, hf_config_to_model_config
from tests.parity.hf_models import LLAMA, V, build_hf_model, max_rel_diff

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

BOUND = 1e-4
W, T = 4, 16
QWEN2 = dict(LLAMA, num_hidden_layers=4, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=4,
             num_experts_per_tok=2, use_sliding_window=True, sliding_window=W)
FULL, SLIDE = "full_attention", "sliding_attention"

# variant -> (HF kwargs, moelab (sliding_window, window_layers), HF layer_types)
WINDOWED = {
    "max-window-layers-3": (dict(QWEN2, max_window_layers=3), (W, (0, 2)), [SLIDE, FULL, SLIDE, FULL]),
    "default-max-window-layers": (QWEN2, (W, (0, 2)), [SLIDE, FULL, SLIDE, FULL]),  # HF default 28
    "layer-types-middle": (dict(QWEN2, layer_types=[FULL, SLIDE, SLIDE, FULL]), (W, (1, 2)),
                           [FULL, SLIDE, SLIDE, FULL]),
    "layer-types-all": (dict(QWEN2, layer_types=[SLIDE] * 4), (W, None), [SLIDE] * 4),
    "max-window-layers-0": (dict(QWEN2, max_window_layers=0), (None, None), [FULL] * 4),
}


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def _sharpen(model):
    """q/k x4, v/o x8: peaked attention that carries much of the residual stream (see test_window_layers)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (HF directory, {attn_implementation: reference logits})."""
    out = {}
    for name, (kwargs, _, _) in WINDOWED.items():
        model = _sharpen(build_hf_model("qwen2_moe", kwargs))
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        refs = {}
        for impl in ("eager", "sdpa"):
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation=impl).eval()
            assert hf.config._attn_implementation == impl
            with torch.no_grad():
                refs[impl] = hf(_ids()).logits
        out[name] = d, refs
    return out


@pytest.mark.parametrize("name", list(WINDOWED))
def test_load_matches_transformers_eager_and_sdpa(saved, name):
    directory, refs = saved[name]
    (window, layers), types = WINDOWED[name][1:]
    assert json.loads((directory / "config.json").read_text())["layer_types"] == types  # what HF built
    model = moelab.load(directory)
    a = model.config.attention
    assert (a.sliding_window, a.window_layers) == (window, layers)
    assert [FULL if model.config.layer_window(i) is None else SLIDE for i in range(4)] == types
    with torch.no_grad():
        out = model(_ids()).logits
    for impl, ref in refs.items():
        assert max_rel_diff(out, ref) <= BOUND, impl


@pytest.mark.parametrize("name", [n for n in WINDOWED if WINDOWED[n][1][0] is not None])
def test_the_window_pattern_moves_the_logits(saved, name):
    """The same weights with every layer windowed, or none, miss transformers by > 100x the bound."""
    directory, refs = saved[name]
    model = moelab.load(directory)
    a = model.config.attention
    for changes in ({"window_layers": None}, {"window_layers": None, "sliding_window": None}):
        if a.window_layers is None and "sliding_window" not in changes:
            continue  # already every layer
        cfg = dataclasses.replace(model.config, attention=dataclasses.replace(a, **changes))
        other = moelab.build_model(cfg).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert max_rel_diff(other(_ids()).logits, refs["eager"]) > 100 * BOUND, changes


@pytest.mark.parametrize("name", list(WINDOWED))
def test_export_reloads_in_transformers(saved, name, tmp_path):
    directory, refs = saved[name]
    model = moelab.load(directory)
    out_dir = moelab.export_hf(model, tmp_path / "exported")
    written = json.loads((out_dir / "config.json").read_text())
    types = WINDOWED[name][2]
    assert written["model_type"] == "qwen2_moe" and written["layer_types"] == types
    assert written["use_sliding_window"] == (SLIDE in types)
    for impl in ("eager", "sdpa"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation=impl).eval()
        assert hf.config.layer_types == types
        with torch.no_grad():
            assert max_rel_diff(hf(_ids()).logits, refs["eager"]) <= BOUND, impl
    again = moelab.load(out_dir)
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("layers,max_window_layers", [((0, 2), 3), ((0,), 1), ((1, 2), 4), ((0, 1, 2, 3), 4)])
def test_export_writes_max_window_layers_that_derives_the_same_pattern(layers, max_window_layers):
    """The explicit layer_types is what transformers reads; max_window_layers is the smallest value
    whose default gives the same layers, else num_layers."""
    cfg = hf_config_to_model_config({"model_type": "qwen2_moe", **QWEN2, "layer_types": [
        SLIDE if i in layers else FULL for i in range(4)]})
    _, fields = choose_family(cfg, family="qwen2_moe")
    assert fields["max_window_layers"] == max_window_layers
    derived = transformers.AutoConfig.for_model("qwen2_moe", **{**fields, "layer_types": None})
    assert (derived.layer_types == fields["layer_types"]) == (layers in ((0, 2), (0,)))


@pytest.mark.parametrize("num_layers", [1, 2, 5])
@pytest.mark.parametrize("max_window_layers", [0, 1, 2, 3, 6, None])
@pytest.mark.parametrize("use", [True, False])
def test_default_layer_types_as_transformers_derives_them(num_layers, max_window_layers, use):
    """A config.json without layer_types (hub Qwen1.5-MoE files): moelab slides exactly the layers
    transformers' Qwen2MoeConfig marks sliding."""
    fields = dict(QWEN2, num_hidden_layers=num_layers, use_sliding_window=use)
    if max_window_layers is not None:
        fields["max_window_layers"] = max_window_layers
    hf_types = transformers.AutoConfig.for_model("qwen2_moe", **fields).layer_types
    cfg = hf_config_to_model_config({"model_type": "qwen2_moe", **fields})
    assert [FULL if cfg.layer_window(i) is None else SLIDE for i in range(num_layers)] == hf_types
    assert cfg.attention.sliding_window == (W if SLIDE in hf_types else None)


def test_legacy_attention_layer_type_is_full_attention():
    cfg = hf_config_to_model_config({"model_type": "qwen2_moe", **QWEN2, "layer_types": ["attention", SLIDE] * 2})
    assert cfg.attention.window_layers == (1, 3)


@pytest.mark.parametrize("change,field", [
    # transformers sets sliding_window to 0 without use_sliding_window: no key visible (sdpa crashes)
    ({"use_sliding_window": False, "layer_types": [SLIDE, FULL, FULL, FULL]}, "layer_types"),
    ({"sliding_window": None}, "sliding_window"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"layer_types": [SLIDE, FULL]}, "layer_types"),
    ({"layer_types": ["chunked_attention"] * 4}, "layer_types"),
    ({"max_window_layers": "all"}, "max_window_layers"),
])
def test_window_fields_moelab_cannot_honour(change, field):
    with pytest.raises(ConfigError, match=field):
        hf_config_to_model_config({"model_type": "qwen2_moe", **QWEN2, **change})


@pytest.mark.parametrize("family", ["mixtral", "phimoe", "qwen3_moe", "olmoe", "dbrx", "deepseek_v3"])
def test_other_families_refuse_a_per_layer_pattern(family):
    cfg = hf_config_to_model_config({"model_type": "qwen2_moe", **QWEN2, "max_window_layers": 3})
    with pytest.raises(MoelabError, match="sliding windows on some layers only"):
        choose_family(cfg, family=family)


def test_a_window_on_every_listed_layer_exports_as_one_window():
    """window_layers naming every layer is the all-layer window: mixtral and qwen3_moe express it."""
    base = hf_config_to_model_config({"model_type": "mixtral", **LLAMA, "num_local_experts": 4, "sliding_window": W})
    every = dataclasses.replace(base, attention=dataclasses.replace(base.attention, window_layers=(0, 1)))
    adapter, fields = choose_family(every)
    assert adapter.model_type == "mixtral" and fields["sliding_window"] == W
    assert choose_family(dataclasses.replace(base, attention=dataclasses.replace(base.attention, window_layers=None)),
                         family="mixtral")[1] == fields


@pytest.fixture(scope="module")
def qwen3_swa(tmp_path_factory):
    """Qwen3-MoE windows every layer (its config has no layer_types / max_window_layers)."""
    kwargs = dict(LLAMA, num_hidden_layers=3, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                  head_dim=16, use_sliding_window=True, sliding_window=W)
    model = _sharpen(build_hf_model("qwen3_moe", kwargs))
    d = tmp_path_factory.mktemp("qwen3-swa")
    model.save_pretrained(d)
    with torch.no_grad():
        return d, model(_ids()).logits


def test_qwen3_moe_window_on_every_layer_loads_and_exports(qwen3_swa, tmp_path):
    directory, ref = qwen3_swa
    model = moelab.load(directory)
    assert (model.config.attention.sliding_window, model.config.attention.window_layers) == (W, None)
    with torch.no_grad():
        assert max_rel_diff(model(_ids()).logits, ref) <= BOUND
    out_dir = moelab.export_hf(model, tmp_path / "exported")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        assert max_rel_diff(hf(_ids()).logits, ref) <= BOUND
    # a pattern the family cannot say is refused rather than exported as all-layer windows
    pattern = dataclasses.replace(model.config, attention=dataclasses.replace(model.config.attention,
                                                                              window_layers=(0, 2)))
    with pytest.raises(MoelabError, match="sliding windows on some layers only"):
        choose_family(pattern, family="qwen3_moe")
