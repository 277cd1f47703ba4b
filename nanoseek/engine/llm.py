"""`LLM`: the engine everyone uses (RL rollouts, evaluation, the CLI, the server).

    llm = LLM("runs/x/r1")                       # or LLM(model, tokenizer) for a live policy
    llm.generate(["2+3=", ...], SamplingParams(temperature=0.6, n=8))   # -> per prompt n Completions
    rid = llm.add_request(prompt, params); outs = llm.step(); llm.abort(rid)   # streaming
    llm.take_finished(rid)                       # a final output another caller's steps produced
    llm.update_weights(policy.state_dict())      # RL: new weights in place, prefix cache cleared

Split the vLLM / nano-vllm way, one concept per file:
  sequence.py      SamplingParams, Request / Sequence state, stop rules, incremental detokenizing
  kv_memory.py     slot pools in blocks, memory budget, packed AttentionBatch from block tables
  prefix_cache.py  block manager: ref counts, chained block hashes, LRU eviction, revival
  scheduler.py     continuous batching, chunked prefill, token budget, preemption
  runner.py        packs a step into one [1, N] forward pass; logits only where sampled
  graphs.py        decode steps as compiled pieces at fixed batch sizes (LLM(compile=True))
  dispatch.py      warm compiled functions called straight into dynamo's code
  sampler.py       temperature / top-k / top-p, per-request generators, logprobs
  speculative.py   MTP drafting and exact acceptance
  loading.py       a model directory's tokenizer and sampling defaults
  llm.py           this file: step() = schedule -> run -> sample/accept -> MTP -> fork -> bookkeeping

One engine, several callers (the API server streams, RL calls generate()). `step()` returns the
output of every request that made progress, whoever added it (vLLM's shape): whoever drives it
routes them by request id (the server's loop, one queue per request). `generate()` drives the
steps itself and keeps only its own requests' outputs; a request of someone else that finishes
meanwhile is parked with its final output in `self.finished` and handed over once, by the next
`step()` or by `take_finished(id)`: nothing is dropped, nothing is delivered twice. An output is
a cumulative snapshot (all tokens so far), so the intermediate ones a streaming caller misses
while generate() runs lose nothing. One thread drives the engine at a time.

n > 1. A request's n samples share one prefill: sequence 0 computes the prompt; when its last
prompt token's logits exist, every sample draws its first token from them with its own generator
and samples 1..n-1 are forked: they share the prompt's full blocks (reference counts) and get
their own copy of the partial last block, made at once (not copy-on-write: each writes its next
token there at the next step anyway). The running set never exceeds `max_num_seqs`: forks that
find no seat (or no free block) wait at the head of the queue with no blocks, like a preempted
sequence, and are recomputed when admitted, the prompt's full blocks coming back from the prefix
cache (vLLM v1 runs n > 1 this way, as n requests sharing a prefix). Admitting the parent only
once all n fit was the alternative; it could never admit n > max_num_seqs and leaves seats idle.

Weights. `update_weights(state)` copies tensors into the model in place (nanoseek or transformers
key names) and clears the prefix cache, whose KV the old weights computed. Sequences still running
keep the KV they have (as in asynchronous RL engines); call it between rollouts to avoid that.
An `LLM(model)` built on a live module shares its parameters, so `update_weights()` with no
argument only clears the cache. The engine never changes the module's train/eval mode: a forward
pass with a cache does not depend on it.

Measured when the engine landed (eager, tiny preset, 1 thread): a decode step was ~2.4k eager aten
ops for 4 layers, so the engine ran ~1.1-1.3× transformers' generate. LLM(compile=True) runs decode
and verification steps as compiled graphs (graphs.py); `nanoseek bench engine` has today's figures
for both (--no-compile), and issue 13's note what bounds them.
"""
from __future__ import annotations

import itertools
import os
import time

import torch

from nanoseek.engine import sampler
from nanoseek.engine.kv_memory import KVMemory
from nanoseek.engine.loading import load_tokenizer
from nanoseek.engine.prefix_cache import BlockManager
from nanoseek.engine.runner import ModelRunner
from nanoseek.engine.scheduler import Scheduled, Scheduler
from nanoseek.engine.sequence import Completion, Request, RequestOutput, SamplingParams, Sequence, Status
from nanoseek.engine.speculative import MTPDrafter, accept_greedy, accept_sampled
from nanoseek.model import gemv, packed


class LLM:
    def __init__(self, model, tokenizer=None, *, dtype: torch.dtype | str | None = None, block_size: int = 16,
                 kv_cache_memory: int = 256 << 20, num_blocks: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 speculative_tokens: int = 0, max_model_len: int | None = None, add_bos: bool = True,
                 compile: bool = False, compile_sizes: tuple[int, ...] | None = None, pack_weights: bool = True,
                 log=None):
        """model: a checkpoint directory (nanoseek.load_pretrained) or a Transformer. KV memory is
        `num_blocks` blocks of `block_size` tokens, or as many as fit in `kv_cache_memory` bytes.
        speculative_tokens = k > 0 drafts k tokens per step with the model's MTP module.
        A bf16 model on CPU runs its decode steps' linears on model/gemv.py's kernel (built here,
        once per machine); an fp32 one its large linears and MoE experts on weights packed here
        (model/packed.py: a second copy of those weights, `self.packed_bytes`; repacked by itself
        when a weight is written in place; pack_weights=False keeps MKL).
        compile=True runs decode steps (every sequence one token) as torch.compile'd pieces at the
        batch sizes `compile_sizes` (default graphs.DEFAULT_SIZES up to max_num_seqs), compiled
        here at start-up (`self.compile_seconds`, reported through `log`); compile=False keeps the
        eager model for every step (the reference)."""
        if isinstance(model, (str, os.PathLike)):
            from nanoseek.checkpoint import load_pretrained
            path = str(model)
            model = load_pretrained(path, dtype)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        self.model, self.tokenizer, self.add_bos = model, tokenizer, add_bos
        cfg = model.config
        spec = speculative_tokens > 0
        layers = model.num_cache_layers(with_mtp=spec)
        param = next(model.parameters())
        hidden = cfg.hidden_size if spec else 0
        if num_blocks is None:
            num_blocks = KVMemory.blocks_for_budget(kv_cache_memory, layers, cfg.cache_width(), block_size,
                                                   param.dtype, hidden)
        # one block more than the block manager hands out: the compiled steps' pad rows write there
        self.cache = KVMemory(layers, cfg.cache_width(), num_blocks + 1, block_size, param.dtype, param.device,
                              hidden)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, lookahead=speculative_tokens)
        if param.dtype in (torch.bfloat16, torch.float32) and param.device.type == "cpu" and not gemv.load() and log:
            log(f"decode linears stay on F.linear: {gemv.reason()}")
        self.packed_bytes = 0
        if param.dtype == torch.float32 and param.device.type == "cpu" and pack_weights:
            self.packed_bytes = packed.attach(model)
        graphs, self.compile_seconds = None, None
        if compile:
            from nanoseek.engine.graphs import DEFAULT_SIZES, DecodeGraphs
            sizes = compile_sizes or tuple(s for s in DEFAULT_SIZES if s < max_num_seqs) + (
                min(max_num_seqs, DEFAULT_SIZES[-1]),)
            queries = (1, 1 + speculative_tokens) if spec else (1,)
            graphs = DecodeGraphs(model, self.cache, num_blocks, sizes, log=log, queries=queries,
                                  mtp_queries=(1, 1 + speculative_tokens) if spec else 0)
            self.compile_seconds = graphs.warm_up()
        self.runner = ModelRunner(model, self.cache, graphs)
        self.drafter = MTPDrafter(model, self.cache, speculative_tokens, graphs) if spec else None
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
            eos = eos + [tokenizer.eos_id]
        self.eos_ids = frozenset(e for e in eos if e is not None)
        self.requests: dict[str, Request] = {}               # unfinished
        self.finished: dict[str, RequestOutput] = {}         # finished under generate(), not yet handed over
        self._ids = itertools.count()
        self.counters = dict(steps=0, prompt_tokens_computed=0, generated_tokens=0, spec_proposed=0,
                             spec_accepted=0)

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or LLM(..., tokenizer=...)")
        ids = self.tokenizer.encode(prompt)
        bos = getattr(self.tokenizer, "bos_id", None)
        return [bos] + ids if self.add_bos and bos is not None and ids[:1] != [bos] else ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len {self.max_model_len}")
        if len(ids) + self.scheduler.lookahead > self.scheduler.capacity_tokens():
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the KV cache ({self.scheduler.capacity_tokens()} tokens)")
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.requests or rid in self.finished:
            raise ValueError(f"request id {rid!r} is already in use")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        req = Request(rid, prompt if isinstance(prompt, str) else None, ids, params, stop_ids, arrival=time.perf_counter())
        req.seqs.append(Sequence(req, 0, ids))     # samples 1..n-1 are forked after the prefill
        self.requests[rid] = req
        self.scheduler.add(req.seqs[0])
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown or
        already handed over; a parked finished output is handed over as it is)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return self.finished.pop(request_id, None)
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.finish("abort")
        while len(req.seqs) < req.params.n:
            req.seqs.append(Sequence(req, len(req.seqs), req.prompt_token_ids))
            req.seqs[-1].finish("abort")
        return req.output()

    def take_finished(self, request_id: str) -> RequestOutput | None:
        """The final output of a request that finished while generate() drove the engine, handed
        over once (None if it is still running, unknown, or already handed over)."""
        return self.finished.pop(request_id, None)

    def has_unfinished(self) -> bool:
        """True while step() has something to do or to hand over (parked final outputs included)."""
        return bool(self.requests or self.finished)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[list[Completion]]:
        """Run prompts (texts or token-id lists) to completion: per prompt, its n completions.
        Other callers' requests advance too; those that finish here are parked for their owners."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        mine, done = set(ids), {}
        try:
            while len(done) < len(ids):
                for out in self._outputs(self._step()):
                    if out.request_id in mine:
                        if out.finished:
                            done[out.request_id] = out.outputs
                    elif out.finished:
                        self.finished[out.request_id] = out
        except BaseException:          # interrupted: our requests would otherwise run for no one
            for rid in mine - done.keys():
                self.abort(rid)
            raise
        return [done[i] for i in ids]

    def chat(self, conversations: list[dict] | list[list[dict]], params: SamplingParams | None = None):
        """generate() on chat conversations rendered with the tokenizer's chat template."""
        single = conversations and isinstance(conversations[0], dict)
        convs = [conversations] if single else conversations
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        return self.generate(prompts, params)

    # ------------------------------------------------------------------ weights and cache
    @torch.no_grad()
    def update_weights(self, weights=None) -> None:
        """Copy new weights in place (a state dict, (name, tensor) pairs or a module; nanoseek or
        transformers names; a subset is fine), then forget what came from the old ones: the prefix
        cache and the packed weights (model/packed.py). With no argument: the weights were changed
        in place (an optimizer step on the shared model); only the forgetting."""
        if weights is not None:
            if isinstance(weights, torch.nn.Module):
                weights = weights.state_dict()
            items = dict(weights.items() if isinstance(weights, dict) else weights)
            if any(k.startswith("model.") for k in items):
                from nanoseek.hf import from_hf
                items, problems = from_hf(items, self.model.config)
                if problems:
                    raise ValueError("update_weights: " + "; ".join(problems))
            own = self.model.state_dict()
            unknown = sorted(k for k in items if k not in own or own[k].shape != items[k].shape)
            if unknown:
                raise ValueError(f"update_weights: unknown or mis-shaped tensors: {unknown[:8]}")
            for k, v in items.items():
                own[k].copy_(v)
        packed.forget(self.model)
        self.blocks.clear()

    def clear_prefix_cache(self) -> None:
        self.blocks.clear()

    def stats(self) -> dict:
        s = dict(self.counters)
        s.update(prefix_queries=self.blocks.queries, prefix_hits=self.blocks.hits, evictions=self.blocks.evictions,
                 preemptions=self.scheduler.num_preemptions, kv_usage=self.blocks.usage(),
                 running=len(self.scheduler.running), waiting=len(self.scheduler.waiting))
        return s

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the current output of every request it advanced, whoever added
        it (finished ones for the last time), after the parked final outputs (see the top)."""
        outs = list(self.finished.values())
        self.finished.clear()
        return outs + self._outputs(self._step())

    def _outputs(self, touched: dict[str, Request]) -> list[RequestOutput]:
        """The touched requests' outputs; finished ones leave `self.requests` here (once)."""
        outs = []
        for rid, req in touched.items():
            if self.requests.get(rid) is req:          # not aborted meanwhile
                outs.append(req.output())
                if req.finished:
                    del self.requests[rid]
        return outs

    @torch.inference_mode()
    def _step(self) -> dict[str, Request]:
        """Schedule, run one forward pass, sample or verify, draft; returns the touched requests."""
        touched: dict[str, Request] = {}
        work = self.scheduler.schedule()
        for seq in self.scheduler.ended:
            touched[seq.request.request_id] = seq.request
        self.scheduler.ended.clear()
        if work:
            self.counters["steps"] += 1
            self._run(work, touched)
        return touched

    def _run(self, work: list[Scheduled], touched: dict) -> None:
        hidden = self.runner.forward(work)
        offsets = list(itertools.accumulate([0] + [w.num_inputs for w in work]))
        done = [w.seq.num_computed + w.num_tokens == w.seq.num_tokens for w in work]
        rows = [r for w, off, d in zip(work, offsets, done) if d
                for r in range(off + w.num_tokens - 1, off + w.num_inputs)]
        logits = self.runner.logits(hidden[rows]) if rows else None
        emitted, first_rows = self._sample(work, done, logits)
        mtp_items, drafting, forks = [], [], []
        for w, off, d in zip(work, offsets, done):
            seq, nc_old = w.seq, w.seq.num_computed
            self.counters["prompt_tokens_computed"] += max(0, min(seq.num_prompt_tokens - nc_old, w.num_tokens))
            touched[seq.request.request_id] = seq.request
            committed = w.num_tokens + (len(emitted[seq.seq_id][0]) - 1 if d else 0)
            seq.num_computed = nc_old + committed
            if d:
                self._commit_tokens(seq, *emitted[seq.seq_id])
                if len(seq.request.seqs) < seq.params.n:
                    forks.append(seq)
            if self.drafter is not None:
                self._remember_block_hidden(seq, nc_old, hidden[off:off + committed])
                if not seq.finished:
                    mtp_items.append((seq, hidden[off:off + committed], nc_old))
                    drafting.append(seq.num_uncomputed == 1)
        if mtp_items:
            self.drafter.step(mtp_items, drafting)
        for seq in forks:
            self._fork(seq, first_rows[seq.seq_id], hidden, offsets, work)
        for w in work:
            seq = w.seq
            valid = seq.num_computed if self.drafter is None else min(seq.num_computed, seq.mtp_len)
            self.blocks.register_full_blocks(seq, valid)
            if seq.finished:
                self.scheduler.remove(seq)

    def _sample(self, work, done, logits):
        """Tokens to emit per sequence: plain rows are sampled together, drafts verified one by one.
        Returns ({seq_id: (tokens, logits rows)}, {seq_id: first-token logits row} for forks)."""
        emitted, first_rows, plain, r = {}, {}, [], 0
        for w, d in zip(work, done):
            if not d:
                continue
            first_rows[w.seq.seq_id] = logits[r]        # a fork's samples draw their first token here
            if w.draft:                                 # (a draft may already guess a prompt's first token)
                lg = logits[r:r + 1 + len(w.draft)]
                emitted[w.seq.seq_id] = (self._verify(w, lg), lg)
            else:
                plain.append((w.seq, r))
            r += 1 + len(w.draft)
        if plain:
            lg = logits[[r for _, r in plain]]
            tokens, _ = sampler.sample(lg, [s.params for s, _ in plain], [s.generator for s, _ in plain])
            for (s, _), t, row in zip(plain, tokens.tolist(), lg):
                emitted[s.seq_id] = ([t], row[None])
        return emitted, first_rows

    def _verify(self, w: Scheduled, lg: torch.Tensor) -> list[int]:
        seq = w.seq
        if seq.params.greedy:
            out = accept_greedy(lg, w.draft)
        else:
            p = sampler.processed_logits(lg, *sampler.row_params([seq.params] * len(lg))).softmax(-1)
            out = accept_sampled(p, seq.draft_probs, w.draft, seq.generator)
        self.counters["spec_proposed"] += len(w.draft)
        self.counters["spec_accepted"] += len(out) - 1
        return out

    def _commit_tokens(self, seq: Sequence, tokens: list[int], rows: torch.Tensor) -> None:
        lps, tops = [None] * len(tokens), [None] * len(tokens)
        if seq.params.logprobs is not None:
            lps, tops = sampler.logprobs(rows[:len(tokens)], [seq.params] * len(tokens),
                                         torch.tensor(tokens), seq.params.logprobs)
            tops = tops or [None] * len(tokens)
        if seq.request.first_token_time is None:
            seq.request.first_token_time = time.perf_counter()
        for t, lp, top in zip(tokens, lps, tops):
            self.counters["generated_tokens"] += 1
            if seq.append(t, self.tokenizer, self.max_model_len, lp, top):
                break

    def _remember_block_hidden(self, seq: Sequence, nc_old: int, rows: torch.Tensor) -> None:
        """Keep h at each block's last position (see kv_memory.py: MTP after a prefix hit)."""
        B = self.cache.block_size
        for p in range(nc_old, nc_old + len(rows)):
            if (p + 1) % B == 0:
                self.cache.last_hidden[seq.block_table[p // B]] = rows[p - nc_old]

    def _fork(self, parent: Sequence, row: torch.Tensor, hidden, offsets, work) -> None:
        """Create samples 1..n-1 from a finished prompt, each one's first token drawn from the
        prompt's last logits with its own generator. Those with a seat in the running set (and a
        free block) share the full blocks and copy the partial one; the others queue, blockless."""
        req, B, P = parent.request, self.cache.block_size, parent.num_prompt_tokens
        children = [Sequence(req, i, req.prompt_token_ids) for i in range(len(req.seqs), req.params.n)]
        tokens, _ = sampler.sample(row[None].expand(len(children), -1), [c.params for c in children],
                                   [c.generator for c in children])
        i = next(j for j, w in enumerate(work) if w.seq is parent)
        last_hidden = hidden[offsets[i] + work[i].num_tokens - 1]
        # sequences that finished this step still sit in `running` (removed after the forks, which
        # must come first: the parent's blocks may only be released once the children hold them)
        seats = self.scheduler.max_num_seqs - sum(not s.finished for s in self.scheduler.running)
        queued = []
        for child, t in zip(children, tokens.tolist()):
            req.seqs.append(child)
            child.cached_prompt_tokens = parent.cached_prompt_tokens
            full = P // B
            table = parent.block_table[:full]
            extra = (self.blocks.allocate(1) if P % B else []) if seats > 0 else None
            if extra is None:
                queued.append(child)                         # no seat or no memory: recompute it later
            else:
                seats -= 1
                self.blocks.acquire(table)
                if extra:
                    self.cache.copy_block(parent.block_table[full], extra[0], P % B)
                child.block_table, child.block_hashes = table + extra, parent.block_hashes[:full]
                child.num_computed, child.mtp_len, child.last_hidden = P, P, last_hidden.clone()
                child.status = Status.RUNNING
                self.scheduler.running.append(child)
            self._commit_tokens(child, [t], row[None])
            if child.finished:
                self.scheduler.remove(child)
        # ahead of later requests: they arrived with theirs (first come, first served)
        self.scheduler.waiting.extendleft(c for c in reversed(queued) if not c.finished)
