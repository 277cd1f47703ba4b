"""The pieces both training stages (pretrain, sft) share: losses, one optimizer step with V3's
balancing, held-out loss, resumable checkpoints, metrics, plots. The stages own their loops.

Losses of one step (V3 §2.2, §2.1.2; deepseek_spec §2.4, §3):
    L = CE_main + λ/D Σ_k CE_k + Σ_layers L_Bal
CE_main over every target token of the step, CE_k over depth k's targets (token i+k+1), L_Bal the
sequence-wise balance loss (α Σ_i f_i P_i per sequence, over real tokens, averaged over the
step's sequences; `masked_sequence_balance_loss`, equal to moe.sequence_balance_loss without
padding). Each term is a sum over the step's tokens divided by the *global* count (all
micro-batches, all ranks; one all-reduce of a few numbers before the forward), and each rank's
loss is multiplied by the world size because DDP averages gradients: so N ranks × micro-batches
compute exactly the gradient of one process on the same global batch (tests/test_distributed.py).

Auxiliary-loss-free balancing (V3 §2.1.2): the expert loads of the step (tokens routed to each
expert, real tokens only, summed over micro-batches and all-reduced over ranks) drive
moe.bias_update — b_i += γ·sign(mean load − load_i) — after the optimizer step, identically on
every rank; the bias is a buffer and gets no gradient. Per MoE layer (MTP blocks included) we log
MaxVio = max_i load_i / mean load − 1 (the Loss-Free Balancing paper's measure; 0 = perfect).
γ = 0 or α = 0 switches either off.

Checkpoints: an HF directory (checkpoint.save_pretrained, atomic) + nanoseek.json (stage, step,
total steps, data position, RNG state, metrics, args, sha256 of every file) +
optimizer.pt (FQN-keyed, via torch.distributed.checkpoint.state_dict, so DDP, FSDP2 and single
process read each other's). Saved as <out>/checkpoints/step_NNNNNN: each save is a fresh
directory renamed into place in one step, so a kill during a write leaves only a `.tmp-*`
sibling that resume ignores and removes; the last `keep` are kept. Resume refuses a checkpoint
whose files do not match their recorded sha256 (truncated, bit-flipped) with a message naming
the file.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil

import torch
import torch.nn.functional as F

from nanoseek import distributed
from nanoseek.checkpoint import read_tensors, save_pretrained
from nanoseek.data import IGNORE, Batch
from nanoseek.hf import from_hf
from nanoseek.model import param_counts
from nanoseek.moe import MoE, RouterStats, bias_update


# ------------------------------------------------------------------ flags shared by pretrain and sft
def add_common_arguments(p: argparse.ArgumentParser, out: str, lr: float, steps: int | None, batch: int,
                         seq_len: int) -> None:
    a = p.add_argument
    a("--out", default=out, help="run directory: checkpoints/, model/, metrics.jsonl, summary.json, *.png")
    a("--steps", type=int, default=steps, help="optimizer steps (ignored with --minutes)")
    a("--minutes", type=float, default=None,
      help="train for about this long instead: the step count is fixed after timing the first steps")
    a("--seq-len", type=int, default=seq_len, help="tokens per row (input length)")
    a("--batch-size", type=int, default=batch, help="rows per optimizer step, over all ranks")
    a("--micro-batch", type=int, default=None, help="rows per forward per rank (gradient accumulation "
      "= batch / (micro × ranks); default: batch / ranks)")
    a("--lr", type=float, default=lr, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    a("--warmup", type=int, default=50, help="linear warmup steps")
    a("--schedule", choices=["cosine", "wsd"], default="cosine", help="LR schedule after warmup")
    a("--decay-frac", type=float, default=0.2, help="wsd: fraction of steps in the final decay")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices (V3: 0.1)")
    a("--beta1", type=float, default=0.9, help="AdamW β1 (V3: 0.9)")
    a("--beta2", type=float, default=0.95, help="AdamW β2 (V3: 0.95)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    a("--moments", choices=["fp32", "bf16"], default="fp32", help="AdamW moment dtype (V3 used bf16)")
    a("--gamma", type=float, default=0.001, help="bias update speed γ of aux-loss-free balancing (0: off)")
    a("--alpha", type=float, default=1e-4, help="sequence-wise balance loss weight α (0: off)")
    a("--mtp-weight", type=float, default=0.3, help="MTP loss weight λ (0: no MTP loss)")
    a("--precision", choices=["fp32", "bf16", "fp8"], default="fp32",
      help="fp32; bf16 autocast; fp8 = fine-grained E4M3 GEMMs with fp32 master weights (fp8.py)")
    a("--fp8-backend", choices=["auto", "scaled_mm", "emulate"], default="auto",
      help="FP8 GEMMs: real torch._scaled_mm products, or quantize-dequantize emulation")
    a("--parallel", choices=["ddp", "fsdp"], default="ddp", help="data parallelism under torchrun")
    a("--eval-every", type=int, default=100, help="held-out loss every N steps (and at the end)")
    a("--eval-rows", type=int, default=32, help="held-out rows per evaluation (fixed)")
    a("--ckpt-every", type=int, default=200, help="resumable checkpoint every N steps (and at the end)")
    a("--keep", type=int, default=2, help="checkpoints to keep")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out (if any)")
    a("--seed", type=int, default=0, help="seed of the init and the data order")
    a("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    a("--no-plots", action="store_true", help="skip the PNG plots at the end")
    a("--no-progress", action="store_true", help="no progress bar (log lines instead)")


# ------------------------------------------------------------------ losses
def lm_loss_sums(out, batch: Batch, mtp_depth: int) -> torch.Tensor:
    """Σ CE of the main head and of each MTP depth over their targets: [1 + mtp_depth]."""
    labels = batch.labels
    logits = [out.logits] + list(out.mtp_logits[:mtp_depth])
    sums = []
    for k, lg in enumerate(logits):
        target = labels[:, k + 1:]
        sums.append(F.cross_entropy(lg[:, : target.shape[1]].flatten(0, 1).float(), target.flatten(),
                                    ignore_index=IGNORE, reduction="sum"))
    return torch.stack(sums)


def masked_sequence_balance_loss(stats: RouterStats, valid: torch.Tensor, n_experts: int, top_k: int,
                                 alpha: float) -> torch.Tensor:
    """Per-sequence L_Bal [B] over the real tokens only (valid [B, T] bool); mean over B equals
    moe.sequence_balance_loss when every token is real."""
    v = valid.float()[..., None]                                                    # [B, T, 1]
    n = v.sum(1).clamp(min=1)                                                       # [B, 1]
    chosen = F.one_hot(stats.topk_idx, n_experts).sum(2).float() * v                # [B, T, E]
    f = chosen.sum(1) * n_experts / (top_k * n)                                     # [B, E]
    p = (stats.scores / stats.scores.sum(-1, keepdim=True) * v).sum(1) / n          # [B, E]
    return alpha * (f * p).sum(-1)


def stats_valid(stats: RouterStats, valid: torch.Tensor) -> torch.Tensor:
    """The real-token mask aligned with a layer's stats (MTP depth k sees positions 0..T-k-1)."""
    return valid[:, : stats.topk_idx.shape[1]]


def expert_load(stats: RouterStats, valid: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E], real tokens only."""
    idx = stats.topk_idx[stats_valid(stats, valid)]
    return torch.bincount(idx.flatten(), minlength=n_experts).float()


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max load / mean load − 1 per row of [L, E] (0 at perfect balance)."""
    return load.max(-1).values / load.mean(-1).clamp(min=1e-9) - 1


# ------------------------------------------------------------------ one optimizer step
def routers_of(model) -> dict[int, torch.nn.Module]:
    """MoE layer id -> its Router (main layers 0..N-1, MTP blocks N, N+1, …)."""
    return {m.layer_idx: m.gate for m in distributed.unwrap(model).modules() if isinstance(m, MoE)}


def layer_labels(model, layers: list[int]) -> list[str]:
    N = distributed.unwrap(model).config.num_hidden_layers
    return [f"L{i}" if i < N else f"MTP{i - N + 1}" for i in layers]


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def train_step(model, batches: list[Batch], optimizer, args, dist, mtp_depth: int) -> dict:
    """Forward/backward over this rank's micro-batches, clip, AdamW, then the bias sign step."""
    D = mtp_depth if args.mtp_weight > 0 else 0
    routers = routers_of(model)
    N = distributed.unwrap(model).config.num_hidden_layers
    layers = [i for i in sorted(routers) if i < N + D]              # MTP blocks only when they run
    E, K = (routers[layers[0]].n_experts, routers[layers[0]].top_k) if layers else (1, 1)
    norm = torch.cat([sum(b.target_counts(D) for b in batches), torch.tensor([float(sum(len(b.tokens) for b in batches))])])
    norm = dist.all_reduce_sum(norm).clamp(min=1)                  # [main, depth 1..D, sequences]
    sums = torch.zeros(D + 2)                                       # Σ CE main, depths, Σ L_Bal
    load = torch.zeros(len(layers), E)
    for i, b in enumerate(batches):
        with distributed.grad_sync(model, i == len(batches) - 1), autocast(args.precision):
            out = model(b.inputs, mtp=D > 0)
            ce = lm_loss_sums(out, b, D)
            bal = torch.zeros(())
            if args.alpha > 0:
                bal = sum(masked_sequence_balance_loss(s, stats_valid(s, b.valid[:, :-1]), E, K, args.alpha).sum()
                          for s in out.router_stats)
            weights = torch.cat([torch.ones(1), torch.full((D,), args.mtp_weight / max(D, 1))])
            loss = (ce / norm[: D + 1] * weights).sum() + bal / norm[-1]
            (loss * dist.world).backward()
        sums += torch.cat([ce.detach(), torch.as_tensor(bal).detach().reshape(1)])
        for s in out.router_stats:
            load[layers.index(s.layer)] += expert_load(s, b.valid[:, :-1], E)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = torch.tensor([float(sum(b.num_tokens for b in batches))])
    totals = dist.all_reduce_sum(torch.cat([sums, tokens, load.flatten()]))   # one all-reduce
    sums, tokens, load = totals[: D + 2], totals[D + 2], totals[D + 3:].view(len(layers), E)
    if args.gamma > 0:
        for li, layer in enumerate(layers):
            bias_update(routers[layer].e_score_correction_bias, load[li], args.gamma)
    losses = sums[: D + 1] / norm[: D + 1]
    vio = max_violation(load) if layers else torch.zeros(0)
    rec = {"loss": float(losses[0] + (losses[1:] * args.mtp_weight / max(D, 1)).sum() + sums[-1] / norm[-1]),
           "main_loss": float(losses[0]), "bal_loss": float(sums[-1] / norm[-1]),
           "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
           "maxvio_mean": float(vio.mean()) if len(layers) else 0.0,
           "maxvio": dict(zip(layer_labels(model, layers), [round(float(v), 4) for v in vio])),
           "tokens": int(tokens)}
    rec.update({f"mtp{k}_loss": float(losses[k]) for k in range(1, D + 1)})
    return rec


@torch.no_grad()
def evaluate(model, batches: list[Batch], dist, precision: str = "fp32") -> float:
    """Main-head CE per target token over fixed held-out batches (all ranks' shares)."""
    model.eval()
    sums = torch.zeros(2)
    for b in batches:
        with autocast(precision):
            out = model(b.inputs, mtp=False)
        sums += torch.stack([lm_loss_sums(out, b, 0)[0], b.target_counts(0)[0]])
    distributed.reshard(model)
    model.train()
    sums = dist.all_reduce_sum(sums)
    return float(sums[0] / sums[1].clamp(min=1))


def train_flops_per_token(cfg, seq_len: int, mtp_depth: int) -> float:
    """6 × activated matmul parameters (head included, embedding lookup not) + causal attention
    (QKᵀ and AV: seq_len/2 keys on average, × 3 for forward + backward), MTP blocks included."""
    c = param_counts(cfg)
    V, D = cfg.vocab_size, cfg.hidden_size
    n = c["activated"] - V * D
    if mtp_depth:
        n += (c["activated_with_mtp"] - c["activated"]) * mtp_depth / max(1, cfg.num_nextn_predict_layers)
        n += mtp_depth * V * D
    H, qk, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    attn = 3 * (cfg.num_hidden_layers + mtp_depth) * seq_len * H * (qk + v)
    return 6 * n + attn


# ------------------------------------------------------------------ checkpoints
class CheckpointError(ValueError):
    pass


STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dirs(out: str) -> list[str]:
    """Complete checkpoints under out/checkpoints, oldest first (temporary siblings excluded)."""
    root = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(root) if STEP_DIR.match(n)) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "python": list(random.getstate()[1])}


def set_rng_state(st: dict) -> None:
    import numpy as np
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(st["torch"]), dtype=np.uint8).copy()))
    random.setstate((3, tuple(st["python"]), None))


def _full_state(model, optimizer, dist):
    """(full model state dict or None when not sharded, FQN-keyed optimizer state); every rank calls."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    fsdp = distributed.is_fsdp(model)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if fsdp else None
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    msd = get_model_state_dict(model, options=opts) if fsdp else None
    return msd, osd


def plain_model(model, msd):
    """The unwrapped Transformer, or for FSDP2 one rebuilt from the gathered full state dict."""
    plain = distributed.unwrap(model)
    if msd is None:
        return plain
    from nanoseek.model import Transformer
    with torch.device("meta"):
        rebuilt = Transformer(plain.config)
    rebuilt.load_state_dict(msd, assign=True, strict=False)
    return rebuilt


def save_checkpoint(path: str, model, optimizer, tokenizer, state: dict, dist) -> None:
    """Write a resumable HF checkpoint directory at `path` atomically (every rank must call)."""
    msd, osd = _full_state(model, optimizer, dist)
    # RNG: rank 0's state stands for all. Training draws no random numbers after the seeded init
    # (data order is a function of position and seed) and every rank seeds alike; an
    # all_gather_object here made gloo's teardown deadlock now and then (a pickled-tensor work
    # finishing in gloo's run loop while the main thread, holding the GIL, destroys the group).
    rngs = [rng_state()]
    if dist.is_main:
        def write_extra(tmp: str) -> None:
            torch.save(osd, os.path.join(tmp, "optimizer.pt"))
            files = {n: _sha256(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))
                     if n.endswith((".safetensors", ".pt"))}
            meta = {**state, "rng": rngs, "world_size": dist.world, "files": files, "format": 1}
            with open(os.path.join(tmp, "nanoseek.json"), "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)

        save_pretrained(plain_model(model, msd), path, tokenizer=tokenizer, write_extra=write_extra)
    dist.barrier()


def prune_checkpoints(out: str, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints and any leftovers of interrupted writes."""
    root = os.path.join(out, "checkpoints")
    for d in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    for n in os.listdir(root) if os.path.isdir(root) else []:
        if n.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def clear_checkpoints(out: str) -> None:
    """A fresh (not resumed) run drops the checkpoints of an earlier run in the same directory, so
    that a later --resume can never continue the wrong run."""
    old = checkpoint_dirs(out)
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    if old:
        print(f"starting fresh: removed {len(old)} checkpoint(s) of an earlier run in {out}/checkpoints "
              f"(pass --resume to continue a run)", flush=True)


def verify_checkpoint(path: str) -> dict:
    """nanoseek.json of a resumable checkpoint, after checking every recorded file's sha256."""
    meta_file = os.path.join(path, "nanoseek.json")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a resumable checkpoint — nanoseek.json is missing or unreadable ({e})") from e
    if "optimizer.pt" not in meta.get("files", {}):
        raise CheckpointError(f"{path}: not a resumable checkpoint — nanoseek.json records no optimizer.pt")
    for name, digest in meta["files"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{path}: corrupt checkpoint — {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"{path}: corrupt checkpoint — {name} does not match the sha256 recorded in "
                                  f"nanoseek.json (changed or truncated after it was written); delete this "
                                  f"directory to resume from the previous checkpoint")
    return meta


def load_checkpoint(path: str, model, optimizer, dist) -> dict:
    """Restore weights, router biases, optimizer and RNG from `path`; returns nanoseek.json."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    meta = verify_checkpoint(path)
    plain = distributed.unwrap(model)
    state, problems = from_hf(read_tensors(path), plain.config)
    if problems:
        raise CheckpointError(f"{path}: weights do not match the model — " + "; ".join(problems))
    fsdp = distributed.is_fsdp(model)
    opts = StateDictOptions(full_state_dict=True) if fsdp else None
    if fsdp:
        set_model_state_dict(model, state, options=opts)
    else:
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
    osd = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, osd, options=opts)
    rngs = meta.get("rng") or []
    if rngs:
        set_rng_state(rngs[0])
    return meta


# ------------------------------------------------------------------ metrics and plots
class MetricsLog:
    """metrics.jsonl on rank 0; on resume, records from `resume_step` on are dropped first."""

    def __init__(self, out: str, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = os.path.join(out, "metrics.jsonl"), enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] < resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(out: str) -> list[str]:
    """loss.png, lr.png, balance.png from metrics.jsonl (needs matplotlib; skipped without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    recs = read_metrics(out)
    train = [r for r in recs if "main_loss" in r]
    evals = [r for r in recs if "heldout_loss" in r]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(os.path.join(out, name))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["main_loss"] for r in train], lw=0.8, label="train (main)")
    for k in range(1, 8):
        pts = [(r["step"], r[f"mtp{k}_loss"]) for r in train if f"mtp{k}_loss" in r]
        if pts:
            ax.plot(*zip(*pts), lw=0.8, alpha=0.7, label=f"train (MTP depth {k})")
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o-", label="held-out (main)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="loss")
    ax.legend()
    save(fig, "loss.png")
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="LR schedule")
    save(fig, "lr.png")
    if train and train[0].get("maxvio"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in train[0]["maxvio"]:
            ax.plot([r["step"] for r in train], [r["maxvio"][name] for r in train], lw=0.8, label=name)
        ax.set(xlabel="step", ylabel="MaxVio (max load / mean − 1)", title="expert load balance per MoE layer")
        ax.legend()
        save(fig, "balance.png")
    return written


def decide_total_steps(minutes: float, elapsed_s: float, step_s: float, step: int) -> int:
    """Steps that fit a `minutes` budget after `step` steps took `elapsed_s` (≈ step_s each now)."""
    return max(step + 1, step + int(math.floor((minutes * 60 - elapsed_s) / max(step_s, 1e-6))))


class Progress:
    """tqdm bar (rank 0) with loss, held-out loss, tokens/s and ETA; keeps the train-time totals."""

    def __init__(self, total: int | None, initial: int, enabled: bool, show: bool = True):
        from tqdm import tqdm
        # disable=None: no bar when stderr is not a terminal (logs get the held-out lines only)
        self.bar = tqdm(total=total, initial=initial, unit="step", disable=None if enabled else True,
                        dynamic_ncols=True)
        self.show, self.tokens, self.seconds, self.times = show, 0, 0.0, []
        self.heldout, self.last = None, {}

    def update(self, rec: dict, dt: float) -> None:
        self.tokens, self.seconds, self.last = self.tokens + rec["tokens"], self.seconds + dt, rec
        self.times.append(dt)
        self.bar.update(1)
        post = {"loss": f"{rec['main_loss']:.3f}", "tok/s": f"{self.tokens_per_s:.0f}"}
        if self.heldout is not None:
            post["heldout"] = f"{self.heldout:.3f}"
        self.bar.set_postfix(post, refresh=False)

    def note(self, step: int, heldout: float) -> None:
        self.heldout = heldout
        if self.show:
            line = f"step {step}: held-out loss {heldout:.4f}"
            if self.last:
                line += f" | train loss {self.last['main_loss']:.4f} | {self.tokens_per_s:.0f} tok/s"
            self.bar.write(line) if not self.bar.disable else print(line, flush=True)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def median_step_s(self) -> float:
        return sorted(self.times)[len(self.times) // 2] if self.times else 1.0

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def balance_summary(recs: list[dict], tail: float = 0.1) -> dict:
    """MaxVio per layer and mean, averaged over the last `tail` of the training steps."""
    train = [r for r in recs if r.get("maxvio")]
    if not train:
        return {}
    last = train[-max(1, int(len(train) * tail)):]
    per_layer = {k: sum(r["maxvio"][k] for r in last) / len(last) for k in last[0]["maxvio"]}
    return {"maxvio_final": per_layer, "maxvio_final_mean": sum(per_layer.values()) / len(per_layer),
            "maxvio_first_mean": train[0]["maxvio_mean"]}


def finish(args, model, tok, dist, bar: Progress, flops_per_token: float, heldout_loss, stage: str) -> dict | None:
    """Save the final model to out/model, write summary.json (speed, MFU, losses, balance), plot."""
    msd, _ = _full_state(model, None, dist)
    if not dist.is_main:
        return None
    from nanoseek.bench.common import matmul_peak_gflops
    recs = read_metrics(args.out)
    train_recs = [r for r in recs if "main_loss" in r]
    tail = train_recs[-max(1, len(train_recs) // 20):] if train_recs else []
    peak = matmul_peak_gflops(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    achieved = flops_per_token * bar.tokens_per_s / 1e9 if bar.tokens else 0.0
    summary = {"stage": stage, "steps": train_recs[-1]["step"] + 1 if train_recs else 0,
               "tokens_this_session": bar.tokens, "train_seconds_this_session": round(bar.seconds, 2),
               "tokens_per_s": round(bar.tokens_per_s, 1), "world_size": dist.world,
               "precision": args.precision, "flops_per_token": flops_per_token,
               "achieved_gflops": round(achieved, 2),
               f"peak_matmul_gflops_{'bf16' if args.precision == 'bf16' else 'fp32'}": round(peak, 1),
               "mfu": round(achieved / peak, 4) if peak else None,
               "final_heldout_loss": heldout_loss,
               "final_train_loss": sum(r["main_loss"] for r in tail) / len(tail) if tail else None,
               "gamma": args.gamma, "alpha": args.alpha, "mtp_weight": args.mtp_weight,
               **balance_summary(recs)}
    for k in range(1, 8):
        if tail and f"mtp{k}_loss" in tail[-1]:
            summary[f"final_mtp{k}_loss"] = sum(r[f"mtp{k}_loss"] for r in tail) / len(tail)

    def write_extra(tmp: str) -> None:
        with open(os.path.join(tmp, "nanoseek.json"), "w") as f:
            json.dump({**summary, "args": vars(args)}, f, indent=1, sort_keys=True)

    save_pretrained(plain_model(model, msd), os.path.join(args.out, "model"), tokenizer=tok, write_extra=write_extra)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    if not args.no_plots and train_recs:
        plot_metrics(args.out)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}), flush=True)
    return summary
