"""`moelab eval passkey`: retrieval accuracy of a model by prompt length and key depth.

For every (length, depth) cell ``trials`` prompts with random keys (:mod:`moelab.eval.passkey`) are
decoded greedily in one batch, ``answer_budget`` new tokens each, and scored by exact match of the digits.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from moelab.errors import ConfigError, MoelabError
from moelab.eval.passkey import DIGITS, answer_budget, make_prompts, min_length, prompt_pieces, score_continuation

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_grid(lengths: list[int] | None, depths: list[float], trials: int, max_seq_len: int, shortest: int,
               new_tokens: int) -> list[int]:
    """Validated lengths (default: four lengths up to the longest that fits); errors name the flag."""
    limit = max_seq_len - new_tokens  # the answer is decoded inside the model's context
    if limit < shortest:
        raise ConfigError("model.max_seq_len", max_seq_len, f"too short for a passkey prompt ({shortest} tokens) "
                                                            f"plus the {new_tokens} tokens of the answer")
    if lengths is None:
        lengths = sorted({max(shortest, limit // 8), max(shortest, limit // 4), max(shortest, limit // 2), limit})
    if not lengths:
        raise ConfigError("--lengths", "", "give at least one prompt length in tokens, e.g. --lengths 256,512")
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ConfigError("--lengths", too_long, f"longer than the model allows: max_seq_len={max_seq_len} minus "
                                                 f"{new_tokens} answer tokens = {limit}; give lengths <= {limit}")
    too_short = [n for n in lengths if n < shortest]
    if too_short:
        raise ConfigError("--lengths", too_short, f"shorter than the prompt without filler ({shortest} tokens of "
                                                  "this tokenizer); give lengths >= " + str(shortest))
    if not depths:
        raise ConfigError("--depths", "", "give at least one depth in [0, 1], e.g. --depths 0,0.5,1")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError("--depths", bad, "a depth is a fraction of the context: give values in [0, 1]")
    if trials <= 0:
        raise ConfigError("--trials", trials, "must be a positive number of prompts per cell")
    return sorted(set(lengths))


@torch.no_grad()
def evaluate_passkey(model, tokenizer, lengths: list[int] | None = None, depths: list[float] = DEPTHS,
                     trials: int = 10, seed: int = 0, digits: int = DIGITS, intro: bool = False,
                     batch_size: int = 16, progress: bool = False) -> dict:
    """Accuracy grid ``accuracy[depth][length]`` plus margins and a few examples; deterministic in ``seed``."""
    from tqdm.auto import tqdm

    from moelab.inference.generate import generate_ids

    pieces = prompt_pieces(tokenizer, intro=intro)
    new_tokens = answer_budget(digits)
    depths = sorted(set(float(d) for d in depths))
    lengths = check_grid(lengths, depths, trials, model.config.max_seq_len, min_length(pieces, digits), new_tokens)
    device = next(model.parameters()).device
    correct = [[0] * len(lengths) for _ in depths]
    examples = []
    model.eval()
    with tqdm(total=len(lengths) * len(depths) * trials, desc="passkey", unit="prompt", disable=not progress,
              dynamic_ncols=True) as bar:
        for j, L in enumerate(lengths):
            for i, d in enumerate(depths):
                prompts = make_prompts(tokenizer, L, d, trials, seed, digits, pieces)
                for s in range(0, trials, batch_size):
                    chunk = prompts[s:s + batch_size]
                    ids = torch.tensor([p.ids for p in chunk], device=device)
                    out = generate_ids(model, ids, new_tokens)[:, L:].tolist()
                    for p, cont in zip(chunk, out):
                        text = tokenizer.decode(cont)
                        ok = score_continuation(text, p.key)
                        correct[i][j] += ok
                        if s == 0 and p is chunk[0]:
                            examples.append({"length": L, "depth": d, "key": p.key, "key_index": p.key_index,
                                             "continuation": text, "correct": ok})
                    bar.update(len(chunk))
    acc = [[c / trials for c in row] for row in correct]
    return {"lengths": lengths, "depths": depths, "trials": trials, "correct": correct, "accuracy": acc,
            "by_length": [sum(correct[i][j] for i in range(len(depths))) / (trials * len(depths))
                          for j in range(len(lengths))],
            "by_depth": [sum(row) / (trials * len(lengths)) for row in correct],
            "overall": sum(map(sum, correct)) / (trials * len(lengths) * len(depths)),
            "new_tokens": new_tokens, "digits": digits, "intro": intro, "examples": examples}


def _result(source: str, grid: dict, seed: int, t0: float) -> dict:
    return {"source": source, "seed": seed, "trials": grid["trials"], "digits": grid["digits"],
            "new_tokens": grid["new_tokens"], "intro": grid["intro"],
            "grid": {k: grid[k] for k in ("lengths", "depths", "correct", "accuracy", "by_length", "by_depth",
                                          "overall")},
            "examples": grid["examples"], "seconds": time.perf_counter() - t0}


def eval_passkey(source: str | Path, out: str | Path, lengths: list[int] | None = None,
                 depths: list[float] = DEPTHS, trials: int = 10, seed: int = 0, digits: int = DIGITS,
                 intro: bool = False, batch_size: int = 16, progress: bool = True) -> dict:
    """Evaluate a saved model (moelab run / checkpoint / model directory, or an HF directory)."""
    from moelab.eval.report import write_passkey_report
    from moelab.loading import load, load_tokenizer

    t0 = time.perf_counter()
    model = load(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    grid = evaluate_passkey(model, tokenizer, lengths, depths, trials, seed, digits, intro, batch_size, progress)
    result = _result(str(source), grid, seed, t0)
    write_passkey_report(Path(out), result)
    return result


def quick_passkey(out: str | Path, lengths: list[int] | None = None, depths: list[float] = DEPTHS,
                  trials: int = 10, seed: int = 0, steps: int = 800, batch_size: int = 32,
                  progress: bool = True) -> dict:
    """Train the quick model on the task (:mod:`moelab.eval.quick`), evaluate it untrained and trained,
    save it to ``out/model`` (re-evaluate with ``moelab eval passkey OUT/model``) and write the report."""
    from moelab.checkpoint.atomic import prepare_output_dir
    from moelab.checkpoint.model_files import save_model
    from moelab.eval.quick import TRAIN_LENGTHS, quick_config, quick_tokenizer, train_passkey
    from moelab.eval.report import write_passkey_report
    from moelab.model import build_model
    from moelab.params import count_params

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (out / "model").exists():
        raise MoelabError(f"{out}/model already exists; choose another --out")
    if steps <= 0:
        raise ConfigError("--steps", steps, "must be a positive number of training steps")
    prepare_output_dir(out)  # new or moelab's (moelab.checkpoint.atomic), before out/model is written
    tokenizer = quick_tokenizer()
    cfg = quick_config(tokenizer.vocab_size)
    lengths = lengths or [64, 128, 192, cfg.max_seq_len - 7]
    torch.manual_seed(seed)
    model = build_model(cfg)
    untrained = evaluate_passkey(model, tokenizer, lengths, depths, trials, seed, progress=False)
    train = train_passkey(model, tokenizer, steps, batch_size, seed=seed, progress=progress)
    grid = evaluate_passkey(model, tokenizer, lengths, depths, trials, seed, progress=progress)
    save_model(model, out / "model")
    tokenizer.save(out / "model")
    result = _result(str(out / "model"), grid, seed, t0)
    result["untrained"] = {k: untrained[k] for k in ("lengths", "depths", "correct", "accuracy", "by_length",
                                                      "by_depth", "overall")}
    result["quick"] = {**train, "train_lengths": list(TRAIN_LENGTHS), "params": count_params(cfg).total_params,
                       "config": cfg.to_dict()}
    write_passkey_report(out, result)
    return result
