"""FP8 (E4M3) block scaling, V3 §3.3 / deepseek_spec §5.

This file holds the block layout shared by checkpoints and training: weights are quantized in
128×128 blocks with s = amax / 448 (E4M3's largest finite value), stored as fp8 plus
`weight_scale_inv` = s of shape [ceil(out/128), ceil(in/128)] (the released V3 format;
dequantize = fp8 · s per block). Blocks that overhang the matrix edge are computed on the
zero-padded block, as the released checkpoints do.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
BLOCK = 128


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    pr, pc = (-rows) % block, (-cols) % block
    return torch.nn.functional.pad(w, (0, pc, 0, pr)) if (pr or pc) else w


def quantize_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] -> (fp8 e4m3 [M, N], scale_inv fp32 [ceil(M/b), ceil(N/b)])."""
    M, N = w.shape
    p = _pad_to_blocks(w.float(), block)
    blocks = p.view(p.shape[0] // block, block, p.shape[1] // block, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX          # [Mb, Nb]
    q = (blocks / scale[:, None, :, None]).view_as(p)[:M, :N].to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [M, N] and per-block scale_inv [ceil(M/b), ceil(N/b)] -> dense [M, N]."""
    M, N = q.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return (q.float() * s).to(dtype)
