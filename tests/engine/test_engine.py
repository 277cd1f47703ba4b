"""The engine against full recompute: greedy parity, batching, callers, prefix cache, memory, n, seeds, stops."""
from __future__ import annotations

import pytest
import torch

from nanoseek.config import qwen2_tiny, tiny
from nanoseek.engine import LLM, SamplingParams
from nanoseek.hf import to_hf
from nanoseek.model import Transformer
from tests.helpers import randomize_

V = 300
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _v3(**kw):
    base = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32,
                num_hidden_layers=2)
    return tiny(vocab_size=V).replace(**{**base, **kw})


def _model(cfg=None, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return randomize_(Transformer(cfg or _v3()), seed).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, V, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _tokens(outs):
    return [[c.token_ids for c in per_prompt] for per_prompt in outs]


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
def test_greedy_matches_naive_recompute(arch):
    model = _model() if arch == "deepseek_v3" else _model(qwen2_tiny(vocab_size=V).replace(hidden_size=64, num_hidden_layers=2))
    prompts = _prompts([3, 17, 9, 33])
    llm = LLM(model, num_blocks=64, block_size=4)
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o[0].token_ids == naive_greedy(model, p, 10)
        assert o[0].finish_reason == "length"


def test_mixed_batch_equals_each_alone(model):
    """Chunked prefill (budget 8 tokens) mixing prefills and decodes in one pass == one at a time."""
    prompts = _prompts([21, 2, 13, 5, 30], seed=1)
    batched = LLM(model, num_blocks=128, block_size=4, max_num_batched_tokens=8).generate(prompts, GREEDY)
    alone = LLM(model, num_blocks=128, block_size=4)
    assert _tokens(batched) == [_tokens(alone.generate([p], GREEDY))[0] for p in prompts]


def test_streaming_interface_and_abort(model):
    llm = LLM(model, num_blocks=32, block_size=4)
    free = llm.blocks.num_free
    a = llm.add_request(_prompts([6])[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    b = llm.add_request(_prompts([9])[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    seen = {a: [], b: []}
    for _ in range(4):
        for out in llm.step():
            seen[out.request_id].append(len(out.outputs[0].token_ids))
    assert seen[b] == [1, 2, 3] and seen[a] == [1, 2, 3, 4]       # b finished, then left the outputs
    assert llm.blocks.num_free < free
    assert llm.abort(a) and not llm.has_unfinished()
    assert llm.blocks.num_free == free                          # abort frees every block
    assert all(r == 0 for r in llm.blocks.ref)


# ------------------------------------------------------------------ one engine, several callers
def test_generate_returns_its_own_outputs_and_keeps_the_others(model):
    """The server streams its requests (add_request / step) while RL calls generate() on the same
    engine. generate() drives the steps that finish the server's requests: it must return only its
    own outputs, and each server request must still deliver its final output exactly once, from
    the server's next step() or from take_finished()."""
    pa, pb = _prompts([6, 9, 5], seed=13), _prompts([11, 4], seed=14)
    short, long = (SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 30))
    b_params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    b_ref = [[naive_greedy(model, p, 12)] for p in pb]
    llm = LLM(model, num_blocks=64, block_size=4)
    a1, a2 = llm.add_request(pa[0], short), llm.add_request(pa[1], long)
    assert {o.request_id for o in llm.step()} == {a1, a2}               # A streams a little
    assert _tokens(llm.generate(pb, b_params)) == b_ref                  # a1 finishes in there
    got = {}
    while llm.has_unfinished():                                          # A streams on
        for out in llm.step():
            assert out.request_id in (a1, a2)
            if out.finished:
                assert out.request_id not in got                         # the final output comes once
                got[out.request_id] = out
    assert set(got) == {a1, a2}
    assert got[a1].outputs[0].token_ids == naive_greedy(model, pa[0], 3)
    assert got[a2].outputs[0].token_ids == naive_greedy(model, pa[1], 30)
    assert all(o.outputs[0].finish_reason == "length" for o in got.values())
    a3 = llm.add_request(pa[2], short)                                   # a caller that does not step
    assert _tokens(llm.generate(pb, b_params)) == b_ref
    final = llm.take_finished(a3)
    assert final.finished and final.outputs[0].token_ids == naive_greedy(model, pa[2], 3)
    assert llm.take_finished(a3) is None and llm.step() == [] and not llm.has_unfinished()
    assert llm.blocks.num_free == 64


# ------------------------------------------------------------------ prefix cache
def test_prefix_cache_on_equals_off(model):
    shared = _prompts([22], seed=2)[0]
    prompts = [shared + t for t in _prompts([1, 5, 11], seed=3)] + _prompts([7], seed=4)
    off = LLM(model, num_blocks=128, block_size=4, enable_prefix_caching=False)
    on = LLM(model, num_blocks=128, block_size=4)
    ref = _tokens(off.generate(prompts, GREEDY))
    first = on.generate(prompts, GREEDY)                 # concurrent sharers: one batch
    assert _tokens(first) == ref
    again = on.generate(prompts, GREEDY)                 # full hits (all but the last token)
    assert _tokens(again) == ref
    assert [o[0].cached_prompt_tokens for o in again] == [20, 24, 32, 4]
    partial = [shared + t for t in _prompts([3, 9], seed=5)]           # partial hits
    got = on.generate(partial, GREEDY)
    assert _tokens(got) == _tokens(off.generate(partial, GREEDY))
    assert all(o[0].cached_prompt_tokens == 20 for o in got)
    assert on.blocks.hits > 0 and on.blocks.queries > on.blocks.hits
    llm_running = on.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    on.clear_prefix_cache()
    for _ in range(3):
        on.step()                                        # its prompt blocks are keyed while it runs
    late = on.generate(prompts[0], GREEDY)[0][0]         # and shared with a request arriving now
    assert late.cached_prompt_tokens == 20 and late.token_ids == ref[0][0]
    on.abort(llm_running)
    on.clear_prefix_cache()
    assert on.generate(prompts[:1], GREEDY)[0][0].cached_prompt_tokens == 0


def test_hits_after_eviction_and_preemption_under_small_budget(model):
    """12 blocks of 4 slots hold ~2 sequences: requests queue, get preempted, and cached blocks are
    evicted and revived; every output stays the recompute one."""
    prompts = _prompts([9, 14, 6, 11, 17, 3], seed=6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = _tokens(LLM(model, num_blocks=256, block_size=4, enable_prefix_caching=False).generate(prompts, params))
    small = LLM(model, num_blocks=12, block_size=4)
    assert _tokens(small.generate(prompts, params)) == ref
    assert _tokens(small.generate(prompts[::-1], params)) == ref[::-1]
    s = small.stats()
    assert s["preemptions"] > 0 and s["evictions"] > 0 and s["prefix_hits"] > 0
    assert small.blocks.num_free == 12


def test_too_long_for_memory_ends_with_length(model):
    llm = LLM(model, num_blocks=4, block_size=4)
    out = llm.generate(_prompts([10])[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) < 40
    with pytest.raises(ValueError):
        llm.add_request(_prompts([30])[0])


# ------------------------------------------------------------------ n, seeds, sampling
def test_n_shares_the_prompt(model):
    prompt = _prompts([14], seed=7)[0]
    llm = LLM(model, num_blocks=64, block_size=4)
    rid = llm.add_request(prompt, SamplingParams(temperature=0, n=4, max_tokens=6, ignore_eos=True))
    llm.step()
    seqs = llm.requests[rid].seqs
    assert len(seqs) == 4
    assert all(s.block_table[:3] == seqs[0].block_table[:3] for s in seqs)         # full blocks shared
    assert llm.blocks.ref[seqs[0].block_table[0]] == 4
    assert len({s.block_table[3] for s in seqs}) == 4                               # partial block copied
    outs = []
    while llm.has_unfinished():
        outs += [o for o in llm.step() if o.finished]
    assert llm.counters["prompt_tokens_computed"] == 14
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1, 2, 3]
    assert all(c.token_ids == naive_greedy(model, prompt, 6) for c in comps)
    sampled = llm.generate(prompt, SamplingParams(temperature=1.0, n=3, seed=3, max_tokens=8, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in sampled}) == 3


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_larger_than_max_num_seqs(model, prefix_caching):
    """n = 4 samples with max_num_seqs = 2: the running set never exceeds 2 (forks without a seat
    wait and are recomputed), and every sample is still the greedy completion."""
    prompt = _prompts([14], seed=7)[0]                                  # a partial last block
    llm = LLM(model, num_blocks=64, block_size=4, max_num_seqs=2, enable_prefix_caching=prefix_caching)
    schedule, batch_sizes = llm.scheduler.schedule, []
    llm.scheduler.schedule = lambda: batch_sizes.append(len(work := schedule())) or work
    llm.add_request(prompt, SamplingParams(temperature=0, n=4, max_tokens=6, ignore_eos=True))
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
        assert len(llm.scheduler.running) <= 2
    assert max(batch_sizes) <= 2
    assert outs[-1].finished and [c.index for c in outs[-1].outputs] == [0, 1, 2, 3]
    assert all(c.token_ids == naive_greedy(model, prompt, 6) for c in outs[-1].outputs)
    assert llm.counters["prompt_tokens_computed"] == 14 + 2 * (2 if prefix_caching else 14)   # 2 forks waited
    assert llm.blocks.num_free == 64


def test_seed_reproduces_whatever_shares_the_batch(model):
    prompt = _prompts([8], seed=8)[0]
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11, n=2, max_tokens=12, ignore_eos=True)
    alone = LLM(model, num_blocks=64, block_size=4).generate(prompt, sp)[0]
    others = _prompts([5, 19, 3], seed=9)
    mixed = LLM(model, num_blocks=64, block_size=4).generate(
        others[:2] + [prompt] + others[2:],
        [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 2 + [sp]
        + [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)])[2]
    assert [c.token_ids for c in alone] == [c.token_ids for c in mixed]
    unseeded = LLM(model, num_blocks=64, block_size=4).generate(
        [prompt] * 2, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
    assert unseeded[0][0].token_ids != unseeded[1][0].token_ids


def test_logprobs_and_stop_token_ids(model):
    prompt = _prompts([7], seed=10)[0]
    ref = naive_greedy(model, prompt, 6)
    llm = LLM(model, num_blocks=64, block_size=4)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))[0][0]
    with torch.no_grad():
        lp = model(torch.tensor([prompt + ref])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    assert torch.allclose(torch.tensor(out.logprobs), lp.gather(1, torch.tensor(ref)[:, None])[:, 0], atol=1e-4)
    assert all(max(top, key=top.get) == t for top, t in zip(out.top_logprobs, ref))
    stop = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[ref[2]]))[0][0]
    assert stop.token_ids == ref[:3] and stop.finish_reason == "stop"


def test_sampler_top_k_top_p():
    from nanoseek.engine.sampler import processed_logits
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    x = processed_logits(logits, torch.tensor([1.0, 1.0]), torch.tensor([0, 3]), torch.tensor([0.7, 1.0]))
    assert torch.isfinite(x).tolist() == [[True, True, False, False], [True, True, True, False]]


def test_update_weights_takes_new_weights_and_clears_the_prefix_cache(model):
    prompt = _prompts([13], seed=12)[0]
    llm = LLM(_model(seed=0), num_blocks=64, block_size=4)
    llm.generate(prompt, GREEDY)
    assert llm.generate(prompt, GREEDY)[0][0].cached_prompt_tokens == 12
    new = _model(seed=1)
    llm.update_weights(to_hf(new.state_dict(), new.config))          # transformers names
    out = llm.generate(prompt, GREEDY)[0][0]
    assert out.cached_prompt_tokens == 0
    assert out.token_ids == naive_greedy(new, prompt, 10)
    llm.update_weights(_model(seed=0).state_dict())                    # nanoseek names
    assert llm.generate(prompt, GREEDY)[0][0].token_ids == naive_greedy(_model(seed=0), prompt, 10)
    with pytest.raises(ValueError):
        llm.update_weights({"nope.weight": torch.zeros(1)})
