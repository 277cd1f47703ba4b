"""`run_sft`: supervised fine-tuning on conversation files, the wiring `nanoseek sft` and `nanoseek
distill` share (stages import no stage, so what both need lives here).

    rc = run_sft(TrainConfig(out="runs/x/sft", lr=3e-4, steps=None, seq_len=512), "runs/x/pretrain/model",
                 corpus_files(DATA, "sft", "train"), corpus_files(DATA, "sft", "heldout"), epochs=2.0)

Set-up, then the one training loop: the model at `init` (any directory load_pretrained reads, or a
run directory with model/) and its tokenizer; FP8 conversion and DDP/FSDP wrapping as the config
says; conversations ({"messages": [...]} a line) through `Tokenizer.encode_conversation`, which
masks everything but the final assistant turn; packed rows with per-document masks
(data/packing.py) or one conversation per row (`pack=False`); the step count from `epochs` unless
cfg.steps is set; the held-out loss over the held-out files' assistant tokens. The MTP modules
keep training (λ) when the checkpoint has them and cfg.mtp_weight > 0; a dense student (Qwen2
layout) has none. What the figures were is in stages/sft.py (the command's docstring).
"""
from __future__ import annotations

import math

import torch

from nanoseek.checkpoint import load_pretrained, resolve_model_dir
from nanoseek.data.packing import ConversationDataset, read_jsonl
from nanoseek.precision import fp8
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import distributed, loop
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer
from nanoseek.train.step import lm_stage

__all__ = ["run_sft"]


def run_sft(cfg: TrainConfig, init: str, train_files: list[str], heldout_files: list[str], *, epochs: float = 2.0,
            pack: bool = True, name: str = "sft", info: dict | None = None, dist=None) -> int:
    """Fine-tune `init` on the conversations of `train_files` into cfg.out (checkpoints/, model/,
    metrics.jsonl, summary.json, plots); returns the loop's exit code. `dist`: an already set-up
    process group (loop.setup), else one is set up and shut down here. `info` joins what is stored
    in checkpoints and the final model's nanoseek.json."""
    own = dist is None
    dist = dist or loop.setup(cfg)
    init = resolve_model_dir(init)
    tok = Tokenizer.load(init)
    model = load_pretrained(init, dtype=torch.float32).train()
    D = len(model.mtp) if cfg.mtp_weight > 0 else 0
    if D == 0:
        model.mtp.requires_grad_(False)
    if cfg.precision == "fp8":
        fp8.convert(model, cfg.fp8_backend)
    model = distributed.wrap(model, dist, cfg.parallel)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.moments)
    micro = cfg.micro_rows(dist.world)
    data = ConversationDataset(tok, read_jsonl(train_files, "messages"), cfg.seq_len, seed=cfg.seed, pack=pack)
    heldout = ConversationDataset(tok, read_jsonl(heldout_files, "messages"), cfg.seq_len, shuffle=False, pack=pack)
    steps = cfg.steps or math.ceil(epochs * data.n_rows / cfg.batch_size)
    layout = f"packed in {data.n_rows} rows of {cfg.seq_len + 1} ({data.fill():.0%} filled)" if pack else \
        "one per row, padded per micro-batch"
    dist.print0(f"{name} from {init}: {data.n_docs} conversations {layout}, {'?' if cfg.minutes else steps} steps of "
                f"{cfg.batch_size} ({micro}/micro × {dist.world} ranks), MTP D={D}, {cfg.precision}")

    stage = lm_stage(name, cfg, model, optimizer, dist, data, heldout, D)
    info = {"init": init, **(info or {}), "epochs": epochs, "pack": pack, "mtp_depth": D}
    rc = loop.run(cfg, stage, model, optimizer, tok, dist, steps, info)
    if own:
        distributed.shutdown(dist)
    return rc
