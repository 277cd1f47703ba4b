"""Resumable checkpoints: a killed run continues from its last checkpoint, bit for bit.

Each checkpoint is an HF directory (checkpoint.save_pretrained: atomic and crash-safe) +
nanoseek.json (stage, step, total steps, data position, RNG state, metrics, the config, sha256 of
every file) + optimizer.pt (FQN-keyed, via torch.distributed.checkpoint.state_dict, so DDP, FSDP2
and single process read each other's). Saved as <out>/checkpoints/step_NNNNNN: each save is a
fresh directory renamed into place in one step, so a kill during a write leaves only a `.tmp-*`
sibling that resume ignores and removes; the last `keep` are kept. Resume refuses a checkpoint
whose files do not match their recorded sha256 (truncated, bit-flipped) with a message naming
the file (tests/train/test_resume.py kills runs with SIGKILL, mid-step and mid-write).

RNG: rank 0's state stands for all. Training draws its data order from (seed, position), and
every rank seeds alike; what else draws random numbers (RL sampling) draws from torch's global
generator, whose state is restored here.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil

import torch

from nanoseek.checkpoint import read_tensors, save_pretrained
from nanoseek.hf import from_hf
from nanoseek.train import distributed


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


def full_state(model, optimizer):
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
    msd, osd = full_state(model, optimizer)
    # RNG: rank 0's state stands for all (module docstring); gathering every rank's with an
    # all_gather_object made gloo's teardown deadlock now and then (a pickled-tensor work
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


