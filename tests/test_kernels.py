"""The fast expert kernels equal the slow reference loop, forward and gradients."""

import pytest
import torch

from moelab.moe.experts import StackedExperts, reference_moe
from moelab.moe.kernels import act_and_grad


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_activation_derivatives(name):
    from moelab.layers.norm import activation_fn

    g = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    a = activation_fn(name)(g)
    (d,) = torch.autograd.grad(a.sum(), g)
    a2, d2 = act_and_grad(name, g.detach())
    torch.testing.assert_close(a2, a.detach())
    torch.testing.assert_close(d2, d)


def _case(E, K, T, D=12, F=12, act="silu", seed=0):
    torch.manual_seed(seed)
    ex = StackedExperts(E, D, F, act)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(T, D)
    # random top-K routing with some experts left empty
    logits = torch.randn(T, E)
    if E > 2:
        logits[:, -1] -= 100.0  # the last expert never chosen (unless K = E)
    w, idx = logits.softmax(-1).topk(K, dim=-1)
    return ex, x, torch.arange(T).repeat_interleave(K), idx.reshape(-1), w.reshape(-1)


def _run(ex, x, tok, exp, w):
    order = torch.argsort(exp, stable=True)
    counts = torch.bincount(exp, minlength=ex.num_experts).tolist()
    y = ex(x[tok[order]], counts) * w[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, tok[order], y)


@pytest.mark.parametrize("impl", ["sorted", "grouped", "loop"])
@pytest.mark.parametrize("E,K,T,act", [(4, 2, 9, "silu"), (6, 6, 5, "gelu"), (64, 8, 40, "silu"),
                                       (256, 8, 30, "gelu_tanh"), (3, 1, 2, "silu")])
def test_fast_paths_equal_reference_forward_and_grads(impl, E, K, T, act):
    ex, x, tok, exp, w = _case(E, K, T, act=act)
    ex.impl = impl
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    out = _run(ex, xa, tok, exp, w)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [xa, *ex.parameters()])
    ref = reference_moe(ex, xb, tok, exp, w)
    grads_ref = torch.autograd.grad((ref * g).sum(), [xb, *ex.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if E > 2 and K < E:  # an empty expert gets exactly zero gradient
        assert torch.count_nonzero(grads[1][-1]) == 0


def test_bf16_sorted_path_matches_fp32():
    ex, x, tok, exp, w = _case(8, 2, 16)
    ref = _run(ex, x, tok, exp, w)
    out = _run(ex.to(torch.bfloat16), x.bfloat16(), tok, exp, w).float()
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("aoe", [False, True])
def test_decode_path_equals_batch_path(aoe):
    from moelab.config import AoEConfig, AttentionConfig, ModelConfig, MoEConfig, RouterConfig
    from moelab.moe import dispatch
    from moelab.moe.layer import MoELayer

    cfg = ModelConfig(vocab_size=16, d_model=16, num_layers=1, attention=AttentionConfig(num_heads=4),
                      moe=MoEConfig(num_experts=6, expert_ffn_dim=12, num_shared_experts=1,
                                    aoe=AoEConfig(d_low=4) if aoe else None, router=RouterConfig(top_k=2)))
    torch.manual_seed(0)
    layer = MoELayer(cfg).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    for T in (1, 3, 8):
        x = torch.randn(1, T, 16)
        with torch.no_grad():
            fast = layer(x)[0]
            old = dispatch.DECODE_MAX_ASSIGNMENTS
            dispatch.DECODE_MAX_ASSIGNMENTS = -1
            try:
                batch = layer(x)[0]
            finally:
                dispatch.DECODE_MAX_ASSIGNMENTS = old
        torch.testing.assert_close(fast, batch, rtol=1e-5, atol=1e-6)
