"""Training pieces: V3 balancing, MTP targets, losses, optimizer, schedules, data, and both stages
end to end on a tiny model (a few steps each)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main as cli_main
from nanoseek.config import tiny
from nanoseek.data.packing import Batch
from nanoseek.model import Transformer
from nanoseek.model.moe import Router, RouterStats, bias_update, sequence_balance_loss
from nanoseek.model.mtp import mtp_loss
from nanoseek.train.optim import AdamW, build_optimizer, param_groups
from nanoseek.train.losses import expert_load, lm_loss_sums, masked_sequence_balance_loss, max_violation
from nanoseek.train.metrics import read_metrics
from nanoseek.train.resume import checkpoint_dirs
from tests.train.fixtures import make_corpus, pretrain_args

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
        vio.append(float(max_violation(load()[None])[0]))
        bias_update(router.e_score_correction_bias, load(), 0.002)
    before, after = vio[0], sum(vio[-20:]) / 20
    assert before > 2.5 and after < 0.1, (before, after)     # 3.0 = all tokens on 2 of 8 experts
    assert torch.equal(router.weight, w0) and not router.e_score_correction_bias.requires_grad


def test_sequence_balance_loss_equals_alpha_at_perfect_balance_and_ignores_padding():
    E, K, T = 4, 2, 8
    idx = torch.tensor([[0, 1], [2, 3]] * (T // 2))[None]           # every expert chosen T/2 times
    stats = RouterStats(0, torch.full((1, T, E), 0.3), idx)
    valid = torch.ones(1, T, dtype=torch.bool)
    assert torch.allclose(masked_sequence_balance_loss(stats, valid, E, K, 0.01), torch.tensor([0.01]))
    # random stats: equal to moe.sequence_balance_loss (the reference) without padding
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, T, E, generator=g)
    idx = scores.topk(K, dim=-1).indices
    s = RouterStats(0, scores, idx)
    ref = sequence_balance_loss(s, E, K, 0.1)
    assert torch.allclose(masked_sequence_balance_loss(s, torch.ones(3, T, dtype=torch.bool), E, K, 0.1).mean(), ref)
    # padding appended to every sequence changes nothing
    pad = RouterStats(0, torch.cat([scores, torch.rand(3, 5, E, generator=g)], 1),
                      torch.cat([idx, torch.zeros(3, 5, K, dtype=torch.long)], 1))
    v = torch.cat([torch.ones(3, T), torch.zeros(3, 5)], 1).bool()
    assert torch.allclose(masked_sequence_balance_loss(pad, v, E, K, 0.1).mean(), ref)
    assert torch.equal(expert_load(pad, v, E), torch.bincount(idx.flatten(), minlength=E).float())


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
    sums = lm_loss_sums(Out, batch, D)
    assert sums.max() < 1e-6 and torch.equal(batch.target_counts(D), torch.tensor([20.0, 18.0, 16.0]))
    Out.mtp_logits = [F.one_hot(tokens[:, k:T], V).float() * 40 for k in range(1, D + 1)]   # one short
    assert lm_loss_sums(Out, batch, D)[1:].min() > 10
    # per-depth means equal the model's reference mtp_loss (λ/D Σ_k mean CE)
    Out.mtp_logits = [torch.randn(B, T - k, V) for k in range(1, D + 1)]
    total, per_depth = mtp_loss(Out.mtp_logits, tokens[:, :-1], 0.3, labels=tokens)
    ours = lm_loss_sums(Out, batch, D)[1:] / batch.target_counts(D)[1:]
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


# ------------------------------------------------------------------ the stages, end to end
def test_pretrain_then_sft_end_to_end(corpus, tmp_path):
    data, tok = corpus
    out = str(tmp_path / "pre")
    assert cli_main(pretrain_args(data, tok, out, 6)) == 0
    recs = read_metrics(out)
    steps = [r for r in recs if "main_loss" in r]
    assert [r["step"] for r in steps] == list(range(6)) and {r["step"] for r in recs if "heldout_loss" in r} == {0, 3, 6}
    assert {"mtp1_loss", "bal_loss", "maxvio", "lr", "grad_norm"} <= set(steps[0])
    assert set(steps[0]["maxvio"]) == {"L1", "MTP1"}
    model = load_pretrained(os.path.join(out, "model"))
    assert model.layers[1].mlp.gate.e_score_correction_bias.abs().max() > 0      # γ moved the bias
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert {"tokens_per_s", "mfu", "final_heldout_loss", "maxvio_final_mean"} <= set(summary)
    assert all(os.path.exists(os.path.join(out, f)) for f in ("loss.png", "lr.png", "balance.png"))
    assert [os.path.basename(d) for d in checkpoint_dirs(out)] == ["step_000003", "step_000006"]
    # switches: no bias update, no balance loss, no MTP
    out0 = str(tmp_path / "off")
    assert cli_main(pretrain_args(data, tok, out0, 3, "--gamma", "0", "--alpha", "0", "--mtp-weight", "0",
                                  "--no-plots")) == 0
    m0 = load_pretrained(os.path.join(out0, "model"))
    assert m0.layers[1].mlp.gate.e_score_correction_bias.abs().max() == 0
    rec0 = [r for r in read_metrics(out0) if "main_loss" in r][0]
    assert rec0["bal_loss"] == 0 and "mtp1_loss" not in rec0 and set(rec0["maxvio"]) == {"L1"}
    # SFT from the pretrained model, assistant-only loss
    sft = str(tmp_path / "sft")
    assert cli_main(["sft", "--init", out, "--data", data, "--out", sft, "--steps", "3", "--batch-size", "4",
                     "--eval-every", "3", "--ckpt-every", "3", "--eval-rows", "4", "--threads", "1",
                     "--no-progress", "--no-plots"]) == 0
    srecs = [r for r in read_metrics(sft) if "main_loss" in r]
    assert len(srecs) == 3 and all(r["tokens"] > 0 for r in srecs)
    assert os.path.exists(os.path.join(sft, "model", "model.safetensors"))


# ------------------------------------------------------------------ MTP depth, FLOPs
def _step_model(n_mtp: int):
    cfg = tiny(vocab_size=300).replace(hidden_size=32, num_hidden_layers=2, intermediate_size=32,
                                       moe_intermediate_size=16, q_lora_rank=16, kv_lora_rank=16,
                                       num_nextn_predict_layers=n_mtp)
    torch.manual_seed(0)
    return Transformer(cfg).train()


def test_train_step_runs_fewer_mtp_depths_than_the_model_has():
    """Depth 1 of a model with 2 MTP modules: module 2 never runs (no grad, no stats) — this raised
    ValueError from layers.index before."""
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.distributed import Dist
    from nanoseek.train.step import train_step
    model = _step_model(2)
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(tokens, dtype=torch.bool)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w0, w1 = model.mtp[0].eh_proj.weight.clone(), model.mtp[1].eh_proj.weight.clone()
    rec = train_step(model, [Batch(tokens, ones, ones)], opt, TrainConfig(), Dist(), mtp_depth=1)
    assert "mtp1_loss" in rec and "mtp2_loss" not in rec and set(rec["maxvio"]) == {"L1", "MTP1"}
    assert not torch.equal(model.mtp[0].eh_proj.weight, w0) and torch.equal(model.mtp[1].eh_proj.weight, w1)


def test_any_mtp_depth_reaches_the_summary_and_plot():
    """Depth 8: the summary and the loss plot had a hidden cap at depth 7 (range(1, 8))."""
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.distributed import Dist
    from nanoseek.train.metrics import mtp_depths, tail_means
    from nanoseek.train.step import train_step
    model = _step_model(8)
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(tokens, dtype=torch.bool)
    rec = train_step(model, [Batch(tokens, ones, ones)], torch.optim.SGD(model.parameters(), lr=0.0),
                     TrainConfig(), Dist(), mtp_depth=8)
    assert mtp_depths(rec) == list(range(1, 9))
    assert "mtp8_loss" in tail_means([rec], [f"mtp{k}_loss" for k in mtp_depths(rec)])


def test_one_flops_formula_with_the_right_head_sizes():
    """Dense students count their GQA head_dim (not MLA's qk_nope + qk_rope); benchmark and training
    share the function."""
    from nanoseek.bench import model as bench_model
    from nanoseek.config import qwen2_tiny
    from nanoseek.model.params import param_counts
    from nanoseek.train import flops
    cfg = qwen2_tiny(vocab_size=300)
    T = 128
    n = param_counts(cfg)["activated"] - cfg.vocab_size * cfg.hidden_size
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * 2 * cfg.attn_head_dim * (T + 1)
    assert flops.flops_per_token(cfg, T, training=True) == 6 * n + 3 * attn
    assert flops.flops_per_token(cfg, T, training=False) == 2 * n + attn
    v3 = tiny(vocab_size=300)
    d_v3 = v3.qk_nope_head_dim + v3.qk_rope_head_dim + v3.v_head_dim
    assert flops.attention_head_dims(v3) == (v3.qk_head_dim, v3.v_head_dim) and d_v3 == sum(flops.attention_head_dims(v3))
    assert bench_model.flops_per_token is flops.flops_per_token
