"""Communication of expert parallelism per token, against the compute per token, to size clusters.

moelab's all-to-all sends one row of d_model values per (token, routed expert) assignment whose
expert lives on another rank; with E experts spread evenly over P ranks and balanced routing, a
token's K assignments leave its rank with probability 1 - 1/P. Per MoE layer and token:

    dispatch (forward)      K (1 - 1/P) d_model values at ``dispatch_bytes`` each
    combine  (forward)      the same rows back at ``combine_bytes``
    backward                the gradients of both, the same rows again at ``grad_bytes``

Compute per token: 2 FLOPs per active non-embedding parameter forward, 6 for a training step
(forward + backward), attention's quadratic term left out. (DeepSeek-V3 itself sends a token at
most once per node, to at most M = 4 nodes, and forwards inside the node over NVLink; moelab's
all-to-all does not deduplicate, so its figure is the upper end.)
"""

from __future__ import annotations

from moelab.config import ModelConfig


def expert_parallel_traffic(cfg: ModelConfig, ep: int, dispatch_bytes: int = 2, combine_bytes: int = 2,
                            grad_bytes: int = 2) -> dict:
    from moelab.params import count_params

    if cfg.moe is None:
        raise ValueError("expert_parallel_traffic needs an MoE config")
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    K, D = cfg.moe.router.top_k, cfg.d_model
    rows = K * (1 - 1 / ep)  # assignment rows per token and layer that leave the rank
    forward = moe_layers * rows * D * (dispatch_bytes + combine_bytes)
    backward = moe_layers * rows * D * 2 * grad_bytes
    count = count_params(cfg)
    active = count.active_params - count.active_breakdown.get("embeddings", 0)
    return {"ep": ep, "moe_layers": moe_layers, "top_k": K, "d_model": D, "rows_off_rank_per_layer": rows,
            "forward_bytes_per_token": forward, "train_bytes_per_token": forward + backward,
            "active_non_embedding_params": active, "forward_flops_per_token": 2 * active,
            "train_flops_per_token": 6 * active,
            "train_bytes_per_flop": (forward + backward) / (6 * active)}


def bandwidth_needed(traffic: dict, tflops_per_device: float) -> float:
    """Bytes per second each device must move to keep up when it computes ``tflops_per_device``
    (achieved, not peak) of training: tokens/s = FLOP/s / FLOPs per token."""
    tokens_per_s = tflops_per_device * 1e12 / traffic["train_flops_per_token"]
    return tokens_per_s * traffic["train_bytes_per_token"]
