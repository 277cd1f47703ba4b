"""Every fast path of the model against its naive reference, forward and backward.

fp32 tolerance: max |Δ| ≤ 1e-4 · max(1, max |reference|) (tests/helpers.max_rel_diff). bf16 runs
are compared with 3e-2: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 2e-3 per value),
and a fast path and its reference round at different places (fused vs separate casts, GEMM
blocking), so a few roundings add up on O(1) values; a real bug (a wrong mask, a dropped
term, swapped halves) is off by O(1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model import fastpath
from nanoseek.model import mla, moe
from nanoseek.config import tiny
from nanoseek.model.fastpath import fused_linear, linear
from nanoseek.model.norm import rms_norm, rms_norm_reference
from nanoseek.model import Transformer
from nanoseek.model.rope import RotaryEmbedding, apply_rope, apply_rope_reference
from tests.helpers import max_rel_diff, randomize_

TOL, TOL_BF16 = 1e-4, 3e-2


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grads(fn, *inputs, seed=1):
    """fn(*inputs) and the gradients of a fixed random projection of it w.r.t. inputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=_gen(seed)).to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def _cfg(**kw):
    base = dict(hidden_size=96, intermediate_size=128, moe_intermediate_size=48, q_lora_rank=32, kv_lora_rank=32,
                num_nextn_predict_layers=0)
    return tiny(vocab_size=300).replace(**{**base, **kw})


def _agree(a, b, tol=TOL):
    assert max_rel_diff(b.float(), a.float()) <= tol


# ------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("shape", [(2, 7, 3, 16), (2, 7, 16)])
def test_rope_complex_equals_reference(shape):
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(7).expand(2, 7) + 5)
    x = torch.randn(shape, generator=_gen())
    a, ga = _grads(lambda t: apply_rope(t, cos, sin, True), x)
    b, gb = _grads(lambda t: apply_rope_reference(t, cos, sin, True), x)
    _agree(a, b)
    _agree(ga[0], gb[0])


def test_rope_on_strided_slices():
    """q_pe is a slice of q: even offset (a view) and odd offset (copied first) both agree."""
    cos, sin = RotaryEmbedding(8, 10000.0)(torch.arange(5)[None])
    q = torch.randn(1, 5, 2, 21, generator=_gen())
    for start in (13, 12):
        part = q[..., start:start + 8]
        _agree(apply_rope(part, cos, sin, True), apply_rope_reference(part, cos, sin, True))
    half = apply_rope(q[..., :8], cos, sin, False)  # half-split layout: the reference itself
    assert torch.equal(half, apply_rope_reference(q[..., :8], cos, sin, False))


# ------------------------------------------------------------------ RMSNorm, linear
def test_rms_norm_equals_reference_fp32():
    x, w = torch.randn(4, 9, 64, generator=_gen()), torch.rand(64, generator=_gen(1)) + 0.5
    a, ga = _grads(lambda t, u: rms_norm(t, u, 1e-6), x, w)
    b, gb = _grads(lambda t, u: rms_norm_reference(t, u, 1e-6), x, w)
    _agree(a, b)
    for u, v in zip(ga, gb):
        _agree(u, v)


def test_rms_norm_bf16_input():
    x, w = torch.randn(4, 9, 64, generator=_gen()).bfloat16(), torch.rand(64, generator=_gen(1)) + 0.5
    a, ga = _grads(lambda t, u: rms_norm(t, u, 1e-6), x, w)
    b, gb = _grads(lambda t, u: rms_norm_reference(t, u, 1e-6), x, w)
    assert a.dtype == b.dtype == torch.float32 and ga[0].dtype == torch.bfloat16
    assert torch.equal(a, b)                         # same forward ops
    for u, v in zip(ga, gb):
        _agree(u, v, TOL_BF16)                       # ours keeps x̂ in fp32 for the backward


@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(bias):
    x, w = torch.randn(4, 16, 40, generator=_gen()), torch.randn(24, 40, generator=_gen(1))   # 64 rows: oneDNN
    b = torch.randn(24, generator=_gen(2)) if bias else None
    args = (x, w) + ((b,) if bias else ())
    if fastpath.onednn_linear_op() is not None:
        leaf = [t.detach().requires_grad_() for t in args]
        assert type(linear(*leaf).grad_fn).__name__ == "_OneDNNLinearBackward"
    a, ga = _grads(lambda *t: linear(*t), *args)
    r, gr = _grads(lambda *t: F.linear(*t), *args)
    _agree(a, r)
    for u, v in zip(ga, gr):
        _agree(u, v)
    with torch.no_grad():
        _agree(linear(x, w, b), F.linear(x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w, b).dtype == torch.bfloat16   # autocast: F.linear's bf16 path


def test_fused_linear_equals_separate():
    a, b = nn.Linear(40, 16, bias=True), nn.Linear(40, 8, bias=False)
    x = torch.randn(2, 5, 40, generator=_gen())
    fused = fused_linear(x, a, b)
    _agree(fused, torch.cat([a(x), b(x)], dim=-1))

    class Swapped(nn.Linear):  # stands for fp8.Fp8Linear / a LoRA layer: keeps its own forward
        pass
    assert fused_linear(x, a, Swapped(40, 8)) is None


# ------------------------------------------------------------------ MLA
def _mla_inputs(attn, B=2, T=37, seed=0):
    g = _gen(seed)
    H = attn.n_heads
    return (torch.randn(B, T, H, attn.nope, generator=g), torch.randn(B, T, H, attn.rope, generator=g),
            torch.randn(B, T, attn.kv_rank, generator=g), torch.randn(B, T, attn.rope, generator=g))


@pytest.mark.parametrize("impl", ["bmm", "sdpa"])
@pytest.mark.parametrize("v_head_dim", [16, 64])   # narrower / wider than qk_head_dim = 48
def test_mla_causal_equals_naive(impl, v_head_dim):
    model = randomize_(Transformer(_cfg(v_head_dim=v_head_dim)))
    attn = model.layers[0].self_attn
    attn.causal_impl = impl
    inputs = _mla_inputs(attn)
    a, ga = _grads(attn.causal, *inputs)
    b, gb = _grads(lambda *t: attn.naive(*t, mask=None), *inputs)
    _agree(a, b)
    for u, v in zip(ga, gb):
        _agree(u, v)


def test_causal_attention_bmm_blocks():
    """Query blocks that do not divide T, against a plain masked softmax."""
    g = _gen()
    q, k, v = torch.randn(3, 45, 8, generator=g), torch.randn(3, 45, 8, generator=g), torch.randn(3, 45, 5, generator=g)
    mask = torch.ones(45, 45, dtype=torch.bool).tril()
    ref = lambda q, k, v: ((q @ k.transpose(1, 2) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1)) @ v  # noqa: E731
    for block in (16, 45, 128):
        a, ga = _grads(lambda *t: mla.causal_attention_bmm(*t, 0.3, block=block), q, k, v)
        b, gb = _grads(ref, q, k, v)
        _agree(a, b)
        for u, w in zip(ga, gb):
            _agree(u, w)


def test_mla_causal_bf16_autocast():
    model = randomize_(Transformer(_cfg()))
    attn = model.layers[0].self_attn
    inputs = [t.bfloat16() for t in _mla_inputs(attn)]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ref = attn.naive(*inputs, mask=None)
        for impl in ("bmm", "sdpa"):
            attn.causal_impl = impl
            _agree(attn.causal(*inputs), ref, TOL_BF16)


def test_mla_projection_unfused_when_swapped():
    model = randomize_(Transformer(_cfg()))
    attn = model.layers[0].self_attn
    x = torch.randn(2, 6, 96, generator=_gen())
    with torch.no_grad():
        fused = attn.project(x)

        class Swapped(nn.Linear):
            pass
        old = attn.q_a_proj
        attn.q_a_proj = Swapped(old.in_features, old.out_features, bias=False)
        attn.q_a_proj.weight = old.weight
        for a, b in zip(fused, attn.project(x)):
            _agree(a, b)


# ------------------------------------------------------------------ MoE
def _moe(**kw):
    model = randomize_(Transformer(_cfg(**kw)))
    return model.layers[1].mlp


@pytest.mark.parametrize("pad", [0, 8])   # rows per expert rounded up to a multiple of pad (bf16 default: 64)
@pytest.mark.parametrize("kw", [{}, dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)])
def test_grouped_experts_equal_looped(kw, pad, monkeypatch):
    monkeypatch.setitem(moe.GROUP_PAD, torch.float32, pad)
    m = _moe(**kw)
    x = torch.randn(29, 96, generator=_gen())
    scores, idx, w = m.gate(x)
    assert torch.bincount(idx.flatten(), minlength=m.gate.n_experts).min() <= 2  # some experts (nearly) idle
    params = (x, m.experts.gate_up_proj, m.experts.down_proj, w)

    def run(dispatch):
        def f(x, gu, down, w):
            experts = moe.Experts(gu.shape[0], 96, 48)
            del experts.gate_up_proj, experts.down_proj
            experts.gate_up_proj, experts.down_proj = gu, down
            return dispatch(experts, x, idx, w)
        return _grads(f, *params)
    a, ga = run(moe.experts_grouped)
    b, gb = run(moe.experts_looped)
    _agree(a, b)
    for u, v in zip(ga, gb):
        _agree(u, v)


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("kw", [{}, dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)])
def test_decode_sized_experts_equal_looped(kw, n):
    """The decode dispatches (dense: every expert, weight 0 where not chosen; gathered: the chosen
    experts' weights batched) against the reference loop, fp32 and a bf16 model."""
    m = _moe(**kw)
    x = torch.randn(n, 96, generator=_gen())
    with torch.no_grad():
        _, idx, w = m.gate(x)
        ref = moe.experts_looped(m.experts, x, idx, w)
        for dispatch in (moe.experts_dense, moe.experts_gathered, moe.experts_grouped_op):
            _agree(dispatch(m.experts, x, idx, w), ref)
        mb = _moe(**kw).to(torch.bfloat16)
        mb.load_state_dict({k: v.to(mb.state_dict()[k].dtype) for k, v in m.state_dict().items()})
        xb = x.to(torch.bfloat16)
        ref_b = moe.experts_looped(mb.experts, xb, idx, w)
        for dispatch in (moe.experts_dense, moe.experts_gathered):
            got = dispatch(mb.experts, xb, idx, w)
            assert got.dtype == torch.bfloat16
            _agree(got.float(), ref_b.float(), TOL_BF16)


def test_auto_dispatch_compiled_equals_looped(monkeypatch):
    """Inside torch.compile experts_auto takes gathered (N·K <= E), dense (when allowed) and the
    grouped custom op, one graph each with no break; each agrees with the loop."""
    m = _moe(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=2)
    f = torch.compile(lambda x, i, w: moe.experts_auto(m.experts, x, i, w), dynamic=False, fullgraph=True)
    for n, dense in ((1, 0), (4, 64), (16, 0)):       # gathered, dense, grouped op
        monkeypatch.setattr(moe, "DENSE_MAX_COMPILED", dense)
        x = torch.randn(n, 96, generator=_gen())
        with torch.no_grad():
            _, idx, w = m.gate(x)
            _agree(f(x, idx, w), moe.experts_looped(m.experts, x, idx, w))


def test_auto_dispatch_picks_by_size(monkeypatch):
    """Eager: always grouped. Compiled (no grad): gathered while N·K <= E, dense while N·E <=
    DENSE_MAX_COMPILED, else the grouped op."""
    m = _moe(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=2)
    calls = []
    for name in ("experts_dense", "experts_gathered", "experts_grouped", "experts_grouped_op"):
        monkeypatch.setattr(moe, name, lambda *a, _n=name: calls.append(_n) or torch.zeros_like(a[1]))
    monkeypatch.setattr(moe, "DENSE_MAX_COMPILED", 256)
    x = torch.randn(64, 96, generator=_gen())
    with torch.no_grad():
        for n in (1, 8, 16, 17):
            _, idx, w = m.gate(x[:n])
            moe.experts_auto(m.experts, x[:n], idx, w)                       # eager
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
            moe.experts_auto(m.experts, x[:n], idx, w)                       # as if compiling
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _, idx, w = m.gate(x[:1])
    moe.experts_auto(m.experts, x[:1], idx, w)          # grad on (training): always grouped
    assert calls == ["experts_grouped", "experts_gathered", "experts_grouped", "experts_gathered",
                     "experts_grouped", "experts_dense", "experts_grouped", "experts_grouped_op", "experts_grouped"]


def test_grouped_experts_bf16_autocast():
    m = _moe()
    x = torch.randn(40, 96, generator=_gen())
    with torch.no_grad():
        _, idx, w = m.gate(x)
        ref = moe.experts_looped(m.experts, x, idx, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = moe.experts_grouped(m.experts, x, idx, w)
    assert got.dtype == torch.float32
    _agree(got, ref, TOL_BF16)


def test_grouped_experts_fall_back_for_subclasses():
    """fp8.py swaps in an Experts subclass with its own expert(): dispatch must call it."""
    m = _moe()

    class Marked(moe.Experts):
        def expert(self, e, x):
            return torch.full((x.shape[0], x.shape[1]), float(e))
    m.experts.__class__ = Marked
    x = torch.randn(10, 96, generator=_gen())
    with torch.no_grad():
        _, idx, w = m.gate(x)
        got = moe.experts_grouped(m.experts, x, idx, w)
    expected = (idx.float() * w).sum(-1, keepdim=True).expand_as(got)
    _agree(got, expected)


def test_router_stays_fp32_under_autocast():
    m = _moe()
    x = torch.randn(12, 96, generator=_gen())
    with torch.no_grad():
        ref = m.gate(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.gate(x)
    assert got[0].dtype == torch.float32 and torch.equal(got[1], ref[1])
    _agree(got[0], ref[0])


# ------------------------------------------------------------------ all of it: gradients vs transformers
def test_training_gradients_match_transformers(tmp_path):
    """Every fast path at once: loss and all parameter gradients equal transformers' on the same weights."""
    transformers = pytest.importorskip("transformers")
    from nanoseek import save_pretrained
    ours = randomize_(Transformer(_cfg(routed_scaling_factor=2.5))).train()
    save_pretrained(ours, str(tmp_path / "m"))
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "m").train()
    ids = torch.randint(0, 300, (2, 140), generator=_gen())   # > 128: two query blocks

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    la, lb = loss(ours(ids, mtp=False).logits), loss(theirs(ids, use_cache=False).logits)
    la.backward()
    lb.backward()
    assert abs(float(la) - float(lb)) <= TOL * float(lb)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs_params[name if name == "lm_head.weight" else "model." + name].grad
        assert max_rel_diff(ref / ref.abs().max(), p.grad / ref.abs().max()) <= TOL, name


def test_kernels_pass_their_load_time_checks():
    """gemv.c's and native.py's libraries check themselves against F.linear when they load and stay
    unused if they disagree, which would skip every kernel test: that must fail here instead (a
    machine without a compiler or AVX2 may still skip them)."""
    from nanoseek.model import gemv, native
    gemv.load()
    native.load()
    for lib in (gemv, native):
        assert "disagrees" not in (lib.reason() or ""), lib.reason()
