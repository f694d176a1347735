"""`moelab eval passkey --quick`: a tiny moelab MoE trained briefly on the passkey task itself, evaluated
before and after, to show the task and the metric are right (an untrained model scores ~0, a trained
one retrieves at the lengths it was trained on).

Training prompts come from the same generator as the evaluation (:func:`moelab.eval.passkey.make_prompt`)
at random lengths in ``train_lengths``, random depths and random keys, followed by the answer. The loss is
on the tokens that copy the key and the token that ends each copy (its second occurrence in the needle
and the answer): the first occurrence is random and unpredictable, and the filler teaches nothing about
retrieval.
"""

from __future__ import annotations

import random
import time

import torch

from moelab.config import AttentionConfig, ModelConfig, MoEConfig, RouterConfig
from moelab.eval.passkey import FILLER, INTRO, NEEDLE, QUESTION, PromptPieces, make_prompt, prompt_pieces, random_key

QUICK_VOCAB = 384
ANSWER_END = "."  # appended to the answer in training only
TRAIN_LENGTHS = (40, 128)


def quick_tokenizer():
    """A byte-level BPE trained on the prompt's own sentences (digits are never merged: the texts have none)."""
    from moelab.data import train_tokenizer

    text = INTRO + FILLER * 2 + "".join(NEEDLE) + QUESTION
    return train_tokenizer([text] * 64, QUICK_VOCAB)


def quick_config(vocab_size: int) -> ModelConfig:
    """3 layers, d_model 64, 4 experts top-2: about 10 s per hundred steps on one CPU core. Two layers
    learn to copy the digits but retrieve unreliably after 800 steps (0.4-1.0 at 64 tokens over seeds
    0-2); three retrieve every 64- and 128-token prompt but one cell (0.8) over the same seeds."""
    return ModelConfig(vocab_size=vocab_size, d_model=64, num_layers=3, max_seq_len=256, dense_ffn_dim=128,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                       moe=MoEConfig(num_experts=4, expert_ffn_dim=64,
                                     router=RouterConfig(top_k=2, load_balance_coef=0.01)))


def passkey_batch(tokenizer, pieces: PromptPieces, rng: random.Random, batch_size: int, length: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), both (B, length + answer + end tokens, right-padded). Each row is a prompt followed by
    the answer and "."; labels are -100 except on the key's second copy in the needle and the token after
    it, and on the answer and its end (so the model learns where the digits stop: " 123456" is wrong)."""
    end = tokenizer.encode(ANSWER_END)
    prompts = [make_prompt(tokenizer, length, rng.random(), random_key(rng), pieces) for _ in range(batch_size)]
    T = max(p.length + len(p.answer_ids) for p in prompts) + len(end)
    ids = torch.zeros(batch_size, T, dtype=torch.long)
    labels = torch.full((batch_size, T), -100, dtype=torch.long)
    for i, p in enumerate(prompts):
        seq = p.ids + p.answer_ids + end
        k = len(p.answer_ids)
        ids[i, :len(seq)] = torch.tensor(seq)
        second = p.needle_end - len(pieces.needle[2]) - k  # the key's second occurrence in the needle
        labels[i, second:second + k + 1] = ids[i, second:second + k + 1]
        labels[i, p.length:len(seq)] = ids[i, p.length:len(seq)]
    return ids, labels


def train_passkey(model, tokenizer, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                  train_lengths: tuple[int, int] = TRAIN_LENGTHS, progress: bool = True) -> dict:
    """AdamW with a short warmup and cosine decay; returns the loss curve and the time taken."""
    from tqdm.auto import tqdm

    from moelab.moe import update_router_biases

    rng = random.Random(f"passkey-train:{seed}")
    pieces = prompt_pieces(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())))
    losses, t0 = [], time.perf_counter()
    model.train()
    with tqdm(total=steps, desc="train passkey", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for _ in range(steps):
            ids, labels = passkey_batch(tokenizer, pieces, rng, batch_size, rng.randint(*train_lengths))
            out = model(ids, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            update_router_biases(model)
            losses.append(float(out.lm_loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "train_lengths": list(train_lengths),
            "lm_loss": losses, "train_seconds": time.perf_counter() - t0}
