"""`nanoseek sft`: supervised fine-tuning on conversations, loss on the assistant's answer only.

    nanoseek sft --init runs/tiny/pretrain/model --data runs/tiny/corpus --out runs/tiny/sft
    torchrun --nproc_per_node 2 -m nanoseek sft …

Only flags: the wiring is train/sft.py's `run_sft` (shared with `nanoseek distill`), the loop
train/loop.py, the step train/step.py. Data:
`sft/train-*.jsonl` ({"messages": [...]}, or --train-files) through
`Tokenizer.encode_conversation`, which masks everything but the final assistant turn (its
reasoning, answer and EOS). Conversations are packed into rows of --seq-len + 1 tokens with
per-document attention and loss masks (data/packing.py); `--no-pack` gives one conversation per
row, right-padded, the layout before packing. The held-out loss is over `sft/heldout-*.jsonl`'s
assistant tokens (packed the same way, fixed rows).

V3's SFT (§5.1): 2 epochs, cosine LR 5e-6 → 1e-6 on a 671B model. The tiny model takes a larger
LR (default 3e-4, cosine to 10 %); epochs set the step count unless --steps is given. The MTP
modules keep training (λ, default 0.3) when the checkpoint has them; balancing continues (γ, α).

Measured before packing (tiny corpus, 4,000 conversations of ~210 tokens, from the default tiny
pretraining, `nanoseek sft --init OUT/pretrain --data CORPUS --out OUT/sft`, 2 threads, machine
shared): 2 epochs = 500 steps of 16 conversations in 9.2 min wall; 3,174 real tok/s (padding to
the longest row of a micro-batch cost ~40 % of the positions); held-out assistant-token loss
1.222 → 0.480; MaxVio 0.10 at the end.
Packing, side by side (30 steps of 16 rows at --seq-len 512 each, the same init and corpus, an
AVX2 machine, quiet): padded 1,804 real tok/s (3,355 real tokens a step, 1.86 s) → packed 3,205
real tok/s (7,646 a step in 4,000 / 1,786 = 2.2× fewer rows, 93 % filled, 2.39 s): 1.78× the real
tokens per second, and an epoch is 112 steps instead of 250.
    nanoseek sft --init PRE --data CORPUS --out OUT --steps 30 --eval-every 1000 [--no-pack]

Writes under --out: checkpoints/, model/ (final HF model + tokenizer), metrics.jsonl,
summary.json and the plots, as pretrain does.
"""
from __future__ import annotations

from nanoseek.data.packing import corpus_files
from nanoseek.flags import add_dataclass_arguments, from_args
from nanoseek.train.config import TrainConfig
from nanoseek.train.sft import run_sft


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
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one conversation per row, right-padded (the reference layout) instead of packing")
    add_dataclass_arguments(p, TrainConfig, out="runs/tiny/sft", lr=3e-4, steps=None, seq_len=512, warmup=20,
                            eval_every=50, ckpt_every=100)


def main(args) -> int:
    cfg = from_args(TrainConfig, args)
    train_files = args.train_files or corpus_files(args.data, "sft", "train")
    heldout_files = args.heldout_files or corpus_files(args.data, "sft", "heldout")
    return run_sft(cfg, args.init, train_files, heldout_files, epochs=args.epochs, pack=args.pack,
                   info={"data": args.data})
