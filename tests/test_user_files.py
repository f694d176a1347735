"""Never destroy a user's files: a command that writes a directory refuses a plain file and a non-empty
directory moelab did not write (unless --force), re-runs into moelab's own output work, and outputs get
the user's umask."""

import json
import os
import stat
from pathlib import Path

import pytest

from moelab.checkpoint.atomic import MARKER, atomic_directory, foreign_files
from moelab.checkpoint.model_files import save_model
from moelab.cli import main
from moelab.errors import MoelabError
from moelab.model import build_model
from tests.helpers import small_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "tiny"
    save_model(build_model(small_config()), d)
    return d


def _thesis(tmp_path) -> Path:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("my thesis")
    return precious


@pytest.mark.parametrize("to", ["hf", "moelab"])
def test_convert_refuses_a_directory_of_user_files(model_dir, tmp_path, capsys, to):
    precious = _thesis(tmp_path)
    assert main(["convert", str(model_dir), str(precious), "--to", to]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0  # one line
    assert str(precious) in err and "thesis.txt" in err and "--force" in err
    assert sorted(os.listdir(precious)) == ["thesis.txt"]
    assert (precious / "thesis.txt").read_text() == "my thesis"
    assert sorted(os.listdir(tmp_path)) == ["precious"]  # no temp or .old directory beside it


def test_convert_refuses_a_plain_file_and_leaves_it_alone(model_dir, tmp_path, capsys):
    dst = tmp_path / "notes.txt"
    dst.write_text("keep me")
    assert main(["convert", str(model_dir), str(dst), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert f"{dst} is a file" in err
    assert dst.is_file() and dst.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # not turned into a directory, no hidden .old copy
    assert main(["convert", str(model_dir), str(dst), "--to", "hf", "--force"]) == 2  # --force never replaces a file
    assert dst.read_text() == "keep me"


@pytest.mark.parametrize("to", ["hf", "moelab"])
def test_convert_again_into_its_own_output_works_and_force_replaces(model_dir, tmp_path, capsys, to):
    dst = tmp_path / "out"
    assert main(["convert", str(model_dir), str(dst), "--to", to]) == 0
    marker = json.loads((dst / MARKER).read_text())
    assert marker["kind"] == ("hf-export" if to == "hf" else "moelab-model")
    assert "model.safetensors" in marker["files"]
    assert foreign_files(dst) == []
    assert main(["convert", str(model_dir), str(dst), "--to", to]) == 0  # moelab's own output: replaced
    # a file the user added to moelab's output is theirs: refused, then replaced only with --force
    (dst / "notes.md").write_text("mine")
    assert main(["convert", str(model_dir), str(dst), "--to", to]) == 2
    assert "notes.md" in capsys.readouterr().err and (dst / "notes.md").read_text() == "mine"
    precious = _thesis(tmp_path)
    assert main(["convert", str(model_dir), str(precious), "--to", to, "--force"]) == 0
    assert not (precious / "thesis.txt").exists() and (precious / "model.safetensors").is_file()


def test_export_hf_api_refuses_without_force(model_dir, tmp_path):
    import moelab

    model = moelab.load(model_dir)
    precious = _thesis(tmp_path)
    with pytest.raises(MoelabError, match="thesis.txt"):
        moelab.export_hf(model, precious)
    assert sorted(os.listdir(precious)) == ["thesis.txt"]
    moelab.export_hf(model, precious, force=True)
    assert (precious / "config.json").is_file() and not (precious / "thesis.txt").exists()


def test_an_hf_export_with_its_marker_still_loads_in_transformers(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    import moelab

    out = moelab.export_hf(moelab.load(model_dir), tmp_path / "hf")
    assert (out / MARKER).is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in hf.parameters()) > 0


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_users_umask(model_dir, tmp_path, mask):
    import moelab

    old = os.umask(mask)
    try:
        out = moelab.export_hf(moelab.load(model_dir), tmp_path / "hf")
        saved = save_model(moelab.load(model_dir), tmp_path / "ml")
        with atomic_directory(tmp_path / "plain") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.txt").write_text("x")
    finally:
        os.umask(old)
    for d in (out, saved, tmp_path / "plain", tmp_path / "plain" / "sub"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o777 & ~mask, d
    for f in (out / "config.json", out / "model.safetensors", out / MARKER, saved / "manifest.json",
              saved / "model.safetensors", tmp_path / "plain" / "sub" / "a.txt"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~mask, f


def test_a_checkpoint_and_the_run_files_get_the_users_umask(tmp_path):
    from moelab.train import TrainConfig, train

    model = small_config()
    model.vocab_size = 300  # the byte-level tokenizer's minimum
    cfg = TrainConfig(model=model, steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0,
                      eval_batches=1, save_every=1, progress=False)
    old = os.umask(0o027)
    try:
        train(cfg, tmp_path / "run")
        train(cfg, tmp_path / "run", resume=True)  # re-saves step 2 over its own checkpoint
    finally:
        os.umask(old)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert stat.S_IMODE(os.stat(ckpt).st_mode) == 0o750
    for f in ("model.safetensors", "trainer_state.pt", "manifest.json", "config.yaml", "tokenizer.json"):
        assert stat.S_IMODE(os.stat(ckpt / f).st_mode) == 0o640, f
    for f in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / f).st_mode) == 0o640, f


# every command that writes files into --out: (argv before --out); the check runs before any work, so
# sources that do not exist are fine here
OUT_COMMANDS = [["params", "tiny"], ["data", "info", "nosuch.txt"], ["analyze", "nosuch"], ["eval", "nosuch"],
                ["eval", "choice", "nosuch"], ["eval", "passkey", "nosuch"], ["eval", "context", "nosuch", "--lengths", "16"],
                ["bench", "train"], ["compare", "runs/a", "runs/b"], ["experiment", "routers"]]


@pytest.mark.parametrize("argv", OUT_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_out_command_refuses_a_users_directory_and_a_file(argv, tmp_path, capsys):
    precious = _thesis(tmp_path)
    assert main([*argv, "--out", str(precious)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(precious) in err and "--force" in err and "not written by moelab" in err
    assert sorted(os.listdir(precious)) == ["thesis.txt"]
    afile = tmp_path / "a.txt"
    afile.write_text("keep")
    assert main([*argv, "--out", str(afile)]) == 2
    assert f"{afile} is a file" in capsys.readouterr().err and afile.read_text() == "keep"


def test_params_out_can_be_rerun_and_forced(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["params", "tiny", "--out", str(out)]) == 0
    assert main(["params", "tiny", "--out", str(out)]) == 0  # moelab's own output directory
    assert json.loads((out / "result.json").read_text())["source"] == "tiny"
    precious = _thesis(tmp_path)
    assert main(["params", "tiny", "--out", str(precious), "--force"]) == 0
    assert (precious / "thesis.txt").read_text() == "my thesis"  # written beside, nothing deleted
    assert (precious / "result.json").is_file()


def test_train_out_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    afile = tmp_path / "run"
    afile.write_text("keep")
    assert main(["train", "--preset", "tiny", "--steps", "1", "--out", str(afile), "--no-progress"]) == 2
    assert f"{afile} is a file" in capsys.readouterr().err and afile.read_text() == "keep"
