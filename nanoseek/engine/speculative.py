"""Speculative decoding with the model's own MTP module (V3 §2.2, §5.4.3; vLLM's DeepSeek MTP).

The MTP module (nanoseek/model/mtp.py) at position j combines the main model's final hidden h_{j-1} with the
embedding of token j and predicts token j+1 — one token beyond what the main model's hidden at
j-1 predicts. When t_L has just been sampled from h_{L-1} (the main model has computed positions
0..L-1), the module at position L, on (h_{L-1}, t_L), drafts t_{L+1}; the next step feeds
[t_L, d_1, …, d_k] to the main model in one pass, which verifies all drafts at once and always
yields one more token of its own.

MTP cache. The module has its own attention layer (cache layer N, N+1, … in the same block tables),
with entries keyed by position: the entry at j is built from (h_{j-1}, t_j) with rope position j,
exactly what training sees (nanoseek/model/transformer.py feeds module 1 positions 1..T-1); position 0 has none and is
masked (`skip_first`). After every step, one MTP call per step catches each sequence up from
`seq.mtp_len` to L, its new length, using the hidden rows the main pass just made (and
`seq.last_hidden` for h_{nc-1}, the hidden before them), and its last output drafts t_{L+1}. Then
mtp_len = L+1. Because entry j depends only on tokens 0..j, full blocks stay shareable through the
prefix cache; a sequence that starts from a hit of n blocks gets h_{nB-1} from
`KVMemory.last_hidden`. With k > 1 drafts the module is applied recurrently (vLLM's choice for
DeepSeek MTP): its own output hidden stands in for the main model's unknown h at the next
position; those entries are overwritten by the next catch-up. (Only module 1 drafts; a checkpoint's
deeper modules would need drafted tokens in their caches.)

Acceptance (`accept_greedy`, `accept_sampled`) keeps the output exactly the target model's:
  greedy   accept d_i while it equals the target argmax; the first mismatch is replaced by the
           argmax, and if all k match the target's next argmax is added: the same tokens as plain
           greedy decoding, k+1 at most per step.
  sampled  (Leviathan et al. 2023; Chen et al. 2023) with p the target and q the draft
           distribution after the same temperature / top-k / top-p: accept d_i with probability
           min(1, p(d_i)/q(d_i)); on rejection draw from norm(max(0, p − q)); if all are accepted,
           draw one more from p. Every emitted token is then distributed as p.
All random numbers come from the sequence's own generator (sequence.py).

Measured (`nanoseek bench engine`, greedy, 1 thread, both engines compiled, 2026-11-30): the
small preset (8 layers) pretrained 120 steps on regular synthetic text, k = 1: acceptance 0.88,
speed-up 1.13x at batch 1 and 1.34x at batch 8; the tiny preset (4 layers): acceptance 0.90 and
no gain at batch 1 (1.00x). More drafts on small, plain vs k = 1 / 2 / 3 interleaved per prompt in
one process: 1.11x / 1.16x / 1.03x, acceptance 0.89 / 0.83 / 0.60 (the recurrent drafts past the
first are weak). What bounds it: a 2-token verification costs ~1.25x a 1-token step here (the two
tokens' experts are mostly different ones, and small fp32 GEMMs are per-call bound, not
bandwidth bound), plus the MTP pass (one MoE layer and eh_proj, ~0.15 of a step) and a second
vocabulary projection; against the 1.85-1.9 tokens a step yields. Verification, target argmax and
the MTP pass fused into one compiled call measured 1.03x over these separate calls (paired, 40
generates) for a second full-size graph per capture size to compile, and was not kept.
With packed weights (model/packed.py; plain steps got faster too): 1.16x at batch 1, 1.06x at
batch 8. Per engine step at batch 1 (`/tmp/e16/spectime.py`): plain 6.6-7.0 ms (forward 5.8-6.1);
speculative 10.6-11.1 ms: the 2-row forward 7.4-7.8, the MTP pass 2.4 (its compiled layer 1.75 ms,
~1.8 main layers' worth), 1.82 tokens a step. With native.py's C++ operators (every linear of a
step on the packs, no Python inside the graphs) and the MTP pass compiled at 1 and 1 + k rows, per
decode step at batch 1 (`/tmp/e17/spectime2.py`, 12 random 24-token prompts, prefill apart): plain
6.5 ms; k = 1: 10.0 ms (the 2-row forward 6.7, the MTP pass 2.3, its graph call 1.8) for 1.84
tokens, 1.17x; k = 2: 13.1 ms (the 3-row forward 7.7, two MTP passes 4.4) for 2.63 tokens, 1.26x.
What bounds it, measured (2026-12-01, `nanoseek bench engine` reports the first figure as
`spec_oracle_speedup_batch1`): the same engine with perfect drafts that cost nothing
(bench/engine.py's ReplayDrafter: every draft accepted, no MTP pass) reaches 1.40-1.55x at k = 1,
1.73-1.92x at k = 2 and 2.22x at k = 3 on small, against 1.08-1.18x / 1.03-1.20x / 1.01x with the
MTP drafter (Intel Xeon, 1 thread; one process, /tmp/e18/oracle.py, and the bench; gemv.c reading
4 panels side by side made every step faster and moved none of these). At k = 1 verification alone leaves no room: a 2-row step
costs ~1.27x a 1-row one (each row routes to experts of its own: 6.1 distinct a layer for 2
consecutive tokens, 7.7 for 3, instead of 4; 370 KB each), so 1.5x would need every draft accepted
for free. At k = 2 the ceiling is 1.9x and the drafts lose it twice: 26 steps instead of 22 for 64
tokens (the recurrent second draft is accepted ~0.6 of the time after an accepted first: the
module drafts from its own hidden, not the main model's, which it was never trained on), and
~2.4 ms a step for the two MTP passes, 0.6 of a plain step (each reads the module's weights
again after the main pass evicted them: 0.9-1.0 ms in the engine, 0.5 ms hot). What would close it
is a better second draft (V3's D = 2 modules, each trained for its depth, §2.2, or a module trained
on its own hidden), which means another pretraining than the bench's, not another engine.
`nanoseek bench engine --spec-tokens 2` on small: 1.18x at acceptance 0.83; on tiny 0.86x (0.67).
"""
from __future__ import annotations

import torch

from nanoseek.engine.kv_memory import KVMemory
from nanoseek.engine.sampler import draw, processed_logits, row_params
from nanoseek.model.fastpath import run_linear


def accept_greedy(target_logits: torch.Tensor, draft: list[int]) -> list[int]:
    """target_logits [k+1, V] at the fed positions -> the tokens to emit (1..k+1)."""
    best = target_logits.argmax(-1).tolist()
    out = []
    for i, d in enumerate(draft):
        if best[i] != d:
            return out + [best[i]]
        out.append(d)
    return out + [best[len(draft)]]


def accept_sampled(p: torch.Tensor, q: torch.Tensor, draft: list[int], generator: torch.Generator) -> list[int]:
    """p [k+1, V] target and q [k, V] draft probabilities -> the tokens to emit (1..k+1)."""
    out = []
    for i, d in enumerate(draft):
        u = float(torch.rand(1, generator=generator))
        if u * float(q[i, d]) < float(p[i, d]):
            out.append(d)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:
            residual = p[i]
        return out + [int(draw(residual[None], torch.rand(1, generator=generator)))]
    return out + [int(draw(p[len(draft)][None], torch.rand(1, generator=generator)))]


class MTPDrafter:
    """Runs the MTP catch-up + draft pass for a step's sequences (see the module docstring)."""

    def __init__(self, model, cache: KVMemory, num_tokens: int, graphs=None):
        """graphs: the engine's DecodeGraphs (graphs.py); with its MTP pass, catch-ups of at most
        1 + k tokens per sequence run compiled."""
        if not len(model.mtp):
            raise ValueError("speculative decoding needs a model with MTP modules (num_nextn_predict_layers > 0)")
        self.model, self.cache, self.k = model, cache, num_tokens
        self.module = model.mtp[0]
        self.graphs = graphs if graphs is not None and graphs.mtp is not None else None

    def _run(self, seqs, starts, qlens, hidden: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        g = self.graphs
        if g is not None and g.fits(len(seqs), qlens, g.mtp_queries):
            return g.mtp_forward(hidden, tokens, [s.block_table for s in seqs], starts, qlens)
        batch = self.cache.paged_batch([s.block_table for s in seqs], starts, qlens, skip_first=True)
        cos, sin = self.model.rotary(batch.positions)
        emb = self.model.embed_tokens(torch.tensor(tokens, device=hidden.device))[None]
        return self.module(hidden[None], emb, cos, sin, self.cache, batch)[0]     # [N, D]

    def step(self, items: list[tuple], drafting: list[bool]) -> None:
        """items: (seq, committed hidden rows [n, D] for positions nc_old.., nc_old). Catches the MTP
        cache up to each sequence's length and, where drafting[i], sets seq.draft / seq.draft_probs."""
        seqs, starts, qlens, hid, toks = [], [], [], [], []
        for seq, rows, nc_old in items:
            L = seq.num_computed
            first = seq.mtp_len
            assert first >= nc_old, "MTP cache fell behind the main cache"
            prev = rows[first - 1 - nc_old: L - nc_old]
            if first - 1 < nc_old:     # h_{nc_old-1}: a fork's parent row, or the hit block's last hidden
                before = seq.last_hidden
                if before is None:
                    before = self.cache.last_hidden[seq.block_table[(first - 1) // self.cache.block_size]]
                prev = torch.cat([before[None], rows[: L - nc_old]])
                seq.last_hidden = None
            seqs.append(seq)
            starts.append(first)
            qlens.append(L + 1 - first)
            hid.append(prev)
            toks.extend(seq.token_ids[first:L + 1])
            seq.mtp_len = L + 1
        out = self._run(seqs, starts, qlens, torch.cat(hid), toks)
        last = torch.cumsum(torch.tensor(qlens), 0) - 1
        chosen = [i for i, d in enumerate(drafting) if d]
        for s in seqs:
            s.draft, s.draft_probs = [], None
        if not chosen or self.k == 0:
            return
        h = out[last[chosen]]
        seqs = [seqs[i] for i in chosen]
        probs_per_step = []
        for j in range(self.k):
            logits = run_linear(self.model.lm_head, h)
            tokens, probs = self._propose(seqs, logits)
            for s, t in zip(seqs, tokens):
                s.draft.append(t)
            probs_per_step.append(probs)
            if j + 1 < self.k:     # recurrent: the module's own hidden stands in for the main model's
                pos = [s.num_computed + 1 + j for s in seqs]
                h = self._run(seqs, pos, [1] * len(seqs), h, tokens)
        if probs_per_step[0] is not None:
            stacked = torch.stack(probs_per_step, dim=1)                       # [S, k, V]
            for s, p in zip(seqs, stacked):
                s.draft_probs = p

    def _propose(self, seqs, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            return logits.argmax(-1).tolist(), None
        probs = processed_logits(logits, *row_params(params, logits.device)).softmax(-1)
        tokens = logits.argmax(-1)
        for i, s in enumerate(seqs):
            if not s.params.greedy:
                tokens[i] = draw(probs[i:i + 1], torch.rand(1, generator=s.generator))[0]
        return tokens.tolist(), probs
