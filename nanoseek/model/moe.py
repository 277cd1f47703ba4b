"""DeepSeekMoE (V3 §2.1.2): sigmoid router with group-limited top-k and a selection-only bias,
fine-grained routed experts, shared experts, and the pieces of V3's load balancing.

Router, per token (deepspec §2.2):
  s = sigmoid(x W_gᵀ) in fp32;  choice = s + e_score_correction_bias (the bias picks, never weighs)
  group score = sum of the top-2 choice scores in each of n_group groups; keep topk_group groups;
  experts of the other groups are masked with −inf, so they can never be chosen (the official
  code's rule; masking with 0.0 could pick a masked expert whenever s + b < 0)
  top-k of the masked choice scores; weights = s at those experts, normalised to sum 1 when
  norm_topk_prob, times routed_scaling_factor.
Output = Σ_k w_k · Expert_k(x) + SharedExperts(x) (the residual is the block's).

Expert dispatch, three implementations of one function (tests check they agree):
  `experts_grouped` sort the (token, expert) pairs by expert and run all experts as two grouped
                    GEMMs (`torch._grouped_mm`, offsets = cumulative counts: no per-expert Python
                    loop, one gradient for each stacked weight instead of E slices zero-filled and
                    summed); the routing weight scales the [pairs, I] activation before the down
                    projection (down is linear and I < H, so fewer products); tokens gathered with
                    index_select and summed back with index_add_ (x[idx]'s backward is an
                    accumulating index_put: 3.0 vs 1.5 ms fp32, 4.2 vs 0.5 ms bf16, at 4096 × 256).
                    Under bf16 each expert's rows are padded to a multiple of 64 (zero-weight rows
                    of token 0, which add exact zeros): grouped_mm runs each group through oneDNN,
                    which JIT-compiles a kernel per new shape, and counts that change every step
                    kept it compiling (perf: Xbyak, primitive cache and page faults ~20 % of a bf16
                    step; padded, 289 → 272 ms per tiny step, 1 thread). The fast path (tiny MoE
                    layer forward+backward, 1 thread: 41.7 → 35.3 ms fp32); falls back to
                    `experts_sorted` where grouped_mm does not run (other dtypes or devices) or the
                    experts are a subclass with its own `expert()` (precision/fp8.py). Tried: the shared
                    expert as one more group of the same grouped GEMMs (30.0 → 35.3 ms, slower:
                    its 2048-row GEMMs are faster as plain Linears).
  `experts_sorted`  the same sort, then each expert once on its contiguous slice
  `experts_looped`  for each expert, find its tokens with a mask — the reference
Under autocast, grouped_mm (not an autocast op) gets the activations and weights cast to the
autocast dtype here, as F.linear would. The router's logits stay fp32 under autocast (V3 §3.3.1
keeps gating in high precision; transformers' router runs under autocast in bf16).
Experts are stored stacked ([E, 2I, H] gate|up and [E, H, I] down): one tensor per layer for the
optimizer and FSDP, per-expert 2-D tensors in checkpoints (hf.py splits them).

Balancing (used by training, pure functions here): `RouterStats` records per layer the expert
load and the scores; `bias_update` is the auxiliary-loss-free sign step (V3 §2.1.2);
`sequence_balance_loss` the complementary sequence-wise loss (eqs. 17–20).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model import packed
from nanoseek.model.mlp import MLP


@dataclass
class RouterStats:
    layer: int
    scores: torch.Tensor      # [B, T, E] sigmoid affinities (with grad, for the balance loss)
    topk_idx: torch.Tensor    # [B, T, K] chosen experts


class Router(nn.Module):
    """The gate: weight [E, H] and the fp32 `e_score_correction_bias` buffer [E] (no gradient)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x [N, H] -> scores [N, E] fp32, topk_idx [N, K], topk_weight [N, K] fp32."""
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)      # [N, G]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        topk_idx = choice.topk(self.top_k, dim=-1).indices
        weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return scores, topk_idx, weight * self.scaling


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])


GROUP_PAD = {torch.bfloat16: 64}   # see experts_grouped


def eager_under_compile(fn):
    """`torch.compiler.disable(fn)` made only while torch.compile traces (where dynamo sees
    is_compiling() as True and calls the disabled function eagerly, one graph break, as the
    decorator would). The decorator itself imports torch._dynamo: ~3 s of every process's start
    here, in the many processes that never compile (a speedrun starts 30+)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return call


def _grouped_mm_dtype(experts: Experts, x: torch.Tensor) -> torch.dtype | None:
    """The dtype grouped GEMMs run in here, or None where `experts_grouped` must fall back."""
    if not hasattr(torch, "_grouped_mm") or type(experts).expert is not Experts.expert or x.shape[0] == 0:
        return None
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else experts.gate_up_proj.dtype
    ok = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16,)}.get(dev, ())
    return dtype if dtype in ok else None


@eager_under_compile  # data-dependent shapes, and grouped_mm's fake kernel takes only bf16: runs eager
def experts_grouped(experts: Experts, x, topk_idx, topk_weight) -> torch.Tensor:
    """Fast dispatch with grouped GEMMs. x [N, H], topk_* [N, K] -> [N, H]."""
    dtype = _grouped_mm_dtype(experts, x)
    if dtype is None:
        return experts_sorted(experts, x, topk_idx, topk_weight)
    return _grouped_gemms(experts.gate_up_proj, experts.down_proj, x, topk_idx, topk_weight, dtype)


def _grouped_gemms(gate_up_proj, down_proj, x, topk_idx, topk_weight, dtype) -> torch.Tensor:
    """experts_grouped's body on the stacked weights, in `dtype` (one _grouped_mm_dtype allows)."""
    N, K = topk_idx.shape
    flat = topk_idx.flatten()
    order = flat.argsort(stable=True)                      # pairs grouped by expert
    src = order // K                                       # source token of each sorted pair
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0])
    w = topk_weight.flatten()[order]
    pad = GROUP_PAD.get(dtype, 0) if x.device.type == "cpu" else 0
    if pad > 1:  # each expert's rows rounded up to a multiple of `pad`: GEMM shapes recur step to step
        padded = (counts + pad - 1) // pad * pad
        offs = padded.cumsum(0)
        pos = torch.arange(flat.numel(), device=x.device) + (offs - padded - (counts.cumsum(0) - counts))[flat[order]]
        rows = int(offs[-1])
        src = torch.zeros(rows, dtype=src.dtype, device=x.device).index_copy_(0, pos, src)  # pad rows read token 0 …
        w = w.new_zeros(rows).index_copy(0, pos, w)                                          # … with weight 0
    else:
        offs = counts.cumsum(0)
    offs = offs.to(torch.int32)
    w_gate_up, w_down = gate_up_proj.to(dtype), down_proj.to(dtype)
    h = torch._grouped_mm(x.to(dtype).index_select(0, src), w_gate_up.transpose(1, 2), offs=offs)  # [P, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up * w[:, None].to(dtype), w_down.transpose(1, 2), offs=offs)  # [P, H]
    return torch.zeros_like(x).index_add_(0, src, y.to(x.dtype))  # pad rows add exact zeros


def experts_dense(experts: Experts, x, topk_idx, topk_weight) -> torch.Tensor:
    """Every expert on every token, each weighted by its routing weight (0 where not chosen): one
    GEMM for all experts' gate/up, one batched GEMM for their down projections. E/K times the
    FLOPs of a sparse dispatch but ~8 ops, no sort, no data-dependent shapes (it compiles): the
    decode-sized path when N·E is small (a few tokens, few experts: CPU decode is op-bound).
    x [N, H], topk_* [N, K] -> [N, H]."""
    N, H = x.shape
    E, I2 = experts.gate_up_proj.shape[:2]
    dtype = x.dtype
    dense_w = x.new_zeros(N, E, dtype=topk_weight.dtype).scatter_(1, topk_idx, topk_weight)     # [N, E]
    h = F.linear(x, experts.gate_up_proj.to(dtype).reshape(E * I2, H)).view(N, E, I2)           # [N, E, 2I]
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up * dense_w[..., None].to(dtype)                                        # [N, E, I]
    return torch.bmm(a.transpose(0, 1), experts.down_proj.to(dtype).transpose(1, 2)).sum(0).to(x.dtype)


def experts_gathered(experts: Experts, x, topk_idx, topk_weight) -> torch.Tensor:
    """Each (token, expert) pair with its expert's weights gathered: two batched GEMMs over the N·K
    pairs, no sort, static shapes. Reads N·K experts' weights (a copy), so it pays only while N·K
    is well below E (decode of a many-expert model: V3's 256 experts, top-8).
    x [N, H], topk_* [N, K] -> [N, H]."""
    N, K = topk_idx.shape
    flat = topk_idx.flatten()
    dtype = x.dtype
    w_gate_up = experts.gate_up_proj.index_select(0, flat).to(dtype)                            # [P, 2I, H]
    w_down = experts.down_proj.index_select(0, flat).to(dtype)                                  # [P, H, I]
    xs = x.repeat_interleave(K, dim=0)[:, :, None]                                             # [P, H, 1]
    gate, up = torch.bmm(w_gate_up, xs)[..., 0].chunk(2, dim=-1)                              # [P, I] each
    a = F.silu(gate) * up * topk_weight.flatten()[:, None].to(dtype)
    return torch.bmm(w_down, a[:, :, None])[..., 0].view(N, K, -1).sum(1).to(x.dtype)          # [N, H]


@torch.library.custom_op("nanoseek::experts_grouped", mutates_args=())
def _experts_grouped_op(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                        gate_up_proj: torch.Tensor, down_proj: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """experts_grouped's GEMMs as one opaque op for compiled graphs: inductor calls it like a GEMM (its
    output is [N, H] whatever the routing), so a compiled decode step keeps a single graph and
    pays only the chosen experts' FLOPs (no graph break, no data-dependent shapes inside)."""
    return _grouped_gemms(gate_up_proj, down_proj, x, topk_idx, topk_weight, dtype)


@_experts_grouped_op.register_fake
def _(x, topk_idx, topk_weight, gate_up_proj, down_proj, dtype):
    return torch.empty_like(x)


def experts_grouped_op(experts: Experts, x, topk_idx, topk_weight) -> torch.Tensor:
    """experts_grouped through the custom op (what experts_auto takes inside a compiled graph, where
    _grouped_mm_dtype allows it)."""
    return _experts_grouped_op(x, topk_idx, topk_weight, experts.gate_up_proj, experts.down_proj,
                               _grouped_mm_dtype(experts, x))


# experts_auto inside a compiled graph: gathered while N·K <= E·GATHER_SHARE (the chosen experts'
# weights, read by inductor's fused kernels without a copy), dense while N·E <= DENSE_MAX_COMPILED,
# else the grouped custom op. Measured on the tiny preset's compiled decode step (1 thread, forward
# of 4 layers, median of 15 interleaved rounds, 2026-11-30): batch 1 gathered 4.5 ms vs dense 6.7;
# batch 2 5.3 vs 9.1; batch 4 gathered 6.1 vs grouped 9.7 vs dense 10.3; batch 8 gathered 8.4 vs
# grouped 8.7 vs dense 8.8; batch 16 grouped 10.3 vs dense 12.5 (inductor's Python wrapper then).
# With the C++ wrapper (engine/graphs.py), whole generate calls interleaved in one process (64 tokens,
# 1 thread, 5 rounds): tiny batch 16 (N·E = 128) dense 1,736 vs grouped 1,479 tok/s, and 1,638 vs
# 1,521 in a second run; small batch 16 (N·E = 256) dense 537 vs grouped 559. Dense's E/K-fold FLOPs
# (M = 16 GEMMs at ~16 GFLOP/s here) pay while N·E <= 128; the grouped op's ~15 eager ops cost more.
# An fp32 model in an engine has its experts packed (packed.py): past the gathered path, and in eager
# decode steps of at most packed.MAX_ROWS tokens, its MoE op runs them instead (each expert on the
# rows that chose it; tiny batch 16: the engine 1.48x with the packs, most of it from this op).
GATHER_SHARE = 1
DENSE_MAX_COMPILED = 128


def experts_auto(experts: Experts, x, topk_idx, topk_weight) -> torch.Tensor:
    """The dispatch of a forward pass: inside a compiled graph (engine/graphs.py's decode steps) a
    path with static shapes, picked by size (above); everywhere else the grouped GEMMs, which were
    also the fastest eager dispatch at decode sizes (tiny, 3 layers cycled, µs per layer: 1 token
    grouped 460, sorted 379, gathered 600, dense 925; 4 tokens 820 / 921 / 1850 / 1309; 16 tokens
    1573 / 1704 / 8439 / 1586). Subclasses with their own expert() (fp8) always go through
    experts_grouped (which falls back to their expert())."""
    plain = type(experts).expert is Experts.expert
    compiled = plain and torch.compiler.is_compiling() and not torch.is_grad_enabled()
    N, K = topk_idx.shape
    E = experts.gate_up_proj.shape[0] if compiled else 0      # (fp8's subclass stores its weights apart)
    if compiled and N * K <= E * GATHER_SHARE:
        return experts_gathered(experts, x, topk_idx, topk_weight)
    if plain and packed.moe_fits(experts, x):               # compiled past the gathered path, or eager
        return packed.moe(experts, x, topk_idx, topk_weight)
    if compiled and N * E <= DENSE_MAX_COMPILED:
        return experts_dense(experts, x, topk_idx, topk_weight)
    if compiled and _grouped_mm_dtype(experts, x) is not None:
        return experts_grouped_op(experts, x, topk_idx, topk_weight)
    return experts_grouped(experts, x, topk_idx, topk_weight)


def experts_sorted(experts: Experts, x, topk_idx, topk_weight) -> torch.Tensor:
    """Sorted dispatch, one `experts.expert(e, ·)` call per expert's slice (what subclasses such as
    fp8's run, and a reference for experts_grouped). x [N, H], topk_* [N, K] -> [N, H]."""
    N, K = topk_idx.shape
    flat = topk_idx.flatten()
    order = flat.argsort(stable=True)                      # pairs grouped by expert
    token = order // K                                     # source token of each sorted pair
    counts = torch.bincount(flat, minlength=experts.gate_up_proj.shape[0]).tolist()
    xs = x[token]
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(experts.expert(e, xs[start:start + n]))
        start += n
    ys = torch.cat(outs) * topk_weight.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


def experts_looped(experts: Experts, x, topk_idx, topk_weight) -> torch.Tensor:
    """Reference dispatch: one masked pass per expert."""
    out = torch.zeros_like(x)
    for e in range(experts.gate_up_proj.shape[0]):
        token, slot = torch.where(topk_idx == e)
        if token.numel():
            out.index_add_(0, token, experts.expert(e, x[token]) * topk_weight[token, slot, None].to(x.dtype))
    return out


class MoE(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.dispatch = experts_auto  # experts_grouped by size; experts_sorted, experts_looped: the references

    def forward(self, x: torch.Tensor, stats: list | None = None) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        scores, topk_idx, topk_weight = self.gate(flat)
        out = self.dispatch(self.experts, flat, topk_idx, topk_weight).view(B, T, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if stats is not None:
            _record(stats, self, scores.view(B, T, -1), topk_idx.view(B, T, -1))
        return out


@eager_under_compile  # compiled, guards on the list's length and the layer index would recompile per layer
def _record(stats, moe: MoE, scores: torch.Tensor, topk_idx: torch.Tensor) -> None:
    stats.append(RouterStats(moe.layer_idx, scores, topk_idx))   # loads are counted by the caller


# ------------------------------------------------------------------ balancing (pure functions)
@torch.no_grad()
def bias_update(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing: b_i += γ·sign(mean load − load_i), in place; returns bias.

    >>> b = torch.zeros(4); bias_update(b, torch.tensor([6., 2., 0., 0.]), 0.001)
    tensor([-0.0010,  0.0000,  0.0010,  0.0010])
    """
    return bias.add_(gamma * torch.sign(counts.float().mean() - counts.float()))


def sequence_balance_loss(stats: RouterStats, n_experts: int, top_k: int, alpha: float) -> torch.Tensor:
    """L_Bal = α Σ_i f_i P_i per sequence, averaged over sequences (V3 eqs. 17–20).

    f_i = N_r/(K_r T) · #tokens of the sequence routed to i (the actual, bias-included selection),
    P_i = mean over the sequence of s_i / Σ_j s_j. At perfect balance the loss equals α.
    """
    B, T, E = stats.scores.shape
    chosen = F.one_hot(stats.topk_idx, n_experts).sum(2).float()                   # [B, T, E]
    f = chosen.sum(1) * n_experts / (top_k * T)                                     # [B, E]
    p = (stats.scores / stats.scores.sum(-1, keepdim=True)).mean(1)                 # [B, E]
    return alpha * (f * p).sum(-1).mean()
