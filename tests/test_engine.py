"""The generation engine (moelab/inference/engine.py) and padding masks through the model: left-padded batches
equal single sequences, padding never routes, stop strings cut exactly, streaming, the rolling
sliding-window cache and chunked prefill equal the full computation."""

from types import SimpleNamespace

import pytest
import torch

from moelab.config import AttentionConfig, MLAConfig, ModelConfig, RouterConfig
from moelab.data.tokenizer import train_tokenizer
from moelab.inference.engine import generate_batch
from moelab.errors import ConfigError
from moelab.inference.generate import generate_ids
from moelab.model import build_model
from tests.helpers import small_config

ROUTERS = [RouterConfig(top_k=2), RouterConfig(type="deepseek_v3", top_k=2, n_group=2, topk_group=1),
           RouterConfig(type="expert_choice", top_k=2), RouterConfig(type="top_p", top_k=2)]


def _prompts(lengths, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: r.type)
def test_left_padded_batch_equals_single_sequences(router):
    torch.manual_seed(0)
    model = build_model(small_config(router=router)).eval()
    prompts = _prompts((3, 11, 6, 1))
    out = generate_batch(model, prompts, 14)
    for p, c in zip(prompts, out):
        alone = generate_ids(model, torch.tensor([p]), 14)[0, len(p):].tolist()
        assert c.token_ids == alone and c.finish_reason == "length"
        assert len(c.logprobs) == 14 and all(lp <= 0 for lp in c.logprobs)


def test_left_padded_batch_with_mla_and_sampling_seed():
    torch.manual_seed(1)
    cfg = small_config()
    cfg.attention = AttentionConfig(num_heads=4, mla=MLAConfig(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                                                               qk_rope_head_dim=4, v_head_dim=6))
    model = build_model(ModelConfig.from_dict(cfg.to_dict())).eval()
    prompts = _prompts((2, 9, 5), seed=3)
    for p, c in zip(prompts, generate_batch(model, prompts, 10)):
        assert c.token_ids == generate_ids(model, torch.tensor([p]), 10)[0, len(p):].tolist()
    a = generate_batch(model, prompts, 10, temperature=1.0, top_k=20, seed=7)
    b = generate_batch(model, prompts, 10, temperature=1.0, top_k=20, seed=7)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    logits = model(torch.tensor([prompts[0]])).logits[0, -1]  # the first logprob is the model's, unfiltered
    assert a[0].logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[a[0].token_ids[0]].item(), abs=1e-5)


@pytest.mark.parametrize("router", [RouterConfig(top_k=2, capacity_factor=1.0),
                                    RouterConfig(type="deepseek_v3", top_k=2, seq_balance_coef=1e-2),
                                    RouterConfig(top_k=2, balance_scope="sequence", expert_balance_coef=1e-2)],
                         ids=["capacity", "v3-seq", "seq-scope"])
def test_padded_positions_change_no_loss_metric_or_bias(router):
    """Whatever the padding holds, the real tokens' logits, every aux loss, the load counters the
    aux-free bias moves with and the layer metrics are the same; pads take no capacity."""
    torch.manual_seed(0)
    model = build_model(small_config(router=router)).train()
    ids = torch.randint(1, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :9] = 0
    runs = []
    for fill in (0, 1):
        x = ids.clone()
        if fill:
            x[mask == 0] = torch.randint(1, 64, (int((mask == 0).sum()),))
        for layer in model.moe_layers():
            layer.load_accum_E.zero_()
        torch.manual_seed(5)
        out = model(x, labels=x, attention_mask=mask)
        layers = model.moe_layers()
        runs.append((out.logits[mask.bool()], out.loss, dict(out.aux_losses),
                     [lay.load_accum_E.clone() for lay in layers], [dict(lay.last_metrics) for lay in layers]))
    (la, loss_a, aux_a, load_a, met_a), (lb, loss_b, aux_b, load_b, met_b) = runs
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_a, loss_b)
    assert aux_a.keys() == aux_b.keys() and aux_a
    for k in aux_a:
        torch.testing.assert_close(aux_a[k], aux_b[k])
    real = int(mask.sum())
    for a, b in zip(load_a, load_b):
        assert torch.equal(a, b) and int(a.sum()) == real * 2  # only the real tokens' K choices
    for a, b in zip(met_a, met_b):
        assert a["dropped_frac"] == b["dropped_frac"] and a["capacity"] == b["capacity"]
    if router.capacity_factor:  # capacity from the real tokens, not the padded batch
        assert met_a[0]["capacity"] == model.moe_layers()[0].capacity(real)


def test_mtp_loss_ignores_padding():
    from moelab.config import MTPConfig

    torch.manual_seed(0)
    cfg = small_config()
    cfg.mtp = MTPConfig(num_modules=2)
    model = build_model(ModelConfig.from_dict(cfg.to_dict()))
    ids = torch.randint(1, 64, (1, 8))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    a, b = model(ids, labels=ids), model(padded, labels=padded, attention_mask=mask)
    torch.testing.assert_close(torch.stack(b.mtp_losses), torch.stack(a.mtp_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)


def test_context_limit_of_a_mixed_batch_is_reported():
    torch.manual_seed(0)
    cfg = small_config()
    cfg.max_seq_len = 16
    model = build_model(ModelConfig.from_dict(cfg.to_dict())).eval()
    out = generate_batch(model, _prompts((3, 14)), 10)
    assert [len(c.token_ids) for c in out] == [2, 2] and [c.finish_reason for c in out] == ["context"] * 2


def test_padded_training_batch_loss_ignores_padding():
    torch.manual_seed(0)
    model = build_model(small_config())
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    out = model(ids, labels=ids, attention_mask=mask)
    alone = [model(ids[0:1], labels=ids[0:1]), model(ids[1:2, 4:], labels=ids[1:2, 4:])]
    n0, n1 = 9, 5  # scored targets per row
    expected = (alone[0].lm_loss * n0 + alone[1].lm_loss * n1) / (n0 + n1)
    torch.testing.assert_close(out.lm_loss, expected, rtol=1e-5, atol=1e-6)


def _tokenizer():
    text = " ".join(f"alpha beta gamma {i} delta." for i in range(200))
    return train_tokenizer([text, "stop here. more text follows\n\nand again"], vocab_size=300)


def test_stop_strings_cut_exactly_and_streaming_matches():
    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = small_config()
    cfg.vocab_size = 320
    model = build_model(ModelConfig.from_dict(cfg.to_dict())).eval()
    prompts = ["alpha beta", "gamma 3"]
    free = generate_batch(model, prompts, 24, tokenizer=tok, stop_ids=[])
    stops = []
    for c in free:  # a stop string taken from the middle of what the model writes anyway
        text = c.text
        stops.append(text[len(text) // 2: len(text) // 2 + 2])
    for b, (c, stop) in enumerate(zip(free, stops)):
        pieces = []
        out = generate_batch(model, [prompts[b]], 24, tokenizer=tok, stop_ids=[], stop_strings=[stop],
                             stream=lambda row, piece: pieces.append(piece))[0]
        assert out.text == c.text[:c.text.find(stop)] and out.finish_reason == "stop_string"
        assert "".join(pieces) == out.text  # streaming gives exactly the final text, nothing of the stop
        assert out.token_ids == c.token_ids[:len(out.token_ids)]
    # a stop token ends a row and is kept in its tokens
    first = free[0].token_ids[3]
    out = generate_batch(model, prompts[:1], 24, tokenizer=tok, stop_ids=[first])[0]
    assert out.token_ids == free[0].token_ids[:free[0].token_ids.index(first) + 1]
    assert out.finish_reason == "stop_token"


class _Scripted(torch.nn.Module):
    """A stub model that writes ``script`` (one token id per step) whatever it is fed: the engine's
    text handling (stop strings, streaming) on a chosen token sequence, e.g. a character split
    across two byte tokens."""

    def __init__(self, script, vocab=320, max_seq_len=64):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads the device from a parameter
        self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def new_cache(self, rolling=False):
        return []  # one entry per forward

    def forward(self, input_ids, cache, attention_mask=None):
        logits_BTV = torch.zeros(*input_ids.shape, self.vocab)
        logits_BTV[:, -1, self.script[len(cache)]] = 1.0
        cache.append(input_ids.shape[1])
        return SimpleNamespace(logits=logits_BTV)


@pytest.mark.parametrize("text, max_new, max_seq_len, reason, final", [
    ("####", 4, 64, "length", "####"),  # the whole tail "#" could start "#X": held back, then flushed
    ("#####", 9, 7, "context", "####"),  # prompt of 3 tokens: 4 fit
    ("##", 3, 64, "stop_token", "##"),  # then eos
    ("##X#", 4, 64, "stop_string", "#"),
])
def test_streamed_pieces_add_up_to_the_text_whatever_the_finish_reason(text, max_new, max_seq_len, reason, final):
    tok = _tokenizer()
    script = tok.encode(text) + [tok.eos_id]
    assert len(script) == len(text) + 1  # one token per character
    pieces = []
    out = generate_batch(_Scripted(script, max_seq_len=max_seq_len), [[1, 2, 3]], max_new, tokenizer=tok,
                         stop_strings=["#X"], stream=lambda row, piece: pieces.append(piece))[0]
    assert out.finish_reason == reason and out.text == final
    assert "".join(pieces) == final


@pytest.mark.parametrize("stop, reason, final", [("bé", "stop_string", "a"), ("bè", "stop_token", "abé")])
def test_streaming_holds_back_a_split_character_that_may_complete_a_stop_string(stop, reason, final):
    """é is two byte tokens: after the first the text ends with U+FFFD, and "ab" must still be held
    back as the start of "bé" (nothing streamed that the stop string later cuts)."""
    tok = _tokenizer()
    script = tok.encode("abé") + [tok.eos_id]
    assert len(script) == 5 and tok.decode(script[:3]) == "ab\ufffd"
    pieces = []
    out = generate_batch(_Scripted(script), [[1, 2, 3]], 5, tokenizer=tok, stop_strings=[stop],
                         stream=lambda row, piece: pieces.append(piece))[0]
    assert out.finish_reason == reason and out.text == final
    assert "".join(pieces) == final


def test_eval_capacity_is_refused_and_dropless_generates():
    """With an eval capacity rows compete for expert slots: a row's output would depend on its batch mates."""
    prompts = _prompts((3, 7))
    torch.manual_seed(0)
    capped = build_model(small_config(router=RouterConfig(top_k=2, eval_capacity_factor=1.0))).eval()
    with pytest.raises(ConfigError, match=r"moe\.router\.eval_capacity_factor=1\.0: .*set it to null"):
        generate_batch(capped, prompts, 4)
    torch.manual_seed(0)
    dropless = build_model(small_config()).eval()
    for p, c in zip(prompts, generate_batch(dropless, prompts, 4)):
        assert c.token_ids == generate_ids(dropless, torch.tensor([p]), 4)[0, len(p):].tolist()


def _window_model(window=4, layers=2):
    cfg = small_config()
    cfg.attention = AttentionConfig(num_heads=4, num_kv_heads=2, sliding_window=window)
    cfg.num_layers = layers
    return build_model(ModelConfig.from_dict(cfg.to_dict())).eval()


def test_rolling_cache_past_the_window_equals_full_cache_and_stays_flat():
    torch.manual_seed(0)
    model = _window_model(window=4)
    prompts = _prompts((3, 7))
    full = generate_batch(model, prompts, 30)
    rolled = generate_batch(model, prompts, 30, rolling_cache=True)
    assert [c.token_ids for c in rolled] == [c.token_ids for c in full]
    # memory: the rolling cache holds `window` keys per layer whatever the length; the full one grows
    ids = torch.randint(1, 64, (1, 40))
    sizes = {}
    for rolling in (True, False):
        cache, nbytes = model.new_cache(rolling=rolling), []
        with torch.no_grad():
            ref = model(ids).logits
            outs = [model(ids[:, :1], cache=cache).logits]
            for t in range(1, 40):
                outs.append(model(ids[:, t:t + 1], cache=cache).logits)
                nbytes.append(cache.nbytes())
        torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-5, atol=1e-5)
        sizes[rolling] = nbytes
    assert len(set(sizes[True][5:])) == 1 and sizes[True][-1] < sizes[False][-1] / 8


@pytest.mark.parametrize("chunk", [1, 3, 5, 16])
@pytest.mark.parametrize("rolling", [False, True])
def test_chunked_prefill_equals_one_shot(chunk, rolling):
    torch.manual_seed(0)
    model = _window_model(window=5)
    prompts = _prompts((13, 6, 9), seed=2)
    ref = generate_batch(model, prompts, 8)
    got = generate_batch(model, prompts, 8, prefill_chunk=chunk, rolling_cache=rolling)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]


def test_engine_bad_input():
    model = build_model(small_config())
    with pytest.raises(ConfigError, match=r"prompts\[1\]"):
        generate_batch(model, [[1, 2], []], 4)
    with pytest.raises(ConfigError, match=r"prompts\[0\]"):
        generate_batch(model, [[1] * 64], 4)
    with pytest.raises(ConfigError, match="stop_strings"):
        generate_batch(model, [[1, 2]], 4, stop_strings=["x"])
    with pytest.raises(ConfigError, match="stop_strings"):
        generate_batch(model, [[1, 2]], 4, tokenizer=_tokenizer(), stop_strings=[""])
    with pytest.raises(ConfigError, match="stream"):
        generate_batch(model, [[1, 2]], 4, stream=lambda row, piece: None)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_batch(model, [[1, 2]], 0)
    cfg = small_config().to_dict()
    cfg["attention"]["sliding_window"] = 65  # max_seq_len 64
    with pytest.raises(ConfigError, match="attention.sliding_window"):
        ModelConfig.from_dict(cfg)
    with pytest.raises(ConfigError, match="attention_mask"):
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
