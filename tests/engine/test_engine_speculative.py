"""MTP speculative decoding: the MTP cache against the training forward, exact greedy, exact sampling."""
from __future__ import annotations

import pytest
import torch

from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.speculative import MTPDrafter, accept_greedy, accept_sampled
from tests.engine.test_engine import V, _model, _prompts, _tokens, _v3, naive_greedy


@pytest.fixture(scope="module")
def model():
    return _model(_v3(num_nextn_predict_layers=1))


def test_mtp_drafts_equal_the_training_forward(model, monkeypatch):
    """Every draft distribution the engine's cached MTP pass makes (after chunked prefill, prefix
    hits, forks) equals model(ids, mtp=True).mtp_logits at the same position."""
    captured = []
    propose = MTPDrafter._propose

    def spy(self, seqs, logits):
        for s, row in zip(seqs, logits):
            if not s.draft:                                  # the first draft: from the cached MTP pass
                captured.append((list(s.token_ids), row.clone()))
        return propose(self, seqs, logits)
    monkeypatch.setattr(MTPDrafter, "_propose", spy)
    shared = _prompts([13], seed=1)[0]
    prompts = [shared + t for t in _prompts([2, 7], seed=2)]
    llm = LLM(model, num_blocks=64, block_size=4, speculative_tokens=2, max_num_batched_tokens=6)
    llm.generate(prompts, GREEDY_N)
    llm.generate(prompts, SamplingParams(temperature=0, n=2, max_tokens=5, ignore_eos=True))   # hits + forks
    assert llm.stats()["prefix_hits"] > 0 and len(captured) > 20
    with torch.no_grad():
        for ids, row in captured:
            ref = model(torch.tensor([ids]), mtp=True).mtp_logits[0][0, len(ids) - 2]   # predicts token len(ids)
            assert (ref - row).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


GREEDY_N = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_plain_greedy(model, monkeypatch, k):
    """Drafts from an oracle that is right 2 times in 3 exercise accept, reject and bonus paths."""
    prompts = _prompts([5, 18, 11], seed=3)
    refs = {tuple(p): p + naive_greedy(model, p, 12) for p in prompts}

    def oracle(self, seqs, logits):
        out = []
        for s in seqs:
            full = refs[tuple(s.token_ids[:s.num_prompt_tokens])]
            i = len(s.token_ids) + len(s.draft)
            t = full[i] if i < len(full) else 0
            out.append(t if i % 3 else (t + 1) % V)
        return out, None
    monkeypatch.setattr(MTPDrafter, "_propose", oracle)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(model, num_blocks=64, block_size=4, speculative_tokens=k)
    outs = llm.generate(prompts, params)
    assert [o[0].token_ids for o in outs] == [refs[tuple(p)][len(p):] for p in prompts]
    c = llm.counters
    assert 0 < c["spec_accepted"] < c["spec_proposed"]
    assert llm.counters["steps"] < 12                       # accepted drafts saved steps


def test_speculative_with_untrained_mtp_is_still_exact(model):
    prompts = _prompts([4, 21], seed=4)
    plain = LLM(model, num_blocks=64, block_size=4).generate(prompts, GREEDY_N)
    spec = LLM(model, num_blocks=64, block_size=4, speculative_tokens=2).generate(prompts, GREEDY_N)
    assert _tokens(plain) == _tokens(spec)


def test_speculative_forks_that_wait_for_a_seat(model):
    """n = 3 with max_num_seqs = 2: a fork that waits is recomputed from the prefix cache and its
    MTP cache from the hit block's remembered hidden state; still plain greedy, never > 2 running."""
    prompt = _prompts([10], seed=7)[0]
    llm = LLM(model, num_blocks=64, block_size=4, speculative_tokens=2, max_num_seqs=2)
    llm.add_request(prompt, SamplingParams(temperature=0, n=3, max_tokens=9, ignore_eos=True))
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
        assert len(llm.scheduler.running) <= 2
    assert [c.token_ids for c in outs[-1].outputs] == [naive_greedy(model, prompt, 9)] * 3
    assert llm.counters["prompt_tokens_computed"] == 10 + 2       # the waiting fork: its partial block


def test_accept_greedy_rule():
    logits = torch.eye(5)[[1, 2, 3, 4]]              # target argmax: 1, 2, 3, 4
    assert accept_greedy(logits, [1, 2, 3]) == [1, 2, 3, 4]
    assert accept_greedy(logits, [1, 0, 3]) == [1, 2]
    assert accept_greedy(logits[:1], []) == [1]


def test_accept_sampled_keeps_the_target_distribution():
    """First emitted token ~ p exactly, whatever q proposes (empirical, 20k draws)."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    accepted = 0
    for _ in range(20000):
        d = int(torch.multinomial(q[0], 1, generator=g))
        out = accept_sampled(p, q, [d], g)
        counts[out[0]] += 1
        accepted += len(out) - 1
    assert (counts / 20000 - p[0]).abs().max() < 0.015
    assert abs(accepted / 20000 - torch.minimum(p[0], q[0]).sum()) < 0.015   # acceptance = Σ min(p, q)


def test_speculative_sampling_is_seeded_and_runs(model):
    prompts = _prompts([6, 9], seed=5)
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=4, n=2, max_tokens=10, ignore_eos=True, logprobs=0)
    a = LLM(model, num_blocks=64, block_size=4, speculative_tokens=2).generate(prompts, sp)
    b = LLM(model, num_blocks=64, block_size=4, speculative_tokens=2).generate(prompts, sp)
    assert _tokens(a) == _tokens(b)
    assert all(len(c.token_ids) == 10 == len(c.logprobs) for o in a for c in o)


def test_speculative_under_memory_pressure_and_abort(model):
    """Preemption, eviction and revival with the MTP layers in the blocks: still plain greedy."""
    prompts = _prompts([9, 14, 6, 11, 17], seed=6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = _tokens(LLM(model, num_blocks=256, block_size=4).generate(prompts, params))
    small = LLM(model, num_blocks=14, block_size=4, speculative_tokens=1)
    assert _tokens(small.generate(prompts, params)) == ref
    assert _tokens(small.generate(prompts[::-1], params)) == ref[::-1]
    s = small.stats()
    assert s["preemptions"] > 0 and s["prefix_hits"] > 0
    rid = small.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    small.step(), small.step()
    assert small.abort(rid).outputs[0].finish_reason == "abort"
    assert small.blocks.num_free == 14 and not any(small.blocks.ref)


def test_bench_replay_drafter_is_the_ceiling_and_hands_back_cleanly(model):
    """`nanoseek bench engine`'s ceiling (bench/engine.py's ReplayDrafter): drafts are the greedy run's
    own next tokens, so every one is accepted and a step yields k + 1 tokens; the MTP drafter put back
    afterwards (prefix cache cleared, as the bench does) still decodes exactly."""
    from nanoseek.bench.engine import ReplayDrafter
    prompts = _prompts([5, 9], seed=6)
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    refs = {tuple(p): naive_greedy(model, p, 13) for p in prompts}
    llm = LLM(model, num_blocks=64, block_size=4, speculative_tokens=3)
    mtp = llm.drafter
    llm.drafter = ReplayDrafter(3, refs)
    for p in prompts:
        c0 = dict(llm.counters)
        assert llm.generate([p], params)[0][0].token_ids == refs[tuple(p)]
        d = {k: llm.counters[k] - c0[k] for k in ("steps", "spec_proposed", "spec_accepted")}
        # the prefill emits 1 token, each later step 4, the last draft cut at max_tokens (13 = 1 + 4·3)
        assert d == dict(steps=4, spec_proposed=9, spec_accepted=9)
    llm.drafter = mtp
    llm.clear_prefix_cache()
    assert [o[0].token_ids for o in llm.generate(prompts, params)] == [refs[tuple(p)] for p in prompts]
