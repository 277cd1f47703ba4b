"""RMSNorm, with a fast autograd path beside its reference.

RMSNorm computes in fp32 and casts back, as both the official code and transformers do (V3 keeps
norms in higher precision, §3.3).

  `rms_norm`   one autograd Function: forward saves x̂ = x·r (fp32) and r, backward is
               dx = r·(g·w − x̂·mean(g·w·x̂)), dw = Σ g·x̂ — 7 passes where autograd's trace of
               `rms_norm_reference` takes ~15 (pow/mean/rsqrt backward each materialise a full
               tensor). Measured 2.1 → 1.0 ms forward+backward on [2048, 256], 1 thread.
Checked against the reference in tests/model/test_fastpaths.py.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · (x / rms(x)) computed in fp32, normalised value cast back to x's dtype (HF's order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xhat = x.float()
        r = torch.rsqrt(xhat.square().mean(-1, keepdim=True).add_(eps))     # [..., 1] fp32
        xhat = xhat * r
        ctx.save_for_backward(xhat, weight, r)
        ctx.in_dtype = x.dtype
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        xhat, weight, r = ctx.saved_tensors
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * xhat).flatten(0, -2).sum(0).to(weight.dtype)
        gw = (g * weight).float()
        mean = (gw * xhat).mean(-1, keepdim=True)
        dx = torch.addcmul(gw, xhat, mean.expand_as(xhat), value=-1).mul_(r)  # expanded: 3× faster than broadcast
        return dx.to(ctx.in_dtype), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast RMSNorm (one autograd node); same values as `rms_norm_reference`."""
    if not (x.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        return rms_norm_reference(x, weight, eps)  # inference: no saved tensors needed
    return _RMSNorm.apply(x, weight, eps)
