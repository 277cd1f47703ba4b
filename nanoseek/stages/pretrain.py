"""`nanoseek pretrain`: pretrain a DeepSeek-V3-style model (MLA + MoE + MTP) on the corpus.

    nanoseek corpus --preset tiny --out runs/tiny/corpus
    nanoseek pretrain --preset tiny --data runs/tiny/corpus --out runs/tiny/pretrain
    torchrun --nproc_per_node 2 -m nanoseek pretrain … [--parallel fsdp]     # same run, data-parallel

Only flags and wiring: set-up (process group, tokenizer, model, FP8 conversion, DDP/FSDP wrap,
optimizer, packed data), then the one training loop (train/loop.py: resume, eval → checkpoint →
step → log, final model and summary). What a step does (losses, balancing, accumulation) is in
train/step.py; the data layout in data/packing.py.

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

import os
import sys

import torch

from nanoseek.config import PRESETS, parse_overrides, preset
from nanoseek.data.packing import PackedDataset, cached_tokens, corpus_files, read_jsonl
from nanoseek.flags import add_dataclass_arguments, from_args
from nanoseek.model import Transformer
from nanoseek.precision import fp8
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train import distributed, loop
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer
from nanoseek.train.step import lm_stage


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
    add_dataclass_arguments(p, TrainConfig, out="runs/tiny/pretrain")


def load_or_train_tokenizer(args, out: str, dist) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    path = os.path.join(out, "tokenizer")
    if dist.is_main and not os.path.exists(os.path.join(path, "tokenizer.json")):
        texts = read_jsonl(corpus_files(args.data, "pretrain", "train"), "text")
        train_tokenizer(texts, args.vocab_size).save(path)
    dist.barrier()
    return Tokenizer.load(path)


def load_stream(tok, data: str, out: str, dist, split: str):
    files = corpus_files(data, "pretrain", split)
    cache = os.path.join(out, "tokens")
    if dist.is_main:
        cached_tokens(tok, files, cache)   # rank 0 tokenizes once, the others read the cache
    dist.barrier()
    return cached_tokens(tok, files, cache)


def main(args) -> int:
    cfg = from_args(TrainConfig, args)
    try:                                        # a bad --set fails now, before any work
        overrides = parse_overrides(args.set)
        preset(args.preset, **overrides)
    except ValueError as e:
        print(f"nanoseek pretrain: --set: {e}", file=sys.stderr)
        return 2
    dist = loop.setup(cfg)
    tok = load_or_train_tokenizer(args, cfg.out, dist)
    mcfg = preset(args.preset, **{**overrides, "vocab_size": tok.vocab_size})   # the tokenizer sets the vocabulary
    mcfg = mcfg.replace(num_nextn_predict_layers=mcfg.num_nextn_predict_layers if args.mtp_depth is None
                        else args.mtp_depth)
    D = mcfg.num_nextn_predict_layers if cfg.mtp_weight > 0 else 0
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).train()
    if D == 0:
        model.mtp.requires_grad_(False)         # kept in the checkpoint, never trained
    if cfg.precision == "fp8":
        fp8.convert(model, cfg.fp8_backend)
    model = distributed.wrap(model, dist, cfg.parallel)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.moments)
    micro = cfg.micro_rows(dist.world)
    data = PackedDataset(load_stream(tok, args.data, cfg.out, dist, "train"), cfg.seq_len, seed=cfg.seed)
    heldout = PackedDataset(load_stream(tok, args.data, cfg.out, dist, "heldout"), cfg.seq_len, shuffle=False)
    dist.print0(f"pretrain: {mcfg.hidden_size}d × {mcfg.num_hidden_layers} layers, MTP D={D}, "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {data.n_rows} rows of "
                f"{cfg.seq_len}, batch {cfg.batch_size} ({micro}/micro × {dist.world} ranks), {cfg.precision}")

    stage = lm_stage("pretrain", cfg, model, optimizer, dist, data, heldout, D)
    info = {"preset": args.preset, "data": args.data, "set": args.set, "mtp_depth": D}
    rc = loop.run(cfg, stage, model, optimizer, tok, dist, cfg.steps, info)
    distributed.shutdown(dist)
    return rc
