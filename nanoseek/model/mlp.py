"""The SwiGLU MLP (dense FFN layers, shared and routed experts' shape).

Names are transformers' (`gate_proj`, `up_proj`, `down_proj`; the official code calls them w1, w3,
w2). Tried and dropped: gate+up as one GEMM. Forward+backward, batch 8 × 256: dense 256→512:
57.7 fused vs 55.6 ms unfused (1 thread), 31.9 vs 30.7 (2 threads); shared expert 256→128: 14.7 vs
16.6, 8.2 vs 8.7 — even over a tiny model's step: the backward has to re-assemble the two halves'
gradients into one tensor (a copy of the [N, 2I] activation grad), which costs what the saved GEMM
launch and add gain.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.fastpath import run_linear


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_linear(self.down_proj, F.silu(run_linear(self.gate_proj, x)) * run_linear(self.up_proj, x))
