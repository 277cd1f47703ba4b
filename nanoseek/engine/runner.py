"""The model runner: one scheduled step -> one forward pass of the model.

It lays every scheduled sequence's new tokens end to end into one packed [1, N] input (prefill
chunks, 1-token decodes and speculative verifications alike, nanoseek/model/cache.py's packed
layout), builds the step's `AttentionBatch` from the block tables (kv_memory.py) and runs
`model.forward_hidden` with the paged cache. Padding exists only inside attention. MLA picks its
absorbed form by itself while the step's padded queries per sequence are few
(nanoseek/model/mla.py): every decode step and speculative verification, and steps whose
prefill chunks are short; a step with a long prefill chunk runs naive.

A step in which every sequence feeds its newest token (no prefill chunk), with or without
speculative drafts behind it, runs through the compiled graphs when the engine has them
(LLM(compile=True), graphs.py), padded up to a capture size and a warmed number of tokens per
sequence; the eager path above is their reference.

Logits are computed only at the rows that are sampled (`logits(rows)`): the last row of a finished
prefill, the 1 + k rows of a verification; a 2k-token prefill pays the vocabulary projection once,
not 2k times.
"""
from __future__ import annotations

import torch

from nanoseek.engine.kv_memory import KVMemory
from nanoseek.engine.scheduler import Scheduled
from nanoseek.model.fastpath import run_linear


class ModelRunner:
    def __init__(self, model, cache: KVMemory, graphs=None):
        """graphs: a DecodeGraphs (graphs.py) that runs the steps in which every sequence decodes one
        token, compiled; every other step (and every step without it) runs the eager model."""
        self.model, self.cache, self.graphs = model, cache, graphs
        self.device = next(model.parameters()).device

    def forward(self, work: list[Scheduled]) -> torch.Tensor:
        """Feed the step's tokens; returns the final (normed) hidden states [N, D] in input order."""
        g = self.graphs
        if g is not None and all(w.num_tokens == 1 for w in work):
            qlens = [w.num_inputs for w in work]
            Q = next((q for q in g.queries if q >= max(qlens)), None)
            if Q is not None and g.fits(len(work), qlens, Q):
                return g.forward([t for w in work for t in [w.seq.token_ids[w.seq.num_computed]] + w.draft],
                                 [w.seq.block_table for w in work], [w.seq.num_computed for w in work], qlens, Q)
        ids, tables, starts, qlens = [], [], [], []
        for w in work:
            s = w.seq
            ids += s.token_ids[s.num_computed:s.num_computed + w.num_tokens]
            ids += w.draft
            tables.append(s.block_table)
            starts.append(s.num_computed)
            qlens.append(w.num_inputs)
        self.cache.plan(self.cache.paged_batch(tables, starts, qlens))
        hidden = self.model.forward_hidden(torch.tensor(ids, device=self.device)[None], cache=self.cache)[0]
        return hidden[0]

    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        return run_linear(self.model.lm_head, hidden_rows).float()
