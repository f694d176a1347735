"""`moelab --help` and `moelab <command> --help` do not import torch (heavy imports live in commands)."""

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
