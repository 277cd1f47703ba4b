"""Model internals: every fast path against its naive reference, and the cache protocol."""
from __future__ import annotations

import pytest
import torch

from nanoseek.model.cache import ContiguousCache, PagedCache
from nanoseek.config import ModelConfig, qwen2_tiny, tiny
from nanoseek.model import Transformer
from nanoseek.model.params import param_counts
from nanoseek.model.moe import Router, experts_looped, experts_sorted, sequence_balance_loss, bias_update
from nanoseek.model.mtp import mtp_loss
from tests.helpers import max_rel_diff, randomize_

TOL = 1e-4


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return randomize_(Transformer(cfg), seed).eval()


def _small_v3(**kw) -> ModelConfig:
    base = dict(hidden_size=96, intermediate_size=128, moe_intermediate_size=48, q_lora_rank=32, kv_lora_rank=32)
    return tiny(vocab_size=300).replace(**{**base, **kw})


def _ids(B, T, vocab=300, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _cache(model, kind: str, batch: int, max_len: int = 64):
    cfg = model.config
    if kind == "paged":
        return PagedCache(model.num_cache_layers(), cfg.cache_width(), num_blocks=64, block_size=4)
    return ContiguousCache(model.num_cache_layers(), cfg.cache_width(), batch, max_len)


# ------------------------------------------------------------------ MLA
def test_absorbed_equals_naive_mla():
    model = _model(_small_v3())
    attn = model.layers[0].self_attn
    S, Q, L, H = 3, 5, 11, attn.n_heads
    g = torch.Generator().manual_seed(0)
    q_nope, q_pe = torch.randn(S, Q, H, attn.nope, generator=g), torch.randn(S, Q, H, attn.rope, generator=g)
    latent, k_pe = torch.randn(S, L, attn.kv_rank, generator=g), torch.randn(S, L, attn.rope, generator=g)
    mask = torch.rand(S, Q, L, generator=g) > 0.3
    mask[:, :, 0] = True
    with torch.no_grad():
        naive = attn.naive(q_nope, q_pe, latent, k_pe, mask)
        absorbed = attn.absorbed(q_nope, q_pe, latent, k_pe, mask)
    assert max_rel_diff(naive, absorbed) <= TOL


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_mla_impls_agree_through_the_cache(impl):
    model = _model(_small_v3())
    ids = _ids(2, 12)
    with torch.no_grad():
        full = model(ids).logits
        for layer in model.layers:
            layer.self_attn.impl = impl
        cache = _cache(model, "contiguous", 2)
        prefill = model(ids[:, :7], cache=cache).logits
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(7, 12)]
    assert max_rel_diff(full, torch.cat([prefill] + steps, dim=1)) <= TOL


def test_latent_cache_size_per_token():
    cfg = tiny()
    assert cfg.cache_width() == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 80
    model = Transformer(cfg)
    cache = _cache(model, "contiguous", 1)
    assert cache.bytes_per_token() == 4 * cfg.num_hidden_layers * 80
    g = qwen2_tiny()
    assert g.cache_width() == 2 * g.num_key_value_heads * g.attn_head_dim


# ------------------------------------------------------------------ cache protocol
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
def test_cached_decode_equals_full_recompute(kind, arch):
    model = _model(_small_v3() if arch == "deepseek_v3" else qwen2_tiny(vocab_size=300))
    ids = _ids(3, 14, seed=1)
    with torch.no_grad():
        full = model(ids).logits
        cache = _cache(model, kind, 3)
        parts = [model(ids[:, :5], cache=cache).logits, model(ids[:, 5:9], cache=cache).logits]  # chunked prefill
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(9, 14)]
    assert max_rel_diff(full, torch.cat(parts, dim=1)) <= TOL


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
def test_packed_mixed_length_batch(kind, arch):
    """Sequences of different lengths packed into one [1, N] call, then prefill and decode mixed."""
    model = _model(_small_v3() if arch == "deepseek_v3" else qwen2_tiny(vocab_size=300))
    seqs = [_ids(1, n, seed=10 + n)[0] for n in (9, 4, 13)]
    with torch.no_grad():
        refs = [model(s[None]).logits[0] for s in seqs]
        cache = _cache(model, kind, 3)
        keys = [0, 1, 2]
        # call 1: prefill the first 3 / 4 / 6 tokens of each
        first = [3, 4, 6]
        cache.prepare(keys, first)
        out1 = model(torch.cat([s[:n] for s, n in zip(seqs, first)])[None], cache=cache).logits[0]
        # call 2: sequence 1 is done; 0 gets a prefill chunk of 5, 2 decodes one token
        cache.prepare([0, 2], [5, 1])
        out2 = model(torch.cat([seqs[0][3:8], seqs[2][6:7]])[None], cache=cache).logits[0]
        # call 3: both decode one token; rows mode is not used, so lengths may differ
        cache.prepare([0, 2], [1, 1])
        out3 = model(torch.stack([seqs[0][8], seqs[2][7]])[None], cache=cache).logits[0]
    o = torch.cumsum(torch.tensor([0] + first), 0)
    assert max_rel_diff(refs[0][:3], out1[o[0]:o[1]]) <= TOL
    assert max_rel_diff(refs[1][:4], out1[o[1]:o[2]]) <= TOL
    assert max_rel_diff(refs[2][:6], out1[o[2]:o[3]]) <= TOL
    assert max_rel_diff(refs[0][3:8], out2[:5]) <= TOL
    assert max_rel_diff(refs[2][6:7], out2[5:]) <= TOL
    assert max_rel_diff(refs[0][8], out3[0]) <= TOL
    assert max_rel_diff(refs[2][7], out3[1]) <= TOL


def test_rows_with_different_cached_lengths():
    """Row mode with rows at different lengths: positions follow each row's own length."""
    model = _model(_small_v3())
    a, b = _ids(1, 8, seed=3)[0], _ids(1, 5, seed=4)[0]
    with torch.no_grad():
        cache = _cache(model, "contiguous", 2)
        cache.prepare([0, 1], [7, 4])
        model(torch.cat([a[:7], b[:4]])[None], cache=cache)
        step = model(torch.stack([a[7:8], b[4:5]]), cache=cache).logits  # rows: [2, 1]
        assert cache.lengths == [8, 5]
        assert max_rel_diff(model(a[None]).logits[0, -1], step[0, 0]) <= TOL
        assert max_rel_diff(model(b[None]).logits[0, -1], step[1, 0]) <= TOL


def test_paged_cache_frees_blocks():
    model = _model(_small_v3())
    cache = _cache(model, "paged", 1)
    free0 = len(cache.free_blocks)
    with torch.no_grad():
        model(_ids(1, 10), cache=cache)
    assert len(cache.free_blocks) == free0 - 3  # 10 tokens in blocks of 4
    cache.free(0)
    assert len(cache.free_blocks) == free0


# ------------------------------------------------------------------ MoE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sorted_equals_looped_moe(dtype):
    model = _model(_small_v3(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3))
    moe = model.layers[1].mlp
    x = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, idx, w = moe.gate(x)
        moe.experts.to(dtype)
        a = experts_sorted(moe.experts, x.to(dtype), idx, w)
        b = experts_looped(moe.experts, x.to(dtype), idx, w)
    assert max_rel_diff(a.float(), b.float()) <= (TOL if dtype == torch.float32 else 2e-2)


def _router(**kw) -> Router:
    cfg = _small_v3(**kw)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, 0, 1.0, generator=torch.Generator().manual_seed(0))
    return r


def test_masked_groups_never_selected():
    r = _router(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    x = torch.randn(500, r.weight.shape[1], generator=torch.Generator().manual_seed(1))
    r.e_score_correction_bias.uniform_(-2.0, -1.5)  # score + bias < 0 everywhere: 0.0-masking would fail
    with torch.no_grad():
        scores, idx, _ = r(x)
    choice = (scores + r.e_score_correction_bias).view(500, 4, 4)
    group_score = choice.topk(2, dim=-1).values.sum(-1)
    allowed = group_score.topk(2, dim=-1).indices                           # [N, 2]
    chosen_groups = idx // 4
    assert all(set(c.tolist()) <= set(a.tolist()) for c, a in zip(chosen_groups, allowed))


def test_bias_changes_selection_not_weights():
    r = _router(norm_topk_prob=False, routed_scaling_factor=1.0)
    x = torch.randn(64, r.weight.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scores, idx0, _ = r(x)
        r.e_score_correction_bias[3] = 10.0  # expert 3 now always chosen
        scores1, idx1, w1 = r(x)
    assert torch.equal(scores, scores1)
    assert (idx1 == 3).any(-1).all() and not torch.equal(idx0, idx1)
    assert torch.allclose(w1, scores.gather(1, idx1))  # weights are the un-biased scores


def test_gate_weights_sum_to_scaling_factor():
    r = _router(routed_scaling_factor=2.5)
    with torch.no_grad():
        _, _, w = r(torch.randn(10, r.weight.shape[1]))
    assert torch.allclose(w.sum(-1), torch.full((10,), 2.5))


def test_router_stats_count_tokens():
    model = _model(_small_v3()).train()
    out = model(_ids(2, 6))
    load = torch.stack([torch.bincount(s.topk_idx.flatten(), minlength=8) for s in out.router_stats])
    n_moe = sum(model.config.is_moe_layer(i) for i in range(4)) + len(model.mtp)
    assert load.shape == (n_moe, 8)
    assert torch.all(load[:-1].sum(-1) == 2 * 6 * 2) and load[-1].sum() == 2 * 5 * 2  # MTP sees T-1


def test_balance_helpers():
    b = torch.zeros(4)
    bias_update(b, torch.tensor([5.0, 3.0, 0.0, 0.0]), 0.01)
    assert torch.allclose(b, torch.tensor([-0.01, -0.01, 0.01, 0.01]))
    from nanoseek.model.moe import RouterStats
    E, K, T = 4, 2, 8
    idx = torch.tensor([[0, 1], [2, 3]] * (T // 2))[None]            # every expert chosen T/2 times
    stats = RouterStats(0, torch.full((1, T, E), 0.3), idx)
    assert torch.allclose(sequence_balance_loss(stats, E, K, alpha=0.01), torch.tensor(0.01))


# ------------------------------------------------------------------ MTP and params
def test_mtp_logits_and_loss_targets():
    model = _model(_small_v3(num_nextn_predict_layers=2)).train()
    ids = _ids(2, 10)
    out = model(ids)
    assert [tuple(l.shape) for l in out.mtp_logits] == [(2, 9, 300), (2, 8, 300)]
    # depth k at position i predicts token i+k+1: construct logits that put all mass on that token
    perfect = [torch.nn.functional.one_hot(ids[:, k + 1:], 300).float() * 50 for k in (1, 2)]
    perfect = [torch.cat([p, torch.zeros(2, 1, 300)], dim=1) for p in perfect]  # last position has no target
    total, per_depth = mtp_loss(perfect, ids, weight=0.3)
    assert all(float(l) < 1e-6 for l in per_depth) and float(total) < 1e-6
    assert model.mtp[0].block.self_attn is not model.layers[-1].self_attn
    assert not model.eval()(ids).mtp_logits  # eval: no MTP work


def test_param_counts_match_built_models():
    for cfg in (tiny(), qwen2_tiny(), _small_v3(q_lora_rank=None, num_nextn_predict_layers=2)):
        model = Transformer(cfg)
        own = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        main = sum(v.numel() for k, v in own.items() if not k.startswith("mtp."))
        if cfg.tie_word_embeddings:
            main -= own["lm_head.weight"].numel()
        c = param_counts(cfg)
        assert c["total"] == main
        mtp_own = sum(v.numel() for k, v in own.items() if k.startswith("mtp."))
        n_mtp = len(model.mtp)
        assert c["total_with_mtp"] == main + mtp_own + n_mtp * 2 * cfg.vocab_size * cfg.hidden_size


def test_v3_671b_counts():
    from nanoseek.config import v3_671b
    c = param_counts(v3_671b())
    assert c["total"] == 671_026_419_200
    assert abs(c["activated"] / 1e9 - 37.55) < 0.01
