"""One optimizer step with V3's balancing, and the held-out loss.

A step runs this rank's micro-batches forward and backward, clips, steps AdamW, then moves the
router biases. The loss terms (losses.py) are sums over the step's tokens divided by the *global*
count (all micro-batches, all ranks; one all-reduce of a few numbers before the forward), and each
rank's loss is multiplied by the world size because DDP averages gradients: so N ranks ×
micro-batches compute exactly the gradient of one process on the same global batch
(tests/train/test_distributed.py).

Auxiliary-loss-free balancing (V3 §2.1.2): the expert loads of the step (tokens routed to each
expert, real tokens only, summed over micro-batches and all-reduced over ranks) drive
model.moe.bias_update — b_i += γ·sign(mean load − load_i) — after the optimizer step, identically
on every rank; the bias is a buffer and gets no gradient. Per MoE layer (the MTP blocks that run
included) we log MaxVio = max_i load_i / mean load − 1 (the Loss-Free Balancing paper's measure;
0 = perfect). γ = 0 or α = 0 switches either off.

MTP: the model runs exactly `mtp_depth` MTP modules (any depth up to what it has; a model with
more modules than the trained depth leaves the rest untouched and out of the balance statistics).
"""
from __future__ import annotations

import contextlib

import torch

from nanoseek.data.packing import Batch, eval_batches, step_batches
from nanoseek.model.moe import MoE, bias_update
from nanoseek.train import distributed
from nanoseek.train.config import TrainConfig
from nanoseek.train.flops import flops_per_token
from nanoseek.train.loop import Stage
from nanoseek.train.losses import expert_load, lm_loss_sums, masked_sequence_balance_loss, max_violation, stats_valid


def routers_of(model) -> dict[int, torch.nn.Module]:
    """MoE layer id -> its Router (main layers 0..N-1, MTP blocks N, N+1, …)."""
    return {m.layer_idx: m.gate for m in distributed.unwrap(model).modules() if isinstance(m, MoE)}


def layer_labels(model, layers: list[int]) -> list[str]:
    N = distributed.unwrap(model).config.num_hidden_layers
    return [f"L{i}" if i < N else f"MTP{i - N + 1}" for i in layers]


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _model_inputs(b: Batch) -> dict:
    return {"segments": b.input_segments} if b.segments is not None else {}


def train_step(model, batches: list[Batch], optimizer, cfg: TrainConfig, dist, mtp_depth: int) -> dict:
    """Forward/backward over this rank's micro-batches, clip, AdamW, then the bias sign step."""
    D = mtp_depth if cfg.mtp_weight > 0 else 0
    routers = routers_of(model)
    N = distributed.unwrap(model).config.num_hidden_layers
    layers = [i for i in sorted(routers) if i < N + D]              # MTP blocks only when they run
    row = {layer: i for i, layer in enumerate(layers)}
    E, K = (routers[layers[0]].n_experts, routers[layers[0]].top_k) if layers else (1, 1)
    counts = sum(b.target_counts(D) for b in batches)
    norm = dist.all_reduce_sum(torch.cat([counts, torch.tensor([float(sum(len(b.tokens) for b in batches))])]))
    norm = norm.clamp(min=1)                                        # [main, depth 1..D, rows]
    weights = torch.cat([torch.ones(1), torch.full((D,), cfg.mtp_weight / max(D, 1))])
    sums = torch.zeros(D + 2)                                       # Σ CE main, depths, Σ L_Bal
    load = torch.zeros(len(layers), E)
    for i, b in enumerate(batches):
        with distributed.grad_sync(model, i == len(batches) - 1), autocast(cfg.precision):
            out = model(b.inputs, mtp=D, **_model_inputs(b))
            ce = lm_loss_sums(out, b, D)
            bal = torch.zeros(())
            if cfg.alpha > 0:
                bal = sum(masked_sequence_balance_loss(s, stats_valid(s, b.valid[:, :-1]), E, K, cfg.alpha).sum()
                          for s in out.router_stats)
            loss = (ce / norm[: D + 1] * weights).sum() + bal / norm[-1]
            (loss * dist.world).backward()
        sums += torch.cat([ce.detach(), torch.as_tensor(bal).detach().reshape(1)])
        for s in out.router_stats:
            load[row[s.layer]] += expert_load(s, b.valid[:, :-1], E)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = torch.tensor([float(sum(b.num_tokens for b in batches))])
    totals = dist.all_reduce_sum(torch.cat([sums, tokens, load.flatten()]))   # one all-reduce
    sums, tokens, load = totals[: D + 2], totals[D + 2], totals[D + 3:].view(len(layers), E)
    if cfg.gamma > 0:
        for li, layer in enumerate(layers):
            bias_update(routers[layer].e_score_correction_bias, load[li], cfg.gamma)
    losses = sums[: D + 1] / norm[: D + 1]
    vio = max_violation(load) if layers else torch.zeros(0)
    rec = {"loss": float((losses * weights).sum() + sums[-1] / norm[-1]),
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
            out = model(b.inputs, mtp=False, **_model_inputs(b))
        sums += torch.stack([lm_loss_sums(out, b, 0)[0], b.target_counts(0)[0]])
    distributed.reshard(model)
    model.train()
    sums = dist.all_reduce_sum(sums)
    return float(sums[0] / sums[1].clamp(min=1))


def lm_stage(name: str, cfg: TrainConfig, model, optimizer, dist, data, heldout, mtp_depth: int) -> Stage:
    """The loop's Stage for language-model training (pretrain, SFT, distillation's SFT): each step
    `train_step` over the rows [position, position + batch) of `data` (this rank's share), each
    evaluation the held-out loss over the first `cfg.eval_rows` rows of `heldout`."""
    micro = cfg.micro_rows(dist.world)
    evals = eval_batches(heldout, cfg.eval_rows, micro, dist.rank, dist.world)

    def step(_step: int, position: int) -> tuple[dict, int]:
        batches = step_batches(data, position, cfg.batch_size, micro, dist.rank, dist.world)
        return train_step(model, batches, optimizer, cfg, dist, mtp_depth), cfg.batch_size

    def heldout_loss(_step: int) -> dict:
        return {"heldout_loss": evaluate(model, evals, dist, cfg.precision)}

    mcfg = distributed.unwrap(model).config
    return Stage(name, step=step, evaluate=heldout_loss, epoch=data.epoch,
                 flops_per_token=flops_per_token(mcfg, cfg.seq_len, True, mtp_depth))
