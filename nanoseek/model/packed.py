"""fp32 decode steps on weights packed once for a few-row GEMM (gemv.c's nanoseek_gemm_packed and
nanoseek_moe_packed): what an fp32 model's engine runs its large linears and its MoE experts on.

    from nanoseek.model import gemv, packed
    gemv.load()                         # builds the kernel library (gemv.c) once
    packed.attach(model)                # packs every large fp32 Linear and the stacked experts
    y = packed.linear(x, m.weight, m.packed_weight, m.bias)   # F.linear(x, m.weight, m.bias)
    y = packed.moe(experts, x, topk_idx, topk_weight)         # moe.experts_looped(...)

Why. A decode step of an fp32 model multiplies 1-32 rows by each weight, and MKL's sgemm packs the
weight into its own panel layout on every call. On this machine (2-core Zen 3, AVX2, 1 thread) the
tiny model's batch-16 step spent half its time in MKL GEMMs at ~20-40 GFLOP/s; the largest, the
dense experts' 256 -> 2048 gate/up at 16 rows, took ~780 µs for 17 MFLOP. Packing each weight once
(per weight load) into panels of 16 output columns and running a register-blocked 6x16 kernel over
them, one process, interleaved, µs per product, 16 weight copies cycled, 1 thread, MKL / packed
(2026-11-30; `nanoseek bench gemv --dtype float32 --packed` times the same loop):

    weight (out x in)   1 row      2 rows     8 rows     16 rows    32 rows
    2048 x 256          380/214    538/192    787/340    945/468    1430/740
    512 x 256           94/40      160/32     202/96     218/82     267/167
    1024 x 320          226/155    357/160    450/185    515/248    688/437
    768 x 320           194/107    306/103    311/129    360/164    454/297
    256 x 1024          114/118    184/121    234/151    303/194    407/335
    128 x 256           21/15      19/14      28/22      34/32      54/50

The kernel reads a panel (K x 16 values) from memory once and uses it for every 6-row chunk of x from
L1, so 2 rows cost about what 1 row costs (MKL: up to 3x). A Python custom op's call costs ~20-30 µs
inside a compiled graph, which small weights do not repay: compiled steps call native.py's C++
operators instead (~2 µs), so with those every weight of at least MIN_WEIGHT_NATIVE values is packed
(small: the ~50 small linears of a step, 8.3 -> 6.6 ms at 2 rows, 6.8 -> 5.9 at 1, in one process);
eager products (Python, with ctypes) take packs of at least MIN_WEIGHT values only. The MoE op runs
each expert on the rows that chose it: at 16 tokens, top-2 of 8 experts, a quarter of the FLOPs of
experts_dense (every expert on every row), each expert's weights read once.

At 1-3 rows the kernel reads 4, 3 or 2 panels side by side (gemv.c's group_rows; the same FMAs in
the same order, bit-identical): one core reads ~10 GB/s from one stream and ~18 from four. Intel
Xeon (AVX-512 and AMX, which these AVX2 kernels do not use; 105 MB of L3), 2026-12-01, weights cycled
far beyond L3 (377 MB of small's experts, 1 thread, interleaved, `/tmp/e18/ab_kernel.py`), one
stream -> grouped, GB/s of weights:
the MoE op at 1 / 2 / 3 rows 9.8 -> 13.3, 10.0 -> 13.5, 10.1 -> 13.3 (1.31-1.36x); GEMMs such as
1024 x 320 11.0 -> 15.2 at 1 row, 14.5 at 2, 13.3 at 3 (1.19-1.39x across small's shapes; 4 rows
and more unchanged). In the engine, where small's weights fit in that L3, it moved little: small's
compiled decode at batch 1 ran 1.00-1.04x, one process, paired (on the Python ops, swapping the
library between generates, `/tmp/e18/ab_engine.py`).

From 4 rows on, where the CPU has AVX-512F (checked at run time; the library is built for AVX2), a
zmm holds a whole panel row and a chunk of up to 12 rows runs on one weight load and one broadcast
a row per k (gemv.c's panel_rows512): half the FMA instructions, bit-identical again. Same Xeon,
µs per product, AVX2 / AVX-512 (`/tmp/e18/ab512.py`): 2048 x 256 at 8 / 16 / 32 rows 253/169,
443/311, 866/614; 768 x 256 96/63, 170/118, 331/232; 4-5 rows ~1.05x. Tiny's compiled decode at
batch 16 in one process, paired, same tokens: 4,882 -> 5,339 tok/s (1.09x, `nanoseek_avx512(0|1)`
switched between generates, `/tmp/e18/ab512_engine.py`).

In the engine (tiny, batch 16, 64 greedy tokens, 1 thread, `LLM(pack_weights=False)` vs True in one
process, interleaved, 10 rounds): packed linears alone 1.24-1.27x, with the MoE op 1.48x
(1,552 -> 2,219 tok/s); the same tokens.

Where the packs live and why they cannot go stale. `attach` registers each pack as a non-persistent
buffer beside its weight (`Linear.packed_weight`, `Experts.packed_gate_up` / `packed_down`): compiled
decode graphs take them as inputs like the weights, and checkpoints never see them. Every product
first compares the weight's data pointer and version counter (bumped by every in-place write: an
optimizer step, `load_state_dict`, LLM.update_weights) with those it was packed from, and packs again
when they differ, so a policy trained in place between generations is never served stale weights.
This check runs inside the Python ops at run time; compiled code on native.py's C++ ops (which
cannot read a version counter) runs after `refresh(module)`, the same check for every pack of the
module at once (~40 µs for small's 90 packs; engine/graphs.py calls it at every step). Two writes
leave the version alone: through `.data`, and torch's fused AdamW; LLM.update_weights() (what a
trainer calls after its step anyway, since the prefix cache holds KV of the old weights) has every
pack made again (`forget`).

A pack holds its weight viewed as [N, K]: a Linear's [out, in]; Experts.gate_up_proj [E, 2I, H] as
[E·2I, H] and down_proj [E, H, I] as [E·H, I], so each expert owns whole panels (2I and H must be
multiples of PANEL, or the experts stay unpacked).

Memory: the packs are a second copy of those weights (tiny: 15 MB); attach packs nothing past
MAX_BYTES. bf16 models take gemv.py's kernel instead (memory-bound at decode sizes; no copy).

Reference: F.linear in float64 and moe.experts_looped (tests/model/test_packed.py); engines on the
packs against engines without them (tests/engine/test_graphs.py).
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from nanoseek.model import gemv, native

PANEL = 16              # output columns per panel (gemv.c's PANEL)
MAX_ROWS = 32           # rows of x the kernel takes (the largest decode capture size); more go to F.linear
MIN_WEIGHT = 1 << 16    # eager products: smaller weights stay on MKL (table above: 128 x 256 gains ~1 µs)
MIN_WEIGHT_NATIVE = 1 << 12   # with native.py's C++ ops, compiled steps pack weights from this size
MAX_BYTES = 1 << 30     # packs are a second copy of the weights: attach stops at this many bytes

_packed_from: dict[int, tuple[int, int]] = {}   # pack's data_ptr -> (weight's data_ptr, weight's _version)


def shape(src: torch.Tensor) -> tuple[int, int]:
    """(N, K) of the matrix a pack of src multiplies by: src viewed as [-1, K]."""
    return src.numel() // src.shape[-1], src.shape[-1]


def _numel(src: torch.Tensor) -> int:
    """Values in a pack of src: whole panels of PANEL rows of the [N, K] view."""
    N, K = shape(src)
    return -(-N // PANEL) * PANEL * K


def _fill(src: torch.Tensor, out: torch.Tensor) -> None:
    w = src.detach().reshape(-1, src.shape[-1]).contiguous()
    N, K = w.shape
    gemv.lib().nanoseek_pack16(w.data_ptr(), w.stride(0), out.data_ptr(), N, K)
    global _generation
    _generation += 1
    _packed_from[out.data_ptr()] = (src.data_ptr(), src._version)


def pack(src: torch.Tensor) -> torch.Tensor:
    """A new pack of src (fp32, CPU, viewed as [N, K]): [ceil(N / PANEL) · PANEL · K] values."""
    out = torch.empty(_numel(src), dtype=torch.float32)
    _fill(src, out)
    return out


def fresh(src: torch.Tensor, p: torch.Tensor) -> None:
    """Packs src into p again if src changed since p was made from it."""
    if _packed_from.get(p.data_ptr()) != (src.data_ptr(), src._version):
        _fill(src, p)


class _Seen:
    """What refresh() last saw of a module's packed weights, to tell in ~40 µs (90 weights) that
    nothing changed: each weight's version counter and data pointer, read with C-level map()s."""

    def __init__(self, module: nn.Module):
        found = [(m, src, name) for m in module.modules() for name, src in _PACKS if name in m._buffers]
        self.pairs = found
        self.dicts, self.names = [m._parameters for m, _, _ in found], [src for _, src, _ in found]
        self.state = None

    def now(self) -> tuple:
        ws = list(map(dict.__getitem__, self.dicts, self.names))
        return _generation, list(map(_version, ws)), list(map(torch.Tensor.data_ptr, ws))


_version = operator.attrgetter("_version")
_generation = 0        # bumped by every pack made and by forget(): refresh() then looks at each pack


def refresh(module: nn.Module) -> None:
    """Packs again every pack of module whose weight changed since it was made (data pointer or
    version counter; see `fresh`). Compiled code on native.py's ops must run after it: they do not
    check (engine/graphs.py calls it at every step)."""
    seen = module.__dict__.get("_nanoseek_packs")
    if seen is None:                             # attach() drops it: the packs may have changed
        seen = module.__dict__["_nanoseek_packs"] = _Seen(module)
    if seen.state is not None and seen.now() == seen.state:
        return
    for m, src, name in seen.pairs:
        fresh(m._parameters[src], m._buffers[name])
    seen.state = seen.now()


def forget(model: nn.Module) -> None:
    """Every pack of model is packed again at its next use (LLM.update_weights() calls this: weights
    written without a version bump, through `.data` or a fused optimizer, are caught there too)."""
    global _generation
    _generation += 1
    for b in model.buffers():
        _packed_from.pop(b.data_ptr(), None)


def _run(x: torch.Tensor, src: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fresh(src, p)
    if x.stride(-1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    M, K = x.shape
    N = shape(src)[0]
    y = torch.empty(M, N, dtype=torch.float32)
    gemv.lib().nanoseek_gemm_packed(x.data_ptr(), x.stride(0), p.data_ptr(), None if bias is None else bias.data_ptr(),
                                    y.data_ptr(), N, M, N, K, torch.get_num_threads())
    return y


@torch.library.custom_op("nanoseek::gemm_packed", mutates_args=())
def _gemm_packed_op(x: torch.Tensor, src: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _run(x, src, p, bias)


@_gemm_packed_op.register_fake
def _(x, src, p, bias):
    return x.new_empty(x.shape[0], shape(src)[0])


def _usable(x: torch.Tensor, src: torch.Tensor, p: torch.Tensor | None) -> bool:
    """A pack exists, all fp32 on CPU, at most MAX_ROWS rows, no autograd."""
    if p is None or p.dtype != torch.float32 or x.dtype != torch.float32 or src.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or x.numel() == 0 or x.numel() // x.shape[-1] > MAX_ROWS:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or src.requires_grad))


def fits(x: torch.Tensor, src: torch.Tensor, p: torch.Tensor | None) -> bool:
    """Whether `linear` runs on the pack (`_usable`); in eager calls only for weights of at least
    MIN_WEIGHT values (a small one's Python call costs more than MKL's product; compiled steps call
    native.py's ops, ~2 µs)."""
    return _usable(x, src, p) and (src.numel() >= MIN_WEIGHT or torch.compiler.is_compiling())


def linear(x: torch.Tensor, src: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ src.view(-1, K)ᵀ (+ bias) on the pack p (once `fits` said yes). Eager calls go
    straight to the kernel; traced ones through native.py's C++ operator (one opaque call in the
    graph, no Python; refresh() first), or this module's Python custom op without it."""
    x2 = x.reshape(-1, x.shape[-1])
    if not torch.compiler.is_compiling():
        y = _run(x2, src, p, bias)
    elif native.available():            # no staleness check inside: see refresh()
        y = torch.ops.nanoseek_native.gemm_packed(x2.contiguous(), p, None if bias is None else bias.contiguous(),
                                                   shape(src)[0])
    else:
        y = _gemm_packed_op(x2, src, p, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


# ------------------------------------------------------------------ MoE experts
def _moe(x, topk_idx, topk_weight, gate_up_proj, down_proj, p_gate_up, p_down) -> torch.Tensor:
    fresh(gate_up_proj, p_gate_up)
    fresh(down_proj, p_down)
    x = x.contiguous()
    idx = topk_idx.contiguous().to(torch.int64)
    w = topk_weight.contiguous().to(torch.float32)
    (N, H), (E, I) = x.shape, (down_proj.shape[0], down_proj.shape[2])
    y = torch.empty(N, H, dtype=torch.float32)
    rc = gemv.lib().nanoseek_moe_packed(x.data_ptr(), N, H, idx.data_ptr(), w.data_ptr(), idx.shape[1],
                                        p_gate_up.data_ptr(), p_down.data_ptr(), E, I, y.data_ptr(),
                                        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"moe_packed failed: an expert index outside 0..{E - 1}, or out of memory")
    return y


@torch.library.custom_op("nanoseek::moe_packed", mutates_args=())
def _moe_op(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, gate_up_proj: torch.Tensor,
            down_proj: torch.Tensor, p_gate_up: torch.Tensor, p_down: torch.Tensor) -> torch.Tensor:
    return _moe(x, topk_idx, topk_weight, gate_up_proj, down_proj, p_gate_up, p_down)


@_moe_op.register_fake
def _(x, topk_idx, topk_weight, gate_up_proj, down_proj, p_gate_up, p_down):
    return torch.empty_like(x)


def moe_fits(experts, x: torch.Tensor) -> bool:
    """Whether `moe` runs these experts (moe.Experts: stacked gate_up_proj [E, 2I, H], down_proj
    [E, H, I]) on their packs for x [N, H]."""
    p = getattr(experts, "packed_down", None)
    return p is not None and _usable(x, experts.gate_up_proj, getattr(experts, "packed_gate_up", None))


def moe(experts, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Σ_j topk_weight[n, j] · expert_{topk_idx[n, j]}(x[n]) on the packs (once moe_fits said yes);
    each expert on the rows that chose it (gemv.c's nanoseek_moe_packed)."""
    if torch.compiler.is_compiling() and native.available():      # no staleness check inside: refresh()
        E, _, I = experts.down_proj.shape
        return torch.ops.nanoseek_native.moe_packed(x.contiguous(), topk_idx.contiguous().to(torch.int64),
                                                    topk_weight.contiguous().to(torch.float32),
                                                    experts.packed_gate_up, experts.packed_down, E, I)
    run = _moe_op if torch.compiler.is_compiling() else _moe
    return run(x, topk_idx, topk_weight, experts.gate_up_proj, experts.down_proj,
               experts.packed_gate_up, experts.packed_down)


_PACKS = (("packed_weight", "weight"), ("packed_gate_up", "gate_up_proj"), ("packed_down", "down_proj"))


def _eligible(w, min_weight: int) -> bool:
    return (isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.device.type == "cpu"
            and w.numel() >= min_weight)


def attach(model: nn.Module, max_bytes: int = MAX_BYTES) -> int:
    """Packs the model's large fp32 weights (plain nn.Linear, stacked experts) into buffers beside
    them (see the module docstring); bytes packed. All or nothing: past max_bytes none is packed
    (layers of one kind share a compiled graph, which must find the same buffers in each). Needs
    gemv.load(); a module packed already keeps its pack."""
    if not gemv.available():
        return 0
    least = MIN_WEIGHT_NATIVE if native.load() else MIN_WEIGHT
    todo = []
    for m in model.modules():
        if type(m) is nn.Linear and _eligible(m.weight, least):
            todo.append((m, "packed_weight", m.weight))
        elif (isinstance(getattr(m, "gate_up_proj", None), nn.Parameter) and m.gate_up_proj.dim() == 3
              and isinstance(getattr(m, "down_proj", None), nn.Parameter) and m.down_proj.dim() == 3
              and m.gate_up_proj.shape[1] % PANEL == 0 and m.down_proj.shape[1] % PANEL == 0
              and _eligible(m.gate_up_proj, least) and _eligible(m.down_proj, least)):
            todo += [(m, "packed_gate_up", m.gate_up_proj), (m, "packed_down", m.down_proj)]
    todo = [t for t in todo if getattr(t[0], t[1], None) is None]
    sizes = [_numel(src) * 4 for _, _, src in todo]
    if sum(sizes) > max_bytes:
        return 0
    for m, name, src in todo:
        m.register_buffer(name, pack(src), persistent=False)
    for m in model.modules():
        m.__dict__.pop("_nanoseek_packs", None)
    return sum(sizes)
