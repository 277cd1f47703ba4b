"""Checkpoints are Hugging Face model directories, written atomically.

    save_pretrained(model, path, tokenizer=None, write_extra=None)
    load_pretrained(path, dtype=None) -> Transformer

A directory holds `config.json` (transformers' keys for deepseek_v3 / qwen2 / llama),
`model.safetensors` (or shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
when larger than `max_shard_bytes`), `generation_config.json` (R1's T = 0.6, top-p 0.95) and, when
given, the tokenizer files. Training adds its resume state through `write_extra(tmp_dir)` so that
everything lands in one rename. So a nanoseek checkpoint loads in transformers' AutoModel as it
is, and a transformers / released DeepSeek directory loads here — with safetensors and json only,
never transformers.

Atomic write: everything goes to a sibling `.tmp-<name>-*` directory; every file and directory
in it is fsynced; an existing target is renamed aside to `.old-<name>`, the temporary one renamed
to the target, the parent fsynced after each rename, and the aside copy removed. Two renames leave
a window with no directory at the path, so `recover(path)` (run by load_pretrained, read_tensors
and the next save_pretrained) renames `.old-<name>` back when the path is missing. Killed at any
point, the path thus loads as the old checkpoint or the new one (or, for a first save, is absent),
plus at most stray `.tmp-*` / `.old-*` siblings, never a half one. `crash_hook` is the test hook:
called with each step's name ("tensors", "written", "aside", "swapped", "synced"), it lets
tests/test_checkpoint_crash.py SIGKILL a save there.

Loading rules (each refusal names the file and the tensors or field, as the checkpoint spells them):
  - unknown `model_type`, unreadable config.json or safetensors header -> ValueError
  - a deepseek_v3 directory without MTP tensors (transformers writes none) loads without MTP,
    with a warning
  - no `lm_head.weight` with `tie_word_embeddings` is expected (the head is the embedding)
  - anything else missing, unexpected or of the wrong shape -> ValueError listing each checkpoint
    key with its file (for a missing one: the shard the index names, or the single file)
  - FP8 weights with `weight_scale_inv` (the released V3 format) are dequantized (precision/fp8.py)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from importlib import metadata
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.precision.fp8 import dequantize_blocks
from nanoseek.hf import from_hf, to_hf
from nanoseek.model import Transformer
from nanoseek.model.rope import RotaryEmbedding

INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Test hook, None in use: called with the name of each step of a save (see the module docstring).
crash_hook: Callable[[str], None] | None = None


def _step(point: str) -> None:
    if crash_hook is not None:
        crash_hook(point)


def hf_config_style() -> str:
    """Write config.json as the installed transformers does ("v5" also when none is installed)."""
    try:
        return "v4" if int(metadata.version("transformers").split(".")[0]) < 5 else "v5"
    except metadata.PackageNotFoundError:
        return "v5"


# ------------------------------------------------------------------ save
def save_pretrained(model: Transformer, path: str, tokenizer=None, write_extra=None,
                    max_shard_bytes: int = 4 << 30) -> str:
    cfg = model.config
    dtype = next(model.parameters()).dtype
    cfg_dict = cfg.to_hf_dict(hf_config_style())
    cfg_dict["dtype" if "dtype" in cfg_dict else "torch_dtype"] = str(dtype).replace("torch.", "")
    if cfg.is_mla:
        cfg_dict["num_nextn_predict_layers"] = len(model.mtp)
    tensors = to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)
    target = os.path.abspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    recover(target)  # an earlier save killed between its renames: its old copy is the one to replace
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(target)}-", dir=os.path.dirname(target))
    try:
        _write_json(os.path.join(tmp, "config.json"), cfg_dict)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95}
        _write_json(os.path.join(tmp, "generation_config.json"), gen)
        _write_tensors(tmp, tensors, max_shard_bytes)
        _step("tensors")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
        _fsync_tree(tmp)
        _step("written")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_tensors(dirname: str, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    storages: set[int] = set()
    for name in sorted(tensors):
        t = tensors[name]
        storage = t.untyped_storage()
        if storage.data_ptr() in storages or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses shared storage: expert slices, the MTP copies of embed/head
        storages.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(dirname, "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(dirname, fname), metadata=meta)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    _write_json(os.path.join(dirname, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(file: str, obj) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _fsync_tree(dirname: str) -> None:
    """fsync every file, then every directory (children first), so that the renames below publish
    data that is on disk, not in the page cache."""
    for root, dirs, files in os.walk(dirname, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(dirname: str) -> None:
    fd = os.open(dirname, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _aside(path: str) -> str:
    """Where an overwrite parks the previous checkpoint: one fixed name, so recovery is unambiguous."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".old-{os.path.basename(path)}")


def _swap_in(tmp: str, path: str) -> None:
    parent, old = os.path.dirname(path), _aside(path)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)  # left by a save killed after its swap; path is whole
        os.rename(path, old)
        _fsync_dir(parent)  # the aside copy is durable before the path can go missing on disk
        _step("aside")
    os.rename(tmp, path)
    _step("swapped")
    _fsync_dir(parent)
    _step("synced")
    if os.path.exists(old):
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)


def recover(path: str) -> str:
    """The directory to read `path` from. When a save was killed between its two renames, `path`
    is missing and the previous checkpoint, complete, sits at `.old-<name>`: rename it back (or, on
    a read-only filesystem, return it). The `.tmp-*` sibling may be half written and is never used."""
    old = _aside(path)
    if os.path.exists(path) or not os.path.isdir(old):
        return path
    warnings.warn(f"{path}: missing after an interrupted save; restoring the previous checkpoint from {old}",
                  stacklevel=3)
    try:
        os.rename(old, path)
        _fsync_dir(os.path.dirname(old))
    except OSError:
        if not os.path.exists(path):  # cannot rename (read-only) and no concurrent recovery did
            return old
    return path


# ------------------------------------------------------------------ load
def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or index + shards)."""
    return _read(recover(path))[0]


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, file of each name): the file holding it, or the one the index assigns it to."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                where = dict(json.load(f)["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: unreadable index ({e})") from e
        files = sorted(set(where.values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        where, files = {}, ["model.safetensors"]
    else:
        raise ValueError(f"{path}: no model.safetensors or {INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        file = os.path.join(path, fname)
        try:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
                    where[k] = fname
        except Exception as e:  # safetensors raises its own error types for bad headers / truncation
            raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return _dequantize_fp8(tensors), where


def _dequantize_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name in [k for k in tensors if k.endswith("_scale_inv")]:
        weight = name[: -len("_scale_inv")]
        if weight in tensors:
            tensors[weight] = dequantize_blocks(tensors[weight], tensors.pop(name), dtype=torch.bfloat16)
    return tensors


def load_pretrained(path: str, dtype: torch.dtype | str | None = None) -> Transformer:
    path = recover(path)
    cfg = ModelConfig.load(path)
    tensors, where = _read(path)
    N = cfg.num_hidden_layers
    if cfg.is_mla and cfg.num_nextn_predict_layers and not any(
            k.startswith(f"model.layers.{N}.") for k in tensors):
        warnings.warn(f"{path}: no MTP tensors (model.layers.{N}.*); loading without MTP modules", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    problems = check_tensors(tensors, where, cfg, model)
    if not problems:  # names and shapes agree, so stacking experts cannot fail
        state, problems = from_hf(tensors, cfg, where)
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json — " + "; ".join(problems))
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    target = target or DTYPES.get(cfg.dtype, torch.float32)
    state = {k: (v.to(target) if v.is_floating_point() and not k.endswith("e_score_correction_bias")
                 else v.float() if k.endswith("e_score_correction_bias") else v) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.attn_head_dim
    model.rotary = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling)  # its buffer is not saved
    return model.eval()


def check_tensors(tensors: dict[str, torch.Tensor], where: dict[str, str], cfg, model=None) -> list[str]:
    """Missing, unexpected and mis-shaped tensors, compared in the checkpoint's own names (the
    expected ones are `to_hf` of a meta model), each with its file: `where` from the index or the
    files read; a name neither lists is in the single `model.safetensors`, or absent from the index."""
    if model is None:
        with torch.device("meta"):
            model = Transformer(cfg)
    expected = {k: v.shape for k, v in to_hf(model.state_dict(), cfg).items()}
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # some tied checkpoints keep it
    default = "model.safetensors" if set(where.values()) <= {"model.safetensors"} else f"not in {INDEX}"

    def at(name: str) -> str:
        return f"{name} ({where.get(name, default)})"
    missing = sorted(at(k) for k in expected.keys() - tensors.keys())
    unexpected = sorted(at(k) for k in tensors.keys() - expected.keys() - optional)
    shapes = sorted(f"{at(k)}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k])}"
                    for k in expected.keys() & tensors.keys() if tensors[k].shape != expected[k])
    return [f"{len(items)} {label} tensor(s): " + ", ".join(items[:12]) + (" …" if len(items) > 12 else "")
            for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if items]


def resolve_model_dir(path: str) -> str:
    """`path` itself when it holds config.json, else its model/ (a run directory's final model)."""
    nested = os.path.join(path, "model")
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(nested, "config.json")):
        return nested
    return path
