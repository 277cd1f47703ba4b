"""Compiled decode steps: the forward of a step in which every sequence feeds one token, as
torch.compile'd pieces at fixed batch sizes — vLLM's piecewise CUDA graphs, done with inductor's
CPU code generation.

    graphs = DecodeGraphs(model, cache, scratch_block, sizes=(1, 2, 4, 8, 16))   # LLM(compile=True) builds it
    graphs.warm_up()                     # compiles every size now; prints what it cost
    hidden = graphs.forward(ids, tables, starts)                   # [S, D], S <= max(sizes)

Why pieces. A decode step of the tiny model is ~2,400 eager aten ops for arithmetic that needs
well under a millisecond (issue 13's profile): the time is per-op dispatch. Inductor fuses each
layer's norms, projections, rope, residuals and MLP or MoE into a few kernels. Attention over the
paged latent cache reads a context whose length changes every step, so it stays an eager piece
between two compiled ones (vLLM's split of the graph at attention):
    pre(layer)   RMSNorm → q / latent / rope key projections → rope → (MLA) q absorbed into the
                 latent space (W_UK), the entries to store   [compiled, shape (C, ·)]
    attention    store the entries at their slots, gather each sequence's context, scores, mask,
                 softmax, weighted sum                       [eager, ~8 ops]
    post(layer)  (MLA) W_UV → o_proj → residual → RMSNorm → MLP / MoE → residual   [compiled]
The MoE inside a compiled piece takes the decode-sized dispatch (moe.experts_auto: every expert
on every token, or the chosen experts' weights gathered), whose shapes are static.

Batch sizes. A step of S sequences runs at the smallest capture size C ≥ S; the C − S pad rows
read token 0 at position 0, write their entries to a scratch block no sequence owns (the engine
allocates one more block than its block manager hands out) and attend to that slot alone, and
their outputs are dropped. Every layer of one kind
shares one compiled graph per size (the functions take the layer as an argument; dynamo lifts
its parameters to graph inputs), so compiling costs sizes × {pre, post dense, post MoE}, not
× layers. Steps with a prefill chunk, speculative drafts or more than max(sizes) sequences run
the eager model, which stays the reference: tests/engine/test_graphs.py checks the compiled
step against it (same greedy tokens, logits within tolerance).

Compile cost. The first call of a piece at a size compiles it; `warm_up()` does that for every
size up front and reports the seconds. Inductor's on-disk caches (FX graph cache, under
TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_$USER) make a second start mostly a cache load.
"""
from __future__ import annotations

import time
import types

import torch
import torch.nn.functional as F

from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE
from nanoseek.model.rope import apply_rope

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32)


# ------------------------------------------------------------------ the pieces (plain functions of a layer)
def mla_pre(block, x, cos, sin):
    """x [C, D] -> q in the latent space [C, H, kv_rank + rope], entries to store [C, kv_rank + rope]."""
    attn = block.self_attn
    q, latent, k_pe = attn.project(block.input_layernorm(x)[None])
    q_nope, q_pe = q[0].split([attn.nope, attn.rope], dim=-1)
    q_pe = apply_rope(q_pe[None], cos, sin, attn.interleaved)[0]
    k_pe = apply_rope(k_pe, cos, sin, attn.interleaved)[0]
    w_uk = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope + attn.v_dim, attn.kv_rank)[:, : attn.nope]
    q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk)
    return torch.cat([q_lat, q_pe], dim=-1), torch.cat([latent[0], k_pe], dim=-1)


def gqa_pre(block, x, cos, sin):
    """x [C, D] -> q [C, H, d] (rotated), entries to store [C, 2·kv_heads·d] (k rotated, v)."""
    attn = block.self_attn
    h = block.input_layernorm(x)[None]
    C = x.shape[0]
    q = apply_rope(attn.q_proj(h).view(1, C, attn.n_heads, -1), cos, sin, attn.interleaved)[0]
    k = apply_rope(attn.k_proj(h).view(1, C, attn.kv_heads, -1), cos, sin, attn.interleaved)[0]
    v = attn.v_proj(h)[0]
    return q, torch.cat([k.flatten(1), v], dim=-1)


def _attn_out(block, x, attn_out):
    attn = block.self_attn
    if isinstance(attn, MLA):
        w_uv = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope + attn.v_dim, attn.kv_rank)[:, attn.nope:]
        attn_out = torch.einsum("thc,hdc->thd", attn_out, w_uv)
    return x + attn.o_proj(attn_out.flatten(1))


def post_dense(block, x, attn_out):
    """attn_out [C, H, ·] (MLA: in the latent space) -> the output [C, D] of a layer with a dense MLP."""
    x = _attn_out(block, x, attn_out)
    return x + block.mlp(block.post_attention_layernorm(x))


def post_moe(block, x, attn_out):
    """The same for a MoE layer: its own function, so that its compiled graphs never share a cache
    with the dense layers' (the compiled pieces skip guards on the layer's modules, see DecodeGraphs)."""
    x = _attn_out(block, x, attn_out)
    return x + block.mlp(block.post_attention_layernorm(x)[None], None)[0]


def final_norm(model, x):
    return model.norm(x)


# ------------------------------------------------------------------ attention over the paged cache (eager)
def mla_attention(block, pool, q, entries, new_slots, ctx_slots, mask):
    """q [C, H, W], entries [C, W]; pool [slots, W]; mask [C, L] -> [C, H, kv_rank]."""
    attn = block.self_attn
    pool[new_slots] = entries.to(pool.dtype)
    ctx = pool[ctx_slots].to(q.dtype)                                            # [C, L, W]
    scores = torch.bmm(q, ctx.transpose(1, 2)) * attn.scale                    # [C, H, L]
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return torch.bmm(probs, ctx[..., : attn.kv_rank])


def gqa_attention(block, pool, q, entries, new_slots, ctx_slots, mask):
    """q [C, H, d], entries [C, 2·kvh·d]; mask [C, L] -> [C, H, d]."""
    attn = block.self_attn
    pool[new_slots] = entries.to(pool.dtype)
    ctx = pool[ctx_slots].to(q.dtype)                                            # [C, L, 2·kvh·d]
    C, L = ctx.shape[:2]
    k, v = ctx.view(C, L, 2, attn.kv_heads, attn.head_dim).unbind(2)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], enable_gqa=True)
    return out[:, :, 0]


# ------------------------------------------------------------------ one function per layer kind
def mla_dense_layer(block, x, cos, sin, pool, new_slots, ctx_slots, mask):
    """A whole MLA layer with a dense MLP: pre, attention over the paged cache (stores this step's
    entries into `pool` in place), post. x [C, D] -> [C, D]."""
    q, entries = mla_pre(block, x, cos, sin)
    return post_dense(block, x, mla_attention(block, pool, q, entries, new_slots, ctx_slots, mask))


def mla_moe_layer(block, x, cos, sin, pool, new_slots, ctx_slots, mask):
    q, entries = mla_pre(block, x, cos, sin)
    return post_moe(block, x, mla_attention(block, pool, q, entries, new_slots, ctx_slots, mask))


def gqa_dense_layer(block, x, cos, sin, pool, new_slots, ctx_slots, mask):
    q, entries = gqa_pre(block, x, cos, sin)
    return post_dense(block, x, gqa_attention(block, pool, q, entries, new_slots, ctx_slots, mask))


def gqa_moe_layer(block, x, cos, sin, pool, new_slots, ctx_slots, mask):
    q, entries = gqa_pre(block, x, cos, sin)
    return post_moe(block, x, gqa_attention(block, pool, q, entries, new_slots, ctx_slots, mask))


LAYER_FNS = {(True, False): mla_dense_layer, (True, True): mla_moe_layer,
             (False, False): gqa_dense_layer, (False, True): gqa_moe_layer}
_OWN_CODE: dict = {}


def _own_copy(fn, key):
    """`fn` with a code object of its own for this model structure. Dynamo keeps its compiled graphs
    per code object, and the compiled layers skip guards on the layer's modules (DecodeGraphs), so
    two models of different shapes (or attention kinds) must never reach one code object: each
    structure gets its copy, made once per process (a second engine on the same structure reuses the
    graphs compiled for the first)."""
    if (fn, key) not in _OWN_CODE:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_OWN_CODE)}")
        _OWN_CODE[fn, key] = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return _OWN_CODE[fn, key]


class DecodeGraphs:
    """The model's decode step at fixed batch sizes: one compiled function per layer (attention
    over the paged cache inside it, the context length a dynamic dimension)."""

    def __init__(self, model, cache, scratch_block: int, sizes=DEFAULT_SIZES, compile: bool = True, log=None):
        """cache: the engine's KVMemory; scratch_block: a block of it that no sequence owns."""
        self.model, self.cache, self.scratch_block = model, cache, scratch_block
        self.sizes = tuple(sorted(set(int(s) for s in sizes)))
        self.is_mla = isinstance(model.layers[0].self_attn, MLA)
        self.log, self.compiled = log, compile
        self.compile_seconds: float | None = None
        # guards on the layer's modules are skipped: every call passes another layer of the same
        # structure (its weights are graph inputs), and checking ~20 parameters' metadata per call
        # cost more than the graph itself at decode sizes. Graphs of one function differ only by the
        # batch size, a guard that stays. So a function must only ever see layers of one structure:
        # each (attention kind, MLP kind) has its function, copied per model structure (_own_copy).
        opts = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        param = next(model.parameters())
        key = (repr(model.config), param.dtype, param.device.type,
               tuple(sorted({type(m).__qualname__ for m in model.modules()})))
        wrap = (lambda f: torch.compile(_own_copy(f, key), dynamic=False, options=opts)) if compile else (lambda f: f)
        fns = {}
        self.layer_fns = []
        for b in model.layers:
            kind = (isinstance(b.self_attn, MLA), isinstance(b.mlp, MoE))
            if kind not in fns:
                fns[kind] = wrap(LAYER_FNS[kind])
            self.layer_fns.append(fns[kind])
        self.norm = wrap(final_norm)
        self._arange = torch.arange(cache.num_blocks * cache.block_size, device=cache.pool[0].device)

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def forward(self, ids: list[int], tables: list[list[int]], starts: list[int]) -> torch.Tensor:
        """One token per sequence: ids[i] at position starts[i] along block table tables[i].
        Returns the final normed hidden states [S, D]."""
        S = len(ids)
        C = self.size_for(S)
        if C is None:
            raise ValueError(f"{S} sequences exceed the largest capture size {self.max_size}")
        dev, bs = self.cache.pool[0].device, self.cache.block_size
        # the context is every slot of the first nb blocks (at least 2 slots: a dynamic dimension of
        # size 1 would be specialised); the mask hides the slots past each sequence's position
        nb = max(-(-(max(starts) + 1) // bs), -(-2 // bs))
        # pad rows and table entries past a sequence's blocks point at the scratch block; a pad row
        # (token 0 at position 0) writes its slot 0 and attends to it alone
        rows = [t[:nb] + [self.scratch_block] * (nb - len(t[:nb])) for t in tables]
        rows += [[self.scratch_block] * nb] * (C - S)
        table = torch.tensor(rows, dtype=torch.long, device=dev)
        start_t = torch.tensor(list(starts) + [0] * (C - S), dtype=torch.long, device=dev)
        slots = (table[:, :, None] * bs + self._arange[:bs]).view(C, -1)                # [C, L]
        mask = self._arange[:nb * bs][None, :] <= start_t[:, None]                      # [C, L]
        new_slots = slots.gather(1, start_t[:, None]).view(-1)
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(slots, 1)
            torch._dynamo.maybe_mark_dynamic(mask, 1)
        ids_t = torch.tensor(list(ids) + [0] * (C - S), dtype=torch.long, device=dev)
        model = self.model
        cos, sin = model.rotary(start_t[None])
        x = model.embed_tokens(ids_t)
        for block, layer in zip(model.layers, self.layer_fns):
            x = layer(block, x, cos, sin, self.cache.pool[block.self_attn.layer_idx], new_slots, slots, mask)
        return self.norm(model, x)[:S]

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile (or load from inductor's cache) every size now; returns the seconds it took. The
        pad rows' writes all land in the scratch slot, so this touches no sequence's cache."""
        t0 = time.perf_counter()
        for size in self.sizes:
            self.forward([0] * size, [[self.scratch_block]] * size, [0] * size)
        self.compile_seconds = time.perf_counter() - t0
        if self.log:
            self.log(f"compiled decode steps at batch sizes {', '.join(map(str, self.sizes))} in "
                     f"{self.compile_seconds:.1f} s")
        return self.compile_seconds
