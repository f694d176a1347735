"""EleutherAI lm-evaluation-harness adapter: evaluate a moelab model (or an HF checkpoint loaded by
moelab) on any harness task whose data you have locally.

    import lm_eval
    from moelab.eval.harness import MoelabLM
    lm_eval.simple_evaluate(model=MoelabLM.from_path("runs/tiny"), tasks=["hellaswag"])

or, from the harness's command line, ``lm_eval --model moelab --model_args path=runs/tiny ...``
after ``import moelab.eval.harness`` registers it (``--include_path`` / a plugin import). ``lm_eval``
is an optional dependency, imported when this module is.

The three request types map onto moelab's scoring: ``loglikelihood`` is
:func:`moelab.eval.choice.loglikelihoods` (context and continuation tokenised apart, the context cut
from the left), ``loglikelihood_rolling`` is :func:`moelab.eval.lm.document_nll` without the eos,
and ``generate_until`` is the batched engine, greedy, with the request's stop strings.
"""

from __future__ import annotations

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("moelab.eval.harness needs lm-evaluation-harness: pip install lm_eval") from e

from moelab.data.corpus import Document
from moelab.eval.choice import loglikelihoods
from moelab.eval.lm import document_nll


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
        return [-_rolling(self.model, self.tok, [Document(r.args[0], "text", "0")], self.max_length, self.batch_size)
                for r in requests]

    def generate_until(self, requests) -> list[str]:
        from moelab.engine import generate_batch

        out = []
        for r in requests:
            context, kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            res = generate_batch(self.model, [context], max_new_tokens=int(kwargs.get("max_gen_toks", 64)),
                                 tokenizer=self.tok, temperature=0.0, stop_strings=until)
            out.append(res[0].text)
        return out


def _rolling(model, tok, docs, max_len, batch_size) -> float:
    """Summed NLL of the text alone (no eos appended), windows of ``max_len`` tokens."""
    class _NoEos:
        def __init__(self, t):
            self.t = t
            self.eos_id = None

        def encode(self, s):
            return self.t.encode(s)

    rows = document_nll(model, _NoEos(tok), docs, max_len, batch_size=batch_size)
    return sum(r[1] for r in rows)
