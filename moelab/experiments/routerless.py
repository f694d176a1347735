"""Routerless expert selection: the preliminary study of Autonomy-of-Experts (Lv et al. 2025, §3.1).

AoE asks whether experts "know" what they are good at: the router of a trained MoE is dropped, every
expert runs on every token up to a chosen node of its computation, the norm of that node's activation
scores the expert, the top-K experts by norm finish their computation, and their outputs are combined
with softmax over the K chosen norms (here: ``weighting="norms"``; the default ``"router"`` keeps the
router's own gates for the chosen experts, so the study measures the selection alone). Table 1 of the
paper uses the L2 norm, App. A Tables 6 / 7 the L1 and L-infinity norms, on Mixtral 8x7B and
Phi-3.5-MoE (see ../shared/REFERENCES.md §6).

Nodes of the SwiGLU expert E_e(x) = (act(x W_g) * x W_p) W_o (moelab: gate_EFD, up_EFD, down_EDF):
``x_Wg`` x W_g, ``x_Wp`` x W_p, ``act_x_Wg`` act(x W_g), ``act_x_Wg_x_Wp`` act(x W_g) * x W_p (all
F-dim) and ``output`` E_e(x) (D-dim). The selection is applied from outside the model by
:func:`routerless`, which replaces each MoE layer's forward until the ``with`` block exits. It is
dropless: no capacity applies. Shared experts are added as :class:`moelab.moe.layer.MoELayer` does.

Compute (multiply-adds per token per MoE layer, norms and activations not counted): routed inference
is D*E (router) + K*3*D*F; routerless at a node is E * (cost up to the node) + K * (remaining cost).

Shape legend: T tokens, C tokens of a chunk, D model dim, F expert FFN dim, E experts, K chosen experts,
A = C*K assignments, X the node's feature dim (F, or D for ``output``).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from moelab.errors import ConfigError, MoelabError
from moelab.moe.experts import StackedExperts
from moelab.moe.routing import Routing, TokenLayout

NODES = ("x_Wg", "x_Wp", "act_x_Wg", "act_x_Wg_x_Wp", "output")
NORMS = ("l1", "l2", "linf")
_ORD = {"l1": 1, "l2": 2, "linf": float("inf")}
# Number of the three D*F matmuls (gate, up, down) done before each node.
_DONE_AT = {"x_Wg": 1, "x_Wp": 1, "act_x_Wg": 1, "act_x_Wg_x_Wp": 2, "output": 3}
_CHUNK_ELEMS = 1 << 24  # cap on a chunk's stored node activations (C * E * X elements)
# How the chosen experts are weighted: the router's own gates (default: the question is which experts,
# not their weights) or AoE's softmax over the chosen norms (the paper's rule, reported separately).
WEIGHTINGS = ("router", "norms")
GATED_ROUTERS = ("topk", "switch", "deepseek_v2", "deepseek_v3")  # routers whose gate rule router_gates reuses


def check_choice(node: str, norm: str) -> None:
    """ConfigError naming the option when ``node`` or ``norm`` is not one of NODES / NORMS."""
    if node not in NODES:
        raise ConfigError("node", node, f"unknown node; choose one of {', '.join(NODES)}")
    if norm not in NORMS:
        raise ConfigError("norm", norm, f"unknown norm; choose one of {', '.join(NORMS)}")


def routed_moe_layers(model, source: object = None) -> list:
    """The model's MoE layers, checked: at least one, each with StackedExperts."""
    name = source if source is not None else type(model).__name__
    blocks = [(i, b.ffn) for i, b in enumerate(getattr(model, "blocks", [])) if getattr(b, "is_moe", False)]
    if not blocks:
        raise MoelabError(f"{name}: the model has no MoE layers, so it has no routed experts to select from; "
                          "the routerless study needs a router-based MoE")
    for i, layer in blocks:
        if not isinstance(layer.experts, StackedExperts):
            raise MoelabError(f"{name}: the MoE layer of block {i} has experts of type {type(layer.experts).__name__}, "
                              "not StackedExperts (gate/up/down weights); the routerless study cannot run its nodes")
    return [layer for _, layer in blocks]


# ---- the selection ------------------------------------------------------------------------------------
def _node(ex: StackedExperts, e: int, x_CD: torch.Tensor, node: str) -> torch.Tensor:
    """Expert e's activation at ``node`` for every row of x_CD: (C, F), or (C, D) for ``output``."""
    if node == "output":
        return ex.expert(e, x_CD)
    if node == "x_Wp":
        return x_CD @ ex.up_EFD[e].t()
    g_CF = x_CD @ ex.gate_EFD[e].t()
    if node == "x_Wg":
        return g_CF
    a_CF = ex.act(g_CF)
    return a_CF if node == "act_x_Wg" else a_CF * (x_CD @ ex.up_EFD[e].t())


def _finish(ex: StackedExperts, e: int, x_ND: torch.Tensor, h_NX: torch.Tensor, node: str) -> torch.Tensor:
    """Expert e's output from its node activation h_NX (the rest of E_e(x), reusing h)."""
    if node == "output":
        return h_NX
    if node == "x_Wg":
        h_NX = ex.act(h_NX) * (x_ND @ ex.up_EFD[e].t())
    elif node == "x_Wp":
        h_NX = ex.act(x_ND @ ex.gate_EFD[e].t()) * h_NX
    elif node == "act_x_Wg":
        h_NX = h_NX * (x_ND @ ex.up_EFD[e].t())
    return h_NX @ ex.down_EDF[e].t()


def router_gates(layer, x_CD: torch.Tensor, idx_CK: torch.Tensor) -> torch.Tensor:
    """The gates ``layer``'s own router gives the experts ``idx_CK`` of each token (its scores, its
    renormalisation, its routed_scaling_factor), as if it had chosen them itself."""
    cfg = layer.router_cfg
    if cfg.type not in GATED_ROUTERS:
        raise ConfigError("weighting", "router", f"router type {cfg.type} has no plain gate rule to reuse; "
                          f"use weighting='norms' (router gates exist for {', '.join(GATED_ROUTERS)})")
    logits_CE = layer.router.logits(x_CD)  # fp32
    if cfg.type == "topk" and cfg.softmax_order == "topk_then_softmax":
        return logits_CE.gather(-1, idx_CK).softmax(dim=-1)
    sigmoid = cfg.type == "deepseek_v3"
    scores_CE = torch.sigmoid(logits_CE) if sigmoid else logits_CE.softmax(dim=-1)
    w_CK = scores_CE.gather(-1, idx_CK)
    if _renormalises(cfg):
        p = cfg.topk_norm_p if cfg.type == "topk" else 1.0
        w_CK = w_CK / (w_CK.sum(dim=-1, keepdim=True) if p == 1.0
                       else torch.linalg.vector_norm(w_CK, ord=p, dim=-1, keepdim=True))
    return w_CK * _scale(cfg)


def _renormalises(cfg) -> bool:
    """Whether the router divides its chosen scores by their sum (or p-norm), as its own code does:
    top-k softmax-then-top-k and DeepSeek-V2 with norm_topk_prob, DeepSeek-V3 unless it is False;
    Switch never (its top-1 gate is p_max)."""
    if cfg.type == "deepseek_v3":
        return cfg.norm_topk_prob is None or bool(cfg.norm_topk_prob)
    return cfg.type in ("topk", "deepseek_v2") and bool(cfg.norm_topk_prob)


def _scale(cfg) -> float:
    """routed_scaling_factor where the router applies it (DeepSeek's routers; top-k and Switch ignore it)."""
    return cfg.routed_scaling_factor if cfg.type in ("deepseek_v2", "deepseek_v3") else 1.0


def gates_sum_to_one(cfg) -> bool:
    """Whether the router's own K gates sum to 1 before its routed_scaling_factor (a p-norm other than 1
    does not make them sum to 1)."""
    if cfg.type == "topk" and cfg.softmax_order == "topk_then_softmax":
        return True
    return _renormalises(cfg) and (cfg.type != "topk" or cfg.topk_norm_p == 1.0)


def _select_chunk(layer, x_CD: torch.Tensor, node: str, norm: str, weighting: str):
    """All E experts to ``node``, top-K by norm, the K finish; -> (out_CD, norms_CE, idx_CK, weight_CK).
    ``weighting``: "router" = the router's own gates for the chosen experts; "norms" = AoE's softmax
    over the K chosen norms (x the router's scale only when its own gates sum to 1: a scale made for
    gates that sum to less, Qwen's or DeepSeek-V2's, would inflate weights renormalised to 1)."""
    ex, K, cfg = layer.experts, layer.router_cfg.top_k, layer.router_cfg
    C, D = x_CD.shape
    node_CEX = torch.stack([_node(ex, e, x_CD, node) for e in range(ex.num_experts)], dim=1)
    norms_CE = torch.linalg.vector_norm(node_CEX.float(), ord=_ORD[norm], dim=-1)  # fp32 scores
    top_CK, idx_CK = norms_CE.topk(K, dim=-1)
    if weighting == "router":
        weight_CK = router_gates(layer, x_CD, idx_CK)
    else:
        weight_CK = top_CK.softmax(dim=-1) * (_scale(cfg) if gates_sum_to_one(cfg) else 1.0)
    tok_A, exp_A = torch.arange(C, device=x_CD.device).repeat_interleave(K), idx_CK.reshape(-1)
    y_AD = x_CD.new_empty(C * K, D)
    for e in exp_A.unique().tolist():  # each chosen expert finishes on its rows only
        rows_N = (exp_A == e).nonzero().squeeze(1)
        t_N = tok_A[rows_N]
        y_AD[rows_N] = _finish(ex, e, x_CD[t_N], node_CEX[t_N, e], node)
    out_CD = (y_AD.view(C, K, D) * weight_CK.to(y_AD.dtype)[..., None]).sum(dim=1)
    return out_CD, norms_CE, idx_CK, weight_CK


def routerless_forward(layer, x_BTD: torch.Tensor, node: str, norm: str,
                       valid_BT: torch.Tensor | None = None, weighting: str = "router") -> tuple[torch.Tensor, Routing]:
    """MoELayer.forward with the router's selection replaced by norm-based top-K selection (K = router
    top_k), weighted as ``weighting`` says (see :func:`_select_chunk`). The study runs unpadded text;
    a padding mask is refused rather than routed."""
    if valid_BT is not None and not bool(valid_BT.all()):
        raise ConfigError("attention_mask", "padding", "the routerless study runs on unpadded sequences")
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    ex = layer.experts
    width = ex.d_model if node == "output" else ex.ffn_dim
    chunk = max(1, _CHUNK_ELEMS // (ex.num_experts * width))
    parts = [_select_chunk(layer, x_TD[s:s + chunk], node, norm, weighting) for s in range(0, B * T, chunk)]
    out_TD, norms_TE, idx_TK, weight_TK = (torch.cat(p) for p in zip(*parts))
    out_TD = layer.add_shared(x_TD, out_TD)  # exactly as MoELayer.forward
    # the norms stand in for router logits, so layer metrics describe the routerless selection
    routing = Routing.from_topk(idx_TK, weight_TK, norms_TE, norms_TE.softmax(dim=-1))
    if layer.record_stats:
        layer._record(routing, routing, TokenLayout.dense(B, T, x_TD.device), None)
    return out_TD.view(B, T, D), routing


_MISSING = object()


@contextmanager
def routerless(model, node: str = "act_x_Wg", norm: str = "l2", weighting: str = "router"):
    """Inside the ``with``, every MoE layer of ``model`` selects its experts by the ``norm`` of their
    ``node`` activation instead of its router; each layer's forward is restored on exit (also on errors)."""
    check_choice(node, norm)
    if weighting not in WEIGHTINGS:
        raise ConfigError("weighting", weighting, f"choose one of {', '.join(WEIGHTINGS)}")
    layers = routed_moe_layers(model)
    saved = []
    try:
        for layer in layers:
            saved.append((layer, layer.__dict__.get("forward", _MISSING)))
            layer.forward = lambda x_BTD, valid_BT=None, _layer=layer: routerless_forward(_layer, x_BTD, node, norm,
                                                                                         valid_BT, weighting)
        yield model
    finally:
        for layer, prev in reversed(saved):
            if prev is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = prev


# ---- compute cost -------------------------------------------------------------------------------------
def routed_macs(d_model: int, ffn_dim: int, num_experts: int, top_k: int, router_hidden: int | None = None) -> int:
    """Multiply-adds per token of one routed MoE layer: router D*E (D*H + H*E with a hidden layer of
    width H) + K experts of 3*D*F."""
    router = d_model * num_experts if router_hidden is None else router_hidden * (d_model + num_experts)
    return router + top_k * 3 * d_model * ffn_dim


def routerless_macs(node: str, d_model: int, ffn_dim: int, num_experts: int, top_k: int) -> int:
    """E experts up to ``node`` + the K chosen experts' remaining matmuls, per token per layer."""
    check_choice(node, "l2")
    done = _DONE_AT[node]
    return num_experts * done * d_model * ffn_dim + top_k * (3 - done) * d_model * ffn_dim


def cost_ratio(node: str, d_model: int, ffn_dim: int, num_experts: int, top_k: int) -> float:
    return routerless_macs(node, d_model, ffn_dim, num_experts, top_k) / routed_macs(d_model, ffn_dim, num_experts,
                                                                                     top_k)


def model_macs(model, node: str | None = None) -> int:
    """Per-token multiply-adds summed over the MoE layers: routed (``node=None``) or routerless at ``node``."""
    total = 0
    for layer in routed_moe_layers(model):
        ex = layer.experts
        dims = (ex.d_model, ex.ffn_dim, ex.num_experts, layer.router_cfg.top_k)
        hidden = getattr(layer.router, "hidden", None)  # an optional (H, D) router layer
        total += (routed_macs(*dims, None if hidden is None else hidden.shape[0]) if node is None
                  else routerless_macs(node, *dims))
    return total


# ---- the study ----------------------------------------------------------------------------------------
def run_routerless_study(source: str | Path, out: Path, data: str = "builtin", nodes=NODES, norms=NORMS,
                         batch_size: int = 8, max_batches: int | None = None, seq_len: int | None = None,
                         quick: bool = False, seed: int = 0, progress: bool = True, weightings=WEIGHTINGS,
                         force: bool = False) -> dict:
    """Validation loss per domain of the routed model and of every (node, norm, weighting) routerless
    selection; writes ``result.json``, ``report.md``/``.html`` and ``plots/`` into ``out``; returns the
    result. A router without a plain gate rule (``GATED_ROUTERS``) runs the "norms" weighting only, and
    the result's ``notes`` say so. ``out``: new or written by moelab, else only with ``force``."""
    from tqdm.auto import tqdm

    from moelab.data import load_corpus, prepare_data
    from moelab.loading import load, load_tokenizer
    from moelab.train.trainer import evaluate

    nodes, norms, weightings = tuple(nodes), tuple(norms), tuple(weightings)
    for n in nodes:
        check_choice(n, "l2")
    for p in norms:
        check_choice("output", p)
    for w in weightings:
        if w not in WEIGHTINGS:
            raise ConfigError("weighting", w, f"choose one of {', '.join(WEIGHTINGS)}")
    model = load(source)
    layers = routed_moe_layers(model, source)
    notes = []
    if "router" in weightings and layers[0].router_cfg.type not in GATED_ROUTERS:
        weightings = tuple(w for w in weightings if w != "router")
        notes.append(f"router type {layers[0].router_cfg.type} has no plain gate rule to reuse: only the softmax "
                     "of the chosen norms weights the experts")
    if not weightings:
        raise ConfigError("weighting", "router", "this router has no gate rule to reuse; add weighting 'norms'")
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise MoelabError(f"{source}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                          f"vocab_size {model.config.vocab_size}; it is not the model's tokenizer")
    seq_len = seq_len or min(model.config.max_seq_len, 128)
    max_batches = max_batches or (2 if quick else 16)
    _, val = prepare_data(load_corpus(data, seed=seed), tokenizer, seq_len)
    if len(val.input_ids) == 0:
        raise MoelabError(f"data {data!r}: no validation sequences of {seq_len} tokens; give more data or a "
                          "smaller seq_len")

    def measure(**extra) -> dict:
        t0 = time.perf_counter()
        v = evaluate(model, val, batch_size, max_batches)
        return {**extra, "val_loss": v["val_loss"], "val_ppl": v["val_ppl"],
                "val_domains": {d: s["loss"] for d, s in v["domains"].items()}, "val_tokens": v["val_tokens"],
                "eval_s": time.perf_counter() - t0}

    routed_cost = model_macs(model)
    routed = measure(macs_per_token=routed_cost, cost_ratio=1.0)
    rows = []
    runs = [(w, n, p) for w in weightings for n in nodes for p in norms]
    for weighting, node, norm in tqdm(runs, desc="routerless", unit="eval", disable=not progress, dynamic_ncols=True):
        macs = model_macs(model, node)
        with routerless(model, node, norm, weighting):
            row = measure(node=node, norm=norm, weighting=weighting, macs_per_token=macs, cost_ratio=macs / routed_cost)
        row["delta_loss"] = row["val_loss"] - routed["val_loss"]
        rows.append(row)
    first = layers[0]
    result = {
        "experiment": "routerless", "source": str(source), "data": str(data), "quick": quick, "seed": seed,
        "seq_len": seq_len, "batch_size": batch_size, "max_batches": max_batches, "nodes": list(nodes),
        "norms": list(norms), "weightings": list(weightings), "notes": notes,
        "model": {"moe_layers": len(layers), "num_experts": first.experts.num_experts,
                  "top_k": first.router_cfg.top_k, "d_model": first.experts.d_model,
                  "expert_ffn_dim": first.experts.ffn_dim, "router": first.router_cfg.type,
                  "shared_experts": first.shared is not None},
        "routed": routed, "rows": rows,
    }
    from moelab.checkpoint.atomic import prepare_output_dir
    from moelab.fileio import write_atomic

    out = prepare_output_dir(out, force=force)

    write_atomic(out / "result.json", json.dumps(result, indent=2) + "\n")
    _report(out, result, force)
    return result


def _report(out: Path, result: dict, force: bool = False) -> None:
    import matplotlib.pyplot as plt

    from moelab.reports.writer import md_table, save_figure, write_report

    rows, routed, nodes = result["rows"], result["routed"], result["nodes"]
    plots = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, norm in enumerate(result["norms"]):
        for weighting, style in (("router", "o-"), ("norms", "s--")):
            pts = [(nodes.index(r["node"]), r["val_loss"]) for r in rows
                   if r["norm"] == norm and r["weighting"] == weighting]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{k}",
                        label=f"{norm}, {'router gates' if weighting == 'router' else 'softmax of norms'}")
    ax.axhline(routed["val_loss"], ls="--", color="black", alpha=0.7, label="with router")
    ax.set_xticks(range(len(nodes)), nodes, fontsize=8)
    ax.set_xlabel("node scored by its norm"), ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=8), ax.grid(alpha=0.3)
    plots["loss by node"] = save_figure(fig, out / "plots" / "val_loss_by_node.png")
    fig, ax = plt.subplots(figsize=(7, 3))
    ratios = [next(r["cost_ratio"] for r in rows if r["node"] == n) for n in nodes]
    ax.bar(range(len(nodes)), ratios, color="tab:gray")
    ax.axhline(1.0, ls="--", color="black", alpha=0.7, label="with router")
    ax.set_xticks(range(len(nodes)), nodes, fontsize=8)
    ax.set_ylabel("MoE multiply-adds / routed"), ax.legend(fontsize=8)
    plots["cost by node"] = save_figure(fig, out / "plots" / "cost_by_node.png")
    domains = sorted(routed["val_domains"])
    table = md_table(["node", "norm", "weights", "val loss", "Δ vs router", "val ppl",
                      *[f"{d} loss" for d in domains], "cost / routed", "eval s"],
                     [["(router)", "-", "router", routed["val_loss"], 0.0, routed["val_ppl"],
                       *[routed["val_domains"][d] for d in domains], 1.0, routed["eval_s"]]]
                     + [[r["node"], r["norm"], "router gates" if r["weighting"] == "router" else "softmax of norms",
                         r["val_loss"], r["delta_loss"], r["val_ppl"],
                         *[r["val_domains"].get(d, float("nan")) for d in domains], r["cost_ratio"], r["eval_s"]]
                        for r in rows])
    m = result["model"]
    md = [f"# Routerless expert selection (Autonomy-of-Experts §3.1) on {result['source']}", "",
          f"{m['moe_layers']} MoE layers, {m['num_experts']} experts, top-{m['top_k']}, router {m['router']}; "
          f"data {result['data']}, {routed['val_tokens']} validation tokens of sequences of {result['seq_len']}; "
          "validation loss in nats/token. Without the router's selection every expert runs to the node and the "
          "top-K by norm finish (dropless). They are weighted by the router's own gates for those experts "
          "(\"router gates\": this isolates which experts are chosen) or, as AoE does, by a softmax over their "
          "norms (\"softmax of norms\": that also changes the weights; an L1 norm, which grows with the layer "
          "width, makes it nearly top-1). Cost: MoE multiply-adds per token relative to routed inference "
          "(router + K experts).", "", *[f"Note: {n}" for n in result.get("notes", [])], "", table, ""]
    for weighting, label in (("router", "router gates"), ("norms", "softmax of norms")):
        mine = [r for r in rows if r["weighting"] == weighting]
        if mine:
            best = min(mine, key=lambda r: r["val_loss"])
            md += [f"Best without the router's selection ({label}): {best['node']} / {best['norm']}, loss "
                   f"{best['val_loss']:.4f} vs {routed['val_loss']:.4f} with the router, at {best['cost_ratio']:.3g}x "
                   "the compute.", ""]
    md += ["## Plots", ""] + [f"![{k}]({p.relative_to(out)})" for k, p in plots.items()]
    write_report(out, "moelab routerless study", "\n".join(md) + "\n", result, force=force)
