"""Multi-token prediction modules (V3 §2.2).

Module k (k = 1..D) sees, at position i, the previous depth's hidden h^{k-1}_i and the embedding
of token t_{i+k}, and predicts t_{i+k+1}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      (embedding first, as the
                                                                   released weights, vLLM and
                                                                   transformers order it; the
                                                                   paper writes [h ; emb], §14)
    h^k  = Block_k(h')           causal over the sequence, its own MLA + MoE
    P^k  = head(norm_k(h^k))     embedding and head shared with the main model
h^0 is the main model's final (normed) hidden — what vLLM and transformers' MtpModel feed the
released checkpoint; the chained h^k is the normed one too (transformers' post_norm). Which one V3
trained with is unverified (spec §3); ours is a choice for checkpoint compatibility.
Checkpoint keys (hf.py): model.layers.{N+k-1}.{enorm,hnorm,eh_proj,shared_head.norm,block keys},
plus copies of embed_tokens and shared_head.head, which must equal the main model's.

Loss (eqs. 24–25, `mtp_loss`): L_MTP = λ/D Σ_k CE(P^k, t shifted by k+1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.fastpath import run_linear
from nanoseek.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)   # checkpoint: shared_head.norm

    def forward(self, hidden, next_emb, cos, sin, cache=None, batch=None, stats=None, segments=None):
        """hidden [B, T, D] (depth k−1, normed), next_emb [B, T, D] = Emb(t_{i+k}) -> normed h^k [B, T, D].
        `segments` (packed training rows) are those of the tokens t_{i+k}, like cos and sin."""
        h = run_linear(self.eh_proj, torch.cat([self.enorm(next_emb), self.hnorm(hidden)], dim=-1))
        return self.norm(self.block(h, cos, sin, cache, batch, stats, segments))


def mtp_loss(mtp_logits: list[torch.Tensor], input_ids: torch.Tensor, weight: float,
             ignore_index: int = -100, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """λ/D Σ_k CE. mtp_logits[k-1] [B, T-k, V] at position i predicts token i+k+1 of `labels`
    (default: input_ids). Returns (weighted total, per-depth losses)."""
    labels = input_ids if labels is None else labels
    per_depth = []
    for k, logits in enumerate(mtp_logits, start=1):
        target = labels[:, k + 1:]
        pred = logits[:, : target.shape[1]]
        per_depth.append(F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1),
                                         ignore_index=ignore_index))
    total = weight / max(len(per_depth), 1) * sum(per_depth) if per_depth else torch.zeros(())
    return total, per_depth
