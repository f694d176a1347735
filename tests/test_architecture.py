"""The house rules of docs/architecture.md that the layering contract (lint-imports, run by `make test`)
does not check itself: the size of the package root and of files, the public API, the entry points."""

import subprocess
import sys
from pathlib import Path

import pytest

import moelab

ROOT = Path(moelab.__file__).parent


def test_at_most_12_modules_at_the_package_root():
    modules = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 12, modules


def test_no_file_over_800_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 800}
    assert not long, long


def test_every_folder_is_named_in_the_layering_contract():
    """A new folder must take a place in the layers (pyproject.toml), so the contract covers it."""
    import tomllib

    contract = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {m.strip() for layer in contract["layers"] for m in layer.split("|")}
    here = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert here == named, (sorted(here - named), sorted(named - here))


@pytest.mark.parametrize("name", moelab.__all__)
def test_public_api_resolves(name):
    assert getattr(moelab, name) is not None


def test_public_api_is_the_documented_objects():
    from moelab.inference.engine import generate_batch
    from moelab.loading import load

    assert moelab.load is load and moelab.generate_batch is generate_batch
    assert moelab.build_model(moelab.get_preset("tiny")).config == moelab.get_preset("tiny")


def test_python_m_moelab_train_and_cli_are_the_cli():
    for mod, argv, needle in (("moelab.train", ["--help"], "--preset"), ("moelab.cli", ["--help"], "COMMAND")):
        out = subprocess.run([sys.executable, "-m", mod, *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and needle in out.stdout, out.stderr
