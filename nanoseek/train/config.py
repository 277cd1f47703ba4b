"""TrainConfig: what the one training loop (loop.py) and one optimizer step (step.py) need to know.

A plain dataclass whose defaults are the tiny pretraining run's; each stage overrides a few
(`nanoseek sft`: lr 3e-4, warmup 20, …) and maps its flags onto it with nanoseek.flags. V3's
values (§4.2) where they transfer: AdamW β (0.9, 0.95), weight decay 0.1, clip 1.0, γ = 0.001,
α = 1e-4 (V3 used 1e-4 for its sequence-wise loss), λ = 0.3 for the first 10T tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def _h(text: str, **extra) -> dict:
    return field(default=None, metadata={"help": text, **extra})


@dataclass
class TrainConfig:
    out: str = field(default="runs/tiny/train", metadata={"help": "run directory: checkpoints/, model/, "
                                                           "metrics.jsonl, summary.json, *.png"})
    steps: int | None = field(default=800, metadata={"help": "optimizer steps (ignored with --minutes)"})
    minutes: float | None = _h("train for about this long instead: the step count is fixed after timing "
                               "the first steps")
    seq_len: int = field(default=256, metadata={"help": "tokens per row (input length)"})
    batch_size: int = field(default=16, metadata={"help": "rows per optimizer step, over all ranks"})
    micro_batch: int | None = _h("rows per forward per rank (gradient accumulation = batch / (micro × "
                                 "ranks); default: batch / ranks)")
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR as a fraction of the peak"})
    warmup: int = field(default=50, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "LR schedule after warmup",
                                                      "choices": ["cosine", "wsd", "constant"]})
    decay_frac: float = field(default=0.2, metadata={"help": "wsd: fraction of steps in the final decay"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of matrices (V3: 0.1)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW β1 (V3: 0.9)"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW β2 (V3: 0.95)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0: off)"})
    moments: str = field(default="fp32", metadata={"help": "AdamW moment dtype (V3 used bf16)",
                                                   "choices": ["fp32", "bf16"]})
    gamma: float = field(default=0.001, metadata={"help": "bias update speed γ of aux-loss-free balancing (0: off)"})
    alpha: float = field(default=1e-4, metadata={"help": "sequence-wise balance loss weight α (0: off)"})
    mtp_weight: float = field(default=0.3, metadata={"help": "MTP loss weight λ (0: no MTP loss)"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32; bf16 autocast; fp8 = fine-grained E4M3 GEMMs with fp32 master weights (precision/fp8.py)",
        "choices": ["fp32", "bf16", "fp8"]})
    fp8_backend: str = field(default="auto", metadata={
        "help": "FP8 GEMMs: real torch._scaled_mm products, or quantize-dequantize emulation",
        "choices": ["auto", "scaled_mm", "emulate"]})
    parallel: str = field(default="ddp", metadata={"help": "data parallelism under torchrun",
                                                   "choices": ["ddp", "fsdp"]})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps (and at the end)"})
    eval_rows: int = field(default=32, metadata={"help": "held-out rows per evaluation (fixed)"})
    ckpt_every: int = field(default=200, metadata={"help": "resumable checkpoint every N steps (and at the end)"})
    keep: int = field(default=2, metadata={"help": "checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out (if any)"})
    seed: int = field(default=0, metadata={"help": "seed of the init and the data order"})
    threads: int | None = _h("torch threads per process (default: torch's)")
    plots: bool = field(default=True, metadata={"help": "the PNG plots at the end"})
    progress: bool = field(default=True, metadata={"help": "the progress bar (else log lines)"})

    def micro_rows(self, world: int) -> int:
        """Rows per forward per rank."""
        return self.micro_batch or max(1, self.batch_size // world)
