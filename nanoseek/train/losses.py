"""The losses of one training step, as sums over tokens (the step divides by global counts).

    L = CE_main + λ/D Σ_k CE_k + Σ_layers L_Bal          (V3 §2.2, §2.1.2; deepseek_spec §2.4, §3)

CE_main over every target token of the step, CE_k over MTP depth k's targets (token i+k+1), L_Bal
the sequence-wise balance loss α Σ_i f_i P_i per row over its real tokens (a packed row counts as
one sequence, as in V3's packed pretraining), averaged over the step's rows
(`masked_sequence_balance_loss`, equal to model.moe.sequence_balance_loss without padding).
Targets come from `Batch.targets(k)` (data/packing.py): only where the token is a training target
and lies in the same packed document as the input position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.data.packing import IGNORE, Batch
from nanoseek.model.moe import RouterStats


def lm_loss_sums(out, batch: Batch, mtp_depth: int) -> torch.Tensor:
    """Σ CE of the main head and of each MTP depth over their targets: [1 + mtp_depth]."""
    logits = [out.logits] + list(out.mtp_logits[:mtp_depth])
    sums = []
    for k, lg in enumerate(logits):
        target = batch.targets(k)                                               # [B, T - k]
        sums.append(F.cross_entropy(lg[:, : target.shape[1]].flatten(0, 1).float(), target.flatten(),
                                    ignore_index=IGNORE, reduction="sum"))
    return torch.stack(sums)


def masked_sequence_balance_loss(stats: RouterStats, valid: torch.Tensor, n_experts: int, top_k: int,
                                 alpha: float) -> torch.Tensor:
    """Per-row L_Bal [B] over the real tokens only (valid [B, T] bool); mean over B equals
    model.moe.sequence_balance_loss when every token is real."""
    v = valid.float()[..., None]                                                    # [B, T, 1]
    n = v.sum(1).clamp(min=1)                                                       # [B, 1]
    chosen = F.one_hot(stats.topk_idx, n_experts).sum(2).float() * v                # [B, T, E]
    f = chosen.sum(1) * n_experts / (top_k * n)                                     # [B, E]
    p = (stats.scores / stats.scores.sum(-1, keepdim=True) * v).sum(1) / n          # [B, E]
    return alpha * (f * p).sum(-1)


def stats_valid(stats: RouterStats, valid: torch.Tensor) -> torch.Tensor:
    """The real-token mask aligned with a layer's stats (MTP depth k sees positions 0..T-k-1)."""
    return valid[:, : stats.topk_idx.shape[1]]


def expert_load(stats: RouterStats, valid: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E], real tokens only."""
    idx = stats.topk_idx[stats_valid(stats, valid)]
    return torch.bincount(idx.flatten(), minlength=n_experts).float()


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max load / mean load − 1 per row of [L, E] (0 at perfect balance)."""
    return load.max(-1).values / load.mean(-1).clamp(min=1e-9) - 1
