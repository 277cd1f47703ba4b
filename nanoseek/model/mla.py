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
Both are the same function of the weights; tests check they agree (tests/model/test_model.py).
`impl = "auto"` picks the cheaper form per call: absorb while the padded queries per sequence Q
satisfy Q·(2C − nope − v) ≤ C·(nope + v) — naive pays once per context token to expand it through
kv_b_proj (C·H·(nope+v)), absorb pays per query and context token H·(2C + R) instead of naive's
H·(qk + v) — so every decode step, speculative verification and short chunk over a long cached
prefix runs absorbed (tiny: Q ≤ 64; V3: Q ≤ 170), long prefills naive. Measured (tiny, 1 thread,
2000-token context, one layer): Q = 2: naive 14.6 ms, absorb 0.33 ms; Q = 20: 15.5 vs 1.5;
Q = 64: 34 vs 21; Q = 256: 71 vs 69.

Without a cache (training, batch prefill) `causal` is `naive(mask=None)` made fast: causal
attention as blocked batched GEMMs (`causal_attention_bmm`) or padded flash SDPA; its docstring
has the numbers, tests/model/test_fastpaths.py checks both against `naive`. `project` runs q_a_proj and
kv_a_proj_with_mqa, which read the same x, as one GEMM (1–3 % of an attention layer's
forward+backward in fp32, even under bf16 autocast).

Shapes: B batch, T new tokens, S sequences, Q padded queries per sequence, L context, H heads,
C kv_lora_rank, R qk_rope_head_dim. Softmax scale = qk_head_dim^-1/2 · mscale² under YaRN (§1.4).
Names are transformers' (the official ones in brackets): q_a_proj [wq_a], q_a_layernorm [q_norm],
q_b_proj [wq_b], kv_a_proj_with_mqa [wkv_a], kv_a_layernorm [kv_norm], kv_b_proj [wkv_b], o_proj [wo].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.cache import document_mask, document_starts
from nanoseek.model.fastpath import fused_linear, run_linear
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope, softmax_scale_multiplier


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
        self.causal_impl = "auto"  # "sdpa" | "bmm" | "auto"

    def project(self, x):
        """x [B, T, D] -> q [B, T, H, qk] (un-rotated), latent [B, T, C] (normed), k_pe [B, T, R] (un-rotated).

        q_a_proj (or q_proj) and kv_a_proj_with_mqa read the same x: one GEMM on their
        concatenated weights (`fused_linear`; None when either is not a plain Linear)."""
        B, T, _ = x.shape
        first = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        both = fused_linear(x, first, self.kv_a_proj_with_mqa)
        if both is None:
            q, kv = run_linear(first, x), run_linear(self.kv_a_proj_with_mqa, x)
        else:
            q, kv = both.split([first.out_features, self.kv_rank + self.rope], dim=-1)
        if first is not getattr(self, "q_proj", None):
            q = run_linear(self.q_b_proj, self.q_a_layernorm(q))
        latent, k_pe = kv.split([self.kv_rank, self.rope], dim=-1)
        return q.view(B, T, self.n_heads, -1), self.kv_a_layernorm(latent), k_pe

    def forward(self, x, cos, sin, cache=None, batch=None, segments=None):
        q, latent, k_pe = self.project(x)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)
        k_pe = apply_rope(k_pe, cos, sin, self.interleaved)
        if cache is None:  # training / full recompute: causal attention over the input itself
            out = self.causal(q_nope, q_pe, latent, k_pe, segments)
        else:
            ctx = cache.update(self.layer_idx, batch, torch.cat([latent, k_pe], dim=-1))  # [S, L, C+R]
            c_ctx, pe_ctx = ctx.split([self.kv_rank, self.rope], dim=-1)
            qn, qp = batch.to_padded(q_nope), batch.to_padded(q_pe)                        # [S, Q, H, *]
            use_absorb = self.impl == "absorb" or (self.impl == "auto" and qn.shape[1] * (
                2 * self.kv_rank - self.nope - self.v_dim) <= self.kv_rank * (self.nope + self.v_dim))
            attend = self.absorbed if use_absorb else self.naive
            out = batch.from_padded(attend(qn, qp, c_ctx.to(x.dtype), pe_ctx.to(x.dtype), batch.mask))
        return run_linear(self.o_proj, out.flatten(2))

    def causal(self, q_nope, q_pe, latent, k_pe, segments=None):
        """Fast `naive(..., mask=None)` for training and prefill without a cache: [B, T, H, v].
        `segments` [B, T] (packed documents) restricts attention to the query's own document
        (`naive` with `document_mask(segments)` is the reference).

        Expands the latent like `naive`, then one of two causal attentions (`causal_impl`):
          bmm   `causal_attention_bmm` on [B·H, T, d] operands built head-major by the same cat
                that joins nope and rope parts (no extra transpose copies). Default for T ≤ 1024.
          sdpa  SDPA with is_causal and equal q/k/v head dims: V3's v_head_dim (128) differs from
                qk_head_dim (192), and torch's CPU flash kernel only takes equal dims (otherwise
                SDPA falls back to its math path: ~10 kernels over materialised [B, H, T, T]
                scores). v is padded with zeros to qk_head_dim (or q, k when v is wider: zero
                columns add nothing to q·k); the first v_head_dim output columns are the answer.
                Memory O(T), so the default beyond T = 1024.
        Forward+backward at [8, 4, 256, 48/32], 1 thread: SDPA math path (the reference's) 35 ms,
        padded flash 22 ms fp32 / 31 ms bf16, bmm 20 ms fp32 / 11 ms bf16, and with 128-query
        blocks 16.5 ms fp32."""
        B, T, H = latent.shape[0], latent.shape[1], self.n_heads
        k_nope, v = run_linear(self.kv_b_proj, latent).view(B, T, H, -1).split([self.nope, self.v_dim], dim=-1)
        k_pe = k_pe[:, :, None, :].expand(-1, -1, H, -1)
        if self.causal_impl == "bmm" or (self.causal_impl == "auto" and T <= 1024):
            q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1).flatten(0, 1)   # [BH, T, qk]
            k = torch.cat([k_nope.transpose(1, 2), k_pe.transpose(1, 2)], dim=-1).flatten(0, 1)
            out = causal_attention_bmm(q, k, v.transpose(1, 2).reshape(B * H, T, -1), self.scale,
                                       segments=segments)
            return out.view(B, H, T, -1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        pad = q.shape[-1] - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        elif pad < 0:
            q, k = F.pad(q, (0, -pad)), F.pad(k, (0, -pad))
        mask = None if segments is None else document_mask(segments)[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return out.transpose(1, 2)[..., : self.v_dim]

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


def causal_bias(n_q: int, n_k: int, dtype, device) -> torch.Tensor:
    """[n_q, n_k]: 0 where query i (the last n_q of n_k positions) may see key j, −inf above.
    Built per call (a [128, T] fill, ~1 % of the block's GEMM): the model keeps no runtime state."""
    return torch.full((n_q, n_k), float("-inf"), dtype=dtype, device=device).triu_(n_k - n_q + 1)


def causal_attention_bmm(q, k, v, scale: float, block: int = 128, segments=None) -> torch.Tensor:
    """q, k [N, T, d], v [N, T, dv] -> [N, T, dv]: softmax(scale·q·kᵀ + causal mask)·v by batched GEMMs.

    scores = baddbmm(−inf above the diagonal, q, kᵀ, α = scale): mask and scale ride in the GEMM;
    softmax in fp32; one bmm. Queries go in blocks of `block` rows, each against only the keys it
    can see, so the masked upper triangle is mostly never computed (T = 256: 3/4 of the full
    product; the cost is a few more, smaller kernels). Autograd's backward is 4 bmm and one
    softmax backward per block. `segments` [B, T] with N = B·heads (packed documents): keys of
    other documents are masked too, one masked_fill per block (a query always sees itself, so no
    row is fully masked), and a block starts its keys where the earliest document of its first
    query starts (over all rows), so earlier documents are not computed at all."""
    N, T, _ = q.shape
    starts = None if segments is None else document_starts(segments).min(0).values.tolist()   # [T]
    outs = []
    for start in range(0, T, block):
        end = min(T, start + block)
        k0 = 0 if starts is None else starts[start]           # no query of the block sees a key before k0
        bias = causal_bias(end - start, end - k0, q.dtype, q.device)
        scores = torch.baddbmm(bias, q[:, start:end], k[:, k0:end].transpose(1, 2), alpha=scale)
        if segments is not None:
            B = segments.shape[0]
            other = segments[:, start:end, None] != segments[:, None, k0:end]          # [B, q, k]
            scores = scores.view(B, N // B, end - start, end - k0).masked_fill(other[:, None], float("-inf"))
            scores = scores.view(N, end - start, end - k0)
        probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
        outs.append(torch.bmm(probs, v[:, k0:end]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
