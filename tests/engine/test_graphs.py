"""The compiled decode step (engine/graphs.py) against the eager engine: the same greedy tokens and
logits within tolerance, for MLA + MoE (V3) and GQA (Qwen2) models, with pad rows, ragged context
lengths, prefix-cache hits and n > 1 forks in the same batches."""
from __future__ import annotations

import pytest
import torch

from nanoseek.config import qwen2_tiny
from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine import dispatch, graphs
from nanoseek.engine.graphs import DecodeGraphs
from nanoseek.engine.speculative import MTPDrafter
from tests.engine.test_engine import V, _model, _prompts, _v3


def _qwen2():
    return _model(qwen2_tiny(vocab_size=V).replace(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   head_dim=16))


def _run(llm, prompts, n=1, max_tokens=12):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n,
                                                logprobs=0))
    return [[c.token_ids for c in o] for o in outs], [[c.logprobs for c in o] for o in outs]


def _uncompiled_graphs(llm, sizes, k=0):
    """The graphs' eager form (compile=False): the same pieces, padding and scratch block."""
    g = DecodeGraphs(llm.model, llm.cache, llm.blocks.num_blocks, sizes, compile=False,
                     queries=(1, 1 + k) if k else (1,), mtp_queries=(1, 1 + k) if k else 0)
    llm.runner.graphs = g
    if llm.drafter is not None:
        llm.drafter.graphs = g
    return llm


@pytest.mark.parametrize("per_graph", [1, 8])
@pytest.mark.parametrize("arch", ["v3", "qwen2"])
def test_decode_graph_pieces_equal_the_eager_model(arch, per_graph, monkeypatch):
    """Uncompiled pieces vs the model's own forward: padding to a capture size, ragged contexts;
    the layers as one run or one run each."""
    monkeypatch.setattr(graphs, "LAYERS_PER_GRAPH", per_graph)
    model = _model(_v3(num_hidden_layers=3)) if arch == "v3" else _qwen2()
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


@pytest.mark.parametrize("arch,cpp_wrapper", [("v3", True), ("qwen2", False)])
def test_compiled_decode_equals_eager(arch, cpp_wrapper, monkeypatch):
    """torch.compile'd pieces (inductor) vs the eager engine: same greedy tokens, close logprobs;
    with inductor's C++ wrapper (what small models get) and its Python one (large models)."""
    monkeypatch.setattr(graphs, "CPP_WRAPPER_MAX_BYTES", 1 << 40 if cpp_wrapper else 0)
    model = _model(_v3()) if arch == "v3" else _qwen2()
    prompts = _prompts([3, 17, 9])
    ref = LLM(model, block_size=8, num_blocks=64)
    got = LLM(model, block_size=8, num_blocks=64, compile=True, compile_sizes=(1, 4))
    assert got.compile_seconds is not None and got.compile_seconds > 0
    assert got.runner.graphs.cpp_wrapper is cpp_wrapper
    (tok_r, lp_r), (tok_g, lp_g) = _run(ref, prompts), _run(got, prompts)
    assert tok_g == tok_r
    for a, b in zip(lp_g, lp_r):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-3)
    assert _run(got, prompts[:1])[0] == _run(ref, prompts[:1])[0]      # batch 1 after batch 4


def _capture_drafts(monkeypatch):
    """Every draft distribution the drafter proposes from, in order."""
    captured = []
    propose = MTPDrafter._propose

    def spy(self, seqs, logits):
        captured.extend(row.clone() for row in logits)
        return propose(self, seqs, logits)
    monkeypatch.setattr(MTPDrafter, "_propose", spy)
    return captured


@pytest.mark.parametrize("k", [1, 2])
def test_graph_pieces_with_speculation_equal_eager(monkeypatch, k):
    """Verification steps (1 + k tokens per sequence, fewer where a draft is short) and the MTP
    pass (catch-ups of 1..1+k tokens) on the padded grid: the same tokens and draft distributions
    as the eager engine, and they did run (counted)."""
    model = _model(_v3(num_nextn_predict_layers=1))
    prompts = _prompts([3, 17, 9, 30, 1], seed=5)
    captured = _capture_drafts(monkeypatch)
    ref = LLM(model, block_size=4, num_blocks=96, speculative_tokens=k)
    tok_r, _ = _run(ref, prompts)
    drafts_r = list(captured)
    captured.clear()
    got = _uncompiled_graphs(LLM(model, block_size=4, num_blocks=96, speculative_tokens=k), (1, 2, 8), k)
    tok_g, _ = _run(got, prompts)
    assert tok_g == tok_r
    assert len(captured) == len(drafts_r)
    for a, b in zip(captured, drafts_r):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))
    calls = got.runner.graphs.calls
    assert calls[f"q{1 + k}"] > 0 and calls["mtp"] > 0


def _agreeable(model, delta=0.05):
    """Layers' outputs scaled by `delta` and the MTP module reading the next token's embedding only:
    the main model's argmax at j depends mostly on t_j, the draft mostly agrees with it (~60 %
    accepted at 0.05), so accept, reject and bonus tokens all occur."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.mul_(delta)
            elif "norm" in name:
                p.fill_(1.0)
        eh = model.mtp[0].eh_proj.weight
        D = eh.shape[0]
        eh.zero_()[:, :D] = torch.eye(D)
    return model


def test_compiled_speculative_decode_equals_eager(monkeypatch):
    """LLM(compile=True, speculative_tokens=1): compiled verification and MTP pass, same greedy tokens
    as the eager speculative engine and as plain decoding."""
    model = _model(_v3(num_nextn_predict_layers=1))
    prompts = _prompts([3, 17, 9], seed=6)
    plain = LLM(model, block_size=4, num_blocks=96)
    ref = LLM(model, block_size=4, num_blocks=96, speculative_tokens=1)
    got = LLM(model, block_size=4, num_blocks=96, speculative_tokens=1, compile=True, compile_sizes=(1, 4))
    tok_p, _ = _run(plain, prompts)
    (tok_r, lp_r), (tok_g, lp_g) = _run(ref, prompts), _run(got, prompts)
    assert tok_g == tok_r == tok_p
    for a, b in zip(lp_g, lp_r):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-3)
    calls = got.runner.graphs.calls
    assert calls["q2"] > 0 and calls["mtp"] > 0
    # a model whose drafts are often accepted: accept, reject and bonus tokens, compiled
    _agreeable(model)
    for llm in (plain, got):
        llm.clear_prefix_cache()                              # its KV came from the old weights
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert [o[0].token_ids for o in got.generate(prompts, sp)] == [o[0].token_ids for o in plain.generate(prompts, sp)]
    assert 0 < got.counters["spec_accepted"] < got.counters["spec_proposed"]
    # every compiled function went straight to dynamo's code after warm-up (dispatch.Direct)
    g = got.runner.graphs
    for fn in [r[0] for r in g.runs] + [g.mtp]:
        assert fn.known and all(v is not None for v in fn.known.values())


def test_direct_dispatch_falls_back_to_dynamo_on_a_guard_miss():
    """dispatch.Direct: the code for a signature is called directly while its guards hold; a call that
    fails them (another shape under the same signature) goes through dynamo and is still right."""
    d = dispatch.Direct(torch.compile(lambda x, n: x * n + 1, dynamic=False))
    through_dynamo, compiled = [], d.compiled
    d.compiled = lambda *a: through_dynamo.append(a) or compiled(*a)
    x = torch.arange(3.0)
    assert torch.equal(d("s", x, 2), x * 2 + 1) and len(through_dynamo) == 1
    entry = d.known["s"][1]
    assert torch.equal(d("s", x + 1, 2), (x + 1) * 2 + 1)
    assert len(through_dynamo) == 1 and d.known["s"][1] is entry      # straight into dynamo's code
    y = torch.arange(5.0)
    assert torch.equal(d("s", y, 2), y * 2 + 1)               # a miss: dynamo compiles another graph
    assert torch.equal(d("s", y, 3), y * 3 + 1)               # an int guard (n == 2) missed too
    assert len(through_dynamo) == 3 and d.known["s"][1] is not entry
    assert torch.equal(d("s", y, 3), y * 3 + 1) and len(through_dynamo) == 3


def test_bf16_decode_on_the_gemv_kernel_equals_f_linear(monkeypatch):
    """A bf16 model's decode linears run on model/gemv.py's kernel (eager and compiled); against the
    same engine with the kernel off (F.linear): same greedy tokens, logprobs within bf16 rounding."""
    import torch

    from nanoseek.model import gemv
    if not gemv.load():
        pytest.skip(f"gemv kernel unavailable: {gemv.reason()}")
    model = _qwen2().to(torch.bfloat16)
    prompts = _prompts([3, 17])
    calls = []
    real = gemv._run
    monkeypatch.setattr(gemv, "_run", lambda *a: calls.append(1) or real(*a))
    eager = _run(LLM(model, block_size=8, num_blocks=64), prompts)
    assert calls, "the kernel was not used"
    compiled = _run(LLM(model, block_size=8, num_blocks=64, compile=True, compile_sizes=(1, 2)), prompts)
    monkeypatch.setattr(gemv, "_loaded", False)
    ref = _run(LLM(model, block_size=8, num_blocks=64), prompts)
    for got in (eager, compiled):
        assert got[0] == ref[0]
        for a, b in zip(got[1], ref[1]):
            for x, y in zip(a, b):
                assert x == pytest.approx(y, abs=0.05)


def test_fp32_decode_on_packed_weights_equals_mkl(monkeypatch):
    """An fp32 model's engine packs its weights (model/packed.py; every weight here, the thresholds
    lowered): eager and compiled engines on the packs (linears and the MoE op; compiled: native.py's
    C++ ops) against an engine on a copy without packs (MKL): same greedy tokens, close logprobs;
    the compiled graphs read the packs (a corrupted one shows), and after update_weights the packs
    follow the new weights."""
    import copy

    from nanoseek.model import gemv, native, packed
    if not gemv.load():
        pytest.skip(f"gemv kernel unavailable: {gemv.reason()}")
    monkeypatch.setattr(packed, "MIN_WEIGHT", 1)
    monkeypatch.setattr(packed, "MIN_WEIGHT_NATIVE", 1)
    model = _model(_v3())
    plain = copy.deepcopy(model)
    prompts = _prompts([3, 17, 9, 5, 11, 2])
    calls = {"linear": 0, "moe": 0}
    real_run, real_moe = packed._run, packed._moe
    monkeypatch.setattr(packed, "_run", lambda *a: calls.__setitem__("linear", calls["linear"] + 1) or real_run(*a))
    monkeypatch.setattr(packed, "_moe", lambda *a: calls.__setitem__("moe", calls["moe"] + 1) or real_moe(*a))
    eager = LLM(model, block_size=8, num_blocks=64)
    assert eager.packed_bytes > 0 and model.lm_head.packed_weight is not None
    compiled = LLM(model, block_size=8, num_blocks=64, compile=True, compile_sizes=(1, 8))
    ref = LLM(plain, block_size=8, num_blocks=64, pack_weights=False)
    assert ref.packed_bytes == 0
    want = _run(ref, prompts)

    def same(got, tol=1e-3):
        return got[0] == want[0] and all(x == pytest.approx(y, abs=tol) for a, b in zip(got[1], want[1])
                                         for x, y in zip(a, b))
    for llm in (eager, compiled):
        calls.update(linear=0, moe=0)
        assert same(_run(llm, prompts))
        if llm is eager or not native.available():   # the Python ops (compiled: the C++ ones instead)
            assert calls["linear"] > 0 and calls["moe"] > 0    # 6 rows x top-2 > 8 experts: the MoE op
    # the compiled steps read the packs: one zeroed behind refresh()'s back shows, until forget()
    experts = model.layers[1].mlp.experts
    with torch.no_grad():
        for pack in (model.lm_head.packed_weight, experts.packed_gate_up):
            pack.zero_()
            assert not same(_run(compiled, prompts))
            packed.forget(model)
            assert same(_run(compiled, prompts))
    new = _model(_v3(), seed=1).state_dict()
    for llm in (eager, compiled, ref):
        llm.update_weights(new)
    want = _run(ref, prompts)
    for llm in (eager, compiled):
        assert _run(llm, prompts)[0] == want[0]


def test_pad_rows_repeat_their_sequences_first_row():
    """A sequence feeding fewer rows than the graph's Q: its pad rows take its first row's token,
    hidden (MTP pass) and rope position, so their MoE routes as that row does (no experts of their
    own to read); the valid rows' outputs are those of a graph without pads."""
    model = _model(_v3())
    llm = LLM(model, block_size=8, num_blocks=64, speculative_tokens=2)      # its cache has the MTP layer
    g = DecodeGraphs(model, llm.cache, llm.blocks.num_blocks, (1, 2), compile=False, queries=(1, 3),
                     mtp_queries=(1, 3))
    ids, table, meta, keep = g._inputs([7, 9, 4], [[1, 2], [3]], [5, 2], [2, 1], 3)
    assert ids.tolist() == [7, 9, 7, 4, 4, 4] and keep == [0, 1, 3]
    cos, sin, new_slots, slots, mask = graphs.grid(model.rotary, table, meta, 3, 8, g.scratch_block, False)
    cos = cos.view(2, 3, -1)
    assert torch.equal(cos[0, 2], cos[0, 0]) and not torch.equal(cos[0, 1], cos[0, 0])
    assert torch.equal(cos[1, 1], cos[1, 0]) and torch.equal(cos[1, 2], cos[1, 0])
    assert torch.equal(mask[0, 2], mask[0, 0]) and (new_slots.view(2, 3)[0, 2] // 8).item() == g.scratch_block
    h = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        padded = g.mtp_forward(h, [7, 9, 4], [[1, 2], [3]], [5, 2], [2, 1])      # Q = 3, with pad rows
        alone = torch.cat([g.mtp_forward(h[:2], [7, 9], [[1, 2]], [5], [2]),   # Q = 3, one pad row
                           g.mtp_forward(h[2:], [4], [[3]], [2], [1])])          # Q = 1, none
    assert torch.allclose(padded, alone, atol=1e-5)
