"""`moelab bench moe-layer|train|generate --quick`: contenders agree before anything is timed (timings
are never asserted)."""

import json

import pytest

pytest.importorskip("transformers")

from moelab.bench import harness  # noqa: E402
from moelab.bench.markdown import benchmarks_markdown  # noqa: E402
from moelab.cli import main  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tiny-train", "fine-grained", "decode1"])
def test_moe_layer_contenders_match(shape):
    r = harness.bench_moe_layer(shape, reps=1, quick=True)
    ran = {n: c for n, c in r["contenders"].items() if "fwd" in c}
    assert {"moelab-sorted", "moelab-grouped", "moelab-loop", "transformers-eager"} <= set(ran)
    assert all(c["outputs_match"] for c in ran.values())
    assert r["useful_fwd_flops"] == 2 * r["T"] * r["k"] * r["d"] * 3 * r["f"]


@pytest.mark.slow
def test_bench_all_quick_writes_benchmarks_md(tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    assert main(["bench", "all", "--quick", "--shape", "tiny-train", "--markdown", str(md), "--json"]) == 0
    out = capsys.readouterr().out
    results = json.loads(out[out.index("{"):])
    assert all(m["logits_match"] for m in results["train"]["models"].values())
    assert all(b["tokens_equal"] for b in results["generate"]["batches"].values())
    text = md.read_text()
    for section in ("MoE layer", "Training step", "Greedy generation", "AoE vs MoE", "KV cache per token",
                    "Speculative decoding", "Batched generation engine"):
        assert section in text
    kv = results["kv_cache"]["rows"]  # formula checked against a filled cache inside the benchmark
    assert kv["MLA"]["values_per_token"] == 4 * (64 + 16) and kv["MHA"]["values_per_token"] == 4 * 2 * 4 * 32
    assert results["speculative"]["tokens_equal"] and results["speculative"]["drafted"] > 0
    eng = results["engine"]["rows"]  # tokens equal transformers' generate (checked inside), cache flat
    assert all(r["tokens_equal"] for r in eng.values())
    rolled = eng["1-window"]["cache_bytes"]
    assert len(set(rolled["rolling"][8:])) == 1 and rolled["full"][-1] > rolled["full"][8]


def test_markdown_from_results():
    r = harness.bench_moe_layer("decode8", reps=1, quick=True)
    text = benchmarks_markdown({"moe_layer": [r]})
    assert "| decode8 |" in text and "latency" in text
