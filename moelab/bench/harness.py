"""`moelab bench moe-layer | train | generate`: moelab against transformers, side by side in one
process, with identical weights and outputs checked equal before anything is timed.

- moe-layer: moelab's MoE layer (Mixtral-form top-k router, every expert kernel moelab has) vs
  transformers' ``MixtralSparseMoeBlock`` under every ``experts_implementation`` that runs here, and
  the dense-matmul limit: plain ``torch.mm`` doing the same useful FLOPs (forward: one (T*k, d) x
  (d, 3f) product; forward + backward: three). "x limit" = limit time / contender time.
- train: a training step (forward, LM loss, backward) of a tiny Mixtral made by transformers and
  loaded into moelab through its HF interop (same weights), same batch.
- generate: greedy decoding, moelab's ``generate_ids`` vs transformers' ``generate``; tokens equal.

Timings: warm-up, then repetitions alternating the contenders (the order rotates), medians and
minimums. Absolute times on a shared CPU drift; ratios from one run are what count.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = {  # T tokens, d model, f expert ffn, E experts, k
    "tiny-train": dict(T=4096, d=256, f=512, E=8, k=2),
    "fine-grained": dict(T=4096, d=256, f=128, E=64, k=8),
    "bigger": dict(T=2048, d=1024, f=2816, E=8, k=2),
    "decode1": dict(T=1, d=256, f=512, E=8, k=2),
    "decode8": dict(T=8, d=256, f=512, E=8, k=2),
    "decode1-bigger": dict(T=1, d=1024, f=2816, E=8, k=2),
    "decode8-bigger": dict(T=8, d=1024, f=2816, E=8, k=2),
}
QUICK_T = {"tiny-train": 256, "fine-grained": 256, "bigger": 64}


def _time(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, dict]:
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: {"median_s": statistics.median(v), "min_s": min(v)} for n, v in times.items()}


def _hf_block(d, f, E, k, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k,
                        num_attention_heads=4, num_key_value_heads=4, hidden_act="silu")
    cfg._experts_implementation = impl
    return MixtralSparseMoeBlock(cfg)


def hf_experts_implementations() -> list[str]:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # pragma: no cover - older transformers
        return ["eager"]
    return ["eager", *[k for k in ALL_EXPERTS_FUNCTIONS.keys() if k != "eager"]]


QUICK_NOTE = ("quick mode: CI-sized shapes, every output matched the reference loop; the ratios are "
              "not meaningful as performance numbers")


def bench_moe_layer(shape: str, reps: int = 5, quick: bool = False, seed: int = 0) -> dict:
    from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
    from moelab.moe.layer import MoELayer

    s = dict(SHAPES[shape])
    if quick and shape in QUICK_T:
        s["T"] = QUICK_T[shape]
    T, d, f, E, k = s["T"], s["d"], s["f"], s["E"], s["k"]
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=16, d_model=d, num_layers=1, attention=AttentionConfig(num_heads=4),
                      moe=MoEConfig(num_experts=E, expert_ffn_dim=f, router=RouterConfig(
                          top_k=k, load_balance_coef=0.0, z_loss_coef=0.0)))
    ours = MoELayer(cfg).train()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
        ours.router.weight.normal_(0.0, 1.0)  # decisive routing
    x = torch.randn(1, T, d)
    g = torch.randn(1, T, d)
    contenders: dict[str, torch.nn.Module] = {}
    for impl in ("sorted", "grouped", "loop"):
        m = copy.deepcopy(ours)
        m.experts.impl = impl
        contenders[f"moelab-{impl}"] = m
    results: dict[str, dict] = {}
    ref_out, ref_grad = _fwd_bwd(contenders["moelab-loop"], x, g)
    for impl in hf_experts_implementations():
        gathered = T * k * 3 * f * d * x.element_size()  # batched_mm gathers every assignment's weights
        if impl == "batched_mm" and gathered > 2 ** 30:
            results[f"transformers-{impl}"] = {"skipped": f"would gather {gathered / 2 ** 30:.1f} GiB of expert weights"}
            continue
        try:
            blk = _hf_block(d, f, E, k, impl).train()
            with torch.no_grad():
                blk.gate.weight.copy_(ours.router.weight)
                blk.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate_EFD, ours.experts.up_EFD], dim=1))
                blk.experts.down_proj.copy_(ours.experts.down_EDF)
            out, grad = _fwd_bwd(blk, x, g)
        except Exception as e:  # an implementation this machine cannot run
            results[f"transformers-{impl}"] = {"skipped": f"{type(e).__name__}: {e}"[:200]}
            continue
        contenders[f"transformers-{impl}"] = blk
    matched = {}
    for name, m in contenders.items():
        out, grad = _fwd_bwd(m, x, g)
        scale = ref_out.abs().max().item()
        matched[name] = bool(torch.allclose(out, ref_out, atol=1e-4 * scale, rtol=1e-4)
                             and torch.allclose(grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item(), rtol=1e-4))
    bad = [n for n, ok in matched.items() if not ok]
    if bad:
        raise AssertionError(f"outputs differ from the reference loop before timing: {bad}")
    A = T * k
    a, w = torch.randn(A, d), torch.randn(d, 3 * f)
    wt, ga = torch.randn(3 * f, d), torch.randn(A, 3 * f)

    def limit_fwd():
        torch.mm(a, w)

    def limit_fwd_bwd():  # y = a w; da = dy w^T; dw = a^T dy: the three products of a linear layer
        torch.mm(a, w), torch.mm(ga, wt), torch.mm(a.t(), ga)

    def fwd(m):
        def run():
            with torch.no_grad():
                _out(m, x)
        return run

    def fwd_bwd(m):
        def run():
            xx = x.clone().requires_grad_(True)
            _out(m, xx).backward(g)
        return run

    timing_f = _time({"limit": limit_fwd, **{n: fwd(m) for n, m in contenders.items()}}, reps)
    timing_b = _time({"limit": limit_fwd_bwd, **{n: fwd_bwd(m) for n, m in contenders.items()}}, reps)
    flops = 2 * A * d * 3 * f
    for n in contenders:
        results[n] = {"fwd": timing_f[n], "fwd_bwd": timing_b[n],
                      "fwd_x_limit": timing_f["limit"]["median_s"] / timing_f[n]["median_s"],
                      "fwd_bwd_x_limit": timing_b["limit"]["median_s"] / timing_b[n]["median_s"],
                      "outputs_match": matched[n]}
    hf = [n for n in contenders if n.startswith("transformers")]
    best_hf = {key: min((results[n][key]["median_s"] for n in hf), default=None) for key in ("fwd", "fwd_bwd")}
    ours_best = min(("moelab-sorted", "moelab-grouped"), key=lambda n: results[n]["fwd_bwd"]["median_s"])
    return {"benchmark": "moe-layer", "shape": shape, **s, "quick": quick, "reps": reps, "useful_fwd_flops": flops,
            "limit": {"fwd": timing_f["limit"], "fwd_bwd": timing_b["limit"]}, "contenders": results,
            "moelab_default": "moelab-sorted", "moelab_best": ours_best,
            "vs_transformers_best": {key: (best_hf[key] / results["moelab-sorted"][key]["median_s"]
                                           if best_hf[key] else None) for key in ("fwd", "fwd_bwd")},
            "outputs_match": matched,
            # NOTE: --quick shrinks T to CI size on a shared machine: the timings are too small to compare
            "ratios_meaningful": not quick,
            "note": (QUICK_NOTE if quick else ""),
            "machine": machine()}


def _out(m, x):
    out = m(x)
    return out[0] if isinstance(out, tuple) else out


def _fwd_bwd(m, x, g):
    xx = x.clone().requires_grad_(True)
    out = _out(m, xx)
    out.backward(g)
    m.zero_grad(set_to_none=True)
    return out.detach(), xx.grad


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _tiny_mixtral(tmp, d, layers, E, k, vocab=2048, seed=0, sliding_window=None):
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d if E <= 8 else d // 2,
                                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=E, num_experts_per_tok=k, max_position_embeddings=512,
                                     router_aux_loss_coef=0.0, tie_word_embeddings=False,
                                     sliding_window=sliding_window)
    torch.manual_seed(seed)
    hf = transformers.MixtralForCausalLM(cfg)
    hf.save_pretrained(tmp)
    return hf


def bench_train(reps: int = 5, quick: bool = False, seed: int = 0) -> dict:
    import tempfile

    import moelab

    rows = {}
    for name, E, k in (("mixtral-8e-top2", 8, 2), ("fine-grained-64e-top8", 64, 8)):
        with tempfile.TemporaryDirectory() as tmp:
            d, layers = (64, 2) if quick else (256, 4)
            hf = _tiny_mixtral(tmp, d, layers, E, k, seed=seed).train()
            ours = moelab.load(tmp).train()
            B, S = (2, 32) if quick else (8, 256)
            ids = torch.randint(0, 2048, (B, S), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                a, b = hf(ids).logits, ours(ids).logits
            match = bool(torch.allclose(a, b, atol=1e-4 * a.abs().max().item()))
            if not match:
                raise AssertionError(f"{name}: moelab and transformers logits differ before timing")

            def step(m):
                def run():
                    m.zero_grad(set_to_none=True)
                    (m(ids, labels=ids).loss).backward()
                return run

            t = _time({"moelab": step(ours), "transformers": step(hf)}, reps)
            from moelab.bench.sidebyside import saved_activation_bytes

            mem = {"moelab": saved_activation_bytes(ours, ids, ids), "transformers": _hf_saved_bytes(hf, ids)}
            rows[name] = {"E": E, "k": k, "d": d, "layers": layers, "batch": [B, S], "logits_match": match,
                          "timing": t, "saved_bytes": mem,
                          "tokens_per_s": {n: B * S / v["median_s"] for n, v in t.items()},
                          "speedup": t["transformers"]["median_s"] / t["moelab"]["median_s"],
                          "memory_ratio": mem["moelab"] / mem["transformers"]}
    return {"benchmark": "train", "quick": quick, "reps": reps, "models": rows, "machine": machine()}


def _hf_saved_bytes(hf, ids) -> int:
    from moelab.bench.sidebyside import saved_activation_bytes

    class _Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, labels=None):
            return self.m(input_ids, labels=labels)

    return saved_activation_bytes(_Wrap(hf), ids, ids)


def bench_generate(reps: int = 3, quick: bool = False, seed: int = 0, new_tokens: int | None = None,
                   compiled: bool = False) -> dict:
    """Greedy tokens/s at batch 1 and 8, moelab vs transformers' ``generate`` on the same weights;
    ``compiled`` adds moelab with ``compile_blocks()`` (compile time excluded: it is paid in the
    check run before timing)."""
    import tempfile

    import moelab
    from moelab.inference.generate import generate_ids

    new_tokens = new_tokens or (8 if quick else 64)
    with tempfile.TemporaryDirectory() as tmp:
        d, layers = (64, 2) if quick else (256, 4)
        hf = _tiny_mixtral(tmp, d, layers, 8, 2, seed=seed).eval()
        ours = moelab.load(tmp).eval()
        fast = None
        if compiled:
            fast = moelab.load(tmp).eval()
            fast.compile_blocks(dynamic=True)
    rows = {}
    for batch in (1, 8):
        ids = torch.randint(1, 2048, (batch, 16), generator=torch.Generator().manual_seed(seed + batch))

        def run_ours():
            return generate_ids(ours, ids, new_tokens, temperature=0.0, use_cache=True)

        def run_hf():
            with torch.no_grad():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        contenders = {"moelab": run_ours, "transformers": run_hf}
        if fast is not None:
            contenders["moelab-compiled"] = lambda: generate_ids(fast, ids, new_tokens, temperature=0.0, use_cache=True)
        ref = run_hf()
        for name, fn in contenders.items():
            if not torch.equal(fn(), ref):
                raise AssertionError(f"batch {batch}: greedy tokens differ between {name} and transformers")
        t = _time(contenders, reps)
        tps = {n: batch * new_tokens / v["median_s"] for n, v in t.items()}
        rows[str(batch)] = {"tokens_equal": True, "timing": t, "tokens_per_s": tps,
                            "speedup": t["transformers"]["median_s"] / t["moelab"]["median_s"]}
        if fast is not None:
            rows[str(batch)]["speedup_compiled"] = t["transformers"]["median_s"] / t["moelab-compiled"]["median_s"]
    return {"benchmark": "generate", "quick": quick, "new_tokens": new_tokens, "compiled": compiled,
            "batches": rows, "machine": machine()}


def bench_engine(reps: int = 3, quick: bool = False, seed: int = 0, new_tokens: int | None = None) -> dict:
    """The batched engine (moelab.inference.engine.generate_batch) against transformers' ``generate`` on the
    same weights: batch 8 of mixed prompt lengths (left padding + attention mask on both sides), and
    batch 1 past a sliding window with moelab's rolling cache; tokens must be identical. Also the
    KV-cache bytes of the windowed generation at every step, rolling vs full cache: flat vs growing."""
    import tempfile

    import moelab
    from moelab.inference.engine import generate_batch

    new_tokens = new_tokens or (12 if quick else 64)
    d, layers, window = (64, 2, 8) if quick else (256, 4, 32)
    rows = {}
    g = torch.Generator().manual_seed(seed)
    for name, win, lengths in (("8-mixed", None, (3, 16, 7, 11, 5, 16, 9, 2)), ("1-window", window, (16,))):
        with tempfile.TemporaryDirectory() as tmp:
            hf = _tiny_mixtral(tmp, d, layers, 8, 2, seed=seed, sliding_window=win).eval()
            ours = moelab.load(tmp).eval()
        prompts = [torch.randint(1, 2048, (n,), generator=g).tolist() for n in lengths]
        T0 = max(lengths)
        ids = torch.zeros(len(prompts), T0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, T0 - len(p):], mask[b, T0 - len(p):] = torch.tensor(p), 1
        rolling = win is not None

        def run_ours():
            return generate_batch(ours, prompts, new_tokens, stop_ids=[], rolling_cache=rolling)

        def run_hf():
            with torch.no_grad():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)

        ref = run_hf()[:, T0:].tolist()
        if [c.token_ids for c in run_ours()] != ref:
            raise AssertionError(f"{name}: tokens differ between moelab's engine and transformers")
        t = _time({"moelab": run_ours, "transformers": run_hf}, reps)
        rows[name] = {"prompt_lengths": list(lengths), "window": win, "tokens_equal": True, "timing": t,
                      "tokens_per_s": {n: len(prompts) * new_tokens / v["median_s"] for n, v in t.items()},
                      "speedup": t["transformers"]["median_s"] / t["moelab"]["median_s"]}
        if rolling:  # cache bytes after every step, rolling vs full
            curves = {}
            for kind in (True, False):
                cache, sizes = ours.new_cache(rolling=kind), []
                x = torch.tensor([prompts[0]])
                with torch.no_grad():
                    logits = ours(x, cache=cache).logits[:, -1]
                    for _ in range(new_tokens):
                        x = logits.argmax(-1, keepdim=True)
                        logits = ours(x, cache=cache).logits[:, -1]
                        sizes.append(cache.nbytes())
                curves["rolling" if kind else "full"] = sizes
            rows[name]["cache_bytes"] = curves
    return {"benchmark": "engine", "quick": quick, "new_tokens": new_tokens, "rows": rows, "machine": machine()}
