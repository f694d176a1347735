"""`moelab experiment aoe-ablation` and `aoe-strategies`: the Autonomy-of-Experts paper's Tables 2-4
(Lv et al. 2025, arXiv 2501.13074 §4.1.2) at tiny scale on the built-in corpus.

aoe-ablation (Table 2, Fig. 3, Table 4): traditional MoE; + L_aux; + L_aux + factorised W_g with a
router; + L_aux + a large router (as many parameters as AoE's W_down, E * d_low * d_model); AoE at
four d_low (the paper's 64/128/256/512 of d_model 768, scaled to d_model) without and with L_aux.
aoe-strategies (Table 3): traditional MoE and AoE (d_low = d_model / 3, the paper's 256/768) under
dynamic top-p (p = 0.6 + entropy loss 1e-4) and expert choice (capacity for 2 experts per token on
average, each expert takes 25% of the batch at E = 8; no aux loss).

Every row trains on the same tokens with the same seed and the same active expert parameters per
token (AoE's d_wide from eq. 5). L_aux is the paper's eq. 6 with alpha 0.01, whose f sums to K over
a token's K choices: 0.01 * K in moelab's Switch loss, summed over the MoE layers (``aoe_aux="authors"``
weights it as the authors' code does, over all layers at once: see ``AUX_CONVENTIONS``). After
training, every row's model is timed side by side in one process (tokens/s and activation memory of a
training step, as ratios to the traditional MoE), the paper's Table 4 view.
"""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt

from moelab.bench import measure_training_steps, ratios_to
from moelab.config import AoEConfig, RouterConfig, load_balance_coef_from_hf
from moelab.errors import ConfigError
from moelab.experiments.common import ExperimentSettings, base_config, finish, prepare_out, run_variant, shared_data
from moelab.loading import load
from moelab.reports.writer import md_table, save_figure, write_report
from moelab.train import TrainConfig

PAPER_ALPHA = 0.01  # eq. 6
# How L_aux combines over the MoE layers. "sum": moelab's, each layer's Switch loss (1 at balance) with
# alpha * K, summed over layers. "authors": the AoE code's, HF's load_balancing_loss_func once over all
# layers' tokens (K at balance) x alpha, i.e. alpha * K / L per layer in moelab's sum: L times weaker
# (the paper's 12 MoE layers x K 2 put the two up to 24x apart in the loss's scale).
AUX_CONVENTIONS = {"sum": "each MoE layer's Switch loss x alpha * K, summed over layers",
                   "authors": "HF's load_balancing_loss_func over all layers x alpha, as the authors' code: "
                              "alpha * K / L per layer"}
# The paper's d_low at d_model 768, as fractions of d_model (Table 2 Configs 5-12).
PAPER_D_LOW = (64, 128, 256, 512)
# Table 2: mean accuracy over 8 tasks (732M models, 100B tokens); Table 4: throughput K tok/s, memory GB.
PAPER_TABLE2 = {"moe": 43.28, "moe+aux": 43.68, "moe+aux+factorised": 43.70, "moe+aux+large_router": 43.71,
                "aoe_64": 43.81, "aoe_64+aux": 44.12, "aoe_128": 44.39, "aoe_128+aux": 44.04,
                "aoe_256": 44.12, "aoe_256+aux": 44.46, "aoe_512": 43.77, "aoe_512+aux": 44.08}
PAPER_TABLE4 = {"moe": (51.42, 50.61), "aoe_64": (49.79, 59.39), "aoe_128": (49.42, 57.86),
                "aoe_256": (47.98, 57.32), "aoe_512": (46.07, 55.90)}
PAPER_TABLE3 = {"top_p/moe": 43.87, "top_p/aoe": 44.29, "expert_choice/moe": 43.89, "expert_choice/aoe": 44.17}


def scaled_d_low(d_model: int, paper_d_low: int) -> int:
    """The paper's d_low / 768 at ``d_model``, rounded to a multiple of 4 (at least 4)."""
    return max(4, 4 * round(d_model * paper_d_low / 768 / 4))


def _variant(base: TrainConfig, router: RouterConfig, aoe: AoEConfig | None = None) -> TrainConfig:
    cfg = copy.deepcopy(base)
    cfg.model.moe.router = router
    cfg.model.moe.aoe = aoe
    cfg.model.moe.__post_init__()
    cfg.model.__post_init__()
    return cfg


def aux_coef(base: TrainConfig, convention: str, top_k: int = 2) -> float:
    """The paper's alpha as moelab's load_balance_coef under ``convention`` (AUX_CONVENTIONS)."""
    if convention not in AUX_CONVENTIONS:
        raise ConfigError("--aoe-aux", convention, f"choose one of {', '.join(AUX_CONVENTIONS)}")
    if convention == "sum":
        return PAPER_ALPHA * top_k
    layers = sum(base.model.is_moe_layer(i) for i in range(base.model.num_layers))
    return load_balance_coef_from_hf(PAPER_ALPHA, top_k, layers)


def ablation_rows(base: TrainConfig, quick: bool, convention: str = "sum") -> dict[str, tuple[int | None, TrainConfig]]:
    """name -> (the paper's d_low it stands for, config)."""
    D, E, K = base.model.d_model, base.model.moe.num_experts, 2
    aux = aux_coef(base, convention, K)
    third = scaled_d_low(D, 256)
    hidden = round(E * third * D / (D + E))  # D*h + h*E = E * d_low * D: AoE's W_down parameters
    rows = {
        "moe": (None, _variant(base, RouterConfig(top_k=K, load_balance_coef=0.0))),
        "moe+aux": (None, _variant(base, RouterConfig(top_k=K, load_balance_coef=aux))),
        "moe+aux+factorised": (256, _variant(base, RouterConfig(top_k=K, load_balance_coef=aux),
                                             AoEConfig(d_low=third, router_free=False))),
        "moe+aux+large_router": (None, _variant(base, RouterConfig(top_k=K, load_balance_coef=aux, hidden_dim=hidden))),
    }
    for paper in ((128, 256) if quick else PAPER_D_LOW):
        low = scaled_d_low(D, paper)
        for suffix, coef in (("", 0.0), ("+aux", aux)):
            rows[f"aoe_{paper}{suffix}"] = (paper, _variant(base, RouterConfig(top_k=K, load_balance_coef=coef),
                                                            AoEConfig(d_low=low)))
    return rows


def strategy_rows(base: TrainConfig, convention: str = "sum") -> dict[str, tuple[int | None, TrainConfig]]:
    low = scaled_d_low(base.model.d_model, 256)
    # the paper's L_aux (alpha 0.01 of eq. 6 = 0.02 here in the "sum" convention) plus the entropy loss 1e-4 (Q7)
    top_p = RouterConfig(type="top_p", top_k=2, top_p=0.6, load_balance_coef=aux_coef(base, convention),
                         entropy_loss_coef=1e-4)
    ec = RouterConfig(type="expert_choice", top_k=2, capacity_factor=1.0)  # family default: no aux loss
    return {"top_p/moe": (None, _variant(base, top_p)), "top_p/aoe": (256, _variant(base, top_p, AoEConfig(d_low=low))),
            "expert_choice/moe": (None, _variant(base, ec)),
            "expert_choice/aoe": (256, _variant(base, ec, AoEConfig(d_low=low)))}


def _run(s: ExperimentSettings, name: str, make_rows, paper: dict, reference: str) -> dict:
    out = prepare_out(s.out, s.force)
    base = base_config(s)
    data = shared_data(base)
    rows = []
    variants = make_rows(base)
    for vname, (paper_low, cfg) in variants.items():
        m = cfg.model.moe
        desc = (f"AoE d_low {m.aoe.d_low} (paper {paper_low}), d_wide {cfg.model.aoe_d_wide}"
                + ("" if m.aoe.router_free else ", with a router") if m.aoe else "router-based MoE")
        if m.router.hidden_dim:
            desc += f", MLP router hidden {m.router.hidden_dim}"
        desc += f"; {m.router.type}; balancing: {m.router.balancing_summary()}"
        print(f"== {name} {vname}: {desc}")
        row = run_variant(vname.replace("/", "_"), cfg, out, data)
        row.update(name=vname, description=desc, paper_d_low=paper_low, d_low=m.aoe.d_low if m.aoe else None,
                   paper_score=paper.get(vname))
        rows.append(row)
    # Table 4's view: every trained model timed side by side on one training batch
    models = {r["name"]: load(out / "runs" / r["name"].replace("/", "_")) for r in rows}
    for r in rows:  # expert choice: also the paper's evaluation rule, expert choice over the batch
        r["eval_rule"] = eval_rule(variants[r["name"]][1])
        if r["eval_rule"] is not None:
            r["val_loss_batch_rule"] = batch_rule_loss(models[r["name"]], data, base)
    n = min(base.batch_size, len(data.train.input_ids))
    ids, labels = data.train.input_ids[:n], data.train.labels[:n]
    print(f"== timing {len(models)} models side by side ({3 if s.quick else 7} interleaved repetitions)")
    timing = measure_training_steps(models, ids, labels, reps=3 if s.quick else 7, warmup=2)
    ratios = ratios_to(timing, reference)
    for r in rows:
        r.update(ratios[r["name"]], tokens_per_s_side_by_side=timing[r["name"]]["tokens_per_s"],
                 activation_bytes=timing[r["name"]]["activation_bytes"])
    return finish(out, name, s, base, data, rows, lambda o, res: _report(o, res, reference),
                  extra={"aux_convention": s.aoe_aux})


def eval_rule(cfg: TrainConfig) -> str | None:
    """How an expert-choice row's validation loss routes (None for token choice)."""
    r = cfg.model.moe.router
    if r.type != "expert_choice":
        return None
    return "causal top-k fallback" if r.expert_choice_eval == "topk" else "expert choice over the batch"


def batch_rule_loss(model, data, base: TrainConfig) -> float:
    """Validation loss of an expert-choice model evaluated as it trains: each expert takes its top tokens
    of the batch (non-causal: a token's experts depend on the other tokens), the rule the paper reports."""
    from moelab.train.trainer import evaluate

    saved = [(layer, layer.router_cfg.expert_choice_eval) for layer in model.moe_layers()]
    try:
        for layer, _ in saved:
            layer.router_cfg.expert_choice_eval = "batch"
        return evaluate(model, data.val, base.batch_size, base.eval_batches)["val_loss"]
    finally:
        for layer, rule in saved:
            layer.router_cfg.expert_choice_eval = rule


def run_aoe_ablation(s: ExperimentSettings) -> dict:
    return _run(s, "aoe-ablation", lambda base: ablation_rows(base, s.quick, s.aoe_aux), PAPER_TABLE2, "moe")


def run_aoe_strategies(s: ExperimentSettings) -> dict:
    return _run(s, "aoe-strategies", lambda base: strategy_rows(base, s.aoe_aux), PAPER_TABLE3, "top_p/moe")


def _report(out, result: dict, reference: str) -> None:
    rows = result["variants"]
    names = [r["name"] for r in rows]
    domains = sorted({d for r in rows for d in r["val_domains"]})
    plots = {}
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(names, [r["val_loss"] for r in rows], color=["tab:gray" if r["d_low"] is None else "tab:green"
                                                         for r in rows])
    ax.set_ylim(min(r["val_loss"] for r in rows) * 0.98, max(r["val_loss"] for r in rows) * 1.01)
    ax.set_ylabel("validation loss"), ax.tick_params(axis="x", rotation=40)
    plots["val_loss"] = save_figure(fig, out / "plots" / "val_loss.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        if r["load_entropy_per_layer_last20"]:
            layers = range(len(r["load_entropy_per_layer_last20"]))
            axes[0].plot(layers, r["load_entropy_per_layer_last20"], marker="o", label=r["name"])
            axes[1].plot(layers, r["router_entropy_per_layer_last20"], marker="o", label=r["name"])
    axes[0].set_title("load entropy Ent_load (eq. 7), higher = balanced"), axes[0].set_xlabel("MoE layer")
    axes[1].set_title("confidence entropy Ent_conf (eq. 8), lower = confident"), axes[1].set_xlabel("MoE layer")
    axes[1].legend(fontsize=6)
    plots["entropy"] = save_figure(fig, out / "plots" / "entropy_per_layer.png")
    aoe = [r for r in rows if r["d_low"] and "aoe_" in r["name"]]
    fig3 = [r for r in aoe if r["paper_d_low"] == 256] or aoe[-2:]  # the paper's Fig. 3 shows d_low 256
    heat = [r for r in rows if r["load_per_layer_last20"]][:2] + fig3[:2]
    fig, axes = plt.subplots(1, len(heat), figsize=(3.2 * len(heat), 3.2), squeeze=False)
    for ax, r in zip(axes[0], heat):
        im = ax.imshow(r["load_per_layer_last20"], aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(r["name"], fontsize=8), ax.set_xlabel("expert"), ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    plots["load"] = save_figure(fig, out / "plots" / "expert_load_heatmaps.png")
    fig, ax = plt.subplots(figsize=(8, 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["tokens_per_s_ratio"] for r in rows], width=0.4, label="tokens/s")
    ax.bar([x + 0.2 for x in xs], [r["activation_bytes_ratio"] for r in rows], width=0.4,
           label="saved-for-backward memory")
    ax.axhline(1.0, color="k", lw=0.8), ax.set_xticks(list(xs)), ax.set_xticklabels(names, rotation=40)
    ax.set_ylabel(f"ratio to {reference}"), ax.legend(fontsize=8)
    plots["efficiency"] = save_figure(fig, out / "plots" / "efficiency_ratios.png")
    ec = any(r.get("eval_rule") for r in rows)
    conv = result.get("aux_convention", "sum")
    table = md_table(
        ["row", "val loss", *(["val loss, batch rule"] if ec else []), "val ppl", *[f"{d} loss" for d in domains],
         "Ent_load", "Ent_conf", "max/mean load",
         f"tokens/s vs {reference}", f"saved-for-backward bytes vs {reference}", "active params", "paper avg acc."],
        [[r["name"], r["val_loss"], *([r.get("val_loss_batch_rule", "")] if ec else []), r["val_ppl"],
          *[r["val_domains"].get(d, float("nan")) for d in domains],
          r["load_entropy_last20"], r["router_entropy_last20"], r["max_load_last20"], r["tokens_per_s_ratio"],
          r["activation_bytes_ratio"], f"{r['active_params']:,}",
          "" if r["paper_score"] is None else r["paper_score"]] for r in rows])
    kind = "quick" if result["quick"] else "full"
    md = [f"# {result['experiment']} ({kind}: {result['steps']} steps per row, seed {result['seed']})", "",
          f"Unigram entropy of the training tokens: {result['unigram_entropy']:.4f} nats. Ent_load, Ent_conf and "
          "max/mean load are means over the last 20% of steps and over MoE layers; tokens/s and the bytes autograd "
          "saves for backward (the part of training memory the designs differ in; the paper's Table 4 reports peak "
          "GPU memory) come from training steps of every model timed side by side in this run. "
          "The last column is the paper's mean accuracy over 8 tasks (732M models, 100B tokens)."
          + (" Expert-choice rows train with expert choice over the batch but their \"val loss\" evaluates with the "
             "causal top-k fallback (a token's experts cannot depend on later tokens when decoding); \"val loss, "
             "batch rule\" evaluates them with expert choice over the batch, as in training and as the paper "
             "reports." if ec else "")
          + f" L_aux: the {conv} convention ({AUX_CONVENTIONS[conv]}).",
          "", table, "",
          "## Rows", "", md_table(["row", "setting"], [[r["name"], r["description"]] for r in rows]), "",
          "## Plots", ""]
    md += [f"![{k}]({p.relative_to(out)})" for k, p in plots.items()]
    # force: out was checked (new, moelab's, or forced) by prepare_out before the runs
    write_report(out, f"moelab {result['experiment']}", "\n".join(md) + "\n", result, force=True)
