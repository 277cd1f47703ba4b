"""Data layout: the packed pretraining stream, SFT rows (packed with document masks, or padded),
sharding by rank and the data position."""
from __future__ import annotations

import pytest
import torch

from nanoseek.data.packing import Batch, ConversationDataset, PackedDataset, collate, step_batches, tokenize_documents
from nanoseek.tokenizer import Tokenizer
from tests.train.fixtures import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("data")))


def test_packing_sharding_and_resume_position(corpus):
    data, tok_dir = corpus
    tok = Tokenizer.load(tok_dir)
    docs = ["12 + 3 = 15", "<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜>"]   # the 2nd has its own BOS/EOS
    stream = tokenize_documents(tok, docs).tolist()
    assert stream.count(tok.bos_id) == 2 and stream.count(tok.eos_id) == 2 and stream[0] == tok.bos_id
    ds = PackedDataset(torch.arange(1000).numpy(), seq_len=9, seed=1)
    one = step_batches(ds, 16, 8, 2)                              # 1 rank, 4 micro-batches
    two = [step_batches(ds, 16, 8, 2, rank=r, world=2) for r in range(2)]
    cat = lambda bs: torch.cat([b.tokens for b in bs])
    assert torch.equal(cat(one), torch.cat([cat(two[0]), cat(two[1])]))
    assert all(torch.equal(r[1:], (r[0] + torch.arange(1, 10))) for r in cat(one))   # contiguous rows of T+1
    assert torch.equal(cat(step_batches(ds, 16, 8, 8)), cat(one))                    # position alone decides
    rows = [tuple(ds.rows(g, 1).tokens[0, :2].tolist()) for g in range(ds.n_rows)]
    assert len(set(rows)) == ds.n_rows                                               # an epoch is a permutation


def test_sft_batches_mask_only_the_answer_and_pad_right(corpus):
    tok = Tokenizer.load(corpus[1])
    convs = [[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\nsum\n</think>\n\n2"}],
             [{"role": "user", "content": "What is 12 * 3?"}, {"role": "assistant", "content": "36"}]]
    ds = ConversationDataset(tok, convs, seq_len=64, shuffle=False, pack=False)
    b = ds.rows(0, 2)
    for row, conv in enumerate(convs):
        ids, mask = tok.encode_conversation(conv)
        n = len(ids)
        assert b.tokens[row, :n].tolist() == ids and b.mask[row, :n].tolist() == [bool(m) for m in mask]
        assert not b.valid[row, n:].any() and not b.mask[row, n:].any()
        assert tok.decode([t for t, m in zip(ids, mask) if m]).endswith(tok.decode([tok.eos_id]))
    assert collate([([5, 6, 7], [1, 0, 1])], pad_id=2).targets(0).tolist() == [[-100, 7]]




def _convs(n, seed=0):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        think = " ".join(f"{a} + {i} = {a + i}." for i in range(rng.randint(0, 6)))
        out.append([{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"<think>\n{think}\n</think>\n\n{a + b}"}])
    return out


def test_packed_rows_hold_every_conversation_once_with_its_own_mask(corpus):
    tok = Tokenizer.load(corpus[1])
    convs = _convs(40)
    ds = ConversationDataset(tok, convs, seq_len=255, shuffle=True, seed=3)
    padded = ConversationDataset(tok, convs, seq_len=255, shuffle=False, pack=False)
    assert ds.n_rows < len(convs) / 2 and ds.fill() > 0.8
    found = []
    b = ds.rows(0, ds.n_rows)
    assert b.tokens.shape == (ds.n_rows, 256)
    for r in range(ds.n_rows):
        seg = b.segments[r]
        for d in range(int(seg.max()) + 1):
            where = (seg == d).nonzero().flatten()
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1))            # contiguous
            found.append((tuple(b.tokens[r, where].tolist()), tuple(b.mask[r, where].tolist())))
        assert not b.valid[r, seg < 0].any() and not b.mask[r, seg < 0].any()            # tail padding
    expected = [(tuple(ids), tuple(bool(m) for m in mask)) for ids, mask in padded.examples]
    assert sorted(found) == sorted(expected)


def test_targets_never_cross_a_document_boundary():
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]])
    b = Batch(tokens, mask, seg >= 0, seg)
    assert b.targets(0).tolist() == [[2, 3, -100, 5, 6]]        # 3 -> 4 crosses: not a target
    assert b.targets(1).tolist() == [[3, -100, -100, 6]]        # depth 1: i+2 must share i's document
    assert b.target_counts(1).tolist() == [4.0, 2.0]


def test_packed_loss_equals_padded_loss(corpus):
    """The same conversations, packed with document masks or one per padded row: the same summed
    cross-entropy over the same number of targets (main head and MTP depth 1)."""
    from nanoseek.config import tiny
    from nanoseek.model import Transformer
    from nanoseek.train.losses import lm_loss_sums
    tok = Tokenizer.load(corpus[1])
    convs = _convs(12, seed=1)
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=tok.vocab_size).replace(hidden_size=64, intermediate_size=64,
                                                                moe_intermediate_size=32)).eval()
    sums = []
    for pack in (True, False):
        ds = ConversationDataset(tok, convs, seq_len=127, shuffle=False, pack=pack)
        b = ds.rows(0, ds.n_rows)
        with torch.no_grad():
            out = model(b.inputs, mtp=1, **({"segments": b.input_segments} if pack else {}))
        sums.append((lm_loss_sums(out, b, 1), b.target_counts(1)))
    (packed, n_packed), (padded, n_padded) = sums
    assert torch.equal(n_packed, n_padded)
    assert torch.allclose(packed, padded, rtol=1e-4)
