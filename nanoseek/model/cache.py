"""The cache protocol: the caller owns the KV cache, the model holds no runtime state.

One forward call may mix sequences in prefill and in decode, of different lengths, without
padding the linear layers. The model talks to any cache through three calls:

    batch = cache.begin(input_ids.shape)      # once per forward: an AttentionBatch (below)
    ctx   = cache.update(layer, batch, new)   # per attention layer: store this call's entries,
                                              #   return every sequence's whole context
    cache.commit(batch)                       # after the last layer: the new tokens now count

What a layer stores per token ("entry", one row of `cache.width` values):
  MLA (deepseek_v3)   [kv_norm(c_kv) (kv_lora_rank) | rope(k_pe) (qk_rope_head_dim)]  — exactly
                      kv_lora_rank + qk_rope_head_dim values per token per layer (V3 §2.1.1)
  GQA (qwen2, llama)  [K (kv_heads·head_dim) | V (kv_heads·head_dim)]

Two input layouts, told apart by the cache, not the model:
  rows    input_ids [B, T]: row b is sequence b, each gets T new tokens (training-style batches,
          naive generation, equal-length decode)
  packed  input_ids [1, N]: S sequences' new tokens laid end to end (N = Σ query_lens), set up
          beforehand by the caller (`prepare(...)`); prefill chunks and 1-token decodes mix freely

`AttentionBatch` carries what attention needs: per-sequence query lengths and cached lengths,
the positions of the new tokens (cached length + offset, per row), the causal mask over each
sequence's context [S, max_q, max_ctx], and index maps between the token layout and the padded
[S, max_q] layout attention works in. Padding exists only inside attention, never in the
projections or the MoE.

Every cache here stores entries in a flat pool of slots per layer, `pool[layer]` [num_slots,
width]; a sequence is a list of slots. `ContiguousCache` gives row b the slots b·max_len + t (the
simple cache for tests and naive generation); `PagedCache` gives each sequence a block table
(slots = block·block_size + offset), the layout a paged engine (vLLM-style) uses; blocks come from
a free list, and an engine may manage the tables itself. Both are checked against full recompute
in tests/model/test_model.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionBatch:
    query_lens: torch.Tensor        # [S] new tokens per sequence
    start: torch.Tensor             # [S] tokens already cached per sequence
    positions: torch.Tensor         # like input_ids: position of every new token
    mask: torch.Tensor              # [S, max_q, max_ctx] bool, True = may attend
    packed: bool                    # input is [1, N] of S sequences (else rows [S, T])
    q_index: torch.Tensor | None    # packed: [S, max_q] token index in N (pads point at 0)
    q_valid: torch.Tensor | None    # packed: [S, max_q] bool
    ctx_slots: torch.Tensor         # [S, max_ctx] slot of each context token (pads point at 0)
    new_slots: torch.Tensor         # [N] slot of each new token, in input order
    keys: list                      # the cache's key of each sequence

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.numel())

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] input layout -> [S, max_q, ...] per-sequence layout."""
        if not self.packed:
            return x
        return x[0][self.q_index]

    def from_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[S, max_q, ...] -> the input layout ([1, N, ...] when packed)."""
        if not self.packed:
            return x
        return x[self.q_valid].unsqueeze(0)


def document_starts(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] document numbers (contiguous runs) -> [B, T] index where each token's document starts.

    >>> document_starts(torch.tensor([[0, 0, 0, 1, 1, -1]])).tolist()
    [[0, 0, 0, 3, 3, 5]]
    """
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """Training-time packing (no cache): [B, T] document numbers -> [B, T, T] bool: query i may see key j (j ≤ i, same document)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril_()
    return causal & (segments[:, :, None] == segments[:, None, :])


class SlotCache:
    """Base: a slot pool per layer; subclasses say which slots a sequence owns."""

    def __init__(self, num_layers: int, width: int, num_slots: int, dtype=torch.float32, device=None):
        self.width = width
        self.pool = [torch.zeros(num_slots, width, dtype=dtype, device=device) for _ in range(num_layers)]
        self._plan: tuple[list, list[int]] | None = None  # (sequence keys, query lens) for packed input

    # ---- what a subclass provides
    def _length(self, key) -> int:
        raise NotImplementedError

    def _slots(self, key, end: int) -> torch.Tensor:
        """Slots of tokens [0, end) of sequence `key` (allocating as needed)."""
        raise NotImplementedError

    def _set_length(self, key, n: int) -> None:
        raise NotImplementedError

    def _row_keys(self, rows: int) -> list:
        raise NotImplementedError

    # ---- the protocol
    def prepare(self, keys: list, query_lens: list[int]) -> None:
        """Announce a packed call: sequences `keys` get query_lens[i] new tokens each."""
        self._plan = (list(keys), [int(q) for q in query_lens])

    def begin(self, shape: tuple[int, int]) -> AttentionBatch:
        B, T = shape
        if self._plan is not None:
            keys, qlens = self._plan
            self._plan = None
            if B != 1 or T != sum(qlens):
                raise ValueError(f"packed call expects input [1, {sum(qlens)}], got [{B}, {T}]")
            packed = True
        else:
            keys, qlens, packed = self._row_keys(B), [T] * B, False
        starts = [self._length(k) for k in keys]
        ctx_lens = [s + q for s, q in zip(starts, qlens)]
        slots = [self._slots(k, e) for k, e in zip(keys, ctx_lens)]
        return build_batch(keys, qlens, starts, slots, packed, self.pool[0].device)

    def update(self, layer: int, batch: AttentionBatch, entries: torch.Tensor) -> torch.Tensor:
        """Store entries [B, T, width] of the new tokens; return contexts [S, max_ctx, width]."""
        pool = self.pool[layer]
        pool[batch.new_slots] = entries.reshape(-1, self.width).to(pool.dtype)
        return pool[batch.ctx_slots]

    def commit(self, batch: AttentionBatch) -> None:
        for key, s, q in zip(batch.keys, batch.start.tolist(), batch.query_lens.tolist()):
            self._set_length(key, s + q)

    def bytes_per_token(self) -> int:
        return len(self.pool) * self.width * self.pool[0].element_size()


def build_batch(keys, qlens, starts, slots, packed, device) -> AttentionBatch:
    S = len(keys)
    max_q, max_ctx = max(qlens), max(s + q for s, q in zip(starts, qlens))
    q_off = torch.arange(max_q, device=device)
    k_off = torch.arange(max_ctx, device=device)
    qlen_t = torch.tensor(qlens, device=device)
    start_t = torch.tensor(starts, device=device)
    q_valid = q_off[None, :] < qlen_t[:, None]                                  # [S, max_q]
    qpos = start_t[:, None] + q_off[None, :]                                    # [S, max_q]
    mask = (k_off[None, None, :] <= qpos[:, :, None]) & q_valid[:, :, None]     # causal + valid
    mask[:, :, 0] |= ~q_valid                       # pad queries see one key: no all-masked row (NaN)
    ctx_slots = torch.zeros(S, max_ctx, dtype=torch.long, device=device)
    new_slots = []
    for i, (s, q, sl) in enumerate(zip(starts, qlens, slots)):
        ctx_slots[i, : s + q] = sl
        new_slots.append(sl[s: s + q])
    if packed:
        offsets = torch.cumsum(qlen_t, 0) - qlen_t
        q_index = torch.where(q_valid, offsets[:, None] + q_off[None, :], torch.zeros_like(qpos))
        positions = qpos[q_valid].unsqueeze(0)
    else:
        q_index, positions = None, qpos
    batch = AttentionBatch(query_lens=qlen_t, start=start_t, positions=positions, mask=mask, packed=packed,
                           q_index=q_index, q_valid=q_valid if packed else None, ctx_slots=ctx_slots,
                           new_slots=torch.cat(new_slots), keys=list(keys))
    return batch


class ContiguousCache(SlotCache):
    """Row b owns slots [b·max_len, (b+1)·max_len). Rows may hold different lengths."""

    def __init__(self, num_layers: int, width: int, batch_size: int, max_len: int, dtype=torch.float32,
                 device=None):
        super().__init__(num_layers, width, batch_size * max_len, dtype, device)
        self.max_len = max_len
        self.lengths = [0] * batch_size

    def _row_keys(self, rows: int) -> list:
        if rows != len(self.lengths):
            raise ValueError(f"cache holds {len(self.lengths)} rows, input has {rows}")
        return list(range(rows))

    def _length(self, key) -> int:
        return self.lengths[key]

    def _set_length(self, key, n: int) -> None:
        self.lengths[key] = n

    def _slots(self, key, end: int) -> torch.Tensor:
        if end > self.max_len:
            raise ValueError(f"row {key}: {end} tokens exceed the cache's max_len {self.max_len}")
        return torch.arange(key * self.max_len, key * self.max_len + end, device=self.pool[0].device)


class PagedCache(SlotCache):
    """Sequences own blocks of `block_size` slots through block tables (vLLM's layout)."""

    def __init__(self, num_layers: int, width: int, num_blocks: int, block_size: int = 16,
                 dtype=torch.float32, device=None):
        super().__init__(num_layers, width, num_blocks * block_size, dtype, device)
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.block_tables: dict = {}
        self.lengths: dict = {}

    def _row_keys(self, rows: int) -> list:
        return list(range(rows))

    def _length(self, key) -> int:
        return self.lengths.get(key, 0)

    def _set_length(self, key, n: int) -> None:
        self.lengths[key] = n

    def _slots(self, key, end: int) -> torch.Tensor:
        table = self.block_tables.setdefault(key, [])
        while len(table) * self.block_size < end:
            if not self.free_blocks:
                raise RuntimeError("PagedCache: out of blocks")
            table.append(self.free_blocks.pop())
        blocks = torch.tensor(table, dtype=torch.long, device=self.pool[0].device)
        slots = (blocks[:, None] * self.block_size + torch.arange(self.block_size, device=blocks.device)).flatten()
        return slots[:end]

    def free(self, key) -> None:
        self.free_blocks.extend(reversed(self.block_tables.pop(key, [])))
        self.lengths.pop(key, None)
