"""Compiled decode steps: the forward of a step in which every sequence feeds its newest token
(and, with speculative decoding, its drafts), as torch.compile'd functions at fixed batch sizes —
vLLM's CUDA-graph capture sizes, done with inductor's CPU code generation.

    graphs = DecodeGraphs(model, cache, scratch_block, sizes=(1, 2, 4, 8, 16))   # LLM(compile=True) builds it
    graphs.warm_up()                     # compiles every size now; prints what it cost
    hidden = graphs.forward(ids, tables, starts)                   # [S, D], S <= max(sizes)

Why. A decode step of the tiny model was ~2,400 eager aten ops for arithmetic that needs well
under a millisecond (issue 13's profile): the time went to per-op dispatch. Here a run of up to
LAYERS_PER_GRAPH whole layers is one compiled function (the first run also does the step's index
math and the embedding, `grid`; the last the final norm), each layer: RMSNorm, projections, rope, W_UK absorption, storing the step's entries into the
paged pool, attention over the sequence's context, W_UV, o_proj, residuals and the MLP or MoE.
Inductor fuses the elementwise work and calls GEMMs for the rest. The context length changes every
step, so it is a dynamic dimension (one graph per batch size, not per length): the context is
every slot of the sequence's first blocks, the mask hides the rest. Every layer of one kind shares
one compiled graph per size (the functions take the layer as an argument; dynamo lifts its
parameters to graph inputs, and guards on the layer's modules are skipped), so compiling costs
sizes × distinct runs, not × layers: the 28-layer 1.5B model is 4 runs of 7 (3 distinct: first,
middle, last). A first version compiled pre- and post-attention pieces around eager attention
(vLLM's split at attention): 9 compiled calls and ~32 eager ops a tiny step. One function per layer
did better (tiny, batch 1, graphs.forward 5.9 → 3.2 ms), runs of layers better again (generate,
interleaved in one process: batch 1 179 → 214 tok/s, batch 16 978 → 1,118), and the index math
inside the graph again (214 → 226, 1,118 → 1,224).

MoE inside a compiled layer (moe.experts_auto under compile): few tokens gather the chosen experts'
weights (inductor reads them in place: only those bytes move); more tokens call the grouped GEMMs
as one custom op, sparse FLOPs without a graph break.

The grid. A step of S sequences runs at the smallest capture size C ≥ S, with Q query rows per
sequence (Q = 1 for decode; 1 + k when verifying k drafts, `queries`); row (i, j) is sequence i's
j-th token at position start_i + j. Pad sequences (C − S of them) read token 0 at positions
0..Q−1 of a scratch block no sequence owns (the engine allocates one block more than its block
manager hands out) and attend there alone; a real sequence feeding fewer than Q tokens (a short
draft, a catch-up of one token) has its extra rows repeat its first row (token, hidden, rope
position and context: their MoE routes as that row does, so they read no experts of their own)
and write the scratch block. Only valid rows come back, in the eager runner's packed order. The
MTP module's pass (speculative.py: catching its cache up by 1..1+k tokens, then drafting) runs on
the same grid (`mtp_forward`), compiled at 1 and 1 + k rows: a catch-up after a rejection and a
recurrent draft take the 1-row graph. Steps with a prefill chunk, larger catch-ups or more than
max(sizes) sequences run the eager model, which stays the reference: tests/engine/test_graphs.py
checks the graphs against it (same greedy tokens, logits and draft distributions within tolerance).

Packs. An fp32 model's packed weights (model/packed.py) run on native.py's C++ operators inside the
graphs, which do not check whether a pack is stale: every call refreshes the packs first
(`packed.refresh`, ~40 µs for small).

Wrapper. Models of at most CPP_WRAPPER_MAX_BYTES of weights compile with inductor's C++ wrapper
(the code that calls a graph's kernels), which removed ~3 ms of Python from a small model's step;
larger models keep the Python one, whose cost is noise beside reading their weights.

Dispatch. Once warm, a call goes straight into the code dynamo made for its (batch size, rows per
sequence), the guards of that code still checked (dispatch.py's `Direct`): dynamo's own frame
evaluation cost ~0.5 ms a call, a tenth of a small model's step.

Compile cost. The first call of a function at a size compiles it; `warm_up()` does that for every
size up front and reports the seconds. Inductor's on-disk caches (FX graph cache, under
TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_$USER) make a second start mostly a cache load.
"""
from __future__ import annotations

import collections
import itertools
import time
import types

import torch
import torch.nn.functional as F

from nanoseek.engine.dispatch import Direct
from nanoseek.model import packed
from nanoseek.model.fastpath import run_linear
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE
from nanoseek.model.rope import apply_rope

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32)


# ------------------------------------------------------------------ the pieces (plain functions of a layer)
def mla_pre(block, x, cos, sin):
    """x [C, D] -> q in the latent space [C, H, kv_rank + rope], entries to store [C, kv_rank + rope]."""
    attn = block.self_attn
    h = block.input_layernorm(x)
    # MLA.project, without its fused GEMM: that one concatenates q_a's and kv_a's weights on every
    # call (a copy of both per layer per step; 30 MB a layer at V3's size); two GEMMs read them in place
    if hasattr(attn, "q_proj"):
        q = run_linear(attn.q_proj, h)
    else:
        q = run_linear(attn.q_b_proj, attn.q_a_layernorm(run_linear(attn.q_a_proj, h)))
    latent, k_pe = run_linear(attn.kv_a_proj_with_mqa, h).split([attn.kv_rank, attn.rope], dim=-1)
    latent = attn.kv_a_layernorm(latent)
    q_nope, q_pe = q.view(x.shape[0], attn.n_heads, -1).split([attn.nope, attn.rope], dim=-1)
    q_pe = apply_rope(q_pe[None], cos, sin, attn.interleaved)[0]
    k_pe = apply_rope(k_pe[None], cos, sin, attn.interleaved)[0]
    w_uk = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope + attn.v_dim, attn.kv_rank)[:, : attn.nope]
    q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk)
    return torch.cat([q_lat, q_pe], dim=-1), torch.cat([latent, k_pe], dim=-1)


def gqa_pre(block, x, cos, sin):
    """x [C, D] -> q [C, H, d] (rotated), entries to store [C, 2·kv_heads·d] (k rotated, v)."""
    attn = block.self_attn
    h = block.input_layernorm(x)[None]
    C = x.shape[0]
    q = apply_rope(run_linear(attn.q_proj, h).view(1, C, attn.n_heads, -1), cos, sin, attn.interleaved)[0]
    k = apply_rope(run_linear(attn.k_proj, h).view(1, C, attn.kv_heads, -1), cos, sin, attn.interleaved)[0]
    v = run_linear(attn.v_proj, h)[0]
    return q, torch.cat([k.flatten(1), v], dim=-1)


def _attn_out(block, x, attn_out):
    attn = block.self_attn
    if isinstance(attn, MLA):
        w_uv = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope + attn.v_dim, attn.kv_rank)[:, attn.nope:]
        attn_out = torch.einsum("thc,hdc->thd", attn_out, w_uv)
    return x + run_linear(attn.o_proj, attn_out.flatten(1))


def post_dense(block, x, attn_out):
    """attn_out [C, H, ·] (MLA: in the latent space) -> the output [C, D] of a layer with a dense MLP."""
    x = _attn_out(block, x, attn_out)
    return x + block.mlp(block.post_attention_layernorm(x))


def post_moe(block, x, attn_out):
    """The same for a MoE layer: its own function, so that its compiled graphs never share a cache
    with the dense layers' (the compiled pieces skip guards on the layer's modules, see DecodeGraphs)."""
    x = _attn_out(block, x, attn_out)
    return x + block.mlp(block.post_attention_layernorm(x)[None], None)[0]


# ------------------------------------------------------------------ attention over the paged cache
def mla_attention(block, pool, q, entries, new_slots, ctx_slots, mask):
    """Q query rows per sequence, sequence-major. q [C·Q, H, W], entries [C·Q, W]; pool [slots, W];
    ctx_slots [C, L]; mask [C, Q, L] -> [C·Q, H, kv_rank]."""
    attn = block.self_attn
    pool[new_slots] = entries.to(pool.dtype)
    C, Q, L = mask.shape
    H = q.shape[1]
    ctx = pool[ctx_slots].to(q.dtype)                                            # [C, L, W]
    scores = torch.bmm(q.view(C, Q * H, -1), ctx.transpose(1, 2)) * attn.scale  # [C, Q·H, L]
    scores = scores.view(C, Q, H, L).masked_fill(~mask[:, :, None, :], float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype).view(C, Q * H, L)
    return torch.bmm(probs, ctx[..., : attn.kv_rank]).view(C * Q, H, -1)


def gqa_attention(block, pool, q, entries, new_slots, ctx_slots, mask):
    """q [C·Q, H, d], entries [C·Q, 2·kvh·d]; mask [C, Q, L] -> [C·Q, H, d]."""
    attn = block.self_attn
    pool[new_slots] = entries.to(pool.dtype)
    C, Q, L = mask.shape
    ctx = pool[ctx_slots].to(q.dtype)                                            # [C, L, 2·kvh·d]
    k, v = ctx.view(C, L, 2, attn.kv_heads, attn.head_dim).unbind(2)
    qs = q.view(C, Q, q.shape[1], -1).transpose(1, 2)                          # [C, H, Q, d]
    out = F.scaled_dot_product_attention(qs, k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, :, :], enable_gqa=True)
    return out.transpose(1, 2).reshape(C * Q, q.shape[1], -1)


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


def grid(rotary, table, meta, Q: int, bs: int, scratch: int, skip_first: bool):
    """The step's index math, inside the first compiled function (in eager it was ~20 small ops):
    table [C, nb] block ids, meta [C, 2] (start, number of valid rows) -> cos, sin of the C·Q rows'
    positions, new_slots [C·Q], ctx_slots [C, L], mask [C, Q, L] with L = nb · block size."""
    C, nb = table.shape
    L = nb * bs
    ar = torch.arange(max(L, Q), device=table.device)
    slots = (table[:, :, None] * bs + ar[:bs]).view(C, L)
    j = ar[:Q]
    start, qlen = meta[:, 0], meta[:, 1]
    pos = start[:, None] + j                                                         # [C, Q]
    valid = j < qlen[:, None]
    # an invalid row (a sequence feeding fewer than Q tokens) is a copy of its sequence's first row:
    # its token (and hidden, in the MTP pass; DecodeGraphs fills them in), rope position and context,
    # so that its MoE routes as that row does and reads no experts of its own. It writes its entry
    # into the scratch block; its output is dropped
    seen = torch.where(valid, pos, start[:, None])
    mask = ar[:L] <= seen[:, :, None]                                                # [C, Q, L]
    if skip_first:
        mask = mask & (ar[:L] > 0)
    new_slots = torch.where(valid, slots.gather(1, pos.clamp(max=L - 1)), scratch * bs + j).view(-1)
    cos, sin = rotary(seen.reshape(1, -1))
    return cos, sin, new_slots, slots, mask


def mtp_layer(module, embed, rotary, hidden, ids, table, meta, pool, Q: int, bs: int, scratch: int):
    """The MTP module (model/mtp.py) over the paged cache: eh_proj of the normed embedding and hidden,
    its block (MLA + MoE, cache layer N), its norm. hidden [C·Q, D], ids [C·Q] -> [C·Q, D]."""
    cos, sin, new_slots, slots, mask = grid(rotary, table, meta, Q, bs, scratch, True)
    x = run_linear(module.eh_proj, torch.cat([module.enorm(embed(ids)), module.hnorm(hidden)], dim=-1))
    q, entries = mla_pre(module.block, x, cos, sin)
    out = post_moe(module.block, x, mla_attention(module.block, pool, q, entries, new_slots, slots, mask))
    return module.norm(out)


LAYER_FNS = {(True, False): mla_dense_layer, (True, True): mla_moe_layer,
             (False, False): gqa_dense_layer, (False, True): gqa_moe_layer}


def layer_kind(block) -> tuple[bool, bool]:
    return isinstance(block.self_attn, MLA), isinstance(block.mlp, MoE)


def first_layers(blocks, norm, embed, rotary, ids, table, meta, pools, Q: int, bs: int, scratch: int):
    """The first run of layers (dynamo unrolls the loop: one graph, one call a step), starting from
    the token ids and the block tables (`grid`); the final norm too when it is also the last run.
    Returns the hidden states and the grid, for the runs after it."""
    cos, sin, new_slots, slots, mask = grid(rotary, table, meta, Q, bs, scratch, False)
    x = embed(ids)
    for block, pool in zip(blocks, pools):
        x = LAYER_FNS[layer_kind(block)](block, x, cos, sin, pool, new_slots, slots, mask)
    return (x if norm is None else norm(x)), (cos, sin, new_slots, slots, mask)


def next_layers(blocks, norm, x, cos, sin, new_slots, slots, mask, pools):
    """A later run of layers, then the final norm when `norm` is given (the last run)."""
    for block, pool in zip(blocks, pools):
        x = LAYER_FNS[layer_kind(block)](block, x, cos, sin, pool, new_slots, slots, mask)
    return x if norm is None else norm(x)


# Inductor's wrapper (the code that calls a graph's kernels in order) is Python by default: ~3 ms of
# a small model's decode step at batch 1 (profile of `small`: "Call CompiledFxGraph" self time 189 ms
# over 63 steps, 9.2 ms a step). Its C++ wrapper removes most of that: tiny at batch 16 graphs.forward
# 11.8 -> 9.4 ms a step (1,052 -> 1,330 tok/s), small at batch 1 7.8 -> 6.0 ms, small speculating
# 123 -> 146 tok/s; but compiling takes 1.6-5x longer (tiny b16 24 -> 40 s, small spec 42 -> 210 s).
# A step that reads a large model's weights takes hundreds of ms, where 3 ms is noise and the compile
# time is not: the C++ wrapper is for models of at most this many bytes of weights.
CPP_WRAPPER_MAX_BYTES = 512 << 20
LAYERS_PER_GRAPH = 8   # a run's graph compiles in time ~ its length; runs of the same kinds share one
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
    """The model's decode and verification steps at fixed batch sizes: the layers in runs of at most
    LAYERS_PER_GRAPH, one compiled function per run (attention over the paged cache inside it, the
    context length a dynamic dimension), and optionally the MTP module's pass."""

    def __init__(self, model, cache, scratch_block: int, sizes=DEFAULT_SIZES, compile: bool = True, log=None,
                 queries=(1,), mtp_queries: int | tuple[int, ...] = 0, cpp_wrapper: bool | None = None):
        """cache: the engine's KVMemory; scratch_block: a block of it that no sequence owns.
        queries: the query rows per sequence warmed up (1: decode; 1 + k: verifying k drafts);
        mtp_queries: > 0 (or several) also compiles the MTP module's pass (speculative.py) at that many
        rows per sequence; a pass runs at the smallest that fits (a catch-up after a rejection, a
        recurrent draft: 1 row, not 1 + k with pad rows that route to experts of their own).
        cpp_wrapper: inductor's C++ wrapper instead of its Python one (None: for models of at most
        CPP_WRAPPER_MAX_BYTES of weights, see there)."""
        self.model, self.cache, self.scratch_block = model, cache, scratch_block
        self.sizes = tuple(sorted(set(int(s) for s in sizes)))
        self.queries = tuple(sorted(set(queries)))
        self.mtp_sizes = tuple(sorted(({mtp_queries} if isinstance(mtp_queries, int) else set(mtp_queries)) - {0}))
        self.mtp_queries = max(self.mtp_sizes, default=0)
        if max(max(self.queries), self.mtp_queries + 1) > cache.block_size:
            raise ValueError(f"{max(self.queries + (self.mtp_queries,))} query rows per sequence need a block size above "
                             f"{cache.block_size} (pad rows live in one scratch block)")
        self.log, self.compiled = log, compile
        self.compile_seconds: float | None = None
        self.calls = collections.Counter()          # steps run, by kind ("q1", "q2", …, "mtp")
        # guards on the layer's modules are skipped: every call passes another layer of the same
        # structure (its weights are graph inputs), and checking ~20 parameters' metadata per call
        # cost more than the graph itself at decode sizes. Graphs of one function differ only by the
        # batch size, a guard that stays. So a function must only ever see layers of one structure:
        # each run's sequence of layer kinds has its function, copied per model structure (_own_copy).
        opts = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if cpp_wrapper is None:
            cpp_wrapper = sum(p.numel() * p.element_size() for p in model.parameters()) <= CPP_WRAPPER_MAX_BYTES
        self.cpp_wrapper = bool(cpp_wrapper and compile)
        if self.cpp_wrapper:
            opts["cpp_wrapper"] = True
        if compile:
            # one graph per (size, rows per sequence) for each function, and engines of one model
            # structure share functions (speculation's engine adds its 1 + k rows to the plain
            # engine's): past dynamo's default of 8 graphs a function would fall back to eager
            import torch._dynamo.config as dynamo_config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        param = next(model.parameters())
        key = (repr(model.config), param.dtype, param.device.type,
               tuple(sorted({type(m).__qualname__ for m in model.modules()})), self.cpp_wrapper,
               tuple(sorted(n for n, _ in model.named_buffers())))  # which modules have packs (packed.py)

        def wrap(f, k=key):
            if not compile:
                return lambda sig, *args: f(*args)
            return Direct(torch.compile(_own_copy(f, k), dynamic=False, options=opts))
        # the layers in runs of at most LAYERS_PER_GRAPH, as even as possible (28 -> 4 x 7): runs with
        # the same kinds (and the last, with the final norm, apart) share a function and its graphs
        layers = list(model.layers)
        n_runs = -(-len(layers) // LAYERS_PER_GRAPH)
        per = -(-len(layers) // n_runs)
        fns, self.runs = {}, []
        for i in range(0, len(layers), per):
            blocks = tuple(layers[i:i + per])
            last = i + per >= len(layers)
            kinds = (tuple(layer_kind(b) for b in blocks), i == 0, last)
            if kinds not in fns:
                fns[kinds] = wrap(first_layers if i == 0 else next_layers, (key, kinds))
            self.runs.append((fns[kinds], blocks, model.norm if last else None,
                              tuple(b.self_attn.layer_idx for b in blocks)))
        self.mtp = wrap(mtp_layer) if self.mtp_queries else None

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def fits(self, num_seqs: int, qlens: list[int], queries: int) -> bool:
        return num_seqs <= self.max_size and max(qlens) <= queries

    def _inputs(self, ids, tables, starts, qlens, Q: int, skip_first: bool = False):
        """Row (i, j) of the padded [C, Q] grid is sequence i's j-th new token at position starts[i] + j,
        valid while j < qlens[i]. Three tensors made in Python (the rest is `grid`, compiled): ids
        [C·Q], the block table [C, nb] (nb >= 2: a dynamic dimension of size 1 would be
        specialised), (start, valid rows) [C, 2]; and the flat indices of the valid rows in the eager
        runner's packed order (None when every row is valid)."""
        S = len(tables)
        C = self.size_for(S)
        dev, bs = self.cache.pool[0].device, self.cache.block_size
        nb = max(-(-max(s + q for s, q in zip(starts, qlens)) // bs), 2)
        # pad sequences and table entries past a sequence's blocks point at the scratch block; a pad
        # sequence (token 0 at positions 0..Q-1, 1..Q for the MTP pass) writes and reads it alone
        rows = [t[:nb] + [self.scratch_block] * (nb - len(t[:nb])) for t in tables]
        rows += [[self.scratch_block] * nb] * (C - S)
        table = torch.tensor(rows, dtype=torch.long, device=dev)
        meta = torch.tensor([[s, q] for s, q in zip(starts, qlens)] + [[int(skip_first), Q]] * (C - S),
                            dtype=torch.long, device=dev)
        if all(q == Q for q in qlens) and S == C:
            keep, flat = None, list(ids)
        else:
            keep = [i * Q + r for i, q in enumerate(qlens) for r in range(q)]
            flat = [0] * (C * Q)
            for k, t in zip(keep, ids):
                flat[k] = t
            for i, q in enumerate(qlens):         # a pad row repeats its sequence's first row (see `grid`)
                flat[i * Q + q: (i + 1) * Q] = [flat[i * Q]] * (Q - q)
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(table, 1)
        return torch.tensor(flat, dtype=torch.long, device=dev), table, meta, keep

    def forward(self, ids: list[int], tables: list[list[int]], starts: list[int], qlens: list[int] | None = None,
                queries: int = 1) -> torch.Tensor:
        """Sequence i feeds qlens[i] <= queries tokens (ids, packed in order) at positions starts[i]…
        along block table tables[i]. Returns the final normed hidden states of those tokens [Σ qlens, D]."""
        qlens = [1] * len(tables) if qlens is None else qlens
        if not self.fits(len(tables), qlens, queries):
            raise ValueError(f"{len(tables)} sequences x {max(qlens)} tokens exceed the capture sizes "
                             f"({self.max_size} sequences, {queries} tokens)")
        ids_t, table, meta, keep = self._inputs(ids, tables, starts, qlens, queries)
        self.calls[f"q{queries}"] += 1
        if self.compiled:
            packed.refresh(self.model)          # native.py's ops in the graphs do not check
        model, pool, sig = self.model, self.cache.pool, (ids_t.shape[0], queries)
        (fn, blocks, norm, idx), rest = self.runs[0], self.runs[1:]
        x, g = fn(sig, blocks, norm, model.embed_tokens, model.rotary, ids_t, table, meta,
                  tuple(pool[i] for i in idx), queries, self.cache.block_size, self.scratch_block)
        if rest and self.compiled:
            torch._dynamo.maybe_mark_dynamic(g[3], 1)
            torch._dynamo.maybe_mark_dynamic(g[4], 2)
        for fn, blocks, norm, idx in rest:
            x = fn(sig, blocks, norm, x, *g, tuple(pool[i] for i in idx))
        return x if keep is None else x[torch.tensor(keep, device=x.device)]

    def mtp_forward(self, hidden: torch.Tensor, ids: list[int], tables, starts, qlens) -> torch.Tensor:
        """The MTP module's pass (speculative.py's _run) on the same grid: hidden [Σ qlens, D] of the
        main model at positions starts[i]-1…, ids the tokens at starts[i]…; -> [Σ qlens, D]."""
        Q = next(q for q in self.mtp_sizes if q >= max(qlens))
        ids_t, table, meta, keep = self._inputs(ids, tables, starts, qlens, Q, skip_first=True)
        self.calls["mtp"] += 1
        if self.compiled:
            packed.refresh(self.model.mtp[0])
        if keep is not None:                     # pad rows: their sequence's first row (pad sequences: row 0)
            keep_t = torch.tensor(keep, device=hidden.device)
            firsts = list(itertools.accumulate([0] + qlens[:-1]))
            src = [firsts[i] + (r if r < q else 0) for i, q in enumerate(qlens) for r in range(Q)]
            src += [0] * (ids_t.shape[0] - len(src))
            hidden = hidden[torch.tensor(src, device=hidden.device)]
        model = self.model
        module = model.mtp[0]
        out = self.mtp((ids_t.shape[0], Q), module, model.embed_tokens, model.rotary, hidden, ids_t, table, meta,
                       self.cache.pool[module.block.self_attn.layer_idx], Q, self.cache.block_size,
                       self.scratch_block)
        return out if keep is None else out[keep_t]

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile (or load from inductor's cache) every size now; returns the seconds it took. The
        pad rows' writes all land in the scratch block, so this touches no sequence's cache."""
        t0 = time.perf_counter()
        for size in self.sizes:
            for Q in self.queries:
                self.forward([0] * size * Q, [[self.scratch_block]] * size, [0] * size, [Q] * size, Q)
            for Q in self.mtp_sizes:
                D = self.model.config.hidden_size
                self.mtp_forward(torch.zeros(size * Q, D, dtype=next(self.model.parameters()).dtype,
                                             device=self.cache.pool[0].device),
                                 [0] * size * Q, [[self.scratch_block]] * size, [1] * size, [Q] * size)
        self.compile_seconds = time.perf_counter() - t0
        self.calls.clear()
        if self.log:
            q = "" if self.queries == (1,) else f" x {'/'.join(map(str, self.queries))} tokens"
            m = f", the MTP pass at {'/'.join(map(str, self.mtp_sizes))} tokens" if self.mtp is not None else ""
            w = " (C++ wrapper)" if self.cpp_wrapper else ""
            self.log(f"compiled decode steps{w} at batch sizes {', '.join(map(str, self.sizes))}{q}{m} in "
                     f"{self.compile_seconds:.1f} s")
        return self.compile_seconds
