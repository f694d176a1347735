"""Every router, with its paper's losses on, lowers the loss of a small model on a fixed batch."""

import pytest
import torch

from moelab.config import RouterConfig
from moelab.model import build_model
from moelab.moe import update_router_biases
from tests.helpers import small_config

ROUTERS = {
    "topk": dict(type="topk", top_k=2, z_loss_coef=1e-3),
    "switch": dict(type="switch", top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0),
    "noisy_topk": dict(type="noisy_topk", top_k=2, load_balance_coef=0.0, importance_loss_coef=0.1,
                       noisy_load_loss_coef=0.1),
    "expert_choice": dict(type="expert_choice", top_k=2, load_balance_coef=0.0),
    "top_p": dict(type="top_p", top_p=0.6, entropy_loss_coef=1e-4),
    "deepseek_v2": dict(type="deepseek_v2", top_k=2, n_group=2, topk_group=1, load_balance_coef=0.0,
                        expert_balance_coef=0.003, device_balance_coef=0.05, comm_balance_coef=0.02),
    "deepseek_v3": dict(type="deepseek_v3", top_k=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        load_balance_coef=0.0, bias_update_rate=1e-3, seq_balance_coef=1e-4),
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_trains(name):
    torch.manual_seed(0)
    model = build_model(small_config(router=RouterConfig(**ROUTERS[name]))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (2, 16))
    losses = []
    for _ in range(15):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        update_router_biases(model)
        losses.append(out.lm_loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.3)  # ~ln V at init
    assert losses[-1] < losses[0] - 1.0  # memorising the batch
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)


def test_bias_freezes_after_its_stop_fraction():
    """Issue 22.15: DeepSeek-V3 trains with gamma 0.001, then 0 for the final part (bias_update_stop_fraction).
    The bias moves on steps 0-1 of 4 (stop 0.5) and stays put after; the load counter still resets."""
    cfg = RouterConfig(type="deepseek_v3", top_k=1, bias_update_rate=0.01, bias_update_stop_fraction=0.5)
    torch.manual_seed(0)
    model = build_model(small_config(router=cfg)).train()
    layer = model.moe_layers()[0]
    ids = torch.randint(0, 64, (2, 16))
    biases = []
    for step in range(4):
        model(ids, labels=ids)
        update_router_biases(model, step, 4)
        assert float(layer.load_accum_E.sum()) == 0.0
        biases.append(layer.router.e_score_correction_bias.clone())
    assert not torch.equal(biases[0], torch.zeros_like(biases[0])) and not torch.equal(biases[1], biases[0])
    assert torch.equal(biases[2], biases[1]) and torch.equal(biases[3], biases[1])
    with pytest.raises(Exception, match="bias_update_stop_fraction"):
        RouterConfig(type="topk", bias_update_stop_fraction=0.9)
    with pytest.raises(Exception, match="total steps"):  # a stop fraction needs the run's length
        update_router_biases(model, 0)
