"""Issue 24 (first hour): honest report output (item 12: bench moe-layer --quick)."""
from moelab.bench import harness
from moelab.bench.markdown import moe_layer_rows, summary_lines


def test_moe_layer_quick_says_outputs_matched_and_ratios_not_meaningful():
    r = harness.bench_moe_layer("decode1", reps=1, quick=True)
    assert r["quick"] is True and r["ratios_meaningful"] is False
    assert r["outputs_match"] and all(r["outputs_match"].values())
    assert "not meaningful" in r["note"]
    lines = summary_lines({"moe_layer": [r]})
    assert lines[0].endswith("(quick mode: ratios not meaningful)")
    assert lines[1].startswith("moe-layer decode1: outputs matched the reference loop")
    assert "moelab-loop" in lines[1]
    assert moe_layer_rows([r])[0][-1].endswith("(quick: ratios not meaningful)")


def test_moe_layer_full_mode_has_no_quick_marker():
    r = {"shape": "decode1", "quick": False, "T": 1, "d": 8, "f": 8, "E": 2, "k": 1,
         "outputs_match": {"moelab-sorted": True},
         "contenders": {"moelab-sorted": {"fwd_x_limit": 1.0, "fwd_bwd_x_limit": 1.0}},
         "vs_transformers_best": {"fwd": 2.0, "fwd_bwd": 2.0}}
    lines = summary_lines({"moe_layer": [r]})
    assert "not meaningful" not in lines[0]
    assert "not meaningful" not in moe_layer_rows([r])[0][-1]


def _fake_run(path, steps, top_k):
    import dataclasses
    import json

    from moelab.presets import get_preset
    from moelab.train.config import RUN_CONFIG, TrainConfig

    path.mkdir()
    model = get_preset("tiny")
    model = dataclasses.replace(model, moe=dataclasses.replace(
        model.moe, router=dataclasses.replace(model.moe.router, top_k=top_k)))
    TrainConfig(model=model).save(path / RUN_CONFIG)
    recs = [{"kind": "train", "step": s, "lm_loss": 5.0 - s * 0.1, "tokens_per_s": 1000.0} for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_compare_lists_config_differences_and_step_note(tmp_path):
    from moelab.reports.compare import compare_runs

    a = _fake_run(tmp_path / "a", 4, 1)
    b = _fake_run(tmp_path / "b", 6, 2)
    out = tmp_path / "cmp"
    res = compare_runs([a, b], out)
    diffs = {d["field"]: d["values"] for d in res["config_differences"]}
    assert diffs == {"model.moe.router.top_k": {"a": 1, "b": 2}}
    assert "4, 6" in res["steps_note"]
    md = (out / "report.md").read_text()
    assert "## Config differences" in md and "model.moe.router.top_k" in md and "different numbers of steps" in md
    import json
    assert json.loads((out / "result.json").read_text())["config_differences"] == res["config_differences"]
    same = compare_runs([a, _fake_run(tmp_path / "c", 4, 1)], None)
    assert same["config_differences"] == [] and "steps_note" not in same


def test_routers_report_titles_points_and_all_zero_dropped(tmp_path, monkeypatch):
    from moelab.experiments import routers

    figs = {}

    def capture(fig, path):
        ax = fig.axes[0]
        figs[path.name] = {"title": ax.get_title(), "ylim": ax.get_ylim(), "bars": len(ax.patches),
                           "texts": [t.get_text() for t in ax.texts]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return path

    monkeypatch.setattr(routers, "save_figure", capture)
    hist = {"step": [1, 2], "lm_loss": [5.0, 4.9], "max_load": [1.5, 1.4], "dropped_frac": [0.0, 0.0],
            "experts_per_token": [2.0, 2.0]}
    row = dict(name="topk", val_loss=5.3312, val_ppl=206.7, max_load_last20=1.4, load_cv_last20=0.1,
               dropped_frac_last20=0.0, experts_per_token_last20=2.0, median_tokens_per_s=25123.4,
               active_params=10, total_params=20, description="d", history=hist)
    routers._report(tmp_path, {"variants": [row, dict(row, name="switch", val_loss=5.4)], "quick": True,
                               "steps": 2, "seed": 0, "unigram_entropy": 5.0})
    assert all(f["title"] for f in figs.values()) and len(figs) == 5
    assert figs["val_loss_by_router.png"]["bars"] == 0  # points, no truncated bars
    drop = figs["dropped_fraction.png"]
    assert drop["ylim"] == (0.0, 1.0) and any("all values are 0" in t for t in drop["texts"])
    md = (tmp_path / "report.md").read_text()
    assert "| 25,123 |" in md and "| 5.3312 |" in md


def test_router_tokens_per_s_excludes_first_step():
    import inspect

    from moelab.experiments import common, routers
    assert "steps[1:]" in inspect.getsource(common.run_variant)
    assert "warm_up(" in inspect.getsource(routers.run_router_experiment)


def test_analyze_report_md_layers_note_legend_and_integer_ticks(tmp_path, monkeypatch):
    import json

    import matplotlib
    matplotlib.use("Agg")

    from moelab.analysis import analyze, report
    from moelab.checkpoint.model_files import save_model
    from moelab.data import train_tokenizer
    from tests.test_analysis import TEXTS, planted_model

    tok = train_tokenizer(TEXTS * 3, vocab_size=300)
    save_model(planted_model(tok.vocab_size), tmp_path / "model")
    tok.save(tmp_path / "model" / "tokenizer.json")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": ["prose", "code"][i % 2]}) + "\n"
                            for i, t in enumerate(TEXTS)))
    ticks = {}
    orig = report.save_figure

    def capture(fig, path):
        ticks[path.name] = list(fig.axes[0].get_xticks())
        return orig(fig, path)

    monkeypatch.setattr(report, "save_figure", capture)
    analyze(tmp_path / "model", tmp_path / "an", data=str(data), progress=False, min_count=1)
    assert ticks["consecutive.png"] == [0.0]  # the one analysed layer, no fractional ticks
    md = (tmp_path / "an" / "report.md").read_text()
    assert md.startswith("# moelab analyze") and "the first, middle and last" in md and "figures/" in md
    page = (tmp_path / "an" / "report.html").read_text()
    assert "Colour legend:" in page and "expert 0</span>" in page
    assert report.layers_note([0, 1, 2, 3]).startswith("The expert-load and similarity figures show layers 0, 2, 3 of the 4")


def test_hf_export_writes_eos_for_transformers(tmp_path):
    import json
    import warnings

    import transformers

    import moelab
    from moelab.checkpoint.model_files import save_model
    from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
    from moelab.data import EOS, train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat", "one two three four"] * 3, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, num_layers=1, max_seq_len=64,
                      attention=AttentionConfig(num_heads=2),
                      moe=MoEConfig(num_experts=4, expert_ffn_dim=8, router=RouterConfig(top_k=2)))
    save_model(moelab.build_model(cfg), tmp_path / "m")
    tok.save(tmp_path / "m" / "tokenizer.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = moelab.export_hf(moelab.load(tmp_path / "m"), tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["eos_token_id"] == conf["bos_token_id"] == conf["pad_token_id"] == tok.eos_id
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == EOS
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.model_max_length == 64
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.generation_config.eos_token_id == tok.eos_id
