"""FLOPs per token and the measured matmul peak: the one MFU formula of training and benchmarks.

    training  6·N + 3·(L + D)·H·(d_qk + d_v)·(T + 1)      inference (prefill)  2·N + (L + D)·H·(d_qk + d_v)·(T + 1)

N = activated parameters minus the input embedding (the head is a GEMM and counts; norms and the
router bias are in N too, a rounding error), plus per trained MTP depth its block and the shared
head; L layers, D MTP depths run, H query heads, T tokens per row. Attention counts causal work
only: query i meets i + 1 keys, 2·H·d_qk FLOPs for q·k and 2·H·d_v for p·v per key, so
H·(d_qk + d_v)·(T + 1) per token forward on average, ×3 with backward (PaLM's 12·L·H·Q·T also
counts the masked half; this is the smaller count). Head sizes: MLA's qk_nope + qk_rope and
v_head_dim for DeepSeek-V3; the GQA head_dim for both q·k and p·v for dense students (K and V
shared across a group change the memory, not the FLOPs per query head).

MFU = FLOPs per token × tokens/s ÷ the peak measured by `matmul_peak_gflops` at the step's
precision (an n³ GEMM on this machine, in the same run).
"""
from __future__ import annotations

import statistics
import time

import torch

from nanoseek.model.params import param_counts


def attention_head_dims(cfg) -> tuple[int, int]:
    """(d_qk, d_v) per query head: MLA's for deepseek_v3, the GQA head_dim for dense students."""
    if cfg.is_mla:
        return cfg.qk_head_dim, cfg.v_head_dim
    return cfg.attn_head_dim, cfg.attn_head_dim


def flops_per_token(cfg, seq_len: int, training: bool = True, mtp_depth: int = 0) -> float:
    """Matmul FLOPs per token of a forward (+ backward when training) at `seq_len` tokens per row."""
    c = param_counts(cfg)
    V, D = cfg.vocab_size, cfg.hidden_size
    n = c["activated"] - V * D
    n_mtp = cfg.num_nextn_predict_layers if cfg.is_mla else 0
    if mtp_depth and n_mtp:
        n += (c["activated_with_mtp"] - c["activated"]) * mtp_depth / n_mtp + mtp_depth * V * D
    qk, v = attention_head_dims(cfg)
    layers = cfg.num_hidden_layers + (mtp_depth if n_mtp else 0)
    attn = layers * cfg.num_attention_heads * (qk + v) * (seq_len + 1)
    return 6 * n + 3 * attn if training else 2 * n + attn


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """Measured n³ matmul throughput in GFLOP/s at `dtype` (the MFU denominator; median of reps)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9
