"""Issue 24, first-hour breaks: escapes in --stop, bad sampling values, unknown bench shapes and a
closed pipe are one-line errors or quiet exits, never tracebacks or silent reinterpretations."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moelab.cli import build_parser
from moelab.cli.generate import decode_escapes
from moelab.errors import ConfigError


def _moelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelab.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("typed, meant", [(r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\\n", "\\n"),
                                          (r"é\u00e9\x41", "ééA"), ("plain", "plain"), (r"\q", r"\q"),
                                          (r"\r\n", "\r\n")])
def test_stop_strings_decode_the_usual_escapes(typed, meant):
    assert decode_escapes(typed) == meant
    args = build_parser().parse_args(["generate", "runs/x", "--prompt", "a", "--stop", typed])
    assert args.stop == [meant]


@pytest.mark.parametrize("flag, value, says", [("--temperature", "-1", "--temperature=-1.0: must be >= 0"),
                                               ("--top-k", "0", "--top-k=0: must be >= 1"),
                                               ("--top-p", "1.5", "--top-p=1.5: must be in (0, 1]"),
                                               ("--max-new-tokens", "0", "--max-new-tokens=0: must be >= 1")])
def test_bad_sampling_values_are_one_line_errors_before_loading(flag, value, says, tmp_path):
    r = _moelab("generate", str(tmp_path / "no-such-run"), "--prompt", "hi", flag, value)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert says in r.stderr and r.stderr.count("\n") == 1


def test_top_k_none_turns_the_cut_off():
    assert build_parser().parse_args(["generate", "r", "--prompt", "a", "--top-k", "none"]).top_k is None


def test_the_python_api_refuses_the_same_values():
    from moelab.inference.engine import generate_batch
    from moelab.inference.generate import generate_ids
    from moelab.model import build_model
    from tests.helpers import small_config

    torch.manual_seed(0)
    model = build_model(small_config())
    for kw, field in [(dict(temperature=-0.5), "temperature"), (dict(temperature=1.0, top_k=0), "top_k"),
                      (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=float("nan")), "temperature")]:
        with pytest.raises(ConfigError, match=f"^{field}="):
            generate_batch(model, [[1, 2, 3]], 4, **kw)
        with pytest.raises(ConfigError, match=f"^{field}="):
            generate_ids(model, torch.tensor([[1, 2, 3]]), 4, **kw)
    assert len(generate_batch(model, [[1, 2, 3]], 2, temperature=1.0, top_k=5, top_p=1.0, seed=0)[0].token_ids) == 2


def test_an_unknown_bench_shape_names_the_shapes():
    from moelab.bench import harness
    from moelab.cli.bench import SHAPE_NAMES

    assert SHAPE_NAMES == tuple(harness.SHAPES)  # the names --help lists without importing torch
    r = _moelab("bench", "moe-layer", "--shape", "tiny")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--shape='tiny': unknown moe-layer shape; one of tiny-train, fine-grained" in r.stderr
    import re

    help_text = re.sub(r"-\s+", "-", " ".join(_moelab("bench", "--help").stdout.split()))  # argparse wraps at hyphens
    assert all(name in help_text for name in SHAPE_NAMES)


def test_a_closed_pipe_ends_quietly_with_the_sigpipe_status():
    p = subprocess.Popen([sys.executable, "-m", "moelab.cli", "params", "tiny", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # the reader went away before moelab wrote (`... | head -c 0`)
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_sampled_row_is_what_its_prompt_alone_would_sample():
    """Issue 24.4: each row its own seeded generator, so a prompt's sampled completion does not depend
    on the other prompts of the batch (before: one generator shared by the rows)."""
    from moelab.inference.engine import generate_batch
    from moelab.model import build_model
    from tests.helpers import small_config

    torch.manual_seed(0)
    model = build_model(small_config())
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    kw = dict(temperature=1.0, top_k=None, top_p=None, seed=7)
    batch = generate_batch(model, prompts, 12, **kw)
    for p, row in zip(prompts, batch):
        assert generate_batch(model, [p], 12, **kw)[0].token_ids == row.token_ids
    other_seed = generate_batch(model, prompts, 12, **{**kw, "seed": 8})
    assert [r.token_ids for r in other_seed] != [r.token_ids for r in batch]  # sampling, not a constant
    swapped = generate_batch(model, prompts[::-1], 12, **kw)
    assert [r.token_ids for r in swapped[::-1]] == [r.token_ids for r in batch]
