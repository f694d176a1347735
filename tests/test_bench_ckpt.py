"""`moelab bench ckpt --quick`: the measured rates follow from the measured times and bytes, and the
671B projection follows from them by the formula the report states."""

import json
import statistics

import pytest

from moelab.cli import main


def test_bench_ckpt_quick_numbers_are_consistent(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "ckpt", "--quick", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r == json.loads((out / "result.json").read_text())
    assert {"result.json", "report.md", "report.html", "throughput.png"} <= {p.name for p in out.iterdir()}
    # moelab saves fp32 weights + AdamW exp_avg and exp_avg_sq: 12 bytes per parameter, plus small files
    assert 12.0 <= r["bytes_per_param"] < 12.5
    assert r["bytes_per_param"] == pytest.approx(r["checkpoint_bytes"] / r["params"])
    assert r["save_gbps"] == pytest.approx(r["checkpoint_bytes"] / statistics.median(r["save_s"]) / 1e9)
    assert r["verify_gbps"] == pytest.approx(r["checkpoint_bytes"] / statistics.median(r["verify_s"]) / 1e9)
    assert r["save_s_per_gb"] == pytest.approx(1 / r["save_gbps"])
    for key in ("sha256_gbps", "disk_write_gbps", "disk_read_gbps", "single_process_save_gbps"):
        assert r[key] > 0, key
    p = r["projection"]
    assert (p["params"], p["ranks"], p["ep"]) == (671e9, 64, 64)
    assert p["total_bytes"] == pytest.approx(671e9 * r["bytes_per_param"])
    assert p["bytes_per_rank"] == pytest.approx(p["total_bytes"] / 64)
    assert p["save_s_per_rank"] == pytest.approx(p["bytes_per_rank"] / (r["save_gbps"] * 1e9))
    assert p["verify_s_per_rank"] == pytest.approx(p["bytes_per_rank"] / (r["verify_gbps"] * 1e9))
    assert p["rank0_alone_s"] == pytest.approx(64 * p["verify_s_per_rank"])
    md = (out / "report.md").read_text()
    assert p["formula"] in md and "671B parameters at EP 64" in md
    assert f"{p['save_s_per_rank']:.4g}" in md  # every number shown is the result's
