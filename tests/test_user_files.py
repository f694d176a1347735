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


# ---- review fixes: ownership by content and kind, links, unreadable parts, leaks, --force, failures ----
def test_a_listed_file_the_user_changed_is_theirs(model_dir, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["convert", str(model_dir), str(dst), "--to", "hf"]) == 0
    (dst / "config.json").write_text('{"my": "edits"}')  # a name the marker lists, other content
    assert main(["convert", str(model_dir), str(dst), "--to", "hf"]) == 2
    assert "config.json" in capsys.readouterr().err and "edits" in (dst / "config.json").read_text()
    # a same-size rewrite is caught by its modification time
    assert main(["convert", str(model_dir), str(dst), "--to", "hf", "--force"]) == 0
    size = (dst / "config.json").stat().st_size
    (dst / "config.json").write_text("x" * size)
    assert foreign_files(dst) == ["config.json"]


def test_a_changed_file_in_a_saved_model_known_only_by_its_manifest_is_theirs(model_dir, tmp_path):
    dst = tmp_path / "ml"
    save_model(build_model(small_config()), dst)
    (dst / MARKER).unlink()  # as written before markers: known by the manifest's sizes
    assert foreign_files(dst) == []
    (dst / "config.yaml").write_text("mine: 1\n")
    assert foreign_files(dst) == ["config.yaml"]
    with pytest.raises(MoelabError, match="config.yaml"):
        save_model(build_model(small_config()), dst)


def test_convert_never_replaces_moelab_output_of_another_kind(model_dir, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"  # training state: not an export to replace
    with atomic_directory(ckpt, manifest=True, kind="checkpoint") as tmp:
        (tmp / "trainer_state.json").write_text("{}")
    for to in ("hf", "moelab"):
        assert main(["convert", str(model_dir), str(ckpt), "--to", to]) == 2
        err = capsys.readouterr().err
        assert "holds a moelab checkpoint" in err and "--force" in err
    (ckpt / MARKER).unlink()  # a checkpoint from before markers: its manifest lists trainer_state.json
    assert main(["convert", str(model_dir), str(ckpt), "--to", "moelab"]) == 2
    assert (ckpt / "trainer_state.json").is_file()
    hf = tmp_path / "hf"
    assert main(["convert", str(model_dir), str(hf), "--to", "hf"]) == 0
    assert main(["convert", str(model_dir), str(hf), "--to", "moelab"]) == 2  # an HF export is not a moelab model
    assert "holds a moelab hf-export" in capsys.readouterr().err


def test_unlistable_directories_and_links_count_as_the_users(tmp_path, monkeypatch):
    d = tmp_path / "d"
    with atomic_directory(d) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (d / "link").symlink_to(elsewhere, target_is_directory=True)
    (d / "flink").symlink_to(d / "sub" / "a.txt")
    assert foreign_files(d) == ["flink", "link"]
    (d / "link").unlink()
    (d / "flink").unlink()
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert foreign_files(d) == ["sub/ (unreadable)"]


def test_a_symlinked_destination_is_refused_and_left_alone(model_dir, tmp_path, capsys):
    real = tmp_path / "real"
    assert main(["convert", str(model_dir), str(real), "--to", "hf"]) == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for extra in ([], ["--force"]):
        assert main(["convert", str(model_dir), str(link), "--to", "hf", *extra]) == 2
        assert "symbolic link" in capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(real) and (real / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_a_failed_publish_leaves_no_temp_directory_and_the_old_one_in_place(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(MoelabError, match="mine.txt"):  # the second check, before the rename
        with atomic_directory(target) as tmp:
            (tmp / "v").write_text("2")
            (target / "mine.txt").write_text("added while moelab wrote")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "v").read_text() == "1"
    (target / "mine.txt").unlink()
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        with atomic_directory(target) as tmp:
            (tmp / "v").write_text("3")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "v").read_text() == "1"


def test_force_writes_into_a_users_directory_without_making_it_moelabs(tmp_path, capsys):
    precious = _thesis(tmp_path)
    assert main(["params", "tiny", "--out", str(precious), "--force"]) == 0
    assert not (precious / MARKER).exists()
    assert main(["params", "tiny", "--out", str(precious)]) == 2  # still theirs: --force again
    assert "not written by moelab" in capsys.readouterr().err


def test_resaving_a_checkpoint_replaces_whatever_is_in_its_step_directory(tmp_path):
    from moelab.train import TrainConfig, train

    model = small_config()
    model.vocab_size = 300
    cfg = TrainConfig(model=model, steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0,
                      eval_batches=1, save_every=1, progress=False)
    train(cfg, tmp_path / "run")
    step = tmp_path / "run" / "checkpoints" / "step_000002"
    (step / "notes.txt").write_text("stray")  # in moelab's own run directory
    train(cfg, tmp_path / "run", resume=True)  # re-saves step 2 over it
    assert not (step / "notes.txt").exists() and json.loads((step / MARKER).read_text())["kind"] == "checkpoint"
    assert json.loads((tmp_path / "run" / MARKER).read_text())["kind"] == "run"


@pytest.mark.parametrize("exists", [False, True])
def test_a_command_that_fails_before_writing_leaves_no_output_directory(tmp_path, capsys, exists):
    out = tmp_path / "a" / "b"
    if exists:
        out.mkdir(parents=True)
    assert main(["analyze", str(tmp_path / "nosuch"), "--out", str(out)]) == 2
    assert "nosuch" in capsys.readouterr().err
    if exists:
        assert os.listdir(out) == []  # the marker it added is taken back
    else:
        assert sorted(os.listdir(tmp_path)) == []  # a/ too: it created both


def test_library_writers_refuse_a_users_directory_unless_forced(tmp_path):
    from moelab.checkpoint.atomic import forced_outputs
    from moelab.experiments.common import prepare_out
    from moelab.reports.writer import write_report

    precious = _thesis(tmp_path)
    with pytest.raises(MoelabError, match="thesis.txt"):
        write_report(precious, "t", "# t", {})
    with pytest.raises(MoelabError, match="thesis.txt"):
        prepare_out(precious)
    assert sorted(os.listdir(precious)) == ["thesis.txt"]
    write_report(precious, "t", "# t", {}, force=True)
    assert (precious / "report.md").is_file() and (precious / "thesis.txt").read_text() == "my thesis"
    with forced_outputs(precious):  # what --force sets for the command's --out
        write_report(precious, "t2", "# t2", {})
    assert not (precious / MARKER).exists()
    new = write_report(tmp_path / "new", "t", "# t", {})["md"].parent
    assert (new / MARKER).is_file()
    write_report(new, "t", "# again", {})  # moelab's own: fine


def test_analyze_marks_its_output_so_the_command_line_can_write_there_again(tmp_path):
    # `train --analyze` writes RUN/analysis through moelab.analyze: the directory is marked, so a later
    # `moelab analyze RUN --out RUN/analysis` is not refused as someone else's; a user's directory is
    # refused by the library call too
    from moelab.analysis import analyze
    from moelab.checkpoint.atomic import prepare_output_dir, read_marker
    from moelab.data import train_tokenizer
    from tests.test_analysis import TEXTS, planted_model

    tok = train_tokenizer(TEXTS * 3, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    save_model(planted_model(tok.vocab_size), tmp_path / "m",
               extra_files={"tokenizer.json": tmp_path / "tokenizer.json"})
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(TEXTS))
    kw = dict(data=str(data), expert_outputs=False, progress=False, batch_size=2)
    with pytest.raises(MoelabError, match="thesis.txt"):
        analyze(tmp_path / "m", _thesis(tmp_path), **kw)
    out = tmp_path / "run" / "analysis"
    analyze(tmp_path / "m", out, **kw)
    assert read_marker(out) is not None
    prepare_output_dir(out)  # what the command line checks: moelab's own output, not refused


def test_a_distributed_train_out_that_is_a_file_is_one_clear_error(tmp_path, monkeypatch):
    import moelab.train.trainer as T
    from moelab.train import TrainConfig

    class Env:
        world, rank, is_main = 1, 0, True

        def all_reduce(self, t, op=None):
            return t

    monkeypatch.setattr(T, "init_from_env", lambda *a, **kw: Env())
    monkeypatch.setattr(T, "check_batch", lambda batch, world: batch)
    afile = tmp_path / "run"
    afile.write_text("keep")
    model = small_config()
    model.vocab_size = 300
    t = T.Trainer.__new__(T.Trainer)  # as under torchrun: __init__ leaves the check to _setup_distributed
    t.cfg, t.run_dir, t.resume = TrainConfig(model=model, batch_size=2, seq_len=16, progress=False), afile, False
    with pytest.raises(MoelabError, match="is a file, not a directory"):
        t._setup_distributed()
    assert afile.read_text() == "keep"
