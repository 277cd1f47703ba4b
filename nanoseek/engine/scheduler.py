"""Continuous batching: which sequences run in the next step, with how many tokens each.

Iteration-level scheduling (Orca, Yu et al. OSDI '22): the batch is rebuilt before every forward
pass, so finished sequences leave and waiting ones join between any two steps. One step is one
packed [1, N] call (nanoseek/model/cache.py) that may mix 1-token decodes, speculative
verifications (1 + k tokens) and prefill chunks, so nothing waits for the longest prompt (vLLM
v1's chunked prefill; nano-vllm instead alternates prefill-only and decode-only steps).

Policy, each step, under a token budget (`max_num_batched_tokens`) and `max_num_seqs`:
  1. running sequences first, oldest first: a decode takes 1 token (+ its draft when the budget
     allows), an unfinished prefill the next chunk that fits;
  2. then waiting ones, first come first served (preempted sequences and forks that found no
     seat queue at the front), while the running set has fewer than `max_num_seqs`: the prefix
     cache gives them their cached blocks (prefix_cache.py), and they take a chunk of what
     remains to be computed. Forks join `running` only below max_num_seqs too (llm.py), so the
     running set never exceeds it.
Memory: before a sequence is scheduled its block table must cover every slot the step writes
(+ `lookahead` for the MTP drafts). When blocks run out, the newest running sequence is preempted:
its blocks are released (keyed ones stay revivable, so re-admission often hits the prefix cache)
and it goes back to the front of the queue to be recomputed (vLLM's recompute preemption). A
waiting sequence that does not fit stays queued, and the ones behind it wait too. A sequence
longer than all of memory ends with finish_reason "length".
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nanoseek.engine.prefix_cache import BlockManager
from nanoseek.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int            # tokens of seq.token_ids fed this step (from seq.num_computed)
    draft: list[int]           # speculative draft tokens fed after them (decode only)

    @property
    def num_inputs(self) -> int:
        return self.num_tokens + len(self.draft)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 lookahead: int = 0):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.lookahead = lookahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.ended: list[Sequence] = []            # ended here for lack of memory; the engine reports them

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def schedule(self) -> list[Scheduled]:
        budget, out = self.max_num_batched_tokens, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            draft = seq.draft if seq.num_uncomputed == 1 and len(seq.draft) < budget else []
            if not self._reserve_running(seq, seq.num_computed + n + len(draft) + self.lookahead):
                continue                                   # seq itself was preempted or ended
            out.append(Scheduled(seq, n, list(draft)))
            budget -= n + len(draft)
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                hit = self.blocks.admit(seq)
                seq.num_computed, seq.mtp_len = hit, max(hit, 1)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.reserve(seq, seq.num_computed + n + self.lookahead):
                self.blocks.free_seq(seq)                  # a queued sequence holds no blocks
                seq.reset_cache_state()
                if not self.running:                       # all of memory is not enough
                    self.waiting.popleft()
                    self._end(seq)
                    continue
                break
            self.waiting.popleft()
            if seq.cached_prompt_tokens is None:           # first admission: count the hit
                seq.cached_prompt_tokens = min(seq.num_computed, seq.num_prompt_tokens)
                self.blocks.queries += seq.num_prompt_tokens
                self.blocks.hits += seq.cached_prompt_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, n, []))
            budget -= n
        return out

    def _reserve_running(self, seq: Sequence, num_tokens: int) -> bool:
        while not self.blocks.reserve(seq, num_tokens):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:   # alone, and all of memory is not enough
                self.running.pop()
                self.blocks.free_seq(seq)
                self._end(seq)
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _end(self, seq: Sequence) -> None:
        seq.finish("length")
        self.ended.append(seq)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.reset_cache_state()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
