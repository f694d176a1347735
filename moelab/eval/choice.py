"""Zero-shot multiple choice in the lm-evaluation-harness style (`moelab eval choice`).

A task file is JSONL, one question per line:
``{"task": "name", "context": "...", "choices": ["...", ...], "answer": 0}``.
Each choice is scored by the log-likelihood of its tokens after the context's, ``ll_i``; the
prediction is argmax ``ll_i`` (``acc``) and argmax ``ll_i / len(choice_i)`` with the length in
characters (``acc_norm``, the harness's length normalisation). Accuracy is a mean of 0/1 outcomes;
its standard error is the sample standard deviation / sqrt(n) (the harness's ``mean_stderr``).

Built-in tasks (``--tasks builtin``), generated offline from the built-in corpus's validation split
with a seed: ``math-answer`` (the answer line of a math question among the answers of other
questions) and ``code-next-line`` (the next line of a program among lines of other programs).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moelab.errors import DataError


@dataclass
class Question:
    task: str
    context: str
    choices: list[str]
    answer: int


def load_tasks(path: str | Path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such task file (JSONL with task, context, choices, answer)")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e})") from e
        missing = [k for k in ("context", "choices", "answer") if k not in r]
        if missing:
            raise DataError(f"{path}:{i}: missing {', '.join(missing)}")
        if not isinstance(r["choices"], list) or len(r["choices"]) < 2 or not all(isinstance(c, str) and c
                                                                               for c in r["choices"]):
            raise DataError(f"{path}:{i}: choices must be a list of at least 2 non-empty strings")
        if not isinstance(r["answer"], int) or not 0 <= r["answer"] < len(r["choices"]):
            raise DataError(f"{path}:{i}: answer must be the index of the right choice (0..{len(r['choices']) - 1})")
        out.append(Question(str(r.get("task", path.stem)), str(r["context"]), list(r["choices"]), r["answer"]))
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def builtin_tasks(n_per_task: int = 100, seed: int = 0) -> list[Question]:
    from moelab.data import load_corpus

    corpus = load_corpus("builtin", seed=0)
    rng = random.Random(seed)
    out: list[Question] = []
    pairs = []  # (question, answer) lines of the math documents
    for d in corpus.val:
        if d.domain == "math":
            lines = [x for x in d.text.split("\n") if x.strip()]
            pairs += [(lines[i], lines[i + 1]) for i in range(0, len(lines) - 1, 2)]
    rng.shuffle(pairs)
    answers = sorted({a for _, a in pairs})
    for q, a in pairs:
        wrong = [x for x in answers if x != a]
        if len(wrong) < 3:
            continue
        choices = [a, *rng.sample(wrong, 3)]
        rng.shuffle(choices)
        out.append(Question("math-answer", q + "\n", choices, choices.index(a)))
        if sum(x.task == "math-answer" for x in out) >= n_per_task:
            break
    code = [[x for x in d.text.split("\n") if x.strip()] for d in corpus.val if d.domain == "code"]
    code = [c for c in code if len(c) >= 4]
    pool = [(i, line) for i, c in enumerate(code) for line in c if len(line.strip()) > 8]
    made = 0
    while made < n_per_task and code:
        i = rng.randrange(len(code))
        lines = code[i]
        k = rng.randrange(2, len(lines))
        right = lines[k]
        wrong = list({line for j, line in pool if j != i and line != right and line.strip() != right.strip()})
        if len(right.strip()) <= 8 or len(wrong) < 3:
            continue
        choices = [right, *rng.sample(sorted(wrong), 3)]
        rng.shuffle(choices)
        out.append(Question("code-next-line", "\n".join(lines[:k]) + "\n", choices, choices.index(right)))
        made += 1
    if not out:
        raise DataError("the built-in corpus gave no multiple-choice questions")
    return out


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], max_len: int, batch_size: int = 16,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether it is the greedy continuation) per request; context
    and continuation are tokenised apart, an empty context is the eos token (the harness's prefix
    token), and the context is cut from the left to fit ``max_len``."""
    pairs = []
    for ctx, cont in requests:
        c_ids, x_ids = tokenizer.encode(ctx), tokenizer.encode(cont)
        if not x_ids:
            raise DataError(f"continuation {cont!r} has no tokens")
        if not c_ids:
            c_ids = [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
        pairs.append((c_ids, x_ids))
    return score_tokens(model, pairs, max_len, batch_size, progress)


@torch.no_grad()
def score_tokens(model, pairs: list[tuple[list[int], list[int]]], max_len: int, batch_size: int = 16,
                 progress: bool = False) -> list[tuple[float, bool]]:
    """Token-level scoring: (sum of log p of the continuation ids after the context ids, greedy?);
    the context (at least one id) is cut from the left so the whole continuation fits ``max_len``."""
    encoded = []
    for c_ids, x_ids in pairs:
        if not c_ids:
            raise DataError("a continuation needs at least one context token")
        x_ids = x_ids[-max_len:]
        ids = (c_ids + x_ids)[-max_len - 1:]  # +1: the last token is only a target
        encoded.append((ids, len(x_ids)))
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(encoded), desc="score", unit="choice")
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        L = max(len(encoded[i][0]) for i in idx) - 1
        inp = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):  # left-padded: the continuation ends every row
            ids = encoded[i][0][:-1]
            inp[r, L - len(ids):] = torch.tensor(ids)
            mask[r, L - len(ids):] = 1
        logits = model(inp, attention_mask=None if bool(mask.all()) else mask).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        for r, i in enumerate(idx):
            ids, n_cont = encoded[i]
            target = torch.tensor(ids[-n_cont:])
            lp = logp[r, L - n_cont:]
            results[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def mean_stderr(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def evaluate_choices(model, tokenizer, questions: list[Question], max_len: int, progress: bool = False) -> dict:
    reqs = [(q.context, c) for q in questions for c in q.choices]
    lls = loglikelihoods(model, tokenizer, reqs, max_len, progress=progress)
    k = 0
    per_task: dict[str, dict[str, list[float]]] = {}
    for q in questions:
        ll = [lls[k + j][0] for j in range(len(q.choices))]
        k += len(q.choices)
        norm = [v / len(c) for v, c in zip(ll, q.choices)]
        t = per_task.setdefault(q.task, {"acc": [], "acc_norm": [], "chance": []})
        t["acc"].append(float(max(range(len(ll)), key=ll.__getitem__) == q.answer))
        t["acc_norm"].append(float(max(range(len(norm)), key=norm.__getitem__) == q.answer))
        t["chance"].append(1 / len(q.choices))
    out = {}
    for task, t in per_task.items():
        out[task] = {"n": len(t["acc"]), "acc": sum(t["acc"]) / len(t["acc"]), "acc_stderr": mean_stderr(t["acc"]),
                     "acc_norm": sum(t["acc_norm"]) / len(t["acc_norm"]),
                     "acc_norm_stderr": mean_stderr(t["acc_norm"]), "chance": sum(t["chance"]) / len(t["chance"])}
    return out


def eval_choice(source: str, out: str | None, tasks: str = "builtin", n_per_task: int = 100, seed: int = 0,
                max_len: int | None = None, progress: bool = True) -> dict:
    """`moelab eval choice`: accuracy (raw and length-normalised) with standard errors per task."""
    from moelab.loading import load, load_tokenizer

    model, tok = load(source), load_tokenizer(source)
    questions = builtin_tasks(n_per_task, seed) if tasks == "builtin" else load_tasks(tasks)
    result = {"source": str(source), "tasks_source": tasks, "seed": seed,
              "tasks": evaluate_choices(model, tok, questions, max_len or model.config.max_seq_len, progress=progress)}
    if out:
        from moelab.eval.report import write_choice_report

        write_choice_report(Path(out), result)
    return result
