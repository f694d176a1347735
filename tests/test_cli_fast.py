"""`moelab --help` and `moelab <command> --help` do not import torch (heavy imports live in commands)."""

import json
import subprocess
import sys

import pytest

COMMANDS = ["params", "presets", "convert", "data", "train", "generate", "report", "experiment", "bench", "analyze", "eval"]


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in COMMANDS]])
def test_help_does_not_import_torch(argv):
    code = ("import sys, contextlib, io\nimport moelab.cli as c\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try:\n        c.main(%r)\n    except SystemExit:\n        pass\n"
            "assert 'usage' in buf.getvalue().lower() or 'example' in buf.getvalue().lower(), buf.getvalue()[:200]\n"
            "print('torch' in sys.modules)\n" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", f"{argv} imported torch"


def test_optional_positionals_may_follow_options(tmp_path, capsys):
    """`moelab experiment routerless --quick --out X RUN` named RUN an unrecognised argument (issue 22)."""
    from moelab.cli import main

    missing = tmp_path / "no-such-run"
    assert main(["experiment", "routerless", "--quick", "--out", str(tmp_path / "o"), str(missing)]) == 2
    err = capsys.readouterr().err
    assert "unrecognized" not in err and str(missing) in err
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"document {i}: " + "word " * 40 for i in range(6)))
    assert main(["data", "info", "--json", str(text)]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == str(text)
