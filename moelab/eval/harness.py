"""EleutherAI lm-evaluation-harness adapter: evaluate a moelab model (or an HF checkpoint loaded by
moelab) on any harness task whose data you have locally.

    import lm_eval
    from moelab.eval.harness import MoelabLM
    lm_eval.simple_evaluate(model=MoelabLM.from_path("runs/tiny"), tasks=["hellaswag"])

or, from the harness's command line, ``lm_eval --model moelab --model_args path=runs/tiny ...``
after ``import moelab.eval.harness`` registers it (``--include_path`` / a plugin import). ``lm_eval``
is an optional dependency, imported when this module is.

The three request types map onto moelab's scoring: ``loglikelihood`` is
:func:`moelab.eval.choice.loglikelihoods` (context and continuation tokenised apart, an empty context
replaced by the eos token as the harness's prefix token, the context cut from the left);
``loglikelihood_rolling`` scores every token of the text exactly once, the first given the eos
prefix token, in the harness's own rolling windows (``lm_eval.utils.get_rolling_token_windows``,
each window with as much context as fits); ``generate_until`` is the batched engine, greedy, with
the request's stop strings, the prompt cut from the left to leave room for ``max_gen_toks``.
"""

from __future__ import annotations

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("moelab.eval.harness needs lm-evaluation-harness: pip install lm_eval") from e

from moelab.eval.choice import loglikelihoods, score_tokens


@register_model("moelab")
class MoelabLM(LM):
    def __init__(self, model=None, tokenizer=None, path: str | None = None, batch_size: int = 8,
                 max_length: int | None = None, **_):
        super().__init__()
        if model is None:
            from moelab.loading import load, load_tokenizer

            if path is None:
                raise ValueError("MoelabLM needs model and tokenizer, or path=RUN_OR_MODEL_DIR")
            model, tokenizer = load(path), load_tokenizer(path)
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)

    @classmethod
    def from_path(cls, path: str, **kw) -> "MoelabLM":
        return cls(path=path, **kw)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MoelabLM":
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"})
        return cls(**args)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        return loglikelihoods(self.model, self.tok, pairs, self.max_length, batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        prefix = self.tok.eos_id if self.tok.eos_id is not None else 0
        out = []
        for r in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(r.args[0]), prefix_token=prefix, max_seq_len=self.max_length,
                context_len=1)]
            scores = score_tokens(self.model, [(list(c), list(p)) for c, p in windows], self.max_length,
                                  batch_size=self.batch_size)
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests) -> list[str]:
        from moelab.inference.engine import generate_batch

        out = []
        for r in requests:
            context, kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = max(1, min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1))
            ids = self.tok.encode(context)[-(self.max_length - new):] or [self.tok.eos_id or 0]
            res = generate_batch(self.model, [ids], max_new_tokens=new, tokenizer=self.tok, temperature=0.0,
                                 stop_strings=until)
            out.append(res[0].text)
        return out
