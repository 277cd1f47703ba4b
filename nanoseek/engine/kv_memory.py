"""The engine's KV memory: one slot pool per cache layer, carved into fixed-size blocks.

What a slot holds is the model's business (nanoseek/model/cache.py): for MLA only the normalised latent and the
rotated rope key, kv_lora_rank + qk_rope_head_dim values per token per layer (V3 §2.1.1; 80 for
the tiny preset, against H·(qk_head_dim + v_head_dim) = 4·(48 + 32) = 320 for the same model with
MHA K/V), decoded with the absorbed form (nanoseek/model/mla.py); for GQA students K and V. With
speculative decoding the MTP modules' attention layers get cache layers N..N+D-1 of the same
pools, so one block table addresses a token's entries everywhere.

Blocks: slot = block·block_size + offset; a sequence owns a block table (sequence.py), the
block manager (prefix_cache.py) owns the free list, reference counts and hashes. The number of
blocks is given or comes from a memory budget in bytes (`blocks_for_budget`), so the scheduler
knows when memory is full and queues or preempts. Sharing needs no support here: forked samples
share the prompt's full blocks through reference counts, and only their partial last block is
copied (`copy_block`, called by llm.py's `_fork`).

`KVMemory` speaks nanoseek/model/cache.py's protocol, but the engine builds each call's `AttentionBatch` itself
from block tables in a few vectorised tensor ops (`paged_batch`) and hands it over with
`plan(batch)`; `begin` returns it and `commit` does nothing, because sequence lengths live in the
sequences, not in the cache. The MTP pass (speculative.py) builds its own batches the same way.

`last_hidden[block]` (speculative decoding only) keeps the main model's final hidden state at the
block's last position. The MTP entry of position j is a function of h_{j-1} and token j, so a
sequence that starts from a prefix-cache hit of n blocks needs h_{n·B-1}, which no forward pass of
its own computes: the block that produced it remembers it (one hidden vector per block).
"""
from __future__ import annotations

import torch

from nanoseek.model.cache import AttentionBatch, SlotCache


class KVMemory(SlotCache):
    def __init__(self, num_layers: int, width: int, num_blocks: int, block_size: int,
                 dtype=torch.float32, device=None, hidden_size: int = 0):
        super().__init__(num_layers, width, num_blocks * block_size, dtype, device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.last_hidden = torch.zeros(num_blocks, hidden_size, dtype=dtype, device=device) if hidden_size else None
        self._batch: AttentionBatch | None = None
        self._block_slots = torch.arange(num_blocks * block_size, device=device).view(num_blocks, block_size)
        self._arange = torch.arange(max(num_blocks * block_size, 1), device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, width: int, block_size: int, dtype, hidden_size: int = 0) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return (num_layers * width * block_size + hidden_size) * size

    @classmethod
    def blocks_for_budget(cls, budget_bytes: int, num_layers: int, width: int, block_size: int, dtype,
                          hidden_size: int = 0) -> int:
        return max(int(budget_bytes // cls.bytes_per_block(num_layers, width, block_size, dtype, hidden_size)), 1)

    # ---- the protocol (nanoseek/model/cache.py): the engine plans every call
    def plan(self, batch: AttentionBatch) -> None:
        self._batch = batch

    def begin(self, shape: tuple[int, int]) -> AttentionBatch:
        batch, self._batch = self._batch, None
        if batch is None or shape != (1, int(batch.query_lens.sum())):
            raise RuntimeError(f"KVMemory: no planned batch for an input of shape {tuple(shape)}")
        return batch

    def commit(self, batch: AttentionBatch) -> None:
        pass

    # ---- block operations
    def copy_block(self, src: int, dst: int, num_tokens: int | None = None) -> None:
        """Copy the first num_tokens slots of block src into dst in every layer (MTP layers included):
        a fork's own copy of the prompt's partial last block (llm.py `_fork`). `last_hidden` is not
        copied: only a full block has one."""
        n = self.block_size if num_tokens is None else num_tokens
        s, d = src * self.block_size, dst * self.block_size
        for pool in self.pool:
            pool[d:d + n] = pool[s:s + n]

    def paged_batch(self, tables: list[list[int]], starts: list[int], qlens: list[int],
                    skip_first: bool = False) -> AttentionBatch:
        """A packed [1, N] batch: sequence i feeds qlens[i] tokens at positions starts[i]…, its context
        being its first starts[i] + qlens[i] slots along tables[i]. `skip_first` masks position 0
        (the MTP layers have no entry there, speculative.py). Few tensor ops: a decode step spends
        more time here than in the arithmetic, so 1-token calls take a shorter path."""
        bs, dev = self.block_size, self.pool[0].device
        S = len(tables)
        max_q, max_ctx = max(qlens), max(s + q for s, q in zip(starts, qlens))
        nb = -(-max_ctx // bs)
        table = torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in tables], dtype=torch.long, device=dev)
        slots = self._block_slots[table].view(S, -1)[:, :max_ctx]                   # [S, max_ctx]
        start_t = torch.tensor(starts, device=dev)
        kpos = self._arange[:max_ctx]
        if max_q == 1:                                                               # every sequence decodes
            mask = (kpos <= start_t[:, None])[:, None, :]
            if skip_first:
                mask[:, :, 0] = False
            return AttentionBatch(query_lens=torch.ones(S, dtype=torch.long, device=dev), start=start_t,
                                  positions=start_t[None], mask=mask, packed=True, q_index=self._arange[:S, None],
                                  q_valid=torch.ones(S, 1, dtype=torch.bool, device=dev), ctx_slots=slots,
                                  new_slots=slots.gather(1, start_t[:, None]).view(-1), keys=list(range(S)))
        q_off = self._arange[:max_q]
        qlen_t = torch.tensor(qlens, device=dev)
        qpos = start_t[:, None] + q_off                                              # [S, max_q]
        q_valid = q_off < qlen_t[:, None]
        mask = (kpos <= qpos[:, :, None]) & q_valid[:, :, None]
        if skip_first:
            mask[:, :, 0] = False
        mask[:, :, 0] |= ~q_valid                     # padding queries see one key: no all-masked row
        offsets = torch.cumsum(qlen_t, 0) - qlen_t
        q_index = torch.where(q_valid, offsets[:, None] + q_off, 0)
        new_slots = slots.gather(1, qpos.clamp(max=max_ctx - 1))[q_valid]
        return AttentionBatch(query_lens=qlen_t, start=start_t, positions=qpos[q_valid][None], mask=mask,
                              packed=True, q_index=q_index, q_valid=q_valid, ctx_slots=slots,
                              new_slots=new_slots, keys=list(range(S)))
