"""Evaluations: loss and perplexity per domain with bootstrap intervals, zero-shot multiple choice
(lm-evaluation-harness style, with an adapter for the harness itself in ``moelab.eval.harness``),
and the Mixtral paper's long-context claims (§3): passkey retrieval and perplexity against context
length. The model code never imports this package."""

from moelab.eval.choice import eval_choice
from moelab.eval.context import eval_context
from moelab.eval.lm import eval_lm
from moelab.eval.passkey import PasskeyPrompt, make_prompt, make_prompts, score_continuation
from moelab.eval.passkey_eval import eval_passkey, evaluate_passkey, quick_passkey

__all__ = ["PasskeyPrompt", "eval_choice", "eval_context", "eval_lm", "eval_passkey", "evaluate_passkey", "make_prompt", "make_prompts",
           "quick_passkey", "score_continuation"]
