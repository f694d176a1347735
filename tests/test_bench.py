"""Side-by-side measurements: saved-activation bytes by hand, interleaved timing, `moelab bench aoe`."""

import json

import torch
from torch import nn

from moelab.bench import measure_training_steps, ratios_to, saved_activation_bytes
from moelab.cli import main


class _TwoLinear(nn.Module):
    """loss = sum(relu(x W1^T) W2^T): backward saves x (input of W1), relu's output and W2's input."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False)

    def forward(self, x, labels=None):
        out = type("Out", (), {})()
        out.loss = self.w2(torch.relu(self.w1(x.float()))).sum()
        return out


def test_saved_activation_bytes_excludes_parameters_and_counts_storages_once():
    m = _TwoLinear()
    x = torch.randn(5, 8)
    # saved: x (5x8), relu output (5x16, also W2's input: one storage); weights excluded
    assert saved_activation_bytes(m, x, None) == 4 * (5 * 8 + 5 * 16)


def test_measure_and_ratios():
    models = {"a": _TwoLinear(), "b": _TwoLinear()}
    x = torch.randn(5, 8)
    r = measure_training_steps(models, x, None, reps=3, warmup=1)
    assert set(r) == {"a", "b"} and all(len(v["step_s"]) == 3 and v["tokens_per_s"] > 0 for v in r.values())
    ratios = ratios_to(r, "a")
    assert ratios["a"] == {"tokens_per_s_ratio": 1.0, "activation_bytes_ratio": 1.0}
    assert ratios["b"]["activation_bytes_ratio"] == 1.0


def test_bench_aoe_cli(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "aoe", "--reps", "1", "--batch-size", "2", "--seq-len", "16", "--out", str(out),
                 "--json"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["d_low"] == 32 and result["d_wide"] == 327  # tiny: d_model 128, eq. 5 from F = 256
    # AoE keeps its T x E x d_low cache for backward: at least that much more activation memory
    T, E, L, layers = 2 * 16, 8, 32, 4
    gap = result["models"]["aoe"]["activation_bytes"] - result["models"]["moe"]["activation_bytes"]
    assert gap >= T * E * L * 4 * layers
    assert result["aoe_activation_bytes_ratio"] > 1.0 and result["aoe_tokens_per_s_ratio"] > 0
    assert "AoE / MoE" in (out / "report.md").read_text()
