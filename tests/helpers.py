"""Shared test helpers: tiny configs and random weights that give O(1) logits."""
from __future__ import annotations

import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), norm scales in [0.5, 1.5], biases small, router biases in [0, 0.5).

    Works on nanoseek and transformers modules alike (both store matrices as [..., out, in]).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() == 1 and "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif p.dim() == 1:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.rand(b.shape, generator=g) * 0.5)
    return model


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max(1, max |a|): the parity measure of the Foundation issue."""
    return float((a - b).abs().max() / max(1.0, float(a.abs().max())))
