"""The one training loop every stage uses: pretrain, SFT, GRPO and distillation plug into it.

    stage = Stage("sft", step=..., evaluate=..., flops_per_token=...)
    return loop.run(cfg, stage, model, optimizer, tokenizer, dist, total_steps)

Reads top to bottom: resume (or start fresh), then one loop: evaluate → checkpoint → step → log,
then the final model, summary.json and plots. What a step *is* belongs to the stage: `stage.step
(step, position)` does one optimizer step from the data at `position` (rows consumed so far) and
returns its record and how many rows it used (pretrain and SFT: train_step over packed rows; GRPO:
rollouts, rewards and μ updates). The loop owns everything around it, once for all stages:
  - the LR schedule (warmup, then cosine / WSD / constant; set before each step, logged),
  - the step count: `cfg.steps`, or `cfg.minutes` (fixed after timing CALIBRATION_STEPS steps,
    broadcast from rank 0, stored in checkpoints so a resumed run keeps it),
  - resume: the newest complete checkpoint of `cfg.out` (weights, router biases, optimizer, RNG,
    data position, step count; an explicit new `steps` extends or shortens the run), else a fresh
    start that removes an earlier run's checkpoints so a later resume cannot continue the wrong run,
  - checkpoints every `ckpt_every` steps and at the end (resume.py: atomic, verified on load),
  - metrics.jsonl and the progress bar on rank 0 (metrics.py), evaluations every `eval_every`,
  - at the end: the final HF model in out/model (+ tokenizer), summary.json (tokens/s, MFU
    against the matmul peak measured then, final figures, balance), the stage's plots.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from nanoseek.checkpoint import save_pretrained
from nanoseek.train import distributed, resume
from nanoseek.train.config import TrainConfig
from nanoseek.train.flops import matmul_peak_gflops
from nanoseek.train.metrics import MetricsLog, Progress, balance_summary, mtp_depths, plot_training, read_metrics, tail_means
from nanoseek.train.optim import lr_at, set_lr

CALIBRATION_STEPS = 10  # cfg.minutes: steps timed before the step count is fixed


@dataclass
class Stage:
    """What a stage plugs into the loop."""
    name: str
    step: Callable[[int, int], tuple[dict, int]]        # (step, position) -> (record, rows consumed)
    evaluate: Callable[[int], dict]                     # step -> {"heldout_loss": …} (every rank calls)
    flops_per_token: float = 0.0                        # for MFU in summary.json (0: not reported)
    progress_keys: tuple[str, ...] = ("main_loss",)     # step figures on the progress bar
    summary_keys: list[str] = field(default_factory=lambda: ["main_loss"])  # averaged over the last 5 %
    plot: Callable[[str], list[str]] | None = plot_training
    epoch: Callable[[int], float] | None = None         # position -> epochs of the data


def setup(cfg: TrainConfig):
    """What every training stage starts with: the process group (torchrun or one process), torch's
    threads, the run directory. Returns the Dist."""
    dist = distributed.init()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    return dist


def decide_total_steps(minutes: float, elapsed_s: float, step_s: float, step: int) -> int:
    """Steps that fit a `minutes` budget after `step` steps took `elapsed_s` (≈ step_s each now)."""
    return max(step + 1, step + int(math.floor((minutes * 60 - elapsed_s) / max(step_s, 1e-6))))


def start(cfg: TrainConfig, stage: Stage, model, optimizer, dist, total_steps: int | None) -> dict:
    """The run's state: resumed from the newest checkpoint (cfg.resume) or fresh. Raises
    resume.CheckpointError when the checkpoint is refused."""
    state = {"stage": stage.name, "step": 0, "position": 0, "total_steps": None if cfg.minutes else total_steps}
    resumed = resume.checkpoint_dirs(cfg.out)[-1:] if cfg.resume else []
    if resumed:
        meta = resume.load_checkpoint(resumed[0], model, optimizer, dist)
        state.update({k: meta[k] for k in ("step", "position", "total_steps")})
        if not cfg.minutes and total_steps and meta.get("config", {}).get("steps") != cfg.steps:
            state["total_steps"] = total_steps    # an explicit new step count extends (or shortens) the run
        dist.print0(f"resumed from {resumed[0]} at step {state['step']}")
    if dist.is_main:
        if not resumed:
            resume.clear_checkpoints(cfg.out)
        resume.prune_checkpoints(cfg.out, cfg.keep)
    return state


def run(cfg: TrainConfig, stage: Stage, model, optimizer, tokenizer, dist, total_steps: int | None,
        info: dict | None = None) -> int:
    """Train until the step count; returns an exit code (2: the checkpoint to resume was refused).
    `info` (the stage's own settings) is stored in checkpoints and the final model's nanoseek.json."""
    try:
        state = start(cfg, stage, model, optimizer, dist, total_steps)
    except resume.CheckpointError as e:
        print(f"nanoseek {stage.name}: cannot resume: {e}", file=sys.stderr)
        return 2
    config = {"config": asdict(cfg), "info": info or {}}
    log = MetricsLog(cfg.out, dist.is_main, resume_step=state["step"] if cfg.resume else None)
    bar = Progress(state["total_steps"], state["step"], enabled=dist.is_main and cfg.progress,
                   show=dist.is_main, keys=stage.progress_keys)
    step, first, t_start = state["step"], state["step"], time.time()
    total, evaluation = state["total_steps"], {}
    while True:
        last = total is not None and step >= total
        if step % cfg.eval_every == 0 or last:
            evaluation = stage.evaluate(step)
            log.log({"step": step, **evaluation})
            bar.note(step, evaluation)
        if step > first and (step % cfg.ckpt_every == 0 or last):
            state.update(step=step, total_steps=total, metrics=evaluation)
            resume.save_checkpoint(os.path.join(cfg.out, "checkpoints", f"step_{step:06d}"),
                                   model, optimizer, tokenizer, {**state, **config}, dist)
            if dist.is_main:
                resume.prune_checkpoints(cfg.out, cfg.keep)
        if last:
            break
        lr = lr_at(step, cfg.schedule, cfg.lr, cfg.warmup, total or 10 ** 9, cfg.lr * cfg.min_lr_ratio, cfg.decay_frac)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        rec, rows = stage.step(step, state["position"])
        dt = time.perf_counter() - t0
        state["position"] += rows
        epoch = {"epoch": round(stage.epoch(state["position"]), 4)} if stage.epoch else {}
        log.log({"step": step, "lr": lr, **epoch, "step_s": dt, **rec})
        bar.update(rec, dt)
        step += 1
        if total is None and step == first + CALIBRATION_STEPS:
            total = dist.broadcast_object(decide_total_steps(cfg.minutes, time.time() - t_start,
                                                             bar.median_step_s(), step))
            bar.set_total(total)
    bar.close()
    finish(cfg, stage, model, tokenizer, dist, bar, evaluation, config)
    return 0


def finish(cfg: TrainConfig, stage: Stage, model, tokenizer, dist, bar: Progress, evaluation: dict,
           config: dict) -> dict | None:
    """Save the final model to out/model, write summary.json (speed, MFU, final figures, balance),
    plot. Every rank calls (an FSDP2 model is gathered); rank 0 writes and returns the summary."""
    msd, _ = resume.full_state(model, None)
    if not dist.is_main:
        return None
    recs = read_metrics(cfg.out)
    train_recs = [r for r in recs if "lr" in r]
    bf16 = cfg.precision == "bf16"
    peak = matmul_peak_gflops(torch.bfloat16 if bf16 else torch.float32) if stage.flops_per_token else 0.0
    achieved = stage.flops_per_token * bar.tokens_per_s / 1e9 if bar.tokens else 0.0
    keys = list(stage.summary_keys) + [f"mtp{k}_loss" for k in (mtp_depths(train_recs[-1]) if train_recs else [])]
    summary = {"stage": stage.name, "steps": train_recs[-1]["step"] + 1 if train_recs else 0,
               "tokens_this_session": bar.tokens, "train_seconds_this_session": round(bar.seconds, 2),
               "tokens_per_s": round(bar.tokens_per_s, 1), "world_size": dist.world, "precision": cfg.precision,
               "flops_per_token": stage.flops_per_token, "achieved_gflops": round(achieved, 2),
               f"peak_matmul_gflops_{'bf16' if bf16 else 'fp32'}": round(peak, 1),
               "mfu": round(achieved / peak, 4) if peak else None,
               **{f"final_{k}": v for k, v in evaluation.items() if k != "step"},
               **{f"final_train_{k}": v for k, v in tail_means(train_recs, keys).items()},
               "gamma": cfg.gamma, "alpha": cfg.alpha, "mtp_weight": cfg.mtp_weight, **balance_summary(recs)}

    def write_extra(tmp: str) -> None:
        with open(os.path.join(tmp, "nanoseek.json"), "w") as f:
            json.dump({**summary, **config}, f, indent=1, sort_keys=True)

    save_pretrained(resume.plain_model(model, msd), os.path.join(cfg.out, "model"), tokenizer=tokenizer,
                    write_extra=write_extra)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    if cfg.plots and train_recs and stage.plot:
        stage.plot(cfg.out)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}), flush=True)
    return summary
