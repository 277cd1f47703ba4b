"""`nanoseek bench fp8`: the same tiny training run in fp32, bf16 and FP8; how far FP8 lands from fp32.

Three runs with the same seed, initial weights, data order and hyper-parameters (train/step.py,
so MTP, the balance loss and the bias update are on, as in pretraining):
  fp32  the reference
  bf16  torch.autocast(bfloat16) with fp32 master weights — its distance from fp32 is the noise
        floor of "a different but reasonable precision"
  fp8   fp8.convert(model): E4M3 Fprop/Dgrad/Wgrad with 1×128 / 128×128 scales, fp32 master
        weights (V3 §3.3)
Each ends with the held-out loss on the same fixed batches (evaluated in the run's precision).
Figures: `fp8_rel_loss_err` = |L_fp8 − L_fp32| / L_fp32 and `bf16_rel_loss_err` likewise
(fractions), the same for the mean training loss over the last 10 % of steps (`*_rel_train_loss_err`,
V3's curves compare training loss), `fp8_target` = max(0.25 %, bf16 error) — the issue's bar —
and tokens/s of each run. Ratios (> 1 better): `fp8_tokens_per_s_vs_fp32` (FP8 on this CPU is
slower, cpu_facts §4), `fp8_target_over_err` (> 1: FP8 within the target).

Measured (2 threads, machine shared; defaults: tiny preset, 300 steps of 8 × 64 tokens, ~3 min):
held-out fp32 0.8872, bf16 0.8694, fp8 0.8759 → fp8_rel_loss_err 1.28 %, bf16_rel_loss_err 2.00 %
(target = the bf16 floor, met: fp8_target_over_err 1.57); tokens/s fp32 3,981, bf16 5,808,
fp8 1,428 (0.36×). A 1-thread run under heavier load gave 1.22 % vs 1.15 % (just outside the
floor, 0.94) — at this scale the comparison is noise-bound: any precision change moves a 300-step
tiny run by 1–2 %, so V3's 0.25 % cannot be resolved here; the FP8 training loss over the last
10 % of steps was within 0.06–0.85 % of fp32 in both runs.

Data: a corpus written on the fly (`nanoseek corpus` tiny preset, --docs documents) and a BPE
trained on it, or --data/--tokenizer. Default model: the tiny preset at --seq-len 64 × --batch 8.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from nanoseek.bench.common import report
from nanoseek.config import parse_overrides, preset
from nanoseek.data.packing import PackedDataset, cached_tokens, corpus_files, eval_batches, step_batches
from nanoseek.model import Transformer
from nanoseek.precision import fp8
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.config import TrainConfig
from nanoseek.train.distributed import Dist
from nanoseek.train.optim import build_optimizer, lr_at, set_lr
from nanoseek.train.step import evaluate, train_step


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=300, help="training steps per precision")
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a ModelConfig field")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak LR (warmup 20 steps, cosine to 10 %%)")
    p.add_argument("--data", default=None, help="corpus directory (default: write a small one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: train one, vocab 512)")
    p.add_argument("--docs", type=int, default=4000, help="documents of the on-the-fly corpus")
    p.add_argument("--eval-rows", type=int, default=256, help="fixed held-out rows for the final loss")
    p.add_argument("--fp8-backend", default="auto", choices=["auto", "scaled_mm", "emulate"], help="FP8 GEMMs")
    p.add_argument("--precisions", default="fp32,bf16,fp8", help="comma-separated runs (fp32 first)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of init and data order")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def make_data(args, workdir: str):
    """(tokenizer, train rows, held-out rows): the given corpus, or a small one written here."""
    data = args.data
    if data is None:
        from nanoseek.data.corpus import build, scaled, tiny
        p = tiny()
        data = os.path.join(workdir, "corpus")
        build(scaled(p, args.docs / p.docs), data, seed=args.seed)
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        from nanoseek.data.packing import read_jsonl
        tok = train_tokenizer(read_jsonl(corpus_files(data, "pretrain", "train"), "text"), 512)
    train_rows = PackedDataset(cached_tokens(tok, corpus_files(data, "pretrain", "train"), None), args.seq_len, args.seed)
    heldout = PackedDataset(cached_tokens(tok, corpus_files(data, "pretrain", "heldout"), None), args.seq_len, shuffle=False)
    return tok, train_rows, heldout


def run(precision: str, cfg, data, heldout, args) -> dict:
    """Train `args.steps` steps in `precision`; held-out loss, last-10 % train loss, tokens/s."""
    torch.manual_seed(args.seed)
    model = Transformer(cfg).train()
    if precision == "fp8":
        fp8.convert(model, args.fp8_backend)
    opt = build_optimizer(model, args.lr)
    hp = TrainConfig(mtp_weight=0.3, alpha=1e-4, gamma=1e-3, grad_clip=1.0, precision=precision)
    dist, losses, seconds, tokens = Dist(), [], 0.0, 0
    for step in range(args.steps):
        set_lr(opt, lr_at(step, "cosine", args.lr, 20, args.steps, args.lr / 10))
        batches = step_batches(data, step * args.batch, args.batch, args.batch)
        t0 = time.perf_counter()
        rec = train_step(model, batches, opt, hp, dist, cfg.num_nextn_predict_layers)
        seconds += time.perf_counter() - t0
        losses.append(rec["main_loss"])
        tokens += rec["tokens"]
    tail = losses[-max(1, args.steps // 10):]
    return {"heldout": evaluate(model, eval_batches(heldout, args.eval_rows, 16), dist, precision),
            "train": sum(tail) / len(tail),
            "tokens_per_s": tokens / seconds}


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        tok, data, heldout = make_data(args, work)
    cfg = preset(args.preset, vocab_size=tok.vocab_size, **parse_overrides(args.set))
    backend = fp8.resolve_backend(args.fp8_backend)
    results = {}
    for precision in args.precisions.split(","):
        results[precision] = run(precision, cfg, data, heldout, args)
        if not args.json:
            r = results[precision]
            print(f"  {precision:5s} held-out {r['heldout']:.4f}  train(last 10%) {r['train']:.4f}  "
                  f"{r['tokens_per_s']:.0f} tok/s", flush=True)
    ref = results["fp32"]
    figures: dict = {}
    for name, r in results.items():
        figures[f"heldout_loss_{name}"] = round(r["heldout"], 5)
        figures[f"tokens_per_s_{name}"] = round(r["tokens_per_s"], 1)
        if name != "fp32":
            figures[f"{name}_rel_loss_err"] = abs(r["heldout"] - ref["heldout"]) / ref["heldout"]
            figures[f"{name}_rel_train_loss_err"] = abs(r["train"] - ref["train"]) / ref["train"]
    ratios = {}
    if "fp8" in results:
        target = max(0.0025, figures.get("bf16_rel_loss_err", 0.0))
        figures["fp8_target"] = target
        ratios["fp8_tokens_per_s_vs_fp32"] = results["fp8"]["tokens_per_s"] / ref["tokens_per_s"]
        ratios["fp8_target_over_err"] = target / max(figures["fp8_rel_loss_err"], 1e-9)
    config = {"preset": args.preset, "overrides": args.set, "steps": args.steps, "seq_len": args.seq_len,
              "batch": args.batch, "lr": args.lr, "fp8_backend": backend, "vocab": tok.vocab_size,
              "threads": torch.get_num_threads()}
    report("fp8", config, figures, ratios, args.json)
    return 0
