"""A resume reads what its checkpoint verified: the run config and tokenizer come from the checkpoint
(not the run directory's unverified copies, which may have been edited), and a change to the data
files is refused unless --allow-data-change."""

import hashlib
import json
import warnings

import pytest
import yaml

from moelab.cli import main
from moelab.errors import CheckpointError
from moelab.train import TrainConfig, train
from tests.helpers import small_config


@pytest.fixture()
def corpus(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(words[(i + k) % 10] for k in range(40))}) + "\n"
                            for i in range(40)))
    return path


def _cfg(corpus, **kw):
    model = small_config()
    model.vocab_size = 300
    base = dict(model=model, data=str(corpus), steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0,
                eval_batches=1, save_every=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_an_edited_run_config_is_not_adopted_on_resume(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(corpus), run)
    data = yaml.safe_load((run / "config.yaml").read_text())
    before = data["model"]["moe"]["router"]["load_balance_coef"]
    data["model"]["moe"]["router"]["load_balance_coef"] = 0.5  # a valid-YAML edit of a loss coefficient
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    said = [str(w.message) for w in caught if "config.yaml" in str(w.message)]
    assert said and str(run / "config.yaml") in said[0] and "load_balance_coef" in said[0]
    assert said[0].startswith("resuming with the verified copy") and "differs from it" in said[0]
    assert "checkpoints/step_000002/run_config.yaml" in said[0]
    resumed = yaml.safe_load((run / "checkpoints" / "step_000003" / "run_config.yaml").read_text())
    assert resumed["model"]["moe"]["router"]["load_balance_coef"] == before != 0.5  # the verified value
    assert resumed["steps"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["moe"]["router"]["load_balance_coef"] == 0.5


def test_an_edited_run_tokenizer_is_not_adopted_on_resume(corpus, tmp_path):
    from moelab.data import train_tokenizer

    run = tmp_path / "run"
    train(_cfg(corpus), run)
    original = (run / "checkpoints" / "step_000002" / "tokenizer.json").read_bytes()
    train_tokenizer(["zzz yyy xxx www " * 50], 300).save(run / "tokenizer.json")  # valid, and different
    edited = (run / "tokenizer.json").read_bytes()
    assert edited != original
    with pytest.warns(UserWarning, match=r"tokenizer\.json differs from the verified copy .*step_000002"):
        train(_cfg(corpus, steps=3), run, resume=True)
    assert (run / "checkpoints" / "step_000003" / "tokenizer.json").read_bytes() == original
    assert (run / "tokenizer.json").read_bytes() == edited  # the user's file is left alone


def test_changed_data_is_refused_on_resume_unless_allowed(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(corpus), run)
    meta = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    fp = meta["data_files"]["files"][str(corpus)]
    assert fp["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest() and fp["size"] == corpus.stat().st_size
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "a new document " * 20}) + "\n")
    with pytest.raises(CheckpointError, match=rf"{corpus}: .* bytes, .* when step_000002 was saved.*--allow-data-change"):
        train(_cfg(corpus, steps=3), run, resume=True)
    assert not (run / "checkpoints" / "step_000003").exists()
    assert main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(corpus) in err and "--allow-data-change" in err
    with pytest.warns(UserWarning, match="training data changed since step_000002"):
        train(_cfg(corpus, steps=3), run, resume=True, allow_data_change=True)
    new = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())["data_files"]
    assert new["files"][str(corpus)]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()


def test_same_size_rewrite_of_the_data_is_caught(corpus, tmp_path):
    run = tmp_path / "run"
    train(_cfg(corpus), run)
    text = corpus.read_text()
    corpus.write_text(text.replace("alpha", "ALPHA", 1))  # same size, different content
    with pytest.raises(CheckpointError, match="content changed"):
        train(_cfg(corpus, steps=3), run, resume=True)


def test_an_untouched_resume_says_nothing(corpus, tmp_path):
    run = tmp_path / "run"
    train(_cfg(corpus), run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(_cfg(corpus, steps=3), run, resume=True)
    assert (run / "checkpoints" / "step_000003").is_dir()


def test_resuming_again_after_a_steps_change_says_nothing(corpus, tmp_path):
    # RUN/config.yaml keeps the first --steps; a field a resume may change is no difference to report
    run = tmp_path / "run"
    train(_cfg(corpus), run)
    train(_cfg(corpus, steps=3), run, resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(_cfg(corpus, steps=4), run, resume=True)
    assert (run / "checkpoints" / "step_000004").is_dir()


def test_the_builtin_corpus_is_fingerprinted_and_a_change_refused(tmp_path):
    import sys

    from moelab.train.resume import BUILTIN_KEY, check_data_unchanged, data_fingerprint
    from moelab.train.trainer import Trainer

    fp = data_fingerprint("builtin", seed=0)
    entry = fp["files"][BUILTIN_KEY]
    assert entry["python"] == sys.version.split()[0] and len(entry["sha256"]) == 64 and entry["size"] > 0
    assert Trainer(_cfg("builtin"), tmp_path / "run").data_files == fp  # what every checkpoint records
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()

    def saved(files):
        (ckpt / "trainer_state.json").write_text(json.dumps({"data_files": {"source": "builtin", "files": files}}))

    saved({BUILTIN_KEY: {**entry, "python": "3.10.0", "sha256": "0" * 64}})  # built by another Python
    with pytest.raises(CheckpointError, match=r"builtin corpus: its documents changed .*Python 3\.10\.0"):
        check_data_unchanged(ckpt, fp)
    saved({BUILTIN_KEY: {**entry, "python": "3.10.0"}})  # another Python, the same documents: fine
    check_data_unchanged(ckpt, fp)
    saved({})  # a checkpoint from before the built-in corpus was fingerprinted
    check_data_unchanged(ckpt, fp)


def test_data_files_are_hashed_once_per_process(corpus, tmp_path, monkeypatch):
    import moelab.train.resume as R
    from moelab.train.trainer import Trainer

    monkeypatch.setattr(R, "RACY_NS", 0)  # the file is not racily clean here
    monkeypatch.setattr(R, "_PRINTS", {})
    calls = []
    real = R._hash_file
    monkeypatch.setattr(R, "_hash_file", lambda path, st: calls.append(path) or real(path, st))
    for i in range(3):  # experiment variants, ranks: one hash
        Trainer(_cfg(corpus), tmp_path / f"run{i}")
    assert len(calls) == 1
    with corpus.open("a") as f:
        f.write("\n")
    assert R.data_fingerprint(str(corpus))["files"][str(corpus)]["size"] == corpus.stat().st_size
    assert len(calls) == 2  # changed: hashed again
