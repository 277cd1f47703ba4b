"""Training pieces: V3 balancing, MTP targets, losses, optimizer, schedules, data, and both stages
end to end on a tiny model (a few steps each)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from nanoseek import train
from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main as cli_main
from nanoseek.config import tiny
from nanoseek.data import Batch, ConversationDataset, PackedDataset, collate, step_batches, tokenize_documents
from nanoseek.model import Transformer
from nanoseek.moe import Router, RouterStats, bias_update, sequence_balance_loss
from nanoseek.mtp import mtp_loss
from nanoseek.optim import AdamW, build_optimizer, param_groups
from nanoseek.stages.corpus import build, scaled
from nanoseek.stages.corpus import tiny as tiny_corpus
from nanoseek.tokenizer import Tokenizer, train_tokenizer

# the model of every stage test: hidden 64, 1 dense + 1 MoE layer, 8 experts top-2, one MTP depth
TINY_MODEL = ["--set", "hidden_size=64", "--set", "num_hidden_layers=2", "--set", "intermediate_size=64",
              "--set", "moe_intermediate_size=32", "--set", "q_lora_rank=32", "--set", "kv_lora_rank=32"]


def make_corpus(out) -> tuple[str, str]:
    """A ~400-document corpus (the real `nanoseek corpus` writer) and a 300-token BPE: (data, tokenizer)."""
    data, tok_dir = os.path.join(out, "corpus"), os.path.join(out, "tokenizer")
    build(scaled(tiny_corpus(), 0.01), data, seed=0)
    with open(os.path.join(data, "pretrain", "train-00000.jsonl")) as f:
        train_tokenizer([json.loads(line)["text"] for line in f], 300).save(tok_dir)
    return data, tok_dir


def pretrain_args(data, tok, out, steps=6, *extra) -> list[str]:
    return ["pretrain", "--data", data, "--tokenizer", tok, "--out", out, *TINY_MODEL, "--steps", str(steps),
            "--seq-len", "32", "--batch-size", "8", "--micro-batch", "4", "--eval-every", "3",
            "--ckpt-every", "3", "--eval-rows", "8", "--warmup", "2", "--threads", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("train")))


# ------------------------------------------------------------------ V3 balancing
def test_bias_update_moves_load_toward_balance():
    """A router skewed towards experts 0 and 1: the sign step on the bias evens the load out,
    without touching the router weights (the bias picks experts, it never weighs them)."""
    cfg = tiny(vocab_size=300).replace(hidden_size=16)
    router = Router(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 16, generator=g) * 0.1)
        router.weight[:2] += 0.1                                   # experts 0, 1 win for every token
    x = torch.randn(512, 16, generator=g).abs()
    w0 = router.weight.clone()

    def load():
        _, idx, _ = router(x)
        return torch.bincount(idx.flatten(), minlength=8).float()

    vio = []
    for _ in range(300):
        vio.append(float(train.max_violation(load()[None])[0]))
        bias_update(router.e_score_correction_bias, load(), 0.002)
    before, after = vio[0], sum(vio[-20:]) / 20
    assert before > 2.5 and after < 0.1, (before, after)     # 3.0 = all tokens on 2 of 8 experts
    assert torch.equal(router.weight, w0) and not router.e_score_correction_bias.requires_grad


def test_sequence_balance_loss_equals_alpha_at_perfect_balance_and_ignores_padding():
    E, K, T = 4, 2, 8
    idx = torch.tensor([[0, 1], [2, 3]] * (T // 2))[None]           # every expert chosen T/2 times
    stats = RouterStats(0, torch.zeros(E), torch.full((1, T, E), 0.3), idx)
    valid = torch.ones(1, T, dtype=torch.bool)
    assert torch.allclose(train.masked_sequence_balance_loss(stats, valid, E, K, 0.01), torch.tensor([0.01]))
    # random stats: equal to moe.sequence_balance_loss (the reference) without padding
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, T, E, generator=g)
    idx = scores.topk(K, dim=-1).indices
    s = RouterStats(0, torch.zeros(E), scores, idx)
    ref = sequence_balance_loss(s, E, K, 0.1)
    assert torch.allclose(train.masked_sequence_balance_loss(s, torch.ones(3, T, dtype=torch.bool), E, K, 0.1).mean(), ref)
    # padding appended to every sequence changes nothing
    pad = RouterStats(0, torch.zeros(E), torch.cat([scores, torch.rand(3, 5, E, generator=g)], 1),
                      torch.cat([idx, torch.zeros(3, 5, K, dtype=torch.long)], 1))
    v = torch.cat([torch.ones(3, T), torch.zeros(3, 5)], 1).bool()
    assert torch.allclose(train.masked_sequence_balance_loss(pad, v, E, K, 0.1).mean(), ref)
    assert torch.equal(train.expert_load(pad, v, E), torch.bincount(idx.flatten(), minlength=E).float())


# ------------------------------------------------------------------ MTP and the loss normalisation
def test_mtp_targets_shifted_right():
    """Depth k at input position i predicts token i+k+1: logits that put all mass there give ~0 CE,
    the same logits one position off give a large one."""
    B, T, V, D = 2, 10, 50, 2
    tokens = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(tokens, dtype=torch.bool)
    batch = Batch(tokens, ones, ones)

    class Out:
        logits = F.one_hot(tokens[:, 1:], V).float() * 40
        mtp_logits = [F.one_hot(tokens[:, k + 1:], V).float() * 40 for k in range(1, D + 1)]
    sums = train.lm_loss_sums(Out, batch, D)
    assert sums.max() < 1e-6 and torch.equal(batch.target_counts(D), torch.tensor([20.0, 18.0, 16.0]))
    Out.mtp_logits = [F.one_hot(tokens[:, k:T], V).float() * 40 for k in range(1, D + 1)]   # one short
    assert train.lm_loss_sums(Out, batch, D)[1:].min() > 10
    # per-depth means equal the model's reference mtp_loss (λ/D Σ_k mean CE)
    Out.mtp_logits = [torch.randn(B, T - k, V) for k in range(1, D + 1)]
    total, per_depth = mtp_loss(Out.mtp_logits, tokens[:, :-1], 0.3, labels=tokens)
    ours = train.lm_loss_sums(Out, batch, D)[1:] / batch.target_counts(D)[1:]
    assert torch.allclose(ours, torch.stack(per_depth)) and torch.allclose(0.3 / D * ours.sum(), total)


# ------------------------------------------------------------------ optimizer
def test_param_groups_and_bf16_moment_adamw():
    model = Transformer(tiny(vocab_size=300).replace(hidden_size=64, moe_intermediate_size=32, intermediate_size=64))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # our AdamW with fp32 moments == torch's; with bf16 moments (V3) close to it
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, 64, generator=g)
    grads = [torch.randn(64, 64, generator=g) for _ in range(5)]
    results = []
    for opt_cls, kw in ((torch.optim.AdamW, {}), (AdamW, {"moment_dtype": torch.float32}),
                        (AdamW, {"moment_dtype": torch.bfloat16})):
        p = torch.nn.Parameter(p0.clone())
        opt = opt_cls([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kw)
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        results.append(p.detach())
    assert (results[0] - results[1]).abs().max() < 1e-6
    assert (results[0] - results[2]).abs().max() < 1e-3
    assert isinstance(build_optimizer(model, 1e-3, moments="bf16"), AdamW)


# ------------------------------------------------------------------ data
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
    ds = ConversationDataset(tok, convs, seq_len=64, shuffle=False)
    b = ds.rows(0, 2)
    for row, conv in enumerate(convs):
        ids, mask = tok.encode_conversation(conv)
        n = len(ids)
        assert b.tokens[row, :n].tolist() == ids and b.mask[row, :n].tolist() == [bool(m) for m in mask]
        assert not b.valid[row, n:].any() and not b.mask[row, n:].any()
        assert tok.decode([t for t, m in zip(ids, mask) if m]).endswith(tok.decode([tok.eos_id]))
    assert collate([([5, 6, 7], [0, 1, 1])], pad_id=2).labels.tolist() == [[-100, 6, 7]]


# ------------------------------------------------------------------ the stages, end to end
def test_pretrain_then_sft_end_to_end(corpus, tmp_path):
    data, tok = corpus
    out = str(tmp_path / "pre")
    assert cli_main(pretrain_args(data, tok, out, 6)) == 0
    recs = train.read_metrics(out)
    steps = [r for r in recs if "main_loss" in r]
    assert [r["step"] for r in steps] == list(range(6)) and {r["step"] for r in recs if "heldout_loss" in r} == {0, 3, 6}
    assert {"mtp1_loss", "bal_loss", "maxvio", "lr", "grad_norm"} <= set(steps[0])
    assert set(steps[0]["maxvio"]) == {"L1", "MTP1"}
    model = load_pretrained(os.path.join(out, "model"))
    assert model.layers[1].mlp.gate.e_score_correction_bias.abs().max() > 0      # γ moved the bias
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert {"tokens_per_s", "mfu", "final_heldout_loss", "maxvio_final_mean"} <= set(summary)
    assert all(os.path.exists(os.path.join(out, f)) for f in ("loss.png", "lr.png", "balance.png"))
    assert [os.path.basename(d) for d in train.checkpoint_dirs(out)] == ["step_000003", "step_000006"]
    # switches: no bias update, no balance loss, no MTP
    out0 = str(tmp_path / "off")
    assert cli_main(pretrain_args(data, tok, out0, 3, "--gamma", "0", "--alpha", "0", "--mtp-weight", "0",
                                  "--no-plots")) == 0
    m0 = load_pretrained(os.path.join(out0, "model"))
    assert m0.layers[1].mlp.gate.e_score_correction_bias.abs().max() == 0
    rec0 = [r for r in train.read_metrics(out0) if "main_loss" in r][0]
    assert rec0["bal_loss"] == 0 and "mtp1_loss" not in rec0 and set(rec0["maxvio"]) == {"L1"}
    # SFT from the pretrained model, assistant-only loss
    sft = str(tmp_path / "sft")
    assert cli_main(["sft", "--init", out, "--data", data, "--out", sft, "--steps", "3", "--batch-size", "4",
                     "--eval-every", "3", "--ckpt-every", "3", "--eval-rows", "4", "--threads", "1",
                     "--no-progress", "--no-plots"]) == 0
    srecs = [r for r in train.read_metrics(sft) if "main_loss" in r]
    assert len(srecs) == 3 and all(r["tokens"] > 0 for r in srecs)
    assert os.path.exists(os.path.join(sft, "model", "model.safetensors"))
