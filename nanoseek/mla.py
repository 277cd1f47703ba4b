"""Multi-head latent attention (MLA, V3 §2.1.1 / V2 §2.1), in its naive and absorbed forms.

Per token, one down-projection makes the latent c_kv (kv_lora_rank) and a single rope key k_pe
shared by all heads (qk_rope_head_dim); only [kv_norm(c_kv) | rope(k_pe)] is cached. Queries go
through their own low-rank bottleneck (q_lora_rank; None = one q_proj as in V2-Lite).

  naive   expand the cached latent into per-head keys and values with kv_b_proj, then ordinary
          attention. Cheapest when queries are many (training, prefill).
  absorb  fold kv_b_proj's key half into the query (q̃_h = W_UK,hᵀ q_nope,h, one [kv_lora_rank]
          vector per head) and its value half into the output: scores and the weighted sum run
          directly on the cached latent, so nothing per-head is materialised for the context.
          Cheapest for decode, where one query meets a long context (V2 App. C; official
          `attn_impl="absorb"`).
Both are the same function of the weights; tests check they agree (tests/test_model.py).
`impl = "auto"` uses absorb when every sequence in the call decodes one token, naive otherwise.

Shapes: B batch, T new tokens, S sequences, Q padded queries per sequence, L context, H heads,
C kv_lora_rank, R qk_rope_head_dim. Softmax scale = qk_head_dim^-1/2 · mscale² under YaRN (§1.4).
Names are transformers' (the official ones in brackets): q_a_proj [wq_a], q_a_layernorm [q_norm],
q_b_proj [wq_b], kv_a_proj_with_mqa [wkv_a], kv_a_layernorm [kv_norm], kv_b_proj [wkv_b], o_proj [wo].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.layers import RMSNorm
from nanoseek.rope import apply_rope, softmax_scale_multiplier


class MLA(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.nope, self.rope, self.v_dim = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                          cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.kv_rank, self.interleaved = cfg.kv_lora_rank, cfg.rope_interleave
        H, D, qk = self.n_heads, cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=cfg.attention_bias)
        self.scale = qk ** -0.5 * softmax_scale_multiplier(cfg.rope_scaling)
        self.impl = "auto"  # "naive" | "absorb" | "auto"

    def forward(self, x, cos, sin, cache=None, batch=None):
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe, cos, sin, self.interleaved)
        if cache is None:  # training / full recompute: causal attention over the input itself
            out = self.naive(q_nope, q_pe, latent, k_pe, mask=None)
        else:
            ctx = cache.update(self.layer_idx, batch, torch.cat([latent, k_pe], dim=-1))  # [S, L, C+R]
            c_ctx, pe_ctx = ctx.split([self.kv_rank, self.rope], dim=-1)
            qn, qp = batch.to_padded(q_nope), batch.to_padded(q_pe)                        # [S, Q, H, *]
            use_absorb = self.impl == "absorb" or (self.impl == "auto" and qn.shape[1] == 1)
            attend = self.absorbed if use_absorb else self.naive
            out = batch.from_padded(attend(qn, qp, c_ctx.to(x.dtype), pe_ctx.to(x.dtype), batch.mask))
        return self.o_proj(out.flatten(2))

    def naive(self, q_nope, q_pe, latent, k_pe, mask):
        """q_* [S, Q, H, *], latent [S, L, C], k_pe [S, L, R] -> [S, Q, H, v]; mask [S, Q, L] or causal."""
        S, L, H = latent.shape[0], latent.shape[1], self.n_heads
        k_nope, v = self.kv_b_proj(latent).view(S, L, H, -1).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, H, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=mask is None, scale=self.scale)
        return out.transpose(1, 2)

    def absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        """Same contract as `naive`, computed on the latent: W_UK into q, W_UV after the sum."""
        S, Q, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]                         # [H, nope, C], [H, v, C]
        q_lat = torch.einsum("sqhd,hdc->sqhc", q_nope, w_uk)                      # [S, Q, H, C]
        q_cat = torch.cat([q_lat, q_pe], dim=-1).reshape(S, Q * H, -1)           # [S, Q·H, C+R]
        kv = torch.cat([latent, k_pe], dim=-1)                                   # [S, L, C+R]
        scores = torch.bmm(q_cat, kv.transpose(1, 2)).view(S, Q, H, -1) * self.scale
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(latent.dtype)
        ctx = torch.bmm(probs.view(S, Q * H, -1), latent).view(S, Q, H, -1)      # [S, Q, H, C]
        return torch.einsum("sqhc,hdc->sqhd", ctx, w_uv)                         # [S, Q, H, v]
