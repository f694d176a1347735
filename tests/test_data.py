"""moelab.data: built-in corpus, user corpora, tokenizer, packing, `moelab data info`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.data import (
    EOS, Corpus, Document, PackedData, Tokenizer, builtin_corpus, load_corpus, pack, prepare_data, train_tokenizer,
    unigram_entropy,
)
from moelab.data.corpus import DOMAIN_CHARS, split_documents
from moelab.data.mathgen import MODULES, _eval, fmt, math_document
from moelab.data.sources import stdlib_dir
from moelab.errors import CheckpointError, ConfigError, DataError, MoelabError

SMALL = 12  # documents per domain in the quick corpus

TRICKY = [
    "", " ", "  \n\n\t  ", "hello world", "def f(x):\n    return x ** 2  # square\n",
    "naïve café — “quotes” ‘single’ …", "日本語のテキスト、中文文本", "Ελληνικά, русский, עברית, العربية",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷", "combining e\u0301 vs \u00e9, zero\u200bwidth, \ufeffbom",
    "control \x00\x01\x7f chars\r\nwindows\rold mac", f"literal {EOS} inside text", "x" * 500, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥²",
]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Corpus:
    return builtin_corpus(cache_dir=tmp_path_factory.mktemp("cache"), max_docs_per_domain=SMALL)


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory) -> Path:
    """A cache directory shared by the tests that need the whole built-in corpus (built once)."""
    return tmp_path_factory.mktemp("full_cache")


@pytest.fixture(scope="module")
def tok(small_corpus) -> Tokenizer:
    return train_tokenizer((d.text for d in small_corpus.train), vocab_size=512)


# ---------------------------------------------------------------------------------------- corpus


def test_builtin_corpus_is_deterministic_and_every_domain_non_empty(small_corpus, tmp_path):
    again = builtin_corpus(cache_dir=tmp_path / "other", max_docs_per_domain=SMALL)  # a fresh build
    assert again == small_corpus
    assert again.fingerprint() == small_corpus.fingerprint()
    assert small_corpus.domains == ["code", "math", "prose"]
    for split in (small_corpus.train, small_corpus.val):
        assert {d.domain for d in split} == {"code", "math", "prose"}
    counts = {d: sum(doc.domain == d for doc in small_corpus.train + small_corpus.val) for d in small_corpus.domains}
    assert counts == {"code": SMALL, "math": SMALL, "prose": SMALL}
    assert builtin_corpus(cache_dir=tmp_path / "s1", seed=1, max_docs_per_domain=SMALL).fingerprint() \
        != small_corpus.fingerprint()


def test_builtin_cache_is_reused_and_a_broken_cache_rebuilt(tmp_path):
    first = builtin_corpus(cache_dir=tmp_path, max_docs_per_domain=3)
    (cache,) = tmp_path.glob("*.jsonl")
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed, not left behind
    lines = cache.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + 9 and json.loads(lines[0])["documents"] == 9
    cache.write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")  # truncated, as by a crash
    assert builtin_corpus(cache_dir=tmp_path, max_docs_per_domain=3) == first
    assert len(cache.read_text(encoding="utf-8").splitlines()) == 10


def test_builtin_sources_are_honest(small_corpus):
    docs = small_corpus.train + small_corpus.val
    root = stdlib_dir()
    for d in docs:
        assert d.doc_id.startswith(d.domain + "/")
        if d.domain == "code":
            rel = d.doc_id.removeprefix("code/")
            assert "site-packages" not in rel and (root / rel).is_file()
            assert (root / rel).read_text(encoding="utf-8").startswith(d.text)
    texts = {dom: {d.text for d in docs if d.domain == dom} for dom in small_corpus.domains}
    assert not (texts["code"] & texts["prose"])


def test_full_builtin_corpus_is_balanced(full_cache, tmp_path):
    corpus = builtin_corpus(cache_dir=full_cache)
    assert list(full_cache.glob("*.jsonl"))
    assert corpus == builtin_corpus(cache_dir=full_cache)  # from the cache
    chars = {dom: sum(len(d.text) for d in corpus.train + corpus.val if d.domain == dom) for dom in corpus.domains}
    for dom, n in chars.items():
        assert 0.8 * DOMAIN_CHARS[dom] <= n <= DOMAIN_CHARS[dom] + 16_000, (dom, n)
    train_ids, val_ids = {d.doc_id for d in corpus.train}, {d.doc_id for d in corpus.val}
    assert not train_ids & val_ids
    assert 0.02 < len(val_ids) / (len(train_ids) + len(val_ids)) < 0.08


def test_split_is_by_doc_id_and_stable_when_documents_are_added():
    docs = [Document(text=f"text {i}", domain=("a", "b")[i % 2], doc_id=f"doc{i}") for i in range(200)]
    c = split_documents(docs, 0.1)
    more = split_documents(docs + [Document("new", "a", f"new{i}") for i in range(50)], 0.1)
    assert {d.doc_id for d in c.val} <= {d.doc_id for d in more.val}
    assert not {d.doc_id for d in c.train} & {d.doc_id for d in c.val}
    assert sorted(c.train + c.val, key=lambda d: d.doc_id) == sorted(docs, key=lambda d: d.doc_id)
    # the seed reorders, never re-splits
    c1 = split_documents(docs, 0.1, seed=1)
    assert {d.doc_id for d in c1.val} == {d.doc_id for d in c.val} and c1.train != c.train
    # every domain with >= 2 documents has one in validation, even at a tiny fraction
    tiny = split_documents(docs[:4], 0.001)
    assert {d.domain for d in tiny.val} == {"a", "b"} and {d.domain for d in tiny.train} == {"a", "b"}


def test_math_answers_are_exact():
    assert fmt(0.5) == "0.5" and fmt(-7) == "-7" and str(fmt(__import__("fractions").Fraction(1, 3))) == "1/3"
    assert _eval("(3 - 5) * 4 + 2 / 8") == __import__("fractions").Fraction(-31, 4)
    doc = math_document(0, "algebra__linear_1d", 0)
    lines = doc.splitlines()
    assert len(lines) == 24
    for q, a in zip(lines[::2], lines[1::2]):  # "Solve a*x + b = c for x." -> substitute the answer
        lhs, rhs = q.removeprefix("Solve ").split(" for ")[0].split(" = ")
        var = q.rstrip(".").split(" for ")[1]
        assert _eval(lhs.replace(var, f"({a})").replace(")(", ")*(")) == int(rhs)
    assert math_document(0, "arithmetic__mixed", 5) == math_document(0, "arithmetic__mixed", 5)
    assert len(MODULES) >= 15


# ------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_text(tok):
    for s in TRICKY:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, s
        assert tok.eos_id not in ids  # a literal "<|endoftext|>" is text, not a document boundary
    assert tok.eos_id == 0 and tok.vocab_size == 512
    assert tok.decode([tok.eos_id]) == EOS


def test_tokenizer_training_is_deterministic_and_saves_exactly(small_corpus, tok, tmp_path):
    again = train_tokenizer((d.text for d in small_corpus.train), vocab_size=512)
    assert again == tok
    path = tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.json"
    for where in (tmp_path / "ckpt", path):
        loaded = Tokenizer.load(where)
        assert loaded == tok
        assert loaded.encode(TRICKY[8]) == tok.encode(TRICKY[8])
        assert loaded.decode(loaded.encode(TRICKY[6])) == TRICKY[6]


def test_tokenizer_load_errors(tok, tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    path = tok.save(tmp_path)
    path.write_text(path.read_text()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="not a valid tokenizer file"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


# --------------------------------------------------------------------------------------- packing


def test_pack_keeps_every_token_once_with_its_domain(small_corpus, tok):
    docs = small_corpus.train
    packed = pack(docs, tok, seq_len=64, domains=small_corpus.domains)
    stream, domains = [], []
    for d in docs:
        ids = tok.encode(d.text) + [tok.eos_id]
        stream += ids
        domains += [small_corpus.domains.index(d.domain)] * len(ids)
    N = math.ceil(len(stream) / 64)
    assert packed.input_ids.shape == packed.labels.shape == packed.domain_ids.shape == (N, 64)
    assert packed.input_ids.dtype == packed.labels.dtype == packed.domain_ids.dtype == torch.int64
    real = packed.labels != -100
    assert packed.input_ids[real].tolist() == stream
    assert packed.domain_ids[real].tolist() == domains
    assert torch.equal(packed.labels[real], packed.input_ids[real])
    # padding: only at the end of the last row, with domain -1
    pad = int((~real).sum())
    assert pad == N * 64 - len(stream) and pad < 64
    assert (~real).view(-1)[len(stream):].all() and (packed.domain_ids[~real] == -1).all()
    # cutting the stream at eos gives back every document's text, in order
    texts = tok.decode(stream).split(EOS)
    assert texts[:-1] == [d.text for d in docs] and texts[-1] == ""
    assert packed.num_tokens == len(stream)
    assert sum(packed.tokens_per_domain().values()) == len(stream)


def test_pack_edge_cases(tok):
    docs = [Document("ab", "x", "1"), Document("cd", "y", "2")]
    L = len(tok.encode("ab")) + len(tok.encode("cd")) + 2
    exact = pack(docs, tok, seq_len=L)
    assert exact.input_ids.shape == (1, L) and (exact.labels != -100).all()
    assert exact.domains == ["x", "y"]
    empty = pack([], tok, seq_len=8)
    assert empty.input_ids.shape == (0, 8) and empty.num_tokens == 0
    with pytest.raises(DataError, match="not in domains"):
        pack(docs, tok, seq_len=8, domains=["x"])
    with pytest.raises(ConfigError, match="seq_len"):
        pack(docs, tok, seq_len=0)


def test_prepare_data_shares_domain_indices(small_corpus, tok):
    train, val = prepare_data(small_corpus, tok, seq_len=32)
    assert train.domains == val.domains == small_corpus.domains
    for packed, docs in ((train, small_corpus.train), (val, small_corpus.val)):
        want = {dom: sum(len(tok.encode(d.text)) + 1 for d in docs if d.domain == dom) for dom in packed.domains}
        assert packed.tokens_per_domain() == want


def test_unigram_entropy():
    ids = torch.tensor([[5, 5, 7, 7], [9, 9, 9, 9]])
    labels = ids.clone()
    labels[1] = -100  # padding is not counted
    p = PackedData(input_ids=ids, labels=labels, domain_ids=torch.zeros_like(ids), domains=["a"])
    assert unigram_entropy(p) == pytest.approx(math.log(2))
    labels[1, :2] = 9  # counts 2, 2, 2
    assert unigram_entropy(p) == pytest.approx(math.log(3))


# ------------------------------------------------------------------------------------- user data


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_text_file_documents(tmp_path):
    f = _write(tmp_path / "notes.txt", "first para\nline two\n\n\n  \nsecond 😀\r\n\r\nthird\n")
    c = load_corpus(f, val_fraction=0.3)
    docs = sorted(c.train + c.val, key=lambda d: d.doc_id)
    assert [d.text for d in docs] == ["first para\nline two", "second 😀", "third"]
    assert {d.domain for d in docs} == {"text"} and len(c.val) >= 1 and len(c.train) >= 1
    g = _write(tmp_path / "sep.txt", f"doc one\n\nstill one\n{EOS}\ndoc two\n{EOS}\n")
    c = load_corpus(g)
    assert sorted(d.text for d in c.train + c.val) == ["doc one\n\nstill one", "doc two"]


def test_directory_documents(tmp_path):
    _write(tmp_path / "code" / "a.py", "print(1)\n")
    _write(tmp_path / "code" / "deep" / "b.py", "x = 2\n")
    _write(tmp_path / "prose" / "c.md", "# Title\n\nSome words.\n")
    _write(tmp_path / "top.txt", "top level\n")
    _write(tmp_path / "image.png", "not text")
    _write(tmp_path / ".hidden" / "d.txt", "hidden\n")
    c = load_corpus(tmp_path)
    docs = {d.doc_id: d for d in c.train + c.val}
    assert set(docs) == {"code/a.py", "code/deep/b.py", "prose/c.md", "top.txt"}
    assert [docs[k].domain for k in sorted(docs)] == ["code", "code", "prose", "text"]
    assert docs["prose/c.md"].text == "# Title\n\nSome words.\n"
    assert c.domains == ["code", "prose", "text"]
    assert load_corpus(tmp_path) == c and load_corpus(tmp_path, seed=3).fingerprint() != c.fingerprint()


def test_jsonl_documents(tmp_path):
    lines = [{"text": "alpha", "domain": "greek"}, {"text": "one two"}, {"text": "beta", "domain": "greek", "id": "b"}]
    f = _write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    c = load_corpus(f)
    docs = {d.doc_id: d for d in c.train + c.val}
    assert docs == {"data.jsonl:1": Document("alpha", "greek", "data.jsonl:1"),
                    "data.jsonl:2": Document("one two", "text", "data.jsonl:2"),
                    "b": Document("beta", "greek", "b")}


@pytest.mark.parametrize("case, match", [
    ("missing", r"nope\.txt: no such file or directory"),
    ("empty_string", "data path is empty"),
    ("empty_file", r"empty\.txt: the file is empty"),
    ("empty_dir", r"holds no text files"),
    ("only_binary_dir", r"holds no text files"),
    ("no_text_field", r"bad\.jsonl, line 2: no 'text' field \(keys: 'txt'\)"),
    ("bad_json", r"bad\.jsonl, line 1: not valid JSON"),
    ("text_not_string", r"field 'text' is int"),
    ("duplicate_id", r"bad\.jsonl, line 2: id 'a' is already used on line 1"),
    ("latin1", r"latin\.txt: not valid UTF-8 \(byte 0xe9 at offset 3, line 1\); re-encode it as UTF-8"),
    ("latin1_in_dir", r"sub.latin\.md: not valid UTF-8.*iconv"),
    ("one_document", r"holds 1 document\(s\), too few to hold out validation"),
])
def test_bad_inputs_name_the_file_and_the_fix(tmp_path, case, match):
    src: object
    if case == "missing":
        src = tmp_path / "nope.txt"
    elif case == "empty_string":
        src = ""
    elif case == "empty_file":
        src = _write(tmp_path / "empty.txt", " \n\n")
    elif case == "empty_dir":
        src = tmp_path
    elif case == "only_binary_dir":
        (tmp_path / "x.bin").write_bytes(b"\x00\x01")
        src = tmp_path
    elif case == "no_text_field":
        src = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"txt": "typo"}\n')
    elif case == "bad_json":
        src = _write(tmp_path / "bad.jsonl", '{"text": "unterminated\n')
    elif case == "text_not_string":
        src = _write(tmp_path / "bad.jsonl", '{"text": 3}\n')
    elif case == "duplicate_id":
        src = _write(tmp_path / "bad.jsonl", '{"text": "x", "id": "a"}\n{"text": "y", "id": "a"}\n')
    elif case == "latin1":
        src = tmp_path / "latin.txt"
        src.write_bytes("café au lait".encode("latin-1"))
    elif case == "latin1_in_dir":
        _write(tmp_path / "sub" / "ok.txt", "fine\n")
        (tmp_path / "sub" / "latin.md").write_bytes("caf\xe9".encode("latin-1"))
        src = tmp_path
    else:
        src = _write(tmp_path / "one.txt", "a single paragraph\n")
    with pytest.raises(DataError, match=match) as info:
        load_corpus(src)
    assert isinstance(info.value, MoelabError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_data_info_json_matches_the_library(tmp_path, capsys):
    rows = [{"text": f"def f{i}(x):\n    return x + {i}\n", "domain": "code"} for i in range(20)]
    rows += [{"text": f"Paragraph {i} of plain English prose about experts.", "domain": "prose"} for i in range(20)]
    f = _write(tmp_path / "mix.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert main(["data", "info", str(f), "--json", "--vocab-size", "300", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)

    corpus = load_corpus(f)
    tok = train_tokenizer((d.text for d in corpus.train), 300)
    assert info["domains"] == ["code", "prose"] and info["vocab_size"] == tok.vocab_size
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        for dom in ("code", "prose"):
            mine = [d for d in docs if d.domain == dom]
            assert info["splits"][split][dom] == {
                "documents": len(mine), "characters": sum(len(d.text) for d in mine),
                "tokens": sum(len(tok.encode(d.text)) + 1 for d in mine)}
        assert info["splits"][split]["all"]["documents"] == len(docs)
    assert info["splits"]["train"]["all"]["documents"] + info["splits"]["val"]["all"]["documents"] == 40
    train, _ = prepare_data(corpus, tok, seq_len=16)
    assert info["unigram_entropy_nats"] == pytest.approx(unigram_entropy(train), abs=1e-12)
    assert info["unigram_entropy_bits"] == pytest.approx(info["unigram_entropy_nats"] / math.log(2))
    assert info["corpus_fingerprint"] == corpus.fingerprint()

    assert json.loads((out / "result.json").read_text()) == info
    table = (out / "data_info.md").read_text()
    assert f"| train | code | {info['splits']['train']['code']['documents']:,} |" in table
    assert f"{info['unigram_entropy_nats']:.4f} nats" in table
    assert Tokenizer.load(out) == tok

    assert main(["data", "info", str(f), "--vocab-size", "300"]) == 0  # the human-readable table
    text = capsys.readouterr().out
    assert f"{info['unigram_entropy_nats']:.4f} nats = {info['unigram_entropy_bits']:.4f} bits" in text
    code = info["splits"]["train"]["code"]
    assert f"train  {'code':<12}{code['documents']:>11,}{code['characters']:>14,}{code['tokens']:>12,}" in text


def test_cli_data_info_builtin(full_cache, capsys):
    assert main(["data", "info", "--json", "--cache-dir", str(full_cache)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == "builtin" and info["domains"] == ["code", "math", "prose"]
    train = info["splits"]["train"]
    tokens = [train[d]["tokens"] for d in info["domains"]]
    assert min(tokens) > 200_000 and max(tokens) < 1.3 * min(tokens)  # roughly balanced
    assert all(info["splits"]["val"][d]["tokens"] > 5_000 for d in info["domains"])
    assert 4.0 < info["unigram_entropy_nats"] < math.log(2048)


def test_cli_data_info_errors(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab data: error:") and "missing: no such file or directory" in err
    assert len(err.splitlines()) == 1
    assert main(["data", "info", "--vocab-size", "10", "--cache-dir", str(tmp_path)]) == 2
    assert "vocab_size=10" in capsys.readouterr().err


def test_tokenizer_from_elsewhere_finds_its_eos(tmp_path):
    """A tokenizer.json of a Hugging Face model directory: eos from tokenizer_config.json, else </s>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from moelab.data import Tokenizer
    from moelab.errors import CheckpointError

    vocab = {"<s>": 0, "</s>": 1, "<eot>": 2, "a": 3, "b": 4}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="a"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tokenizer.json").write_text(hf.to_str())
    assert Tokenizer.load(tmp_path).eos_id == 1  # falls back to </s>
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "<eot>", "lstrip": false}}')
    assert Tokenizer.load(tmp_path).eos_id == 2  # the config's eos_token wins
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<missing>"}')
    with pytest.raises(CheckpointError, match="<missing>"):
        Tokenizer.load(tmp_path)
