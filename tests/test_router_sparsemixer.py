"""SparseMixer router (Phi-3.5-MoE): eval-mode picks and gates against a hand-written reference,
and the training-mode gate values and gradient path."""

from __future__ import annotations

import torch

from moelab.config import RouterConfig
from moelab.moe.routers import build_router


def _reference(logits: torch.Tensor, eps: float) -> tuple[list[list[int]], list[list[float]]]:
    """Per token: pick the best remaining expert; its gate is its softmax over the remaining experts
    whose logit l satisfies (best - l) / max(|l|, best) <= 2 eps."""
    picks, gates = [], []
    for row in logits.tolist():
        left, p_row, g_row = set(range(len(row))), [], []
        for _ in range(2):
            best = max(row[i] for i in left)
            keep = [i for i in left if (best - row[i]) / max(abs(row[i]), best) <= 2 * eps]
            top = max(keep, key=lambda i: row[i])
            z = sum(torch.tensor(row[i]).exp().item() for i in keep)
            p_row.append(top)
            g_row.append(torch.tensor(row[top]).exp().item() / z)
            left.remove(top)
        picks.append(p_row)
        gates.append(g_row)
    return picks, gates


def test_eval_matches_reference():
    torch.manual_seed(0)
    router = build_router(RouterConfig(type="sparsemixer", top_k=2, sparsemixer_eps=0.2), 16, 6).eval()
    torch.nn.init.normal_(router.weight, 0.0, 0.5)
    x = torch.randn(40, 16)
    routing = router(x)
    picks, gates = _reference(router.logits(x), 0.2)
    assert routing.expert_idx_A.view(40, 2).tolist() == picks
    torch.testing.assert_close(routing.weight_A.view(40, 2), torch.tensor(gates), rtol=1e-5, atol=1e-6)
    # with eps = 0.2 some second picks see more than one survivor, some first picks see exactly one
    assert (routing.weight_A.view(40, 2)[:, 0] == 1.0).any() and (routing.weight_A.view(40, 2) < 1.0).any()


def test_training_gates_and_gradient():
    torch.manual_seed(0)
    router = build_router(RouterConfig(type="sparsemixer", top_k=2, sparsemixer_eps=0.5), 8, 4).train()
    torch.nn.init.normal_(router.weight, 0.0, 0.5)
    routing = router(torch.randn(64, 8))
    idx = routing.expert_idx_A.view(64, 2)
    assert (idx[:, 0] != idx[:, 1]).all()  # two different experts per token
    routing.weight_A.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
