"""torch.distributed for the training stages: one code path for 1 process and for torchrun.

    dist = distributed.init()                 # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model = distributed.wrap(model, dist, "ddp" | "fsdp")
    with distributed.grad_sync(model, last_micro_batch): loss.backward()
    dist.all_reduce_sum(tensor); dist.print0(...)

Backend: gloo on CPU, nccl on CUDA (`init` picks by device). A single process (no WORLD_SIZE or
WORLD_SIZE=1) never touches torch.distributed, so the stages run unchanged on a laptop.

Wrapping is from outside (STYLE 2): the model is built and (optionally) FP8-converted first.
  ddp   DistributedDataParallel with broadcast_buffers=False: the only mutable buffer is the
        router's e_score_correction_bias, and every rank already moves it by the same sign step
        from all-reduced expert loads (train/step.py), so re-broadcasting it each forward would only
        cost time. find_unused_parameters=False: experts are stacked tensors, so every parameter
        gets a gradient each step, even an expert that received no token.
  fsdp  FSDP2 `fully_shard` on every decoder block (main and MTP), then on the root: parameters
        become DTensor shards; full state dicts for checkpoints are gathered through
        torch.distributed.checkpoint.state_dict (train/step.py).
Gradient accumulation: DDP skips its all-reduce inside `no_sync`, FSDP2 with
`set_requires_gradient_sync(False)`; `grad_sync(model, last)` picks the right one.

Measured (cpu_facts §5): gloo DDP and FSDP2 both run with 2 CPU ranks; on 2 cores 2 ranks give no
speed-up over 1 process with 2 threads (torchrun sets OMP_NUM_THREADS=1 per rank): the CPU use is
testing the code path — tests/train/test_distributed.py checks 2 ranks == 1 process.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (identity in a single process)."""
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def print0(self, *args, **kw) -> None:
        if self.is_main:
            file = kw.pop("file", sys.stdout)
            print(*args, file=file, flush=True, **kw)


def init(device: str | None = None) -> Dist:
    """Join the process group torchrun set up (if any); pick the device (cuda:local_rank or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def shutdown(dist: Dist) -> None:
    """Leave the group after every rank has finished its last collective (a barrier first: gloo
    work still in flight when the group is destroyed can deadlock the teardown)."""
    if dist.enabled and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def wrap(model: nn.Module, dist: Dist, mode: str = "ddp") -> nn.Module:
    """Data-parallel wrapper for `dist.world` ranks ("ddp" or "fsdp"); identity in one process."""
    if not dist.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DDP(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=False)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in list(model.layers) + [m.block for m in getattr(model, "mtp", [])]:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}; choose ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 shards in place and keeps the class)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "config") else model


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync") and not hasattr(model, "no_sync")


def reshard(model: nn.Module) -> None:
    """FSDP2: free unsharded parameters left by a forward without backward (evaluation); the root
    does not reshard after its forward, and until it does, `named_parameters()` yields the
    unsharded tensors instead of the sharded ones the optimizer holds. No-op otherwise."""
    if is_fsdp(model):
        for m in model.modules():
            if hasattr(m, "reshard") and hasattr(m, "set_requires_gradient_sync"):
                m.reshard()


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only if `sync`."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):                      # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()
