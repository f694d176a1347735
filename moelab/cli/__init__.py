"""`moelab <command>`: a thin layer that parses arguments and calls the library.

Every error a user can cause is printed as one line naming the bad input and the fix, with a
non-zero exit and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from contextlib import contextmanager

from moelab.cli import analyze, bench, ckpt, compare, data, experiment, generate, model, train
from moelab.cli import eval as evaluate
from moelab.errors import MoelabError


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab", formatter_class=_Formatter,
        description="moelab: build, train, run and analyse Mixture-of-Experts language models.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    from moelab import __version__
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for register in (model.register, data.register, train.register, generate.register, train.register_report,
                     analyze.register, bench.register, evaluate.register, ckpt.register, compare.register,
                     experiment.register):  # in `moelab --help` order
        register(sub, _Formatter)
    for p in _leaf_parsers(parser):  # every command that writes into --out, bar train and ckpt torture
        if any(a.dest == "out" for a in p._actions) and p.prog.split()[1] not in OWN_OUT_RULES:
            p.add_argument("--force", action="store_true",
                           help="write into --out even when it is a non-empty directory moelab did not write")
            p.set_defaults(check_out=True)
        if p.prog.split()[1] in READS_CHECKPOINTS:
            p.add_argument("--allow-unverified", action="store_true",
                           help="load a model or checkpoint without manifest.json (written before manifests) without "
                                "the warning, and resume from it like a verified one (MOELAB_ALLOW_UNVERIFIED=1)")
    return parser


# commands that load a model, checkpoint or run: --allow-unverified (docs/reliability.md)
READS_CHECKPOINTS = ("train", "generate", "analyze", "eval", "convert", "experiment")


@contextmanager
def _allow_unverified(on: bool):
    """MOELAB_ALLOW_UNVERIFIED=1 for one command (and the processes it starts: torchrun)."""
    from moelab.checkpoint.integrity import ALLOW_ENV

    before = os.environ.get(ALLOW_ENV)
    if on:
        os.environ[ALLOW_ENV] = "1"
    try:
        yield
    finally:
        if on and before is None:
            os.environ.pop(ALLOW_ENV, None)
        elif on:
            os.environ[ALLOW_ENV] = before


@contextmanager
def _output_dir(args: argparse.Namespace):
    """``--out`` of a command that writes files into it, before any work: a plain file or someone
    else's directory is refused (never overwritten), --force lets the library's writers into it
    (forced_outputs), and a command that fails before writing anything leaves nothing behind: the
    directories it created are removed, a marker it added to an empty one taken back (what a
    command wrote before it failed is kept, for inspection)."""
    out = getattr(args, "out", None) if getattr(args, "check_out", False) else None
    if not out:
        yield
        return
    import contextlib
    from pathlib import Path

    from moelab.checkpoint.atomic import MARKER, forced_outputs, prepare_output_dir, read_marker

    path = Path(out)
    created = [p for p in (path, *path.parents) if not os.path.lexists(p)]  # what this command makes
    marked = path.is_dir() and read_marker(path) is not None
    prepare_output_dir(path, force=args.force)
    try:
        with forced_outputs(*([path] if args.force else [])):
            yield
    except BaseException:
        if not marked and path.is_dir() and os.listdir(path) == [MARKER]:  # nothing written: undo
            os.unlink(path / MARKER)
            for d in created:  # innermost first; each is empty unless something else wrote there meanwhile
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        raise


# commands with their own --out rules: train (a new run needs an empty directory), ckpt (torture)
OWN_OUT_RULES = ("train", "ckpt")


def _leaf_parsers(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for child in dict.fromkeys(subs[0].choices.values()):  # aliases map to the same parser
        yield from _leaf_parsers(child)


def _late_positionals(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """argparse gives an optional positional (nargs="?") nothing when options stand between it and the
    positional before it (`moelab experiment routerless --quick --out X RUN` leaves RUN unrecognised):
    put such values where they belong, so positionals may come before or after options. Returns the
    extras left."""
    while subs := [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]:
        parser = subs[0].choices[getattr(args, subs[0].dest)]
    late = [a for a in parser._actions
            if not a.option_strings and a.nargs == "?" and getattr(args, a.dest) == a.default]
    left = []
    for token in extra:
        if late and not token.startswith("-"):
            setattr(args, late.pop(0).dest, token)
        else:
            left.append(token)
    return left


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "eval":  # `moelab eval SOURCE ...` = `moelab eval lm SOURCE ...`
        from moelab.cli.eval import EVALS

        i = command + 1
        if i < len(argv) and argv[i] not in EVALS and not argv[i].startswith("-"):
            argv.insert(i, "lm")
    args, extra = parser.parse_known_args(argv)
    extra = _late_positionals(parser, args, extra)
    args.argv = argv
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with _output_dir(args), _allow_unverified(getattr(args, "allow_unverified", False)):
            return args.func(args, extra) if getattr(args, "allow_extra", False) else args.func(args)
    except (MoelabError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"moelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main_entry() -> None:
    if "--debug" not in sys.argv[1:]:  # one line per warning, without the source line that raised it
        warnings.formatwarning = lambda message, category, *rest, **kw: f"moelab: warning: {message}\n"
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`moelab ... --json | head -c 100`): stop quietly as other CLIs do, with
        # the status a process killed by SIGPIPE has; stdout points at /dev/null so the interpreter's
        # final flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + 13
    sys.exit(code)


if __name__ == "__main__":
    main_entry()
