"""Perplexity against context length: per-position losses equal a direct prefix-by-prefix computation,
buckets and windows average what the docs say, and the command writes its curve and numbers."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.data.document import Document
from moelab.errors import ConfigError
from moelab.eval.context import check_lengths, context_windows, position_losses, summarise
from moelab.model import build_model


def _model(vocab=300, max_seq_len=64):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=vocab, d_model=32, num_layers=2, max_seq_len=max_seq_len,
                                   dense_ffn_dim=48, attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                                   moe=MoEConfig(num_experts=4, expert_ffn_dim=24, router=RouterConfig(top_k=2)))).eval()


def test_position_losses_equal_a_direct_computation():
    model = _model()
    windows = torch.randint(0, 300, (3, 16))
    got = position_losses(model, windows, batch_size=2)
    assert torch.isnan(got[:, 0]).all()
    with torch.no_grad():
        for n in (0, 2):  # rows of different batches
            for c in range(1, 16):  # token c predicted from the prefix of c tokens, run on its own
                logits = model(windows[n:n + 1, :c]).logits[0, -1].float()
                want = F.cross_entropy(logits[None], windows[n, c:c + 1]).item()
                assert got[n, c].item() == pytest.approx(want, abs=1e-4)


def test_buckets_and_windows_average_positions():
    loss = torch.tensor([[float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
                         [float("nan"), 3.0, 2.0, 1.0, 0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    s = summarise(loss, [2, 4, 8])
    mean = [None, 2.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0]
    assert s["per_position_loss"] == mean
    b = [r["bucket_loss"] for r in s["rows"]]
    assert b == [2.0, 2.0, pytest.approx((2 + 3 + 4 + 5) / 4)]  # positions [1,2), [2,4), [4,8)
    assert [r["bucket"] for r in s["rows"]] == [[1, 1], [2, 3], [4, 7]]
    assert [r["bucket_tokens"] for r in s["rows"]] == [2, 4, 8]
    assert s["rows"][2]["window_loss"] == pytest.approx(sum(mean[1:]) / 7)  # positions 1 .. 7
    assert s["rows"][1]["window_ppl"] == pytest.approx(math.exp(2.0))


class _CharTok:
    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]


def test_windows_are_document_slices_round_robin():
    docs = [Document("a" * 25, "x", "1"), Document("b" * 9, "y", "2"), Document("c" * 16, "y", "3")]
    windows, domains, used, longest = context_windows(_CharTok(), docs, 8)
    assert [chr(w[0]) for w in windows] == ["a", "b", "c", "a", "c", "a"]  # first windows first; no partial tail
    assert all(len(w) == 8 and len(set(w)) == 1 for w in windows)
    assert domains == ["x", "y", "y", "x", "y", "x"] and used == 3 and longest == 25
    assert len(context_windows(_CharTok(), docs, 8, max_windows=2)[0]) == 2
    assert context_windows(_CharTok(), docs, 30)[0] == []


def test_length_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--lengths.*at least one"):
        check_lengths([], 64)
    with pytest.raises(ConfigError, match=r"--lengths=128.*max_seq_len=64"):
        check_lengths([32, 128], 64)
    with pytest.raises(ConfigError, match="--lengths"):
        check_lengths([1, 8], 64)
    assert check_lengths([32, 8, 32], 64) == [8, 32]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from moelab.checkpoint.model_files import save_model
    from moelab.data import train_tokenizer

    root = tmp_path_factory.mktemp("ctx")
    text = "\n\n".join(f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(6))
    (root / "docs.txt").write_text(text)
    tok = train_tokenizer([text], 300)
    save_model(_model(vocab=tok.vocab_size), root / "model")
    tok.save(root / "model")
    return root


def test_cli_context_writes_curve_and_numbers(saved, capsys):
    from moelab.cli import main

    out = saved / "out"
    assert main(["eval", "context", str(saved / "model"), "--lengths", "8,16,32", "--data", str(saved / "docs.txt"),
                 "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "result.json").read_text())
    assert [row["length"] for row in r["rows"]] == [8, 16, 32] and r["window"] == 32 and r["windows"] > 0
    assert (out / "plots" / "perplexity_vs_context.png").stat().st_size > 1000
    assert "perplexity" in (out / "report.md").read_text()
    # the reported numbers are the per-position means of the same windows
    pos = r["per_position_loss"]
    assert r["rows"][0]["bucket_loss"] == pytest.approx(sum(pos[1:8]) / 7)
    assert r["rows"][2]["window_loss"] == pytest.approx(sum(pos[1:32]) / 31)
    assert "32:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--lengths", ""], "--lengths"),
    (["--lengths", "8,x"], "--lengths"),
    (["--lengths", "8,128"], "max_seq_len=64"),
    (["--lengths", "8,64", "--data", "MISSING.txt"], "MISSING.txt"),
])
def test_cli_context_bad_input_exits_2(saved, capsys, argv, needle):
    from moelab.cli import main

    data = [] if "--data" in argv else ["--data", str(saved / "docs.txt")]
    assert main(["eval", "context", str(saved / "model"), *argv, *data, "--out", str(saved / "bad")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.startswith("moelab eval: error:")


def test_cli_context_unknown_source_exits_2(tmp_path, capsys):
    from moelab.cli import main

    assert main(["eval", "context", str(tmp_path / "nope"), "--lengths", "8", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
