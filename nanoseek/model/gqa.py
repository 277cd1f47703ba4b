"""Grouped-query attention for the dense students (Qwen2 / Llama, the R1-Distill layouts).

H query heads share kv_heads key/value heads (H % kv_heads == 0). Qwen2 puts biases on q, k, v
(not o); Llama's `attention_bias` puts them on all four. RoPE uses the half-split pair layout.
Cached per token per layer: [K | V] = 2 · kv_heads · head_dim values (model/cache.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.cache import document_mask
from nanoseek.model.rope import apply_rope


class GQAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim
        qkv_bias = cfg.model_type == "qwen2" or cfg.attention_bias
        o_bias = cfg.model_type != "qwen2" and cfg.attention_bias
        D, d = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(D, self.kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(D, self.kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, D, bias=o_bias)
        self.interleaved = cfg.rope_interleave

    def forward(self, x, cos, sin, cache=None, batch=None, segments=None):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, -1), cos, sin, self.interleaved)
        k = apply_rope(self.k_proj(x).view(B, T, self.kv_heads, -1), cos, sin, self.interleaved)
        v = self.v_proj(x).view(B, T, self.kv_heads, -1)
        mask = None if segments is None else document_mask(segments)[:, None]   # packed documents
        if cache is not None:
            ctx = cache.update(self.layer_idx, batch, torch.cat([k.flatten(2), v.flatten(2)], dim=-1))
            S, L = ctx.shape[:2]
            k, v = ctx.to(x.dtype).view(S, L, 2, self.kv_heads, self.head_dim).unbind(2)
            q, mask = batch.to_padded(q), batch.mask[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        out = out.transpose(1, 2)
        if cache is not None:
            out = batch.from_padded(out)
        return self.o_proj(out.flatten(2))
