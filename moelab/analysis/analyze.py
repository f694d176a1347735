"""`moelab analyze SOURCE`: run a model over labelled text with the routing recorder attached and
compute every analysis of the seed papers (see ``docs/analysis.md`` for the analysis.json schema).

Documents are tokenised with SOURCE's own ``tokenizer.json`` exactly as it encodes (its special
tokens included). Each document is cut into windows of ``seq_len`` tokens; a batch row holds one
window of one document (padding at the end, never recorded), so attention and every statistic stay
inside a document. Tokens are visited document by document until ``max_tokens`` real tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from moelab.analysis import similarity, stats
from moelab.analysis.recorder import record
from moelab.analysis.training import routing_over_training
from moelab.data.document import Document
from moelab.errors import ConfigError, DataError, MoelabError
from moelab.fileio import write_atomic


def read_analysis_documents(data: str, seed: int = 0) -> tuple[list[Document], str | None]:
    """Documents to analyse and a note. builtin: the held-out validation split first, then training
    documents; a user path: every document. No domain labels -> one domain "all"."""
    from moelab.data import load_corpus
    from moelab.data.userdata import DEFAULT_DOMAIN, read_documents

    if data == "builtin":
        corpus = load_corpus("builtin", seed=seed)
        return list(corpus.val) + list(corpus.train), None
    docs = read_documents(Path(data))
    if all(d.domain == DEFAULT_DOMAIN for d in docs):
        return [Document(text=d.text, domain="all", doc_id=d.doc_id) for d in docs], \
            "the data has no domain labels: every document is in one domain, \"all\""
    return docs, None


def encode_documents(tokenizer, docs: list[Document], max_tokens: int, seq_len: int):
    """Windows (doc index, start position, ids) covering the documents in order, at most
    ``max_tokens`` tokens in all."""
    windows, total = [], 0
    for di, d in enumerate(docs):
        if total >= max_tokens:
            break
        # exactly as tokenizer.json encodes (its post-processor's special tokens included)
        ids = tokenizer.encode(d.text, add_special_tokens=True)[:max_tokens - total]
        for s in range(0, len(ids), seq_len):
            windows.append((di, s, ids[s:s + seq_len]))
        total += len(ids)
    return windows, total


def moe_layer_indices(model, source) -> list[int]:
    idx = [i for i, b in enumerate(model.blocks) if b.is_moe]
    if not idx:
        raise MoelabError(f"{source}: the model has no MoE layers; moelab analyze needs a model with routed experts")
    return idx


def analyze(source: str | Path, out: str | Path, data: str = "builtin", max_tokens: int = 100_000,
            layers: list[int] | None = None, seq_len: int | None = None, batch_size: int = 16,
            expert_outputs: bool = True, neuron_matching: bool = False, view_layer: int | None = None,
            over_training: bool = True, progress: bool = True, seed: int = 0,
            output_similarity: str = "angular", min_count: int = stats.MIN_COUNT, force: bool = False) -> dict:
    """Analyse ``source`` (a moelab run / checkpoint / model directory or an HF directory) and write
    ``analysis.json``, ``report.html`` and ``figures/`` into ``out``; returns the analysis.
    ``output_similarity``: how expert outputs are compared, "angular" (1 - arccos(cos)/pi, as the
    authors of "A Closer Look into MoE" average) or "cosine". ``min_count``: occurrences a token id
    or position needs to count in token specialisation and routing spread (OpenMoE: 128). ``out``: a
    new directory or one moelab wrote; one holding someone else's files only with ``force`` (nothing
    in it is deleted, files of the same name are overwritten)."""
    from moelab.analysis.report import write_analysis_report
    from moelab.checkpoint.atomic import prepare_output_dir
    from moelab.loading import load, load_tokenizer

    if min_count < 1:
        raise ConfigError("--min-count", min_count, "must be at least 1 occurrence")
    if output_similarity not in similarity.OUTPUT_SIMILARITIES:
        raise ConfigError("--output-similarity", output_similarity,
                          f"choose one of {', '.join(similarity.OUTPUT_SIMILARITIES)}")

    t0 = time.perf_counter()
    if max_tokens <= 0:
        raise ConfigError("--max-tokens", max_tokens, "must be a positive number of tokens to analyse")
    model = load(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    all_layers = moe_layer_indices(model, source)
    if layers is not None:
        bad = [i for i in layers if i not in all_layers]
        if bad:
            raise ConfigError("--layers", bad, f"not MoE layers of this model; its MoE layers are {all_layers}")
    chosen = sorted(layers) if layers is not None else all_layers
    seq_len = seq_len or min(model.config.max_seq_len, 256)
    docs, note = read_analysis_documents(data, seed)
    windows, total = encode_documents(tokenizer, docs, max_tokens, seq_len)
    if total == 0:
        raise DataError(f"{data}: the documents encode to no tokens; give text to analyse")
    out = prepare_output_dir(out, force=force)
    rec, cols = record(model, windows, batch_size, chosen, expert_outputs, progress, total=total)
    domains = sorted({d.domain for d in docs[:int(cols["doc"].max()) + 1]})
    dom_index = {d: i for i, d in enumerate(domains)}
    domain_N = np.array([dom_index[docs[i].domain] for i in cols["doc"]], dtype=np.int64)
    result = {"source": str(source), "data": data, "notes": [note] if note else [], "tokens": int(total),
              "documents": int(len(np.unique(cols["doc"]))), "seq_len": seq_len, "domains": domains,
              "tokens_per_domain": {d: int((domain_N == i).sum()) for d, i in dom_index.items()},
              "layers": chosen, "num_experts": {}, "top_k": {}, "expert_load": {}, "consecutive": {},
              "token_specialization": {}, "routing_spread": {},
              "top_tokens": {}, "drop_by_position": {}, "weight_similarity": {}, "output_similarity": {},
              "output_similarity_measure": output_similarity,
              "weight_vs_output": {}, "router_vs_experts": {}, "router_top1_is_max_norm": {}, "router_vs_norm": {},
              "expert_outputs": expert_outputs}
    blocks = {i: model.blocks[i].ffn for i in chosen}
    for i in chosen:
        layer, arr = blocks[i], rec.traces[i].arrays()
        E, K = layer.num_experts, layer.router_cfg.top_k
        key = str(i)
        experts, top1 = arr["experts"].astype(np.int64), arr["experts"][:, 0].astype(np.int64)
        result["num_experts"][key], result["top_k"][key] = E, K
        result["expert_load"][key] = stats.expert_load(experts, domain_N, domains, E)
        result["consecutive"][key] = stats.consecutive(experts, cols["doc"], cols["pos"], domain_N, domains, E, K)
        result["token_specialization"][key] = stats.specialization_with_chance(top1, cols["token"], min_count,
                                                                               seed=seed)
        result["routing_spread"][key] = stats.routing_spread(top1, cols["token"], cols["pos"], E, min_count, seed=seed)
        result["top_tokens"][key] = [[tokenizer.decode([t]) for t in ids]
                                     for ids in stats.top_tokens_per_expert(top1, cols["token"], E)]
        if layer.capacity(seq_len * batch_size) is not None:
            result["drop_by_position"][key] = stats.drop_by_position(arr["dropped"], experts, cols["row_pos"], seq_len)
        result["weight_similarity"][key] = similarity.weight_similarity(layer)
        result["router_vs_experts"][key] = similarity.router_vs_experts(layer)
        if neuron_matching:
            result.setdefault("neuron_matched_similarity", {})[key] = similarity.neuron_matched_similarity(layer)
        if expert_outputs and arr["output_norms"] is not None:
            out_sim = rec.traces[i].output_similarity(output_similarity)
            result["output_similarity"][key] = out_sim.tolist()
            result["weight_vs_output"][key] = {k: similarity.pair_correlation(result["weight_similarity"][key][k],
                                                                              out_sim) for k in similarity.KINDS}
            rv = stats.router_vs_norm(top1, np.asarray(arr["output_norms"]), np.asarray(arr["scores"]))
            result["router_top1_is_max_norm"][key] = rv["top1_is_max_norm"]
            result["router_vs_norm"][key] = rv
    view = view_layer if view_layer is not None else chosen[len(chosen) // 2]
    if view not in chosen:
        raise ConfigError("--view-layer", view, f"must be one of the analysed MoE layers {chosen}")
    result["token_view"] = _token_view(rec.traces[view].arrays()["experts"][:, 0], cols, docs, tokenizer, view)
    if over_training:
        result["routing_over_training"] = routing_over_training(source, windows, batch_size, chosen, seed=seed)
    result["seconds"] = time.perf_counter() - t0
    write_atomic(out / "analysis.json", json.dumps(result, indent=1) + "\n")
    result["report"] = str(write_analysis_report(out, result))
    return result


def _token_view(top1_N: np.ndarray, cols: dict, docs: list[Document], tokenizer, layer: int,
                per_domain: int = 1, max_tokens: int = 120) -> dict:
    """The first ``max_tokens`` tokens of the first document of each domain, with their top-1 expert."""
    out, seen = {"layer": layer, "documents": []}, {}
    for di in np.unique(cols["doc"]):
        dom = docs[di].domain
        if seen.get(dom, 0) >= per_domain:
            continue
        seen[dom] = seen.get(dom, 0) + 1
        idx = np.nonzero(cols["doc"] == di)[0][:max_tokens]
        out["documents"].append({"domain": dom, "doc_id": docs[di].doc_id,
                                 "tokens": [tokenizer.decode([int(t)]) for t in cols["token"][idx]],
                                 "top1": [int(e) for e in top1_N[idx]]})
    return out
