"""`nanoseek pretrain`: pretrain a DeepSeek-V3-style model (MLA + MoE + MTP) on the corpus.

    nanoseek corpus --preset tiny --out runs/tiny/corpus
    nanoseek pretrain --preset tiny --data runs/tiny/corpus --out runs/tiny/pretrain
    torchrun --nproc_per_node 2 -m nanoseek pretrain … [--parallel fsdp]     # same run, data-parallel

Reads top to bottom: set-up (process group, tokenizer, model, FP8 conversion, DDP/FSDP wrap,
optimizer, packed data, resume), then one loop: eval → checkpoint → step → log. What a step does
(losses, balancing, accumulation) is in train.py; the data layout in data.py.

Writes under --out: tokenizer/ (trained on the corpus unless --tokenizer is given), tokens/ (the
tokenized stream, cached), checkpoints/step_NNNNNN/ (resumable), model/ (the final HF model +
tokenizer), metrics.jsonl (one line per step and per evaluation), summary.json (tokens/s, MFU
against the measured matmul peak, final losses, balance), loss.png, lr.png, balance.png.

Defaults (V3 §4.2 where they transfer): AdamW β (0.9, 0.95), wd 0.1, clip 1.0, warmup 50 then
cosine to 10 %, γ = 0.001, α = 1e-4, λ = 0.3, D = 1. The LR (3e-3) and the batch (16 × 256 tokens)
are the tiny model's, not V3's (2.2e-4 at 15360 × 4K). The default 800 steps are 3.3M tokens,
about 10 minutes on 2 idle cores; `--steps N` or `--minutes M` (the step count is fixed after
timing the first 10 steps, and kept on resume) resize it.

Measured (the tiny corpus, `nanoseek pretrain --preset tiny --data CORPUS --out OUT`, torch's 2
threads; the machine was shared part of the time): vocab 785 (the BPE ran out of pairs below 1024),
4.97M parameters, 16.9 MFLOP per trained token (6 × activated incl. MTP + causal attention).
800 steps in 633 s of training, 11.4 min wall with tokenizer, tokenization, evals and checkpoints:
5,175 tok/s (≈ 6,000 while the machine was idle) = 87 GFLOP/s, MFU 0.54 against the fp32 matmul
peak measured at the end (163 GFLOP/s, 1024³, 2 threads). Held-out loss 6.71 → 0.931 (step 100)
→ 0.607 (step 800); train 0.573, MTP depth 1 0.602 (last 5 % of steps).
Balance, MaxVio averaged over the last 10 % of steps (per MoE layer L1, L2, L3, MTP1; the γ = 0
runs side by side at 1 thread each):
    γ = 0.001, α = 1e-4 (default)   0.100 0.099 0.090 0.105  (mean 0.099; 0.94 at step 0)
    γ = 0,     α = 1e-4             0.89  1.45  1.68  0.78   (mean 1.20)    held-out 0.647
    γ = 0,     α = 0                1.13  2.18  2.38  1.23   (mean 1.73)    held-out 0.629
so the bias update balances 12× better than the α loss alone, and the balanced run also reached
the lowest held-out loss (0.607). With γ = 0.001 MaxVio falls over the first ~500 steps (each step
moves a bias by at most γ) and then stays near 0.1 (balance.png).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from nanoseek import distributed, fp8, train
from nanoseek.config import PRESETS, preset
from nanoseek.data import (PackedDataset, cached_tokens, corpus_files, eval_batches, read_jsonl,
                           step_batches)
from nanoseek.model import Transformer
from nanoseek.optim import build_optimizer, lr_at, set_lr
from nanoseek.tokenizer import Tokenizer, train_tokenizer

CALIBRATION_STEPS = 10  # --minutes: steps timed before the step count is fixed


def add_arguments(p) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(k for k in PRESETS if k != "v3_671b"),
                   help="model preset (config.py)")
    p.add_argument("--data", default="runs/tiny/corpus", help="corpus directory written by `nanoseek corpus`")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory; default: train a BPE on the corpus into OUT/tokenizer")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary when training the tokenizer")
    p.add_argument("--mtp-depth", type=int, default=None, help="MTP depth D (default: the preset's); 0: none")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, e.g. --set hidden_size=128 (repeatable)")
    train.add_common_arguments(p, out="runs/tiny/pretrain", lr=3e-3, steps=800, batch=16, seq_len=256)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value[:1] in "-0123456789[{tfn" else value
    return out


def load_or_train_tokenizer(args, dist) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    path = os.path.join(args.out, "tokenizer")
    if dist.is_main and not os.path.exists(os.path.join(path, "tokenizer.json")):
        texts = read_jsonl(corpus_files(args.data, "pretrain", "train"), "text")
        train_tokenizer(texts, args.vocab_size).save(path)
    dist.barrier()
    return Tokenizer.load(path)


def load_stream(tok, args, dist, split: str):
    files = corpus_files(args.data, "pretrain", split)
    cache = os.path.join(args.out, "tokens")
    if dist.is_main:
        cached_tokens(tok, files, cache)   # rank 0 tokenizes once, the others read the cache
    dist.barrier()
    return cached_tokens(tok, files, cache)


def main(args) -> int:
    # ---------------------------------------------------------------- set-up
    dist = distributed.init()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    tok = load_or_train_tokenizer(args, dist)
    cfg = preset(args.preset, vocab_size=tok.vocab_size, **parse_overrides(args.set))
    D = cfg.num_nextn_predict_layers if args.mtp_depth is None else args.mtp_depth
    cfg = cfg.replace(num_nextn_predict_layers=D)
    D = D if args.mtp_weight > 0 else 0
    torch.manual_seed(args.seed)
    model = Transformer(cfg).train()
    if D == 0:
        model.mtp.requires_grad_(False)         # kept in the checkpoint, never trained
    if args.precision == "fp8":
        fp8.convert(model, args.fp8_backend)
    model = distributed.wrap(model, dist, args.parallel)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2), args.moments)
    micro = args.micro_batch or args.batch_size // dist.world
    data = PackedDataset(load_stream(tok, args, dist, "train"), args.seq_len, seed=args.seed)
    heldout = PackedDataset(load_stream(tok, args, dist, "heldout"), args.seq_len, shuffle=False)
    evals = eval_batches(heldout, args.eval_rows, micro, dist.rank, dist.world)
    state = {"stage": "pretrain", "step": 0, "position": 0, "total_steps": None if args.minutes else args.steps}
    resumed = train.checkpoint_dirs(args.out)[-1:] if args.resume else []
    if resumed:
        try:
            meta = train.load_checkpoint(resumed[0], model, optimizer, dist)
        except train.CheckpointError as e:
            print(f"nanoseek pretrain: cannot resume: {e}", file=sys.stderr)
            return 2
        state.update({k: meta[k] for k in ("step", "position", "total_steps")})
        if not args.minutes and args.steps and meta["args"].get("steps") != args.steps:
            state["total_steps"] = args.steps      # an explicit new --steps extends (or shortens) the run
        dist.print0(f"resumed from {resumed[0]} at step {state['step']}")
    if dist.is_main:
        if not resumed:
            train.clear_checkpoints(args.out)
        train.prune_checkpoints(args.out, args.keep)
    log = train.MetricsLog(args.out, dist.is_main, resume_step=state["step"] if args.resume else None)
    flops = train.train_flops_per_token(cfg, args.seq_len, D)
    dist.print0(f"pretrain: {cfg.hidden_size}d × {cfg.num_hidden_layers} layers, MTP D={D}, "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {data.n_rows} rows of "
                f"{args.seq_len}, batch {args.batch_size} ({micro}/micro × {dist.world} ranks), {args.precision}")
    bar = train.Progress(state["total_steps"], state["step"], enabled=dist.is_main and not args.no_progress,
                         show=dist.is_main)

    # ---------------------------------------------------------------- loop: eval → checkpoint → step → log
    step, start, t_start = state["step"], state["step"], time.time()
    total, heldout_loss = state["total_steps"], None
    while True:
        last = total is not None and step >= total
        if step % args.eval_every == 0 or last:
            heldout_loss = train.evaluate(model, evals, dist, args.precision)
            log.log({"step": step, "heldout_loss": heldout_loss})
            bar.note(step, heldout_loss)
        if step > start and (step % args.ckpt_every == 0 or last):
            state.update(step=step, total_steps=total, metrics={"heldout_loss": heldout_loss})
            train.save_checkpoint(os.path.join(args.out, "checkpoints", f"step_{step:06d}"),
                                  model, optimizer, tok, {**state, "args": vars(args)}, dist)
            if dist.is_main:
                train.prune_checkpoints(args.out, args.keep)
        if last:
            break
        lr = lr_at(step, args.schedule, args.lr, args.warmup, total or 10 ** 9,
                   args.lr * args.min_lr_ratio, args.decay_frac)
        set_lr(optimizer, lr)
        batches = step_batches(data, state["position"], args.batch_size, micro, dist.rank, dist.world)
        t0 = time.perf_counter()
        rec = train.train_step(model, batches, optimizer, args, dist, D)
        dt = time.perf_counter() - t0
        state["position"] += args.batch_size
        log.log({"step": step, "lr": lr, "epoch": round(data.epoch(state["position"]), 4), "step_s": dt, **rec})
        bar.update(rec, dt)
        step += 1
        if total is None and step == start + CALIBRATION_STEPS:
            total = dist.broadcast_object(train.decide_total_steps(
                args.minutes, time.time() - t_start, bar.median_step_s(), step))
            bar.set_total(total)

    # ---------------------------------------------------------------- final model, summary, plots
    bar.close()
    train.finish(args, model, tok, dist, bar, flops, heldout_loss, stage="pretrain")
    distributed.shutdown(dist)
    return 0
