"""Linear-layer fast paths (the oneDNN dispatch) the model's modules call instead of nn.Linear.

  `linear`       fp32 GEMMs of plain nn.Linear layers on oneDNN instead of MKL (forward and dX;
                 see its docstring); `run_linear(m, x)` is how the model's modules call their Linears.
  `fused_linear` several Linears that read the same x as one GEMM on concatenated weights (MLA's
                 q_a_proj + kv_a_proj_with_mqa). Only plain nn.Linear are fused or sent to oneDNN, so
                 a Linear swapped in from outside (fp8.convert's Fp8Linear, a LoRA layer) keeps its
                 own forward; parameters and checkpoint names are unchanged.
`F.linear` is the reference (tests/model/test_fastpaths.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model import gemv, packed


@functools.cache
def onednn_linear_op():
    """torch's oneDNN linear (`mkldnn::_linear_pointwise`, what inductor emits for CPU linears), if
    it runs here and matches F.linear; else None. Probed at the first linear, not at import: a
    process that runs a parallel op before it forks (the speedrun's fork server) leaves OpenMP
    in its children hanging."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
        ok = torch.allclose(op(x, w, None, "none", [], ""), F.linear(x, w), atol=1e-5)
        ok = ok and torch.allclose(op(x[:, :3], w[:, :3].t(), None, "none", [], ""), x[:, :3] @ w[:, :3], atol=1e-5)
        return op if ok else None
    except (AttributeError, RuntimeError):
        return None


def _onednn_mm(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] @ w[N, K]ᵀ (+ b) on oneDNN; w may be a strided view."""
    return onednn_linear_op()(x2, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x wᵀ + b with the forward and input-gradient GEMMs on oneDNN; dW stays on MKL."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_mm(g2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; fp32 on CPU runs its GEMMs on oneDNN instead of MKL (where available).

    Why: on this CPU, at the model's shapes ([2048, 64…256] × [64…256, 64…1024]), MKL's sgemm
    spends ~17 % of its time packing operands and pre-scaling C (perf: `sgemm_scopy_*`,
    `sgemm_mscale`); oneDNN's JIT GEMM runs the same products 10–20 % faster (forward and
    dX = dY·W; the weight gradient dYᵀ·X is not faster there and stays on MKL). oneDNN JIT-compiles
    a kernel per new shape (~0.5 ms, then cached), so only row counts that are multiples of 64 take
    it — the fixed shapes of training and batch prefill; decode steps and odd prefill chunks, whose
    shapes keep changing, stay on MKL. bf16 products of at most gemv.MAX_ROWS rows (decode steps of
    a bf16 model; gemv.BF16_NATIVE_MAX_ROWS on a CPU with native bf16), and fp32 ones of 2-8 rows with large weights (gemv.fits), run on gemv's kernel
    once an engine has loaded it (gemv.load()). Autocast, other
    dtypes and devices take F.linear unchanged.
    `F.linear` is the reference (tests/model/test_fastpaths.py, tests/model/test_gemv.py)."""
    if gemv.fits(x, weight, bias):
        return gemv.run(x, weight, bias)
    if (torch.compiler.is_compiling()     # inductor lowers F.linear itself (and must not trace the probe)
            or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or x.numel() == 0
            or (x.numel() // x.shape[-1]) % 64
            or type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter)
            or onednn_linear_op() is None):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_mm(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def run_linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) for any Linear-like module; a plain nn.Linear goes through the fast `linear`, or through
    its pre-packed weight (packed.py: a decode step's rows of an fp32 model in an engine).
    (A subclass swapped in from outside — fp8.Fp8Linear, a LoRA layer — keeps its own forward.)"""
    if type(m) is not nn.Linear:
        return m(x)
    p = getattr(m, "packed_weight", None)
    if p is not None and packed.fits(x, m.weight, p):
        return packed.linear(x, m.weight, p, m.bias)
    return linear(x, m.weight, m.bias)


def fused_linear(x: torch.Tensor, *linears: nn.Linear) -> torch.Tensor | None:
    """x through several Linears of the same input as one GEMM ([.., Σ out]); None unless all are
    plain nn.Linear (a swapped-in FP8 or LoRA Linear keeps its own forward)."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    weight = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, linears)])
    return linear(x, weight, bias)
