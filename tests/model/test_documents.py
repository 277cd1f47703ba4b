"""Packed documents (`model(ids, segments=…)`): a packed row computes what its documents compute one
by one — logits, MTP logits, router choices and gradients — for MLA (both causal kernels) and GQA.
Also: the model keeps no runtime state between calls."""
from __future__ import annotations

import pytest
import torch

from nanoseek.config import qwen2_tiny
from nanoseek.model import mla as mla_module
from nanoseek.model.cache import document_mask
from nanoseek.model.mla import causal_attention_bmm
from nanoseek.model.transformer import segment_positions
from tests.helpers import max_rel_diff
from tests.model.test_model import _ids, _model, _small_v3

LENGTHS = [5, 9, 3]      # three documents; the row ends in 2 padding tokens (segment −1)


def _packed_row(docs):
    ids = torch.cat(docs + [torch.zeros(2, dtype=torch.long)])[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)] + [torch.full((2,), -1)])[None]
    return ids, seg


@pytest.mark.parametrize("kind", ["mla-bmm", "mla-sdpa", "gqa"])
def test_packed_row_equals_documents_one_by_one(kind):
    cfg = qwen2_tiny(vocab_size=300) if kind == "gqa" else _small_v3(num_nextn_predict_layers=1)
    model = _model(cfg).train()
    if kind != "gqa":
        for layer in list(model.layers) + [m.block for m in model.mtp]:
            layer.self_attn.causal_impl = kind.split("-")[1]
    docs = [_ids(1, n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    ids, seg = _packed_row(docs)
    with torch.no_grad():
        packed = model(ids, segments=seg)
        at = 0
        for d in docs:
            alone, n = model(d[None]), len(d)
            assert max_rel_diff(alone.logits[0], packed.logits[0, at: at + n]) <= 1e-4
            for k, lg in enumerate(alone.mtp_logits, start=1):   # depth k: positions whose token i+k is in the doc
                assert max_rel_diff(lg[0], packed.mtp_logits[k - 1][0, at: at + n - k]) <= 1e-4
            for s_alone, s_packed in zip(alone.router_stats, packed.router_stats):
                if s_alone.layer < cfg.num_hidden_layers:
                    assert torch.equal(s_alone.topk_idx[0], s_packed.topk_idx[0, at: at + n])
            at += n
    # gradients: the same loss over the real tokens, packed or one by one
    model(ids, segments=seg).logits[0, :at].square().sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for d in docs:
        model(d[None]).logits.square().sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None and "mtp" not in name:
            assert max_rel_diff(p.grad, g_packed[name]) <= 1e-4, name


def test_segment_positions_and_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 0, 1, 2, 0], list(range(6))]
    m = document_mask(seg)
    assert m[0, 3].tolist() == [False, False, True, True, False, False]        # sees its own document only
    assert torch.equal(m[1], torch.ones(6, 6, dtype=torch.bool).tril())        # one document: causal


def test_document_blocks_match_the_masked_reference():
    """causal_attention_bmm with segments == softmax over the explicit document mask, in small query blocks."""
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 3, 20, 8
    q, k, v = (torch.randn(B * H, T, d, generator=g) for _ in range(3))
    seg = torch.tensor([[0] * 7 + [1] * 10 + [2] * 3, [0] * 20])
    ref_scores = (q @ k.transpose(1, 2) * 0.5).view(B, H, T, T)
    ref_scores = ref_scores.masked_fill(~document_mask(seg)[:, None], float("-inf"))
    ref = (ref_scores.softmax(-1).view(B * H, T, T) @ v)
    got = causal_attention_bmm(q, k, v, 0.5, block=6, segments=seg)
    assert max_rel_diff(ref, got) <= 1e-5


def test_model_keeps_no_runtime_state_across_calls():
    """No module of the model package grows a cache as calls of new lengths come (mla.py once kept
    one causal bias per length, for ever)."""
    model = _model(_small_v3()).train()

    def state():
        return {name: len(v) for name, v in vars(mla_module).items() if isinstance(v, (dict, list, set))}

    before = state()
    for T in (7, 13, 29, 130):
        model(_ids(1, T))
    assert state() == before
