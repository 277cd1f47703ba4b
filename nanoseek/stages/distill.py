"""`nanoseek distill`: a small dense student fine-tuned on the teacher's verified reasoning traces
(R1 §2.4 and §4.1; spec §10).

    nanoseek pretrain --preset qwen2_tiny --data runs/tiny/corpus --out runs/tiny/student-base
    nanoseek distill --teacher runs/tiny/r1/model --student runs/tiny/student-base/model \\
                     --data runs/tiny/corpus --out runs/tiny/student

R1 distils by SFT alone: the same ~800k curated samples that fine-tune R1 (§9 stage 3), no RL on
the student (the paper notes RL would add more, and that distillation beats RL on a small model,
Table 6; the speedrun compares with a student trained by GRPO alone). Here, in two parts:
  1. traces: rejection sampling from --teacher on CORPUS/problems/rl.jsonl into OUT/traces/
     (rl/rejection.py, the `nanoseek rejection-sample` layout: sft/train-00000.jsonl,
     sft/heldout-00000.jsonl, manifest.json). Skipped when OUT/traces/manifest.json exists, the
     marker written last (--force-traces samples again). Under torchrun rank 0 samples while the
     others wait.
  2. SFT of --student on them into OUT/ (train/sft.py's run_sft, as `nanoseek sft`: packed
     conversations, assistant-only loss, checkpoints/, model/, metrics.jsonl, summary.json, plots;
     --resume continues from the newest checkpoint).
The student is any model directory with a tokenizer (R1's are dense Qwen2.5 / Llama bases; here a
`--preset qwen2_tiny` pretrained on the same corpus). It reads the teacher's traces as text with
its own tokenizer. Defaults are `nanoseek sft`'s (lr 3e-4, 2 epochs, packed rows of 512): R1's
per-student LRs (1e-4 at 1.5B to 2e-5 at 70B, 2–3 epochs) are unverified and for far larger models.
--seed seeds both the sampling and the SFT data order.

Measured: not yet on the tiny recipe (the speedrun reports the distilled vs RL-only student);
tests/rl/test_rejection.py runs it end to end on micro models.
"""
from __future__ import annotations

import json
import os
import sys

from nanoseek.data.packing import corpus_files
from nanoseek.flags import add_dataclass_arguments, from_args
from nanoseek.rl.rejection import MANIFEST, RejectionConfig, build_traces, describe, is_complete
from nanoseek.train import distributed, loop
from nanoseek.train.config import TrainConfig
from nanoseek.train.sft import run_sft


def add_arguments(p) -> None:
    p.add_argument("--teacher", required=True, help="the model whose verified traces are distilled (a model "
                                                    "directory, or a run directory with model/)")
    p.add_argument("--student", required=True, help="the student to fine-tune (e.g. a pretrained qwen2_tiny "
                                                    "model directory)")
    p.add_argument("--data", required=True, help="corpus directory: prompts from problems/rl.jsonl")
    p.add_argument("--problems", type=int, default=256, help="distinct prompts to sample from the teacher (0: all)")
    p.add_argument("--heldout-frac", type=float, default=0.05, help="share of the kept problems held out (the SFT "
                                                                    "held-out loss)")
    p.add_argument("--min-conversations", type=int, default=0, help="top the traces up to this many with the "
                                                                     "corpus's own SFT conversations")
    p.add_argument("--force-traces", action="store_true", help="sample the traces again even when "
                                                               "OUT/traces/manifest.json exists")
    add_dataclass_arguments(p, RejectionConfig, skip=("seed",))
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the traces when --steps is not given")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one conversation per row, right-padded, instead of packing")
    add_dataclass_arguments(p, TrainConfig, out="runs/tiny/student", lr=3e-4, steps=None, seq_len=512, warmup=20,
                            eval_every=50, ckpt_every=100)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def traces(args, rcfg: RejectionConfig, out: str) -> dict | None:
    """OUT/traces' manifest: read when complete, else sampled now; None when sampling failed."""
    if is_complete(out) and not args.force_traces:
        with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        log(f"traces: {out} is complete ({manifest['train_conversations']} train conversations), not sampled again")
        return manifest
    try:
        manifest = build_traces(args.teacher, args.data, out, rcfg, args.problems, args.heldout_frac,
                                args.min_conversations, None, log)
    except (OSError, ValueError) as e:
        log(f"nanoseek distill: {e}")
        return None
    print(describe(manifest, out), flush=True)
    return manifest


def main(args) -> int:
    cfg = from_args(TrainConfig, args)
    rcfg = from_args(RejectionConfig, args, seed=cfg.seed)
    dist = loop.setup(cfg)
    out = os.path.join(cfg.out, "traces")
    manifest = traces(args, rcfg, out) if dist.is_main else None
    kept = dist.broadcast_object(manifest["kept"] if manifest else None)      # None: sampling failed
    if kept is None:
        distributed.shutdown(dist)
        return 1
    info = {"teacher": args.teacher, "data": args.data, "traces": out, "traces_kept": kept}
    rc = run_sft(cfg, args.student, corpus_files(out, "sft", "train"), corpus_files(out, "sft", "heldout"),
                 epochs=args.epochs, pack=args.pack, name="distill", info=info, dist=dist)
    distributed.shutdown(dist)
    return rc
