"""The compiled decode step (engine/graphs.py) against the eager engine: the same greedy tokens and
logits within tolerance, for MLA + MoE (V3) and GQA (Qwen2) models, with pad rows, ragged context
lengths, prefix-cache hits and n > 1 forks in the same batches."""
from __future__ import annotations

import pytest

from nanoseek.config import qwen2_tiny
from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.graphs import DecodeGraphs
from tests.engine.test_engine import V, _model, _prompts, _v3


def _qwen2():
    return _model(qwen2_tiny(vocab_size=V).replace(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   head_dim=16))


def _run(llm, prompts, n=1, max_tokens=12):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n,
                                                logprobs=0))
    return [[c.token_ids for c in o] for o in outs], [[c.logprobs for c in o] for o in outs]


def _uncompiled_graphs(llm, sizes):
    """The graphs' eager form (compile=False): the same pieces, padding and scratch block."""
    llm.runner.graphs = DecodeGraphs(llm.model, llm.cache, llm.blocks.num_blocks, sizes, compile=False)
    return llm


@pytest.mark.parametrize("arch", ["v3", "qwen2"])
def test_decode_graph_pieces_equal_the_eager_model(arch):
    """Uncompiled pieces vs the model's own forward: padding to a capture size, ragged contexts."""
    model = _model(_v3()) if arch == "v3" else _qwen2()
    prompts = _prompts([3, 17, 9, 30, 1])                   # 5 sequences -> capture size 8: 3 pad rows
    ref = LLM(model, block_size=8, num_blocks=64)
    got = _uncompiled_graphs(LLM(model, block_size=8, num_blocks=64), (1, 2, 8))
    (tok_r, lp_r), (tok_g, lp_g) = _run(ref, prompts), _run(got, prompts)
    assert tok_g == tok_r
    for a, b in zip(lp_g, lp_r):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-4)


def test_graphs_with_prefix_hits_and_forks_equal_eager():
    model = _model(_v3())
    shared = _prompts([40])[0]
    prompts = [shared + p for p in _prompts([2, 5, 9], seed=1)]
    ref = LLM(model, block_size=8, num_blocks=64)
    got = _uncompiled_graphs(LLM(model, block_size=8, num_blocks=64), (1, 2, 4, 8))
    for llm in (ref, got):                                   # the second call hits the prefix cache
        _run(llm, prompts[:1])
    assert _run(got, prompts, n=2)[0] == _run(ref, prompts, n=2)[0]


@pytest.mark.parametrize("arch", ["v3", "qwen2"])
def test_compiled_decode_equals_eager(arch):
    """torch.compile'd pieces (inductor) vs the eager engine: same greedy tokens, close logprobs."""
    model = _model(_v3()) if arch == "v3" else _qwen2()
    prompts = _prompts([3, 17, 9])
    ref = LLM(model, block_size=8, num_blocks=64)
    got = LLM(model, block_size=8, num_blocks=64, compile=True, compile_sizes=(1, 4))
    assert got.compile_seconds is not None and got.compile_seconds > 0
    (tok_r, lp_r), (tok_g, lp_g) = _run(ref, prompts), _run(got, prompts)
    assert tok_g == tok_r
    for a, b in zip(lp_g, lp_r):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-3)
    assert _run(got, prompts[:1])[0] == _run(ref, prompts[:1])[0]      # batch 1 after batch 4
