"""LongRoPE (Phi-3.5-MoE): config fields and their validation, YAML/JSON and tyro round-trips, the rotary
tables against the formula, each row's own mscale in a batch, chunked prefill against transformers' cached
forward, the phimoe config mapping both ways, and export -> transformers parity.
Load parity against transformers on both mscale branches is in tests/parity/test_hf_parity.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import moelab
from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig, load_config, save_config
from moelab.errors import ConfigError, MoelabError
from moelab.inference.engine import generate_batch
from moelab.interop.hf import choose_family, hf_config_to_model_config
from moelab.layers.rope import model_rope_cos_sin, rope_cos_sin
from tests.parity.hf_models import LLAMA, LONGROPE, max_rel_diff

PHI = Path(__file__).parent / "data" / "hf_configs" / "phi-3.5-moe.json"
SHORT = (1.0, 1.0399999618530273, 1.25, 2.009999990463257)  # head_dim 8: 4 factors
LONG = (1.0199999809265137, 3.9499998092651367, 18.229999542236328, 64.95999908447266)


def _longrope(**attn) -> AttentionConfig:
    kw = dict(num_heads=4, num_kv_heads=2, rope_type="longrope", rope_short_factor=SHORT, rope_long_factor=LONG,
              rope_short_mscale=1.2, rope_long_mscale=1.6, rope_original_max_len=16)
    return AttentionConfig(**{**kw, **attn})


def _model(attention: AttentionConfig, **kw) -> ModelConfig:
    base = dict(vocab_size=96, d_model=32, num_layers=2, max_seq_len=64, dense_ffn_dim=40, norm="layernorm",
                lm_head_bias=True, moe=MoEConfig(num_experts=4, expert_ffn_dim=24,
                                                 router=RouterConfig(type="sparsemixer", top_k=2)))
    return ModelConfig(**{**base, **kw}, attention=attention)


# ---- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,field", [
    (lambda: AttentionConfig(rope_type="yarn"), "attention.rope_type"),
    (lambda: _longrope(rope_short_factor=()), "attention.rope_short_factor"),
    (lambda: _longrope(rope_long_factor=(1.0, 0.0, 1.0, 1.0)), "attention.rope_long_factor"),
    (lambda: _longrope(rope_long_factor=(1.0, "x", 1.0, 1.0)), "attention.rope_long_factor"),
    (lambda: _longrope(rope_original_max_len=None), "attention.rope_original_max_len"),
    (lambda: _longrope(rope_short_mscale=-1.0), "attention.rope_short_mscale"),
    (lambda: AttentionConfig(rope_short_factor=(1.0, 2.0)), "attention.rope_short_factor"),
    (lambda: AttentionConfig(rope_original_max_len=4096), "attention.rope_original_max_len"),
    (lambda: _model(_longrope(), d_model=64), "attention.rope_short_factor"),  # head_dim 16 needs 8 factors
    (lambda: _model(_longrope(head_dim=8, rope_long_factor=LONG + (2.0,))), "attention.rope_long_factor"),
])
def test_bad_longrope_fields_name_the_field(build, field):
    with pytest.raises(ConfigError, match=field):
        build()


def test_default_config_is_unchanged_plain_rope():
    a = AttentionConfig()
    assert (a.rope_type, a.rope_short_factor, a.rope_long_factor, a.rope_original_max_len) == ("default", (), (), None)
    assert ModelConfig().rope_mscales() == (1.0, 1.0)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_longrope_config_round_trips_exactly(tmp_path, suffix):
    phi_factors = json.loads(PHI.read_text())["rope_scaling"]
    cfg = _model(_longrope(head_dim=128, rope_short_factor=phi_factors["short_factor"],
                           rope_long_factor=phi_factors["long_factor"], rope_long_mscale=None,
                           rope_short_mscale=1.243163121016122))
    assert isinstance(cfg.attention.rope_short_factor, tuple) and len(cfg.attention.rope_short_factor) == 64
    save_config(cfg, tmp_path / f"c{suffix}")
    back = load_config(tmp_path / f"c{suffix}")
    assert back == cfg
    assert back.attention.rope_long_factor[-1] == 64.95999908447266 and back.attention.rope_long_mscale is None


def test_longrope_flags_through_tyro():
    from moelab.cli.train import parse_train_config

    args = argparse.Namespace(resume=None, config=None, preset="tiny", out=None)
    n = 16  # tiny: head_dim 32
    cfg = parse_train_config(args, ["--model.attention.rope-type", "longrope",
                                    "--model.attention.rope-short-factor", *["1.5"] * n,
                                    "--model.attention.rope-long-factor", *["4"] * n,
                                    "--model.attention.rope-original-max-len", "64",
                                    "--model.attention.rope-long-mscale", "1.25"]).model
    a = cfg.attention
    assert (a.rope_type, a.rope_short_factor, a.rope_long_factor) == ("longrope", (1.5,) * n, (4.0,) * n)
    assert (a.rope_original_max_len, a.rope_short_mscale, a.rope_long_mscale) == (64, None, 1.25)
    # short mscale unset: sqrt(1 + ln(256 / 64) / ln(64)) = sqrt(4 / 3)
    assert cfg.rope_mscales() == (pytest.approx(math.sqrt(4 / 3), rel=1e-12), 1.25)


# ---- rotary tables ---------------------------------------------------------------------------------

def test_default_rope_is_bit_identical_to_the_plain_formula():
    cfg = _model(AttentionConfig(num_heads=4, rope_theta=500.0))
    pos = torch.arange(3, 40)
    inv = 1.0 / (500.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    emb = torch.cat([pos.float()[:, None] * inv, pos.float()[:, None] * inv], dim=-1)
    cos, sin = model_rope_cos_sin(cfg, pos, seq_len=40)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())
    assert all(torch.equal(x, y) for x, y in zip(rope_cos_sin(pos, 8, 500.0), (cos, sin)))


@pytest.mark.parametrize("T,mscale", [(16, 1.2), (17, 1.6)])
def test_longrope_tables_short_factor_and_mscale_by_length(T, mscale):
    """HF phimoe: short_factor at every length; long_mscale once max position + 1 > original max (16)."""
    cfg = _model(_longrope(rope_theta=1e4))
    pos = torch.arange(T)
    cos, sin = model_rope_cos_sin(cfg, pos, seq_len=T)
    theta_i = torch.tensor([1e4 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
    angle = pos.double()[:, None] * theta_i / torch.tensor(SHORT, dtype=torch.float64)  # (T, 4)
    angle = torch.cat([angle, angle], dim=-1)
    torch.testing.assert_close(cos.double(), angle.cos() * mscale, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), angle.sin() * mscale, rtol=0, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward_across_the_switch():
    """With a cache, the mscale follows the full length (cache + new tokens), as HF's max(position_ids) + 1:
    a prefill of 16 tokens (short) followed by one token (length 17: long) gives the full forward's last
    logits only when the full forward also runs at length 17."""
    torch.manual_seed(0)
    model = moelab.build_model(_model(_longrope())).eval()
    ids = torch.randint(0, 96, (1, 17))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = model.new_cache()
        model(ids[:, :16], cache=cache)
        step = model(ids[:, 16:], cache=cache).logits[:, -1]
    # the 16 cached keys were rotated with short_mscale, the full forward's with long_mscale: HF does the same
    assert not torch.allclose(step, full, atol=1e-6)
    short_everywhere = dataclasses.replace(model.config, attention=dataclasses.replace(
        model.config.attention, rope_long_mscale=1.2))
    same = moelab.build_model(short_everywhere).eval()
    same.load_state_dict(model.state_dict())
    with torch.no_grad():
        cache = same.new_cache()
        same(ids[:, :16], cache=cache)
        torch.testing.assert_close(same(ids[:, 16:], cache=cache).logits[:, -1], same(ids).logits[:, -1],
                                   rtol=0, atol=1e-5)


def _sharp(model):
    """q/k/v/o x10: sharp attention, so the rotary tables' mscale moves the logits well past fp32 noise."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                p.mul_(10.0)
    return model.eval()


def test_batched_rows_take_their_own_mscale():
    """Rows of 15 and 24 tokens (original max 16) left-padded into one batch, prefill then two cached steps
    (row 0 reaches 16, then 17: long): each row gets the logits it gets alone, as its mscale follows its own
    length (real tokens, cache included), not the batch's longest row."""
    torch.manual_seed(0)
    model = _sharp(moelab.build_model(_model(_longrope())))
    rows = [torch.randint(0, 96, (n + 2,)) for n in (15, 24)]

    def run(ids_BT, mask_BT, n):  # prefill of n columns, then the last two columns one at a time
        cache = model.new_cache()
        outs = [model(ids_BT[:, :n], cache=cache, attention_mask=mask_BT[:, :n]).logits]
        for t in (n, n + 1):
            outs.append(model(ids_BT[:, t:t + 1], cache=cache, attention_mask=mask_BT[:, :t + 1]).logits)
        return torch.cat(outs, dim=1)

    ids_BT, mask_BT = torch.zeros(2, 26, dtype=torch.long), torch.zeros(2, 26, dtype=torch.long)
    for b, r in enumerate(rows):
        ids_BT[b, 26 - len(r):], mask_BT[b, 26 - len(r):] = r, 1
    with torch.no_grad():
        batch = run(ids_BT, mask_BT, 24)
        for b, r in enumerate(rows):
            alone = run(r[None], torch.ones(1, len(r), dtype=torch.long), len(r) - 2)
            assert max_rel_diff(batch[b, 26 - len(r):], alone[0]) <= 1e-5


def test_engine_rows_across_the_switch_equal_each_row_alone():
    """generate_batch: a 12-token prompt beside a 20-token one (original max 16) decodes across the switch
    with the log-probabilities it has alone."""
    torch.manual_seed(1)
    model = _sharp(moelab.build_model(_model(_longrope())))
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (12, 20)]
    batch = generate_batch(model, prompts, max_new_tokens=8)
    for p, got in zip(prompts, batch):
        alone = generate_batch(model, [p], max_new_tokens=8)[0]
        assert got.token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(got.logprobs, alone.logprobs)) <= 1e-5


# ---- HF interop ------------------------------------------------------------------------------------

def test_published_phi_3_5_moe_config_maps_its_longrope():
    cfg = hf_config_to_model_config(json.loads(PHI.read_text()))  # a full load mapping, not counting only
    a = cfg.attention
    assert (a.rope_type, a.rope_original_max_len, len(a.rope_short_factor), len(a.rope_long_factor)) == (
        "longrope", 4096, 64, 64)
    assert (a.rope_short_factor[:2], a.rope_long_factor[-1]) == ((1.0, 1.0399999618530273), 64.95999908447266)
    assert cfg.rope_mscales() == (1.243163121016122, 1.243163121016122)
    assert (cfg.max_seq_len, a.rope_theta) == (131072, 10000.0)


PHIMOE = {"model_type": "phimoe", **LLAMA, "num_local_experts": 4, "head_dim": 16}


@pytest.mark.parametrize("data,field", [
    ({**PHIMOE, "rope_scaling": {**LONGROPE, "short_mscale": None}}, "short_mscale"),
    ({**PHIMOE, "rope_scaling": {**LONGROPE, "short_factor": LONGROPE["short_factor"][:3]}}, "rope_short_factor"),
    ({**PHIMOE, "rope_scaling": {**LONGROPE, "long_factor": [1.0] * 7 + [-1.0]}}, "long_factor"),
    ({**PHIMOE, "rope_scaling": {**LONGROPE, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({**PHIMOE, "rope_scaling": {k: v for k, v in LONGROPE.items() if k != "original_max_position_embeddings"}},
     "original_max_position_embeddings"),
    ({**PHIMOE, "rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({**PHIMOE, "rope_parameters": {**LONGROPE, "rope_theta": 1e4},
      "rope_scaling": {**LONGROPE, "short_mscale": 2.0}}, "disagree"),
    ({"model_type": "mixtral", **LLAMA, "num_local_experts": 4, "head_dim": 16, "rope_scaling": LONGROPE},
     "rope_scaling"),
])
def test_bad_or_foreign_longrope_is_a_clear_error(data, field):
    with pytest.raises(ConfigError, match=field):
        hf_config_to_model_config(data)


def test_top_level_original_max_is_the_fallback():
    block = {k: v for k, v in LONGROPE.items() if k != "original_max_position_embeddings"}
    cfg = hf_config_to_model_config({**PHIMOE, "rope_scaling": block, "original_max_position_embeddings": 12})
    assert cfg.attention.rope_original_max_len == 12


def test_only_phimoe_exports_longrope():
    cfg = _model(_longrope())
    adapter, fields = choose_family(cfg)
    assert adapter.model_type == "phimoe"
    assert fields["rope_parameters"] == {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": list(SHORT), "long_factor": list(LONG),
        "short_mscale": 1.2, "long_mscale": 1.6, "original_max_position_embeddings": 16}
    with pytest.raises(MoelabError, match="mixtral: .*attention.rope_type=longrope"):
        choose_family(dataclasses.replace(cfg, moe=MoEConfig(num_experts=4, expert_ffn_dim=24)), family="mixtral")


@pytest.mark.parametrize("chunks", [(17, 24), (5, 16), (12, 24), (12, 16, 17, 24)])
def test_chunked_prefill_scales_each_forward_by_its_length_as_transformers(tmp_path, chunks):
    """Chunk ends (original max 16): each forward's mscale follows its own final length, cache included, in
    transformers' cached forward as in moelab, so a chunked prefill equals the one pass only when every
    chunk ends on the full length's side of the switch; (12, 24) and (12, 16, 17, 24) cross it and differ."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = _sharp(moelab.build_model(_model(_longrope())))
    hf = transformers.AutoModelForCausalLM.from_pretrained(moelab.export_hf(model, tmp_path / "hf")).eval()
    ids = torch.randint(0, 96, (1, chunks[-1]), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache, past, outs, refs = model.new_cache(), None, [], []
        for a, b in zip((0,) + chunks, chunks):
            outs.append(model(ids[:, a:b], cache=cache).logits)
            ref = hf(ids[:, a:b], cache=past, use_cache=True)
            refs.append(ref.logits)
            past = ref.past_key_values
        chunked, full = torch.cat(outs, dim=1), model(ids).logits
    assert max_rel_diff(chunked, torch.cat(refs, dim=1)) <= 1e-5
    crosses = any((b > 16) != (chunks[-1] > 16) for b in chunks)
    assert (max_rel_diff(chunked, full) <= 1e-5) != crosses


@pytest.mark.parametrize("T", [8, 24])
def test_export_reloads_in_transformers_with_parity(tmp_path, T):
    """A native longrope model (long mscale unset: written resolved) -> export_hf -> transformers, on both
    sides of original_max = 16, and back into moelab with the same config."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = moelab.build_model(_model(_longrope(rope_long_mscale=None))).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)
        for layer in model.moe_layers():
            layer.router.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                p.mul_(10.0)  # sharp attention: the rotary tables move the logits
    out_dir = moelab.export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref = model(ids).logits
        assert max_rel_diff(hf(ids).logits, ref) <= 1e-4
    back = moelab.load(out_dir).config
    long_mscale = math.sqrt(1 + math.log(64 / 16) / math.log(16))  # the LongRoPE default, written out
    assert back.attention == dataclasses.replace(model.config.attention, rope_long_mscale=long_mscale)
