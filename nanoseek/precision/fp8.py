"""FP8 fine-grained mixed precision (V3 §3.3, App. B; deepseek_spec §5), applied from outside.

    model = fp8.convert(build_model(cfg))      # every Linear GEMM in E4M3, V3's exceptions kept

Layout, as V3 and its released checkpoints:
  weights       128×128 blocks, s = amax / 448 per block (`quantize_blocks`; the checkpoint stores
                fp8 + `weight_scale_inv` = s, shape [ceil(out/128), ceil(in/128)])
  activations   1×128 tiles along the GEMM's inner dim K: one scale per token per 128 channels
                (`quantize_tiles`); the Wgrad GEMM contracts over tokens, so there x and dy are
                tiled 128×1 (one scale per channel per 128 tokens) — V3's "128×1 tiles in backward"
Blocks/tiles that overhang an edge are scaled on the zero-padded block (zeros never change the
amax), as the released checkpoints do.

The three GEMMs of a Linear, all E4M3 (V3 uses no E5M2): Fprop y = x Wᵀ, Dgrad dx = dy W,
Wgrad dW = dyᵀ x. Each is C[M,N] = Σ_k (A_k B_kᵀ) ⊙ (a_s[:,k] ⊗ b_s[:,k]) over 128-wide chunks k of
K: the chunk products are scaled and summed in fp32, which is V3's promotion of partial sums to
FP32 every N_C = 128 elements (§3.3.2). A weight block scale is the row scale of every row of its
block, so one kernel shape serves all three GEMMs. Two backends compute it:
  emulate    quantize → dequantize → fp32 matmul: the reference (`gemm_emulated`)
  scaled_mm  real FP8 products: one `torch._scaled_mm` per K chunk with rowwise fp32 scales
             ((M,1) × (1,N)), fp32 output, accumulated in fp32 (`gemm_scaled_mm`). The CPU kernel
             takes only tensorwise/rowwise scales, not blockwise (cpu_facts §4), and this
             composition is exactly blockwise scaling. A last chunk narrower than 128 is passed as
             it is (the kernel accepts any K here), so padding costs no FLOPs.
Both take the same fp8 operands; tests/precision/test_fp8.py checks they agree to fp32 rounding.
`auto` picks scaled_mm when `torch._scaled_mm` runs on the device, emulate otherwise.

Kept in higher precision, as V3 §3.3.1: the embedding, the output head (`lm_head`), the MoE
router (`Router` is not a Linear: fp32 sigmoid gate, fp32 bias), norms, attention (SDPA), and the
combine. Master weights, gradients and the optimizer stay fp32 (train/optim.py offers V3's BF16 moments);
V3 also caches the Wgrad activation in FP8 — so does `_Fp8LinearFn` (x saved as 128×1-tiled fp8).
GEMM outputs are fp32 here (V3: BF16), because the rest of the CPU model runs in fp32.
Not reproduced: E5M6 / power-of-2 scales for attention-output and MoE-dispatch activations, FP8
communication; rejected: Dgrad 128×128 block scaling of activation gradients (V3 App. B.2 saw
it diverge).

Padding cost on the tiny preset (hidden 256, q_lora 64, kv_lora+rope 80, 4 heads × 48/32):
K < 128 in q_b_proj and kv_b_proj (K = 64) and output dims 64 (q_a), 80 (kv_a), 192 (q_b). A
kernel that needs 128-multiples (DeepGEMM) would run the padded shapes; `padding_overhead(model)`
counts padded ÷ real weight area (= Fprop MACs per token through each weight): q_a 2.0×,
kv_a 1.6×, q_b 2.67×, kv_b 2.0×; experts, MLPs, o_proj and eh_proj are aligned; 1.18× over all FP8
weights of tiny. Here the quantizers pad with zeros (elementwise, cheap) and the chunked GEMM
skips the padding, so the numerics equal zero padding and the FLOPs stay unpadded.

Measured (2 cores, shared with other jobs, torch 2.13 CPU). FP8 does not pay on this CPU:
`_scaled_mm` fp8 → fp32 ran at 0.3–0.5× an fp32 matmul of the tiny shapes (M = 4096 tokens,
128-wide K chunks; cpu_facts §4: ~0.7× at 1024³), and quantization, scale expansion and the
per-chunk calls add elementwise work, so an FP8 training step runs at 0.35× fp32 tokens/s
(`nanoseek bench fp8`, measured twice: 397 vs 1,145 tok/s at 1 thread, 1,428 vs 3,981 at 2).
The CPU path is about numerics: after 300 tiny steps the held-out loss of FP8 is 1.28 % from
fp32 while bf16 autocast is 2.0 % from it (train loss, last 10 % of steps: 0.85 % vs 1.09 %) —
at this scale the run-to-run divergence of any precision change is ~1–2 %, far above V3's 0.25 %,
and FP8 sits inside that floor (see bench/fp8.py). On a GPU with sm90 block-scaled kernels the
same `convert` would swap in `torch._scaled_mm` with BlockWise scales; not wired here (no GPU).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

E4M3_MAX = 448.0
BLOCK = 128
_TINY = 1e-12  # amax floor: an all-zero tile gets a finite scale and quantizes to zeros


# ------------------------------------------------------------------ block layout (checkpoints)
def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    pr, pc = (-rows) % block, (-cols) % block
    return torch.nn.functional.pad(w, (0, pc, 0, pr)) if (pr or pc) else w


def quantize_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] -> (fp8 e4m3 [M, N], scale_inv fp32 [ceil(M/b), ceil(N/b)])."""
    M, N = w.shape
    p = _pad_to_blocks(w.float(), block)
    blocks = p.view(p.shape[0] // block, block, p.shape[1] // block, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=_TINY) / E4M3_MAX          # [Mb, Nb]
    q = (blocks / scale[:, None, :, None]).view_as(p)[:M, :N].to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [M, N] and per-block scale_inv [ceil(M/b), ceil(N/b)] -> dense [M, N]."""
    M, N = q.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return (q.float() * s).to(dtype)


# ------------------------------------------------------------------ tiles (activations)
def quantize_tiles(x: torch.Tensor, tile: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """1×tile scaling along the last dim: x [..., K] -> (fp8 [..., K], scale fp32 [..., ceil(K/tile)]).

    >>> q, s = quantize_tiles(torch.tensor([[1.0, -2.0, 4.0]]), tile=2)
    >>> s.tolist(), dequantize_tiles(q, s, tile=2).tolist()
    ([[0.004464285913854837, 0.008928571827709675]], [[1.0, -2.0, 4.0]])
    """
    K = x.shape[-1]
    p = F.pad(x.float(), (0, (-K) % tile))
    tiles = p.unflatten(-1, (-1, tile))                                          # [..., Kb, tile]
    scale = tiles.abs().amax(-1).clamp(min=_TINY) / E4M3_MAX                     # [..., Kb]
    q = (tiles / scale[..., None]).flatten(-2)[..., :K].to(torch.float8_e4m3fn)
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_tiles`: fp8 [..., K] · scale [..., ceil(K/tile)] -> dense [..., K]."""
    return (q.float() * scale.repeat_interleave(tile, -1)[..., : q.shape[-1]]).to(dtype)


def block_scales_as_rows(scale: torch.Tensor, rows: int, block: int = BLOCK) -> torch.Tensor:
    """Block scales [ceil(rows/b), Kb] -> per-row scales [rows, Kb] (every row of a block shares it)."""
    return scale.repeat_interleave(block, 0)[:rows]


# ------------------------------------------------------------------ GEMMs: C = A Bᵀ, rowwise chunk scales
def gemm_emulated(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """Reference: a [M, K] fp8 with scales [M, Kb], b [N, K] fp8 with scales [N, Kb] -> fp32 [M, N]."""
    return dequantize_tiles(a, a_s) @ dequantize_tiles(b, b_s).t()


def gemm_scaled_mm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """Same contract as `gemm_emulated`, with real FP8 products: one rowwise-scaled
    `torch._scaled_mm` per 128-wide K chunk, partial sums promoted to fp32 (V3 §3.3.2)."""
    K = a.shape[1]
    out = None
    for k, start in enumerate(range(0, K, BLOCK)):
        chunk = slice(start, min(start + BLOCK, K))
        part = torch._scaled_mm(a[:, chunk], b[:, chunk].t(), scale_a=a_s[:, k:k + 1].contiguous(),
                                scale_b=b_s[:, k:k + 1].t().contiguous(), out_dtype=torch.float32)
        out = part if out is None else out.add_(part)
    return out


GEMMS = {"emulate": gemm_emulated, "scaled_mm": gemm_scaled_mm}


@functools.cache
def scaled_mm_available(device: str = "cpu") -> bool:
    """Whether `torch._scaled_mm` with rowwise fp32 scales runs on `device` (probed once)."""
    try:
        a = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        b = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=device),
                               scale_b=torch.ones(1, 16, device=device), out_dtype=torch.float32)
        return bool(torch.all(out == 32))
    except (RuntimeError, ValueError, NotImplementedError, TypeError):
        return False


def resolve_backend(backend: str, device: str = "cpu") -> str:
    if backend == "auto":
        return "scaled_mm" if scaled_mm_available(device) else "emulate"
    if backend not in GEMMS:
        raise ValueError(f"unknown FP8 backend {backend!r}; choose auto, {', '.join(GEMMS)}")
    return backend


# ------------------------------------------------------------------ the FP8 linear
class _Fp8LinearFn(torch.autograd.Function):
    """y = x Wᵀ with Fprop, Dgrad and Wgrad in E4M3 (shapes: x [M, K], W [N, K], dy [M, N])."""

    @staticmethod
    def forward(ctx, x, weight, backend: str):
        gemm = GEMMS[backend]
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        xq, xs = quantize_tiles(x2)                                   # 1×128 along K
        wq, ws = quantize_blocks(weight)                              # 128×128, ws [Nb, Kb]
        y = gemm(xq, xs, wq, block_scales_as_rows(ws, N))             # [M, N] fp32
        xtq, xts = quantize_tiles(x2.t())                             # 128×1: [K, M] tiled along M
        ctx.save_for_backward(xtq, xts, wq, ws)
        ctx.backend, ctx.x_dtype, ctx.w_dtype = backend, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], N).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, wq, ws = ctx.saved_tensors
        gemm = GEMMS[ctx.backend]
        N, K = wq.shape
        dy2 = dy.reshape(-1, N)
        dyq, dys = quantize_tiles(dy2)                                # 1×128 along N
        dx = gemm(dyq, dys, wq.t(), block_scales_as_rows(ws.t(), K))  # Dgrad [M, K]
        dytq, dyts = quantize_tiles(dy2.t())                          # 128×1: [N, M] tiled along M
        dw = gemm(dytq, dyts, xtq, xts)                               # Wgrad [N, K]
        return dx.view(*dy.shape[:-1], K).to(ctx.x_dtype), dw.to(ctx.w_dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               backend: str = "emulate") -> torch.Tensor:
    """F.linear with its three GEMMs in fine-grained FP8; the bias is added in x's precision."""
    y = _Fp8LinearFn.apply(x, weight, backend)
    return y if bias is None else y + bias


class Fp8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8; same parameters and state-dict keys as the Linear it replaces."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str = "emulate",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str) -> "Fp8Linear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, backend=backend,
                  device="meta")
        new.weight, new.bias = linear.weight, linear.bias   # share the master weights
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.backend}"


def _fp8_experts_class():
    from nanoseek.model.moe import Experts  # the model never imports fp8; this import points model-ward

    class Fp8Experts(Experts):
        """Stacked routed experts whose per-expert GEMMs run in FP8 (each expert's [2I, H] and
        [H, I] slices get their own 128×128 blocks)."""

        backend = "emulate"

        def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
            gate, up = fp8_linear(x, self.gate_up_proj[e], None, self.backend).chunk(2, dim=-1)
            return fp8_linear(F.silu(gate) * up, self.down_proj[e], None, self.backend)

    return Experts, Fp8Experts


# ------------------------------------------------------------------ convert a built model
KEEP_HIGH_PRECISION = ("lm_head",)  # + Embedding, Router, RMSNorm, attention: not Linear GEMMs


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every Linear (except the head) and the routed experts for FP8 versions, in place.

    Parameters are shared, not copied: the optimizer and the checkpoint see the same fp32
    tensors and keys as before. Returns the model.
    """
    device = next(model.parameters()).device.type
    backend = resolve_backend(backend, device)
    Experts, Fp8Experts = _fp8_experts_class()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, Fp8Linear) or full.split(".")[-1] in KEEP_HIGH_PRECISION:
                continue
            if isinstance(child, nn.Linear):
                setattr(parent, name, Fp8Linear.from_linear(child, backend))
            elif type(child) is Experts:
                child.__class__ = Fp8Experts  # adds no state: only `expert()` changes
                child.backend = backend
    return model


def padding_overhead(model: nn.Module, block: int = BLOCK) -> dict[str, float]:
    """Fprop MACs per token if every FP8 GEMM ran on 128-padded shapes, ÷ the unpadded MACs,
    per Linear kind (the last name part, experts as `experts`) and `total`."""
    def padded(n: int) -> int:
        return -(-n // block) * block
    real: dict[str, int] = {}
    pad: dict[str, int] = {}
    for name, m in model.named_modules():
        shapes = []
        if isinstance(m, Fp8Linear):
            shapes = [tuple(m.weight.shape)]
        elif hasattr(m, "gate_up_proj") and hasattr(m, "backend"):
            shapes = [tuple(m.gate_up_proj.shape[1:]), tuple(m.down_proj.shape[1:])]
        kind = name.split(".")[-1]
        for N, K in shapes:
            real[kind] = real.get(kind, 0) + N * K
            pad[kind] = pad.get(kind, 0) + padded(N) * padded(K)
    out = {k: pad[k] / real[k] for k in sorted(real)}
    out["total"] = sum(pad.values()) / max(1, sum(real.values()))
    return out
