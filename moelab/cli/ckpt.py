"""`moelab ckpt verify | torture`: checkpoint integrity and fault injection."""

from __future__ import annotations

import json
from pathlib import Path

from moelab.errors import MoelabError


def register(sub, formatter) -> None:
    p = sub.add_parser("ckpt", help="verify checkpoints; kill-and-resume torture test", formatter_class=formatter,
                       description="Checkpoint tools.")
    ck = p.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    v = ck.add_parser("verify", formatter_class=formatter,
                      help="check every file of a checkpoint (or of every checkpoint of a run) against its manifest",
                      description="Recompute the size and SHA-256 of every file and compare with manifest.json; "
                                  "exit status 1 when any checkpoint is incomplete or corrupt.",
                      epilog="examples:\n  moelab ckpt verify runs/tiny\n"
                             "  moelab ckpt verify runs/tiny/checkpoints/step_000300 --json")
    v.add_argument("path", help="a run directory, a checkpoint directory or a saved model directory")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=cmd_verify)
    t = ck.add_parser("torture", formatter_class=formatter,
                      help="SIGKILL training again and again, resume each time, compare with an uninterrupted run",
                      description="Kill `moelab train` at random moments and inside checkpoint saves (weights "
                                  "written, state written, manifest written, mid-rename, before pruning), resume "
                                  "each time, check that every checkpoint stays readable and that the final state "
                                  "is bit-identical to an uninterrupted run's (docs/reliability.md).",
                      epilog="examples:\n  moelab ckpt torture --kills 20 --out runs/torture\n"
                             "  moelab ckpt torture run.yaml --kills 5 --out runs/torture_mine --json")
    t.add_argument("config", nargs="?", help="run config (YAML); default: a small built-in run (80 steps)")
    t.add_argument("--kills", type=int, default=20)
    t.add_argument("--steps", type=int, help="override the config's steps")
    t.add_argument("--out", required=True, help="directory for the runs, result.json, report.md, timeline.png")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--power-loss", action="store_true",
                   help="also simulate a power loss at each kill: writes no fsync covered are discarded "
                        "(moelab/reliability/powerloss.py)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_torture)


def _targets(path: Path) -> list[Path]:
    from moelab.checkpoint.run import checkpoint_dirs

    if (path / "checkpoints").is_dir():
        found = checkpoint_dirs(path)
        if not found:
            raise MoelabError(f"{path}: no checkpoint in checkpoints/")
        return found
    return [path]


def cmd_verify(args) -> int:
    from moelab.checkpoint.integrity import check_directory
    from moelab.checkpoint.run import check_complete
    from moelab.errors import CheckpointError

    path = Path(args.path)
    if not path.is_dir():
        raise MoelabError(f"{path}: no such directory")
    results = []
    for d in _targets(path):
        v = check_directory(d, require_manifest=True)
        if (d / "trainer_state.json").is_file() or (d / "run_config.yaml").is_file():  # a training checkpoint
            try:
                check_complete(d)
            except CheckpointError as e:
                v.problems.insert(0, str(e))
        results.append(v.to_dict())
    ok = all(r["ok"] for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "checkpoints": results}, indent=1))
    else:
        for r in results:
            status = "ok" if r["ok"] else "CORRUPT"
            print(f"{status:8} {r['directory']}: {r['files']} files, {r['bytes']:,} bytes")
            for p in r["problems"]:
                print(f"         - {p}")
            if r["extra_files"]:
                print(f"         (not in the manifest, never loaded: {', '.join(r['extra_files'])})")
    return 0 if ok else 1


def cmd_torture(args) -> int:
    from moelab.reliability.torture import torture

    if args.kills < 0:
        raise MoelabError("--kills must be >= 0")
    config = Path(args.config) if args.config else None
    if args.steps is not None:
        import tempfile

        from moelab.reliability.torture import default_config
        from moelab.train.config import TrainConfig

        cfg = TrainConfig.load(config) if config else default_config()
        cfg.steps = args.steps
        config = Path(tempfile.mkdtemp(prefix="moelab-torture-")) / "config.yaml"
        cfg.save(config)
    r = torture(config, Path(args.out), kills=args.kills, seed=args.seed, progress=not args.no_progress,
                power_loss=args.power_loss)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['kills']} kills ({', '.join(f'{k} {v}' for k, v in r['kills_by_kind'].items())}), "
              f"{r['checkpoints_verified']} checkpoint verifications, {len(r['unreadable_checkpoints'])} unreadable; "
              f"final state {'bit-identical to' if r['identical'] else 'DIFFERENT from'} the uninterrupted run "
              f"({r['bytes_compared']:,} bytes of tensors compared) in {r['seconds']:.0f} s; report: "
              f"{Path(args.out) / 'report.md'}")
    return 0 if r["identical"] else 1
