"""`nanoseek sft`: supervised fine-tuning on conversations, loss on the assistant's answer only.

    nanoseek sft --init runs/tiny/pretrain/model --data runs/tiny/corpus --out runs/tiny/sft
    torchrun --nproc_per_node 2 -m nanoseek sft …

Reads top to bottom like pretrain (set-up, then eval → checkpoint → step → log); the shared pieces
are in train.py. Data: `sft/train-*.jsonl` ({"messages": [...]}, or --train-files) through
`Tokenizer.encode_conversation`, which masks everything but the final assistant turn (its
reasoning, answer and EOS; data.py explains why earlier turns are masked too). Rows are single
conversations, right-padded per micro-batch; padding is neither a target nor expert load. The
held-out loss is over `sft/heldout-*.jsonl`'s assistant tokens.

V3's SFT (§5.1): 2 epochs, cosine LR 5e-6 → 1e-6 on a 671B model. The tiny model takes a larger
LR (default 3e-4, cosine to 10 %); epochs set the step count unless --steps is given. The MTP
modules keep training (λ, default 0.3) when the checkpoint has them; balancing continues (γ, α).

Measured (tiny corpus, 4,000 conversations of ~210 tokens, from the default tiny pretraining,
`nanoseek sft --init OUT/pretrain --data CORPUS --out OUT/sft`, 2 threads, machine shared):
2 epochs = 500 steps of 16 conversations in 9.2 min wall; 3,174 real tok/s (padding to the
longest row of a micro-batch costs ~40 % of the positions); held-out assistant-token loss
1.222 → 0.480; MaxVio 0.10 at the end. `--epochs 1` halves it for a time-boxed speedrun.

Writes under --out: checkpoints/, model/ (final HF model + tokenizer), metrics.jsonl,
summary.json and the plots, as pretrain does.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

from nanoseek import distributed, fp8, train
from nanoseek.checkpoint import load_pretrained
from nanoseek.data import ConversationDataset, corpus_files, eval_batches, read_jsonl, step_batches
from nanoseek.optim import build_optimizer, lr_at, set_lr
from nanoseek.stages.pretrain import CALIBRATION_STEPS
from nanoseek.tokenizer import Tokenizer


def add_arguments(p) -> None:
    p.add_argument("--init", default="runs/tiny/pretrain/model",
                   help="model directory to start from (an HF directory, or a run directory with model/)")
    p.add_argument("--data", default="runs/tiny/corpus", help="corpus directory (its sft/ part)")
    p.add_argument("--train-files", nargs="*", default=None, help="conversation .jsonl files instead of "
                   "DATA/sft/train-*.jsonl (a \"messages\" list per line)")
    p.add_argument("--heldout-files", nargs="*", default=None, help="held-out conversation files instead of "
                   "DATA/sft/heldout-*.jsonl")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the conversations (V3: 2) "
                   "when --steps is not given")
    train.add_common_arguments(p, out="runs/tiny/sft", lr=3e-4, steps=None, batch=16, seq_len=512)
    p.set_defaults(warmup=20, eval_every=50, ckpt_every=100)


def resolve_init(path: str) -> str:
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(path, "model", "config.json")):
        return os.path.join(path, "model")
    return path


def main(args) -> int:
    # ---------------------------------------------------------------- set-up
    dist = distributed.init()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    init = resolve_init(args.init)
    tok = Tokenizer.load(init)
    model = load_pretrained(init, dtype=torch.float32).train()
    cfg = model.config
    D = len(model.mtp) if args.mtp_weight > 0 else 0
    if D == 0:
        model.mtp.requires_grad_(False)
    if args.precision == "fp8":
        fp8.convert(model, args.fp8_backend)
    model = distributed.wrap(model, dist, args.parallel)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2), args.moments)
    micro = args.micro_batch or args.batch_size // dist.world
    train_files = args.train_files or corpus_files(args.data, "sft", "train")
    heldout_files = args.heldout_files or corpus_files(args.data, "sft", "heldout")
    data = ConversationDataset(tok, read_jsonl(train_files, "messages"), args.seq_len, seed=args.seed)
    heldout = ConversationDataset(tok, read_jsonl(heldout_files, "messages"), args.seq_len, shuffle=False)
    evals = eval_batches(heldout, args.eval_rows, micro, dist.rank, dist.world)
    steps = args.steps or math.ceil(args.epochs * data.n_rows / args.batch_size)
    state = {"stage": "sft", "step": 0, "position": 0, "total_steps": None if args.minutes else steps}
    resumed = train.checkpoint_dirs(args.out)[-1:] if args.resume else []
    if resumed:
        try:
            meta = train.load_checkpoint(resumed[0], model, optimizer, dist)
        except train.CheckpointError as e:
            print(f"nanoseek sft: cannot resume: {e}", file=sys.stderr)
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
    dist.print0(f"sft from {init}: {data.n_rows} conversations, {state['total_steps'] or '?'} steps of "
                f"{args.batch_size} ({micro}/micro × {dist.world} ranks), MTP D={D}, {args.precision}")
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
    train.finish(args, model, tok, dist, bar, flops, heldout_loss, stage="sft")
    distributed.shutdown(dist)
    return 0
