"""`nanoseek rejection-sample`: k samples per prompt from a model, the verified and readable ones kept
as an SFT corpus (R1 §2.3.3; spec §9.3).

    nanoseek rejection-sample --model runs/tiny/rl/model --data runs/tiny/corpus --out runs/tiny/rs
    nanoseek sft --init runs/tiny/pretrain/model --data runs/tiny/rs --out runs/tiny/rs-sft

Only flags and wiring: the engine on --model, the first --problems distinct prompts of
CORPUS/problems/rl.jsonl, then rl/rejection.py: k samples per prompt at T 0.6 / top-p 0.95 (the
chat template by default, so the prompt opens "<think>\\n"), kept when the problem's own checker
verifies the answer, the format is right, the reasoning is in the prompt's language and readable
(not truncated, no loops, no long paragraphs or code), duplicates dropped, at most
--keep-per-problem per prompt (a seeded random choice). Writes OUT/sft/train-00000.jsonl and
OUT/sft/heldout-00000.jsonl (a held-out share of the *problems*, --heldout-frac) in the corpus's
conversation layout, so `nanoseek sft --data OUT` reads it as it is, then OUT/manifest.json with
the figures (samples, kept, accuracy, rejections per reason, mean lengths, tokens/s). Each file is
written to a temporary name and renamed, the manifest last: it marks a complete run (a re-run
removes it first), so a killed run never looks finished.

When fewer than --min-conversations are kept, train is topped up with CORPUS/sft/train-*.jsonl
conversations (R1 mixes reused SFT data in; here it keeps a micro smoke run going when its model
is right too rarely); when no problem could be held out, the held-out file takes the corpus's
sft/heldout conversations. With nothing kept and no top-up the run fails (exit 1, no manifest).

Measured (2026-11-30, 1 thread at nice 19 beside a GRPO run on this 2-core machine) on the
`--preset r1zero` corpus's base, pretrained 800 steps (held-out pass@1 20 % at T 0.6, R1-Zero prompt):
    nanoseek rejection-sample --model BASE --data CORPUS --out OUT --problems 64 --template r1zero \\
                              --max-tokens 200 --threads 1
64 problems x 8 = 512 samples in 21 s (880 tokens/s). 17.8 % verified right, and every right
sample passed the format, language and readability filters (421 rejected as wrong, none for
anything else); 14 duplicates and 5 beyond the cap of 2 dropped: 72 kept from 46 problems, 77
tokens on average against 36 for all samples (verification picks the worked traces over the
short guesses). But 10 of the 72 were lucky bare guesses ("<think>The answer is 2.</think>");
--min-reasoning-lines 2 drops them: 65 kept from 43 problems, 87 tokens on average. The same with
--template chat: 18.8 % right, 75 kept from 52 problems, 93 tokens on average.
Not yet measured on the recipe's RL model (the speedrun's report shows it).
"""
from __future__ import annotations

import sys

from nanoseek.flags import add_dataclass_arguments, from_args
from nanoseek.rl.rejection import RejectionConfig, build_traces, describe


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model to sample from (a model directory, or a run directory "
                                                  "with model/)")
    p.add_argument("--data", required=True, help="corpus directory: prompts from problems/rl.jsonl")
    p.add_argument("--out", required=True, help="output directory: sft/train-00000.jsonl, sft/heldout-00000.jsonl, "
                                                "manifest.json")
    p.add_argument("--problems", type=int, default=256, help="distinct prompts to sample (the first of "
                                                             "problems/rl.jsonl; 0: all)")
    p.add_argument("--heldout-frac", type=float, default=0.05, help="share of the kept problems held out "
                                                                    "(sft/heldout-00000.jsonl)")
    p.add_argument("--min-conversations", type=int, default=0, help="top train up to this many with the "
                                                                     "corpus's own SFT conversations")
    add_dataclass_arguments(p, RejectionConfig)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: the "
                                                                                 "checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(args) -> int:
    import torch
    cfg = from_args(RejectionConfig, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        manifest = build_traces(args.model, args.data, args.out, cfg, args.problems, args.heldout_frac,
                                args.min_conversations, args.dtype, log)
    except (OSError, ValueError) as e:
        log(f"nanoseek rejection-sample: {e}")
        return 1
    print(describe(manifest, args.out))
    return 0
