"""Load-balancing losses as pure functions, their assembly by coefficient, and the bias balancer.

Every loss function is unscaled (the coefficient is applied by :func:`add_aux_losses`) and takes
plain tensors. Counts (f terms) carry no gradient; the mean-probability (P) terms do.

Shape legend: T tokens, E experts, A assignments, B sequences, S positions per sequence, G groups.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from moelab.config import RouterConfig
from moelab.moe.routing import Routing, TokenLayout, count_ids


class _Statistics:
    """Where the count (f) terms of the batch-wide losses come from. By default the local batch;
    under data parallelism :func:`global_statistics` sums them over every rank's micro-batch, so each
    rank's loss uses the global batch's f and the mean of the ranks' losses (what data-parallel
    gradient averaging optimises) equals the single-process loss of the global batch."""

    group = None  # a torch.distributed process group, or None: local statistics
    local_depth = 0  # > 0 inside per-sequence losses, whose statistics are per sequence by definition


@contextmanager
def global_statistics(group):
    previous, _Statistics.group = _Statistics.group, group
    try:
        yield
    finally:
        _Statistics.group = previous


def _summed(*values):
    """The values summed over the statistics group's ranks, as detached tensors; without a group (or
    inside a per-sequence loss) the values themselves, unchanged (python numbers stay numbers, so a
    compiled graph with dynamic shapes is not specialised on them)."""
    if _Statistics.group is None or _Statistics.local_depth:
        return values
    import torch.distributed as dist

    device = next((v.device for v in values if torch.is_tensor(v)), None)  # the data's: NCCL moves CUDA tensors
    out = [torch.as_tensor(v, dtype=torch.float32, device=device).detach().clone() for v in values]
    sizes = [t.numel() for t in out]
    buf = torch.cat([t.reshape(-1) for t in out])
    dist.all_reduce(buf, group=_Statistics.group)
    return [chunk.view_as(t) for chunk, t in zip(buf.split(sizes), out)]


def _at_least_1(x):
    return x.clamp_min(1) if torch.is_tensor(x) else max(x, 1)


def expert_counts(expert_idx_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, counting every one of a token's K slots: (E,) float."""
    return count_ids(expert_idx_A, num_experts).float()


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, population variance / mean^2 (0 when all equal)."""
    x_E = x_E.float()
    return x_E.var(unbiased=False) / x_E.mean().pow(2).clamp_min(1e-12)


def switch_load_balance_loss(probs_TE: torch.Tensor, expert_idx_A: torch.Tensor) -> torch.Tensor:
    """Switch Transformer eq. 4-6: E * sum_i f_i * P_i, unscaled (multiply by alpha outside).

    f_i: fraction of the A = T*K assignments that went to expert i (sums to 1; for K = 1 this is
    exactly Switch's fraction of tokens). P_i: mean router probability of expert i. At perfectly
    uniform routing f = P = 1/E and the loss is exactly 1, so alpha * loss = alpha. Only P carries
    a gradient. (HF's ``load_balancing_loss_func`` sums over K instead and equals K at balance.)
    """
    num_experts = probs_TE.shape[-1]
    counts_E, A = _summed(expert_counts(expert_idx_A, num_experts), expert_idx_A.numel())
    f_E = counts_E / _at_least_1(A)
    P_E = probs_TE.float().mean(dim=0)
    return num_experts * torch.sum(f_E.detach() * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE §3: (1/T) sum_t (log sum_j exp(logit_tj))^2, penalising large router logits."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


def importance_loss(weight_A: torch.Tensor, expert_idx_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Shazeer et al. 2017 §4: CV(Importance)^2, Importance_i = sum over tokens of gate G(x)_i.
    Minimum 0 when every expert receives the same total gate mass."""
    importance_E = torch.zeros(num_experts, dtype=torch.float32, device=weight_A.device)
    importance_E = importance_E.index_add(0, expert_idx_A, weight_A.float())
    return cv_squared(importance_E)


def noisy_load_loss(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor,
                    top_k: int) -> torch.Tensor:
    """Shazeer et al. 2017 Appendix A smooth load: CV(Load)^2 with Load_i = sum_x P(x, i),
    P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i), the probability that expert i
    stays in the top k when only its own noise is redrawn. kth_excluding is the k-th largest of H
    without i: the (k+1)-th largest of H when i is in the top k, else the k-th largest.
    With k = E every expert is always selected: the load is constant and the loss is 0."""
    E = noisy_TE.shape[-1]
    if top_k >= E:
        return clean_TE.new_zeros(())
    top_TK1 = noisy_TE.topk(top_k + 1, dim=-1).values  # (T, k+1)
    kth_in_T1, kth_out_T1 = top_TK1[:, top_k:top_k + 1], top_TK1[:, top_k - 1:top_k]
    in_topk_TE = noisy_TE > kth_in_T1  # i is one of the k largest
    threshold_TE = torch.where(in_topk_TE, kth_in_T1, kth_out_T1)
    prob_TE = torch.special.ndtr((clean_TE - threshold_TE) / noise_std_TE)  # Phi, standard normal CDF
    return cv_squared(prob_TE.sum(dim=0))


def entropy_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """Huang et al. 2024 dynamic loss: mean over tokens of -sum_i P_i log P_i (0 at one-hot P,
    log E at uniform P). Minimising it sharpens P so top-p keeps few experts."""
    p = probs_TE.float()
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()


def expert_balance_loss(probs_TE: torch.Tensor, expert_idx_A: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeekMoE eq. 12-14 (DeepSeek-V2 eq. 23-25): sum_i f_i P_i with f_i = E/(K T) * count_i
    (1 for every expert at uniform routing) and P_i = (1/T) sum_t s_{i,t}; equals 1 at balance.
    With A = T*K assignments this is exactly the Switch loss."""
    T, E = probs_TE.shape
    counts_E, T_all = _summed(expert_counts(expert_idx_A, E), T)
    f_E = counts_E * (E / (top_k * _at_least_1(T_all)))
    return torch.sum(f_E.detach() * probs_TE.float().mean(dim=0))


def _group_sums(x_E: torch.Tensor, num_groups: int) -> torch.Tensor:
    return x_E.view(*x_E.shape[:-1], num_groups, x_E.shape[-1] // num_groups).sum(dim=-1)


def device_balance_loss(probs_TE: torch.Tensor, expert_idx_A: torch.Tensor, top_k: int,
                        num_groups: int) -> torch.Tensor:
    """DeepSeekMoE eq. 15-17: experts split into D contiguous groups (devices);
    sum_d f'_d P'_d with f'_d = mean_{j in d} f_j (f as in :func:`expert_balance_loss`) and
    P'_d = sum_{j in d} P_j. Equals 1 at balance."""
    T, E = probs_TE.shape
    counts_E, T_all = _summed(expert_counts(expert_idx_A, E), T)
    f_E = counts_E * (E / (top_k * _at_least_1(T_all)))
    f_G = _group_sums(f_E, num_groups) / (E // num_groups)
    P_G = _group_sums(probs_TE.float().mean(dim=0), num_groups)
    return torch.sum(f_G.detach() * P_G)


def comm_balance_loss(probs_TE: torch.Tensor, token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor,
                      num_groups: int, groups_per_token: int) -> torch.Tensor:
    """DeepSeek-V2 eq. 29-31: sum_d f''_d P''_d with f''_d = D/(M T) * (tokens sent to device d,
    each token counted once per device) and P''_d = sum_{j in d} P_j. Equals 1 when every device
    receives M*T/D tokens and P is uniform."""
    T, E = probs_TE.shape
    group_A = expert_idx_A // (E // num_groups)
    sent_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=probs_TE.device)
    sent_TG[token_idx_A, group_A] = True
    sent_G, T_all = _summed(sent_TG.float().sum(dim=0), T)
    f_G = sent_G * (num_groups / (groups_per_token * _at_least_1(T_all)))
    P_G = _group_sums(probs_TE.float().mean(dim=0), num_groups)
    return torch.sum(f_G.detach() * P_G)


def sequence_balance_loss(scores_TE: torch.Tensor, token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor,
                          seq_len: int | TokenLayout, top_k: int) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20, averaged over the sequences: per sequence of S tokens,
    sum_i f_i P_i with f_i = E/(K S) * (tokens of the sequence counting i) and P_i the mean of the
    scores normalised over all experts, s'_{i,t} = s_{i,t} / sum_j s_{j,t}. Equals 1 at balance.
    Eq. 18 counts i when s_{i,t} is in Topk(s_t, K), the raw affinities: :func:`add_aux_losses` passes
    :func:`top_k_assignments` of the scores, not the router's selection.
    ``seq_len``: a length (row t belongs to sequence t // seq_len) or a TokenLayout (padded batches:
    S is each sequence's own number of real tokens)."""
    T, E = scores_TE.shape
    layout = TokenLayout.of(seq_len, T, scores_TE.device)
    B = layout.num_seqs
    lens_B = torch.tensor(layout.lens, dtype=torch.float32, device=scores_TE.device).clamp_min(1)
    s = scores_TE.float()
    s = s / s.sum(dim=-1, keepdim=True)
    if len(set(layout.lens)) <= 1 and B * max(layout.lens, default=0) == T:  # equal lengths: a plain mean
        P_BE = s.view(B, -1, E).mean(dim=1)  # (deterministic summation order, as before padding masks)
    else:
        P_BE = torch.zeros(B, E, device=s.device).index_add(0, layout.seq_T, s) / lens_B[:, None]
    seq_expert_A = layout.seq_T[token_idx_A] * E + expert_idx_A
    counts_BE = count_ids(seq_expert_A, B * E).view(B, E).float()
    f_BE = counts_BE * (E / top_k) / lens_B[:, None]
    return (f_BE.detach() * P_BE).sum(dim=-1).mean()


def top_k_assignments(scores_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_idx_A, expert_idx_A) of each token's top-K scores, A = T*K, with no bias and no group limit."""
    T = scores_TE.shape[0]
    expert_idx_TK = scores_TE.detach().topk(top_k, dim=-1).indices
    return torch.arange(T, device=scores_TE.device).repeat_interleave(top_k), expert_idx_TK.reshape(-1)


def per_sequence(loss_fn, probs_TE: torch.Tensor, token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor,
                 seq_len: int | TokenLayout) -> torch.Tensor:
    """Mean over the sequences of ``loss_fn(probs_SE, token_idx, expert_idx)`` evaluated on each
    sequence's own tokens and assignments (tokens ordered sequence-major; ``seq_len`` a length or a
    TokenLayout)."""
    layout = TokenLayout.of(seq_len, probs_TE.shape[0], probs_TE.device)
    seq_A = layout.seq_T[token_idx_A]
    losses, start = [], 0
    _Statistics.local_depth += 1  # a sequence's own statistics, never summed over ranks
    try:
        for b, n in enumerate(layout.lens):
            if n:
                mine_A = seq_A == b
                losses.append(loss_fn(probs_TE[start:start + n], token_idx_A[mine_A] - start, expert_idx_A[mine_A]))
            start += n
    finally:
        _Statistics.local_depth -= 1
    return torch.stack(losses).mean() if losses else probs_TE.sum() * 0.0  # no sequence has a routed token


def devices_per_token(cfg: RouterConfig, devices: int) -> int:
    """The most devices (of ``devices`` holding contiguous, equal expert ranges) one token's experts
    can span: group-limited routing keeps ``topk_groups`` of ``n_group`` groups, and a group covers
    ``devices / n_group`` devices when groups are larger than devices."""
    K = cfg.top_k
    if cfg.n_group <= 1:
        return min(K, devices)
    if cfg.n_group >= devices:
        return min(cfg.topk_groups, devices, K)
    return min(cfg.topk_groups * (devices // cfg.n_group), devices, K)


def add_aux_losses(cfg: RouterConfig, routing: Routing, seq_len: int | TokenLayout,
                   devices: int | None = None) -> None:
    """Every balance loss whose coefficient is > 0 (``cfg.loss_coefs()``: set, or the router family's
    default), times that coefficient, into ``routing.aux_losses`` under its own name. Losses a router already put there are kept.
    Computed on the router's choices before any capacity dropping (as Switch does).

    ``devices``: the real number of expert-parallel ranks holding the experts (contiguous ranges);
    DeepSeek's device-level and communication losses then count those devices instead of the
    config's ``n_group`` groups."""
    E, K = routing.num_experts, cfg.top_k
    D, M = (cfg.n_group, cfg.topk_groups) if devices is None else (devices, devices_per_token(cfg, devices))
    # no routed token (an MTP depth past every row's real tokens): every loss is 0, not a mean over nothing (NaN)
    empty = routing.num_tokens == 0
    coefs = cfg.loss_coefs()  # explicit values, else the router family's paper defaults

    def scoped(loss_fn):  # (probs_TE, token_idx_A, expert_idx_A) -> loss, over the batch or per sequence
        if cfg.effective_balance_scope == "sequence":
            return per_sequence(loss_fn, routing.probs_TE, routing.token_idx_A, routing.expert_idx_A, seq_len)
        return loss_fn(routing.probs_TE, routing.token_idx_A, routing.expert_idx_A)

    losses = {
        "load_balance": (coefs["load_balance"],
                         lambda: switch_load_balance_loss(routing.probs_TE, routing.expert_idx_A)),
        "z_loss": (coefs["z_loss"], lambda: router_z_loss(routing.logits_TE)),
        "importance": (coefs["importance"], lambda: importance_loss(routing.weight_A, routing.expert_idx_A, E)),
        "entropy": (coefs["entropy"], lambda: entropy_loss(routing.probs_TE)),
        "expert_balance": (coefs["expert_balance"], lambda: scoped(
            lambda p, t, e: expert_balance_loss(p, e, K))),
        "device_balance": (coefs["device_balance"], lambda: scoped(
            lambda p, t, e: device_balance_loss(p, e, K, D))),
        "comm_balance": (coefs["comm_balance"], lambda: scoped(
            lambda p, t, e: comm_balance_loss(p, t, e, D, M))),
        # f counts Topk(s, K) of the affinities (V3 eq. 18; Megatron's compute_routing_scores_for_aux_loss), not
        # the selection, which the bias b and the group limit move; probs_TE orders the experts as s does
        "seq_balance": (coefs["seq_balance"], lambda: sequence_balance_loss(
            routing.probs_TE, *top_k_assignments(routing.probs_TE, K), seq_len, K)),
    }
    for name, (coef, fn) in losses.items():
        if coef > 0 and name not in routing.aux_losses:
            routing.aux_losses[name] = routing.logits_TE.sum() * 0.0 if empty else coef * fn()
