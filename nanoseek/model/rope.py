"""Rotary position embeddings (RoPE) and YaRN context extension.

RoPE rotates pairs of channels by position-dependent angles. Two pair layouts exist and both
are needed:
  interleaved  pairs (x0,x1),(x2,x3),…  — DeepSeek's released weights (`rope_interleave=True`)
  half-split   pairs (x_i, x_{i+d/2})   — Llama / Qwen2 (`rotate_half`)
Rotating interleaved pairs in place gives the same q·k as transformers' de-interleave-then-rotate,
because q and k see the same permutation; we keep the weights' own layout (no permutation copy).

YaRN (V3 §4.3, deepseek_spec §4.2), as transformers computes it from `rope_parameters`:
  θ_i = base^(-2i/d); ramp over [low, high] = correction range of (beta_fast, beta_slow) rotations
  within original_max_position_embeddings (floor/ceil unless `truncate` is false);
  θ'_i = θ_i/s · (1 − smooth_i) + θ_i · smooth_i;
  cos/sin × attention_factor, where attention_factor = mscale(s, mscale)/mscale(s, mscale_all_dim)
  when both are given (1.0 for V3), else 0.1·ln s + 1;
  and for MLA the softmax scale × mscale(s, mscale_all_dim)² (`softmax_scale_multiplier`).
Do not apply the generic 0.1·ln s + 1 to cos/sin when mscale_all_dim is set: counted twice.
"""
from __future__ import annotations

import math

import torch


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [dim/2] and the cos/sin attention factor."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind != "yarn":
        raise ValueError(f"unsupported rope_type {kind!r}")
    orig = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def corr_dim(n_rot: float) -> float:  # the dim whose wavelength makes n_rot turns over `orig`
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency, unchanged), 0: interpolate (÷ factor)
    inv = inv / factor * (1 - keep) + inv * keep
    attn_factor = scaling.get("attention_factor")
    if attn_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if (m and m_all) else yarn_mscale(factor)
    return inv, float(attn_factor)


def softmax_scale_multiplier(scaling: dict | None) -> float:
    """MLA's extra softmax factor under YaRN: mscale(s, mscale_all_dim)² (1 without scaling)."""
    if not scaling or scaling.get("rope_type", "default") == "default":
        return 1.0
    m_all = scaling.get("mscale_all_dim", 0)
    return yarn_mscale(float(scaling["factor"]), m_all) ** 2 if m_all else 1.0


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin [..., T, dim/2] for given positions; holds only a constant buffer."""

    def __init__(self, dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv, self.attention_factor = inv_frequencies(dim, theta, scaling)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] (any int dtype) -> cos, sin [B, T, dim/2] in fp32
        angles = positions.float()[..., None] * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, T, H, d] (or [B, T, d]) by cos/sin [B, T, d/2]; keeps x's layout and dtype.

    Interleaved pairs are one complex multiply (x0 + i·x1)·(cos + i·sin) on a view of x: one
    kernel forward and one backward, where the reference below takes ~8 each (strided slices,
    four products, stack). Half-split pairs use the reference. `apply_rope_reference` is the
    naive form; tests/model/test_fastpaths.py checks they agree.
    """
    if not interleaved or x.shape[-1] % 2 or torch.compiler.is_compiling():   # inductor has no complex codegen
        return apply_rope_reference(x, cos, sin, interleaved)
    xc = x.float().unflatten(-1, (-1, 2))
    if xc.stride(-1) != 1 or xc.storage_offset() % 2 or any(s % 2 for s in xc.stride()[:-1]):
        xc = xc.contiguous()
    rot = torch.complex(cos.float(), sin.float())                              # [B, T, d/2]
    if x.dim() == 4:
        rot = rot[:, :, None, :]
    return torch.view_as_real(torch.view_as_complex(xc) * rot).flatten(-2).to(x.dtype)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The naive rotation (both layouts): the reference of `apply_rope`."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
