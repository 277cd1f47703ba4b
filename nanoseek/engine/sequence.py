"""Request and sequence state: sampling parameters, one Sequence per sample, completions.

A request (one prompt, `SamplingParams.n` samples) owns n `Sequence`s: sample 0 from the start,
samples 1..n-1 forked from it once the prompt is computed (llm.py). A sequence is the whole
per-sample state the engine keeps between steps (vLLM's `Sequence`, nano-vllm's `sequence.py`):

    token_ids       prompt + generated tokens; `num_computed` of them are in the KV cache. The
                    rest are fed at the next step: a prefill chunk, or in decode just the last
                    sampled token (plus the speculative draft, speculative.py).
    block_table     the KV blocks holding its tokens (kv_memory.py), `block_hashes` the chained
                    hashes of the leading full ones that are registered in the prefix cache.
    generator       a private torch.Generator: a seeded request draws the same numbers whatever
                    else shares the batch, so the same request + seed gives the same tokens.
    mtp_len, last_hidden   speculative decoding's MTP cache state (speculative.py).

Finishing rules (`Sequence.append`): a stop token id (EOS unless `ignore_eos`) ends the sequence
with "stop" and its text is not shown; a stop string ends it with "stop" and the text is cut
before the match (OpenAI's rule), found across token boundaries because the check runs on the
detokenized text, not on tokens; `max_tokens` or the model's length ends it with "length";
`abort` with "abort". Text is detokenized incrementally (vLLM's prefix/read offsets): only a few
tokens are decoded per step, and nothing is emitted while the text ends in an incomplete UTF-8
character (U+FFFD), so byte-level BPE pieces of one character never show half.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # nucleus: keep the smallest set with mass >= top_p
    top_k: int = 0                    # 0 = off
    max_tokens: int = 256
    stop: list[str] | str | None = None        # stop strings, not included in the text
    stop_token_ids: list[int] | None = None    # in addition to EOS (unless ignore_eos)
    ignore_eos: bool = False
    n: int = 1                        # samples per prompt, sharing the prompt's KV cache
    seed: int | None = None           # same request + seed -> same tokens, whatever shares the batch
    logprobs: int | None = None       # None: none; 0: the chosen token's; k: also the top k
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1 or self.n < 1:
            raise ValueError("max_tokens and n must be >= 1")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be None or >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None          # "stop" | "length" | "abort" | None while running
    logprobs: list[float] | None = None            # of each generated token (see sampler.py)
    top_logprobs: list[dict[int, float]] | None = None
    cached_prompt_tokens: int = 0      # prompt tokens served from the prefix cache


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion]
    finished: bool


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_seq_ids = itertools.count()


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    seqs: list["Sequence"] = field(default_factory=list)
    arrival: float = 0.0
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.status is Status.FINISHED for s in self.seqs)

    def output(self) -> RequestOutput:
        seqs = sorted(self.seqs, key=lambda s: s.index)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [s.completion() for s in seqs], self.finished)


def make_generator(seed: int | None, index: int) -> torch.Generator:
    """Sample i of a seeded request draws from seed-derived stream i; unseeded ones from fresh entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed * 0x9E3779B97F4A7C15 + index) % (1 << 63))
    return g


class Sequence:
    def __init__(self, request: Request, index: int, token_ids: list[int]):
        self.seq_id = next(_seq_ids)
        self.request, self.index, self.params = request, index, request.params
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator = make_generator(request.params.seed, index)
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.cached_prompt_tokens: int | None = None
        # incremental detokenization (vLLM's offsets into token_ids)
        self.text = ""
        self._prefix_offset = max(self.num_prompt_tokens - 6, 0)
        self._read_offset = self.num_prompt_tokens
        # speculative decoding (speculative.py)
        self.draft: list[int] = []
        self.draft_probs: torch.Tensor | None = None
        self.mtp_len = 1
        self.last_hidden: torch.Tensor | None = None

    # ---- views
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def completion(self) -> Completion:
        want = self.params.logprobs is not None
        return Completion(self.index, self.text, self.output_ids, self.finish_reason,
                          list(self.logprobs) if want else None,
                          list(self.top_logprobs) if want and self.params.logprobs else None,
                          self.cached_prompt_tokens or 0)

    def reset_cache_state(self) -> None:
        """Forget everything about the KV cache (preempted, or queued without a fit): it will be
        recomputed."""
        self.num_computed = 0
        self.block_table, self.block_hashes = [], []
        self.draft, self.draft_probs = [], None
        self.mtp_len, self.last_hidden = 1, None

    # ---- generation
    def append(self, token: int, tokenizer, max_model_len: int, logprob: float | None = None,
               top: dict[int, float] | None = None) -> bool:
        """Add one generated token, update the text and decide whether the sequence ends here."""
        self.token_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            if top is not None:
                self.top_logprobs.append(top)
        if token in self.request.stop_ids:
            self._flush(tokenizer, len(self.token_ids) - 1)      # the stop token's own text is not shown
            return self.finish("stop")
        if tokenizer is not None:
            added = self._detokenize(tokenizer)
            if added and self.params.stop and self._stop_string(len(added)):
                return self.finish("stop")
        if len(self.token_ids) - self.num_prompt_tokens >= self.params.max_tokens or len(self.token_ids) >= max_model_len:
            self._flush(tokenizer, len(self.token_ids))
            return self.finish("length")
        return False

    def finish(self, reason: str) -> bool:
        self.status, self.finish_reason = Status.FINISHED, reason
        return True

    def _detokenize(self, tokenizer) -> str:
        skip = self.params.skip_special_tokens
        ids = self.token_ids
        before = tokenizer.decode(ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
        now = tokenizer.decode(ids[self._prefix_offset:], skip_special_tokens=skip)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""                       # an incomplete character: wait for its next byte
        added = now[len(before):]
        self.text += added
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return added

    def _flush(self, tokenizer, end: int) -> None:
        """At the end, show what an incomplete character held back (as U+FFFD, like decode does)."""
        if tokenizer is None or end <= self._read_offset:
            return
        skip = self.params.skip_special_tokens
        before = tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
        now = tokenizer.decode(self.token_ids[self._prefix_offset:end], skip_special_tokens=skip)
        self.text += now[len(before):]

    def _stop_string(self, added: int) -> bool:
        """Look for a stop string that ends in the newly added text; cut the text before it."""
        longest = max(len(s) for s in self.params.stop)
        window = max(len(self.text) - added - longest + 1, 0)
        found = [i for i in (self.text.find(s, window) for s in self.params.stop) if i >= 0]
        if not found:
            return False
        self.text = self.text[:min(found)]
        return True
