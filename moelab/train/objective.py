"""The training objective of one rank: its share of the global batch's loss.

Data parallelism averages the ranks' gradients, so a rank's objective is the global mean's
share that its tokens carry: ``world / n_global`` times the cross-entropy *summed* over its own
targets, for the LM loss and for each MTP depth (DeepSeek-V3), plus the aux losses as they are
(their statistics are global already). The mean over the ranks of these objectives is the loss of
one process on the global batch, whatever the split of the targets; a rank whose share has no
target (rows that end in padding) adds exactly 0 through the same graph as every other rank, so
its backward runs the same collectives (the all-to-alls of every MoE layer, FSDP2's
reduce-scatters). In one process (world 1) the objective is ``ModelOutput.loss`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def mtp_target_counts(labels_BT: torch.Tensor, depths: int) -> list[int]:
    """Targets of each MTP depth k = 1 .. ``depths`` in a batch (the model's rule: depth k scores token
    i + k + 1 from position i, so its targets are labels[:, k + 1:]; depths a sequence is too short for
    are left out)."""
    T = labels_BT.shape[1]
    return [int((labels_BT[:, k + 1:] != -100).sum()) for k in range(1, depths + 1) if T - k >= 2]


@dataclass
class Shares:
    """What turns a rank's summed losses into its share of the global means: ``world / n_global`` for
    the LM and for each MTP depth (``world / 1`` where a depth has no target anywhere: its sum is 0),
    and the number of depths with a target anywhere (the mean over depths divides by it)."""

    world: int
    lm_targets: int  # global LM targets of the micro-batch
    mtp_targets: list[int]  # global targets of each MTP depth

    @classmethod
    def of(cls, labels_BT: torch.Tensor, depths: int, world: int = 1) -> Shares:
        """From the labels of the *global* micro-batch (every rank's rows)."""
        return cls(world, int((labels_BT[:, 1:] != -100).sum()), mtp_target_counts(labels_BT, depths))

    def scale(self, total: torch.Tensor, targets: int) -> torch.Tensor:
        # NOTE: times world, then divided by the count: with world 1 this is the model's sum / count, bit for bit
        return total * self.world / max(targets, 1)


@dataclass
class RankLoss:
    loss: torch.Tensor  # the objective to backpropagate
    lm: torch.Tensor  # this rank's share of the global mean LM loss (the mean over ranks is the global mean)
    mtp: list[torch.Tensor]  # the same for each MTP depth, unweighted


def rank_loss(out, shares: Shares, mtp_weight: float) -> RankLoss:
    """This rank's objective from a ``ModelOutput`` computed with labels (see the module doc):
    lm + sum(aux) + mtp_weight * (1 / D_global) * sum_k mtp_k, every term a share of a global mean."""
    lm = shares.scale(out.lm_loss_sum, shares.lm_targets)
    aux = out.aux_losses
    loss = lm + sum(aux.values()) if aux else lm
    mtp = [shares.scale(s, n) for s, n in zip(out.mtp_loss_sums, shares.mtp_targets)]
    if mtp:
        depths = sum(1 for n in shares.mtp_targets[:len(mtp)] if n > 0)
        loss = loss + mtp_weight * sum(mtp) / max(depths, 1)
    return RankLoss(loss, lm, mtp)
