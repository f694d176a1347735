"""Checkpoints that stay trustworthy: a damaged manifest is a reported problem (never a crash), paths
from a manifest or DCP metadata never leave the checkpoint, a missing manifest is never silent, the
verification memo sees same-size rewrites, tokenizers are verified, and a distributed checkpoint is
checked against its own ``dcp/.metadata`` (every shard and every rank's RNG file) when it is saved and
whenever it is read. docs/reliability.md states the rules."""

import json
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

import moelab.checkpoint.integrity as integrity
from moelab.checkpoint.integrity import MANIFEST, check_directory, verify_directory, write_manifest
from moelab.checkpoint.run import check_complete, checkpoint_dirs, latest_checkpoint
from moelab.cli import main
from moelab.errors import CheckpointError
from moelab.train import TrainConfig, train
from tests.helpers import small_train_config, write_word_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"))


def _cfg(corpus, **kw):
    return small_train_config(corpus, **kw)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity") / "run"
    train(_cfg(corpus), d)
    return d


def _copy(run, tmp_path, name="run"):
    d = tmp_path / name
    shutil.copytree(run, d)
    return d


def _edit_manifest(ckpt, fn) -> None:
    m = json.loads((ckpt / MANIFEST).read_text())
    fn(m["files"])
    (ckpt / MANIFEST).write_text(json.dumps(m, indent=1) + "\n")


# ---- item 7: a malformed manifest is a reported problem ---------------------------------------------
def test_a_flipped_key_in_the_manifest_is_a_problem_naming_the_entry(run, tmp_path, capsys):
    d = _copy(run, tmp_path)
    ckpt = checkpoint_dirs(d)[-1]
    _edit_manifest(ckpt, lambda f: f["model.safetensors"].update(rha256=f["model.safetensors"].pop("sha256")))
    problems = check_directory(ckpt).problems
    assert problems == ["manifest.json: entry 'model.safetensors' is malformed (no 'sha256' (keys: rha256, size)); "
                        "the manifest is damaged, so model.safetensors cannot be verified"]
    with pytest.raises(CheckpointError, match="entry 'model.safetensors' is malformed"):
        verify_directory(ckpt)
    # `ckpt verify` names it, exit status 1, no traceback
    assert main(["ckpt", "verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("CORRUPT") and "entry 'model.safetensors' is malformed" in out
    # resume falls back to the previous intact checkpoint
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000004.*malformed"):
        assert latest_checkpoint(d).name == "step_000002"


@pytest.mark.parametrize("entry,why", [({"size": "12", "sha256": "0" * 64}, "'size' is '12', not a byte count"),
                                       ({"size": True, "sha256": "0" * 64}, "'size' is True, not a byte count"),
                                       ({"size": 12, "sha256": "xyz"}, "'sha256' is 'xyz', not 64 hex digits"),
                                       ([12, "0" * 64], "its value is list, not an object")])
def test_every_malformed_entry_shape_is_reported(entry, why, run, tmp_path):
    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    _edit_manifest(ckpt, lambda f: f.__setitem__("config.yaml", entry))
    assert check_directory(ckpt).problems == [f"manifest.json: entry 'config.yaml' is malformed ({why}); the "
                                              "manifest is damaged, so config.yaml cannot be verified"]


def test_a_manifest_that_is_not_an_object_is_unreadable_not_a_crash(run, tmp_path):
    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    for text in ("[]", '{"format": "moelab-manifest-1", "files": []}', '"x"'):
        (ckpt / MANIFEST).write_text(text)
        (problem,) = check_directory(ckpt).problems
        assert problem.startswith("manifest.json is unreadable"), text


# ---- item 11: paths confined to the checkpoint ------------------------------------------------------
def test_manifest_paths_leaving_the_directory_are_refused_unread(run, tmp_path, monkeypatch):
    d = _copy(run, tmp_path)
    ckpt = checkpoint_dirs(d)[-1]
    outside = tmp_path / "x"
    outside.write_text("secret")
    os.symlink(outside, ckpt / "link")
    entry = {"size": 6, "sha256": integrity.file_digest(outside)[1]}
    _edit_manifest(ckpt, lambda f: f.update({"/etc/hostname": entry, "../x": entry, "link": entry}))
    opened = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p: opened.append(str(p)) or real(p))
    problems = check_directory(ckpt).problems
    assert sorted(problems) == [
        "manifest.json: entry '../x' is outside the directory (it contains '..'); refused, not read",
        "manifest.json: entry '/etc/hostname' is outside the directory (an absolute path); refused, not read",
        "manifest.json: entry 'link' is outside the directory (a symbolic link leading outside the directory); "
        "refused, not read"]
    assert not any("hostname" in p or p.endswith(("/x", "link")) for p in opened)
    assert opened  # the checkpoint's own files were hashed
    with pytest.raises(CheckpointError, match="symbolic link leading outside"):
        write_manifest(ckpt)  # and a manifest is never written over a link leading out


def test_a_symlink_inside_the_directory_is_allowed(run, tmp_path):
    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    os.symlink("config.yaml", ckpt / "alias.yaml")
    write_manifest(ckpt)
    assert check_directory(ckpt).ok


# ---- item 12: the memo sees a same-size rewrite; the tokenizer is verified --------------------------
def test_a_same_size_rewrite_with_the_mtime_restored_is_hashed_again(run, tmp_path, monkeypatch):
    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    # files seconds old (the copy is new: the clock of the racily-clean rule is moved on, since a ctime
    # cannot be set back), so the memo is used: the second verification hashes nothing
    now = integrity._clock()
    monkeypatch.setattr(integrity, "_clock", lambda: now + 5 * 10**9)
    verify_directory(ckpt)
    hashed = _counting(monkeypatch)
    verify_directory(ckpt)
    assert hashed == []
    w = ckpt / "model.safetensors"
    st = w.stat()
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 1
    with open(w, "r+b") as f:  # in place: the same inode, the same size
        f.write(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # the modification time put back
    assert w.stat().st_size == st.st_size and w.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256 differs"):
        verify_directory(ckpt)


def _respell(path) -> None:
    """A valid-JSON, same-size edit of a tokenizer: two letters of its first merge or word swapped."""
    text = path.read_text()
    i = text.index("alpha")
    path.write_text(text[:i] + "lapha" + text[i + 5:])


def test_load_tokenizer_verifies_a_model_directorys_tokenizer(run, tmp_path):
    from moelab.loading import load_tokenizer

    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    assert load_tokenizer(ckpt).vocab_size == load_tokenizer(run).vocab_size
    _respell(ckpt / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: SHA-256 differs from the manifest"):
        load_tokenizer(ckpt)


def test_a_tokenizer_in_an_hf_directory_needs_no_manifest(run, tmp_path):
    from moelab.loading import load_tokenizer

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    shutil.copy(checkpoint_dirs(run)[-1] / "tokenizer.json", hf / "tokenizer.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(hf)


# ---- item 9: a missing manifest is never silent --------------------------------------------------------
def test_a_checkpoint_without_its_manifest_loads_with_a_warning(run, tmp_path, monkeypatch):
    from moelab.loading import load

    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    (ckpt / MANIFEST).unlink()
    with pytest.warns(UserWarning, match=r"manifest\.json is missing.*UNVERIFIED"):
        load(ckpt)
    with warnings.catch_warnings():  # a directory from before manifests: said once, by the caller
        warnings.simplefilter("error")
        load(ckpt, allow_unverified=True)
        monkeypatch.setenv("MOELAB_ALLOW_UNVERIFIED", "1")
        load(ckpt)


def test_resume_prefers_an_older_verified_checkpoint_to_one_without_a_manifest(run, tmp_path, monkeypatch):
    d = _copy(run, tmp_path)
    (d / "checkpoints" / "step_000004" / MANIFEST).unlink()
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000004: manifest\.json is missing.*"
                                         r"taking the older, verified step_000002"):
        assert latest_checkpoint(d).name == "step_000002"
    (d / "checkpoints" / "step_000002" / MANIFEST).unlink()  # none verified: the newest, with a warning
    with pytest.warns(UserWarning, match=r"no verified checkpoint .*step_000004 UNVERIFIED"):
        assert latest_checkpoint(d).name == "step_000004"
    monkeypatch.setenv("MOELAB_ALLOW_UNVERIFIED", "1")  # checkpoints from before manifests
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(d).name == "step_000004"


# ---- items 6 and 10: a distributed checkpoint against its own .metadata (one process) -------------------
class _Env:
    rank, world, dp, ep, is_main = 0, 1, 1, 1, True

    def barrier(self):
        dist.barrier()


@contextmanager
def _one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield _Env()
    finally:
        dist.destroy_process_group()


def _dcp_save(run, out, step=4):
    """A DCP checkpoint of ``run``'s model and optimizer, saved by save_distributed_checkpoint."""
    from moelab.checkpoint.distributed import save_distributed_checkpoint
    from moelab.checkpoint.trainer_state import DataPosition
    from moelab.data import Tokenizer
    from moelab.loading import load
    from moelab.train.trainer import lr_lambda, make_optimizer

    cfg = TrainConfig.load(run / "config.yaml")
    model = load(run).train()
    opt = make_optimizer(model, cfg)
    for p in model.parameters():  # one step: AdamW's state exists
        p.grad = torch.zeros_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    tok = Tokenizer.load(checkpoint_dirs(run)[-1] / "tokenizer.json")
    with _one_process_group() as env:
        return save_distributed_checkpoint(out, step, model, opt, sched, DataPosition(), cfg, tok, 3, env)


def test_a_distributed_checkpoint_is_checked_against_its_metadata(run, tmp_path, capsys):
    ckpt = _dcp_save(run, tmp_path / "dcp_run")
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "rng_rank0.pt", "trainer_state.json"} <= set(files)
    check_complete(ckpt)
    assert check_directory(ckpt).ok
    # a shard another rank wrote to a disk this process does not see: gone, and the manifest rewritten
    # from this directory's listing (what rank 0 alone did before)
    lost = tmp_path / "lost"
    shutil.copytree(ckpt, lost)
    (lost / "dcp" / "__0_0.distcp").unlink()
    write_manifest(lost)
    with pytest.raises(CheckpointError, match=r"missing dcp/__0_0\.distcp \(named by dcp/\.metadata"):
        check_complete(lost)
    assert main(["ckpt", "verify", str(lost)]) == 1
    assert "dcp/__0_0.distcp" in capsys.readouterr().out
    # a checkpoint of 2 ranks whose second RNG file is missing
    two = tmp_path / "two"
    shutil.copytree(ckpt, two)
    meta = json.loads((two / "trainer_state.json").read_text())
    (two / "trainer_state.json").write_text(json.dumps({**meta, "world": 2}))
    write_manifest(two)
    with pytest.raises(CheckpointError, match=r"2 ranks is missing rng_rank1\.pt"):
        check_complete(two)
    # a shard on disk but not in the manifest was never verified
    unlisted = tmp_path / "unlisted"
    shutil.copytree(ckpt, unlisted)
    _edit_manifest(unlisted, lambda f: f.pop("dcp/__0_0.distcp"))
    with pytest.raises(CheckpointError, match=r"dcp/__0_0\.distcp not in the manifest"):
        check_complete(unlisted)


def test_a_missing_rng_file_at_load_is_an_error(run, tmp_path):
    from moelab.checkpoint.distributed import load_distributed_checkpoint
    from moelab.loading import load
    from moelab.train.trainer import make_optimizer

    ckpt = _dcp_save(run, tmp_path / "dcp_run")
    (ckpt / "rng_rank0.pt").unlink()
    model = load(run).train()
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt: missing"):
        load_distributed_checkpoint(ckpt, model, make_optimizer(model, TrainConfig.load(run / "config.yaml")))


def test_a_save_whose_shard_is_not_visible_publishes_nothing(run, tmp_path, monkeypatch):
    """The shard DCP wrote is gone from rank 0's view before the manifest (a node-local disk): the save
    fails on every rank, and no checkpoint directory appears."""
    import moelab.checkpoint.distributed as d

    real = d.dcp.save

    def save_then_lose(state, storage_writer):
        out = real(state, storage_writer=storage_writer)
        os.unlink(os.path.join(storage_writer.path, "__0_0.distcp"))
        return out

    monkeypatch.setattr(d.dcp, "save", save_then_lose)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp"):
        _dcp_save(run, tmp_path / "dcp_run")
    assert checkpoint_dirs(tmp_path / "dcp_run") == []
    assert not any((tmp_path / "dcp_run" / "checkpoints").iterdir())  # no temp directory left


def test_dcp_metadata_naming_a_file_outside_is_refused(run, tmp_path):
    from moelab.checkpoint.distributed import SafeReader

    ckpt = _dcp_save(run, tmp_path / "dcp_run")
    path = ckpt / "dcp" / ".metadata"
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # the test's own file
    for info in metadata.storage_data.values():
        info.relative_path = "../../../../etc/hostname"
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(CheckpointError, match=r"names the file '\.\./\.\./\.\./\.\./etc/hostname', which is outside"):
        SafeReader(str(ckpt / "dcp")).read_metadata()
    with pytest.raises(CheckpointError, match="outside"):
        check_complete(ckpt)


# ---- item 5: every rank hashes its own shards at save, and a share of each candidate at resume -----------
def _recording_worker(rank: int, world: int, cfg: dict, run_dir: str, resume: bool, log_dir: str) -> None:
    """Train (or resume) on ``world`` ranks, recording every file this rank hashes."""
    from pathlib import Path

    import moelab.checkpoint.distributed as d
    import moelab.checkpoint.integrity as integ
    from moelab.train import Trainer

    hashed, real = [], integ.file_digest
    root = Path(run_dir) / "checkpoints"

    def recording(p):
        hashed.append(Path(p).relative_to(root).as_posix())
        return real(p)

    integ.file_digest = recording
    if hasattr(d, "file_digest"):
        d.file_digest = recording
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(TrainConfig.from_dict(cfg), run_dir, resume=resume).fit()
    Path(log_dir, f"hashed_{'resume' if resume else 'save'}_{rank}.json").write_text(json.dumps(hashed))


@pytest.mark.slow
def test_two_ranks_hash_their_own_shards_and_share_verification(corpus, tmp_path):
    from tests.test_distributed import spawn

    run = tmp_path / "run"
    cfg = _cfg(corpus, parallel=dict(ep=2, timeout_s=120)).to_dict()
    spawn(2, _recording_worker, cfg, str(run), False, str(tmp_path), tmp_path=tmp_path)
    saved = [json.loads((tmp_path / f"hashed_save_{r}.json").read_text()) for r in range(2)]
    for step in (2, 4):
        tmp = f".step_{step:06d}.tmp-dcp"
        rank1 = {h for h in saved[1] if h.startswith(tmp)}
        assert rank1 == {f"{tmp}/dcp/__1_0.distcp", f"{tmp}/rng_rank1.pt"}  # rank 1 hashed its own files
        assert not any("__1_" in h or "rng_rank1" in h for h in saved[0])  # and rank 0 did not hash them again
        assert f"{tmp}/dcp/__0_0.distcp" in saved[0]
    step4 = run / "checkpoints" / "step_000004"
    files = json.loads((step4 / MANIFEST).read_text())["files"]
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt", "dcp/.metadata"} <= set(files)
    assert check_directory(step4).ok
    check_complete(step4)

    # resume on 2 ranks with rank 1's shard of step 4 flipped: the ranks verify each candidate together
    # (every file by exactly one rank), agree on step 2, and rank 0 sets step 4 aside afterwards
    with open(step4 / "dcp" / "__1_0.distcp", "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    want2 = set(json.loads((run / "checkpoints" / "step_000002" / MANIFEST).read_text())["files"])
    cfg["steps"] = 6
    spawn(2, _recording_worker, cfg, str(run), True, str(tmp_path), tmp_path=tmp_path)
    resumed = [json.loads((tmp_path / f"hashed_resume_{r}.json").read_text()) for r in range(2)]
    # (the three small files a resume reads before choosing, moelab.train.resume, are hashed on every rank)
    small = {"run_config.yaml", "tokenizer.json", "trainer_state.json"}
    for name in ("step_000004", "step_000002"):
        mine = [{h[len(name) + 1:] for h in hashes if h.startswith(name + "/")} for hashes in resumed]
        assert "dcp/__0_0.distcp" in mine[0] | mine[1] and "dcp/__1_0.distcp" in mine[0] | mine[1]
        assert mine[0] - small and mine[1] - small and not (mine[0] & mine[1]) - small, (name, mine)  # a share each
        if name == "step_000002":  # the one chosen: every file of it hashed
            assert mine[0] | mine[1] == want2
    root = run / "checkpoints"
    assert (root / "corrupt_step_000004").is_dir()
    assert [p.name for p in checkpoint_dirs(run)] == ["step_000004", "step_000006"]  # redone from step 2
    assert check_directory(root / "step_000006").ok


# ---- review round 2 ---------------------------------------------------------------------------------------
def test_dcp_metadata_of_the_wrong_type_is_a_bad_checkpoint_not_a_crash(run, tmp_path, monkeypatch):
    """A .metadata that unpickles safely into something other than a Metadata with dict storage_data
    (damaged or forged) is a reported problem: resume skips that checkpoint, nothing raises a TypeError."""
    from torch.distributed.checkpoint.metadata import Metadata

    import moelab.checkpoint.run as run_mod

    out = tmp_path / "dcp_run"
    _dcp_save(run, out, step=2)
    ckpt = _dcp_save(run, out, step=4)
    for bad in (Metadata(state_dict_metadata={}, storage_data=["__0_0.distcp"]), torch.Size([3])):
        with open(ckpt / "dcp" / ".metadata", "wb") as f:
            pickle.dump(bad, f)  # the test's own file
        write_manifest(ckpt)  # the manifest matches: only the content is wrong
        with pytest.raises(CheckpointError, match=r"\.metadata"):
            check_complete(ckpt)
        with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000004.*\.metadata"):
            assert latest_checkpoint(out).name == "step_000002"
    # any other failure while assessing a candidate is a bad candidate with its reason, not a crash
    real = run_mod.check_complete
    monkeypatch.setattr(run_mod, "check_complete",
                        lambda c: (_ for _ in ()).throw(ValueError("odd")) if c.name == "step_000004" else real(c))
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000004: .*ValueError: odd"):
        assert latest_checkpoint(out).name == "step_000002"


def test_a_flipped_key_of_a_required_file_is_an_error_not_a_warning(run, tmp_path):
    """A bit flipped in the manifest key ``tokenizer.json`` leaves the tokenizer without an entry: in a
    checkpoint (which always has one) that is an error, never 'added after the manifest'."""
    from moelab.checkpoint.integrity import verify_file
    from moelab.checkpoint.model_files import save_model
    from moelab.loading import load, load_tokenizer

    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    _respell(ckpt / "tokenizer.json")  # and the tokenizer swapped
    _edit_manifest(ckpt, lambda f: f.__setitem__("tokenizer.jsoo", f.pop("tokenizer.json")))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not in .*manifest\.json"):
        load_tokenizer(ckpt)
    for name in ("config.yaml", "model.safetensors"):
        _edit_manifest(ckpt, lambda f, name=name: f.__setitem__(name + "x", f.pop(name)))
        with pytest.raises(CheckpointError, match=rf"{name}: not in"):
            verify_file(ckpt, name)
    # a model saved without a tokenizer, one copied beside it afterwards: listed, loaded with a warning
    model_dir = save_model(load(run), tmp_path / "model")
    shutil.copy(checkpoint_dirs(run)[-1] / "tokenizer.json", model_dir / "tokenizer.json")
    with pytest.warns(UserWarning, match="added after it was written"):
        load_tokenizer(model_dir)


def test_dcp_world_is_validated_against_the_metadata(run, tmp_path):
    ckpt = _dcp_save(run, tmp_path / "dcp_run")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for world in (0, -1, "2", True, 1.5, None):
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world": world}))
        write_manifest(ckpt)
        with pytest.raises(CheckpointError, match=r"trainer_state\.json.*world"):
            check_complete(ckpt)
    # the metadata names a shard of rank 1, but the checkpoint says one rank saved it
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world": 1}))
    path = ckpt / "dcp" / ".metadata"
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # the test's own file
    for info in metadata.storage_data.values():
        info.relative_path = "__1_0.distcp"
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    shutil.copy(ckpt / "dcp" / "__0_0.distcp", ckpt / "dcp" / "__1_0.distcp")
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp.*rank 1.*1 rank"):
        check_complete(ckpt)


def _counting(monkeypatch):
    hashed = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p: hashed.append(p.name) or real(p))
    return hashed


def test_a_directory_written_within_2_seconds_is_not_remembered_as_verified(run, tmp_path, monkeypatch):
    """git's racily-clean rule: on a filesystem with coarse timestamps a same-size rewrite within one
    tick keeps mtime and ctime, so files this young are hashed again at every load."""
    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    hashed = _counting(monkeypatch)
    verify_directory(ckpt)
    verify_directory(ckpt)
    assert hashed.count("model.safetensors") == 2
    # seconds later (the clock the rule reads moved on), the memo skips re-hashing unchanged files
    now = integrity._clock()
    monkeypatch.setattr(integrity, "_clock", lambda: now + 5 * 10**9)
    verify_directory(ckpt)
    verify_directory(ckpt)
    assert hashed.count("model.safetensors") == 3


def test_a_run_directory_without_checkpoints_loads_its_tokenizer_without_a_manifest_warning(run, tmp_path):
    from moelab.loading import load_tokenizer

    d = tmp_path / "young_run"  # config.yaml and tokenizer.json written, no checkpoint yet
    d.mkdir()
    shutil.copy(run / "config.yaml", d / "config.yaml")
    shutil.copy(run / "tokenizer.json", d / "tokenizer.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tokenizer(d).vocab_size == load_tokenizer(run).vocab_size


def test_an_hf_directory_with_a_foreign_manifest_json_loads_its_tokenizer(run, tmp_path):
    from moelab.loading import load_tokenizer

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    shutil.copy(checkpoint_dirs(run)[-1] / "tokenizer.json", hf / "tokenizer.json")
    for foreign in ('{"version": 3, "files": ["model.safetensors"]}', "[1, 2]", '{"format": "other-tool-2"}'):
        (hf / MANIFEST).write_text(foreign)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_tokenizer(hf)


def test_allow_unverified_flag_on_the_command_line(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path) / "checkpoints" / "step_000004"
    (ckpt / MANIFEST).unlink()
    with pytest.warns(UserWarning, match=r"manifest\.json is missing"):
        assert main(["convert", str(ckpt), str(tmp_path / "a"), "--to", "moelab"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["convert", str(ckpt), str(tmp_path / "b"), "--to", "moelab", "--allow-unverified"]) == 0
    assert "MOELAB_ALLOW_UNVERIFIED" not in os.environ  # for that command only


def test_resume_takes_config_and_tokenizer_from_the_checkpoint_it_loads(corpus, tmp_path):
    """The newest checkpoint's small files are intact but its weights are not: the resume loads the
    older checkpoint, and its config and tokenizer with it (not the newest one's), and completes."""
    from moelab.data import train_tokenizer

    d = tmp_path / "run"
    train(_cfg(corpus, steps=2, save_every=1), d)
    new, old = d / "checkpoints" / "step_000002", d / "checkpoints" / "step_000001"
    original = (old / "tokenizer.json").read_bytes()
    other = train_tokenizer(["zzz yyy xxx www " * 50], 300)  # valid, and not the run's
    other.save(new / "tokenizer.json")
    write_manifest(new)  # step 2 says so, verifiably
    w = new / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 1
    w.write_bytes(bytes(data))  # and its weights are corrupt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_cfg(corpus, steps=3, save_every=1), d, resume=True)
    assert result.final_step == 3
    said = " | ".join(str(w.message) for w in caught)
    assert "step_000002/tokenizer.json" not in said, said
    assert (d / "checkpoints" / "corrupt_step_000002").is_dir()
    for step in (2, 3):  # redone from step 1, with step 1's tokenizer
        assert (d / "checkpoints" / f"step_00000{step}" / "tokenizer.json").read_bytes() == original


# ---- a failure on one rank fails every rank at once (2 processes; never a wait for parallel.timeout_s) --------
_TIMEOUT_S = 20  # the process group's timeout: a rank left waiting reaches it and fails differently


class _DistEnv:
    def __init__(self, rank, world):
        self.rank, self.world, self.dp, self.ep, self.is_main = rank, world, world, 1, rank == 0

    def barrier(self):
        dist.barrier()


def _failing_rank_worker(rank: int, world: int, case: str, run_dirs: list, out_dir: str) -> None:
    """One scenario on ``world`` ranks; records what each rank returned or raised, and when."""
    import datetime
    import time
    from pathlib import Path

    import moelab.checkpoint.distributed as d
    import moelab.checkpoint.run as run_mod

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=_TIMEOUT_S))
    env, run_dir = _DistEnv(rank, world), Path(run_dirs[rank % len(run_dirs)])
    start, result = time.monotonic(), {}
    try:
        if case in ("rng", "rank0"):
            if case == "rng" and rank == 1:  # no space left for rank 1's RNG file
                d._rng_state = lambda: (_ for _ in ()).throw(OSError(28, "No space left on device"))
            if case == "rank0" and rank == 0:  # anything, not only an OSError, on rank 0 alone
                d.save_config = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("the YAML writer broke"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _dcp_save_on(run_dir, Path(out_dir) / "saved", env)
        else:
            if case == "set_aside" and rank == 0:
                run_mod.set_aside_newer = lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
            if case == "listing" and rank == 0:
                run_mod.checkpoint_dirs = lambda *a: (_ for _ in ()).throw(OSError(5, "Input/output error"))
            with warnings.catch_warnings():
                warnings.simplefilter("error" if case == "warnings" and rank == 0 else "ignore")
                result["chosen"] = run_mod.choose_checkpoint(run_dir, env, set_aside=case == "set_aside").name
    except BaseException as e:  # noqa: BLE001 (recorded for the test)
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = time.monotonic() - start
    Path(out_dir, f"{case}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _dcp_save_on(run, out, env):
    from moelab.checkpoint.distributed import save_distributed_checkpoint
    from moelab.checkpoint.trainer_state import DataPosition
    from moelab.data import Tokenizer
    from moelab.loading import load
    from moelab.train.trainer import lr_lambda, make_optimizer

    cfg = TrainConfig.load(run / "config.yaml")
    model = load(run).train()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    tok = Tokenizer.load(checkpoint_dirs(run)[-1] / "tokenizer.json")
    return save_distributed_checkpoint(out, 4, model, opt, sched, DataPosition(), cfg, tok, 3, env)


def _flip(path, at: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def _run_case(case, run_dirs, tmp_path):
    from tests.test_distributed import spawn

    spawn(2, _failing_rank_worker, case, [str(r) for r in run_dirs], str(tmp_path), tmp_path=tmp_path)
    return [json.loads((tmp_path / f"{case}_{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case,who,what", [
    ("rng", "rank 1", "No space left on device"),
    ("rank0", "step_000004", "the YAML writer broke"),
    ("set_aside", "set aside", "Permission denied"),
    ("listing", "checkpoints", "Input/output error"),
])
def test_a_failure_on_one_rank_fails_every_rank_at_once(case, who, what, run, tmp_path):
    d = _copy(run, tmp_path)
    _flip(d / "checkpoints" / "step_000004" / "model.safetensors")  # choosing sets step 4 aside
    results = _run_case(case, [d], tmp_path)
    for r, res in enumerate(results):
        assert res.get("error", "").startswith("CheckpointError"), (r, res)
        assert who in res["error"] and what in res["error"], (r, res)
        assert res["seconds"] < _TIMEOUT_S / 2, (r, res)  # nobody waited for the timeout
    if case in ("rng", "rank0"):
        assert not (tmp_path / "saved" / "checkpoints").exists() or \
            not any((tmp_path / "saved" / "checkpoints").iterdir())  # nothing published, no temp dir left


@pytest.mark.slow
def test_rank0_warnings_wait_until_every_rank_has_chosen(run, tmp_path):
    """Under ``-W error`` a warning raises: rank 0 warns only after the last collective, so the other
    rank is never left waiting in one."""
    d = _copy(run, tmp_path)
    _flip(d / "checkpoints" / "step_000004" / "model.safetensors")
    rank0, rank1 = _run_case("warnings", [d], tmp_path)
    assert rank1 == {"chosen": "step_000002", "seconds": rank1["seconds"]} and rank1["seconds"] < _TIMEOUT_S / 2
    assert rank0["error"].startswith("UserWarning: skipping checkpoint") and "step_000004" in rank0["error"]


@pytest.mark.slow
def test_ranks_that_read_different_manifests_do_not_trust_the_checkpoint(run, tmp_path):
    """Each rank hashes its share of the files by its own read of manifest.json; when the reads differ
    (a stale NFS copy, a node-local disk), a file can fall into nobody's share. Here rank 1's copy of
    step 4's manifest lacks trainer_state.pt, so model.safetensors (corrupt) is in neither rank's share
    as each computes it: the ranks must notice they disagree and take step 2."""
    from moelab.checkpoint.integrity import read_manifest, share

    a, b = _copy(run, tmp_path, "a"), _copy(run, tmp_path, "b")
    for d in (a, b):
        _flip(d / "checkpoints" / "step_000004" / "model.safetensors")
    _edit_manifest(b / "checkpoints" / "step_000004", lambda f: f.pop("trainer_state.pt"))
    views = [read_manifest(d / "checkpoints" / "step_000004") for d in (a, b)]
    assert "model.safetensors" not in share(views[0], (0, 2)) | share(views[1], (1, 2))  # the premise
    rank0, rank1 = _run_case("manifests", [a, b], tmp_path)
    assert rank0["chosen"] == rank1["chosen"] == "step_000002", (rank0, rank1)
