"""FP8 fine-grained quantization (V3 §3.3): block/tile layouts and error bounds, the FP8 GEMMs of a
Linear (Fprop, Dgrad, Wgrad) against fp32 and against the emulation, and `convert(model)`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek.precision import fp8
from nanoseek.config import tiny
from nanoseek.model import Transformer

E4M3_REL = 2.0 ** -4      # half the spacing of a 3-bit mantissa, relative to the value
E4M3_SUB = 2.0 ** -10     # half the smallest subnormal spacing (2^-9), in scaled units


def _within_e4m3(x, deq, scale):
    """|x − deq| ≤ 2^-4 |x| + 2^-10 s elementwise (normal range: relative; subnormal: absolute)."""
    return bool(torch.all((x - deq).abs() <= E4M3_REL * x.abs() + E4M3_SUB * scale + 1e-12))


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_block_layout_and_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-3, 1, 200)         # columns of very different size
    w[:128, :128] = 0                                                            # an all-zero block
    q, s = fp8.quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == (3, 2)
    full = fp8.block_scales_as_rows(s, 300).repeat_interleave(128, 1)[:, :200]   # each element's block scale
    assert _within_e4m3(w, fp8.dequantize_blocks(q, s), full)
    # each block's largest |value| maps to 448 (E4M3's max), the zero block to zeros
    blocks = q.float()[128:256, 128:200]
    assert blocks.abs().max() == 448 and torch.all(q.float()[:128, :128] == 0)
    assert torch.allclose(s[1, 1], w[128:256, 128:200].abs().max() / 448)


def test_tile_layout_partial_tiles_equal_zero_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 300, generator=g)
    q, s = fp8.quantize_tiles(x)
    assert q.shape == x.shape and s.shape == (2, 5, 3)                           # 1×128 per token
    assert torch.allclose(s[..., 2], x[..., 256:].abs().amax(-1) / 448)
    assert _within_e4m3(x, fp8.dequantize_tiles(q, s), s.repeat_interleave(128, -1)[..., :300])
    qp, sp = fp8.quantize_tiles(F.pad(x, (0, 84)))
    assert torch.equal(sp, s) and torch.equal(qp[..., :300].float(), q.float())


@pytest.mark.skipif(not fp8.scaled_mm_available(), reason="torch._scaled_mm does not run here")
def test_scaled_mm_chunks_equal_the_emulation():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(70, 300, generator=g), torch.randn(90, 300, generator=g)
    (aq, as_), (bq, bs) = fp8.quantize_tiles(a), fp8.quantize_blocks(b)
    bs_rows = fp8.block_scales_as_rows(bs, 90)
    real, ref = fp8.gemm_scaled_mm(aq, as_, bq, bs_rows), fp8.gemm_emulated(aq, as_, bq, bs_rows)
    assert _rel(real, ref) < 1e-6


@pytest.mark.parametrize("backend", ["emulate", "scaled_mm"])
def test_fp8_linear_forward_and_gradients(backend):
    if backend == "scaled_mm" and not fp8.scaled_mm_available():
        pytest.skip("torch._scaled_mm does not run here")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, 200, generator=g, requires_grad=True)                 # M = 200 tokens: a partial tile
    w = (torch.randn(96, 200, generator=g) / 200 ** 0.5).requires_grad_()
    dy = torch.randn(4, 50, 96, generator=g)
    y = fp8.fp8_linear(x, w, backend=backend)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y32 = F.linear(x, w)
    dx32, dw32 = torch.autograd.grad(y32, (x, w), dy)
    # close to fp32 (two E4M3 roundings: ~2.7 % each on Gaussian data)
    assert _rel(y, y32) < 0.06 and _rel(dx, dx32) < 0.06 and _rel(dw, dw32) < 0.06
    # and exactly the V3 recipe: Fprop 1×128 × 128×128, Dgrad 1×128 × 128×128, Wgrad 128×1 × 128×1
    deq_t = lambda t: fp8.dequantize_tiles(*fp8.quantize_tiles(t))
    w_deq = fp8.dequantize_blocks(*fp8.quantize_blocks(w.detach()))
    x2, dy2 = x.detach().reshape(-1, 200), dy.reshape(-1, 96)
    assert _rel(y.reshape(-1, 96), deq_t(x2) @ w_deq.t()) < 1e-6
    assert _rel(dx.reshape(-1, 200), deq_t(dy2) @ w_deq) < 1e-6
    assert _rel(dw, deq_t(dy2.t()) @ deq_t(x2.t()).t()) < 1e-6


def test_convert_keeps_v3_high_precision_layers_and_weights():
    cfg = tiny(vocab_size=300).replace(hidden_size=128, intermediate_size=128, moe_intermediate_size=128)
    torch.manual_seed(0)
    model = Transformer(cfg)                                                     # init std 0.02, 5 layers deep
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    keys = dict(model.state_dict())
    ref = model(ids).logits
    fp8.convert(model, "emulate")
    assert dict(model.state_dict()).keys() == keys.keys()
    assert all(model.state_dict()[k] is keys[k] or torch.equal(model.state_dict()[k], keys[k]) for k in keys)
    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") == "Linear"                                    # the output head
    assert set(linears.values()) == {"Fp8Linear"}                                # everything else
    assert type(model.layers[1].mlp.experts).__name__ == "Fp8Experts"
    assert type(model.layers[1].mlp.gate).__name__ == "Router"                   # gating stays fp32
    assert type(model.embed_tokens) is torch.nn.Embedding
    out = model(ids)
    assert _rel(out.logits, ref) < 0.15   # ~4 % per GEMM, chained through attention, MoE and MTP
    (out.logits.logsumexp(-1).mean() + sum(l.mean() for l in out.mtp_logits)).backward()
    assert model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_padding_overhead_on_the_tiny_preset():
    over = fp8.padding_overhead(fp8.convert(Transformer(tiny()), "emulate"))
    assert over["q_b_proj"] == pytest.approx(8 / 3) and over["kv_b_proj"] == 2.0 and over["experts"] == 1.0
    assert 1.0 < over["total"] < 1.3
