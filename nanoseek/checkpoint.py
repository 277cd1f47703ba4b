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

Atomic write: everything goes to a sibling temporary directory, fsynced, then renamed over the
target (an existing target is first moved aside, and removed after the swap). A crash leaves
either the old directory or the new one, plus at most a stray `.tmp-*` sibling, never a half one.

Loading rules (each refusal names the file and the tensors or field):
  - unknown `model_type`, unreadable config.json or safetensors header -> ValueError
  - a deepseek_v3 directory without MTP tensors (transformers writes none) loads without MTP,
    with a warning
  - no `lm_head.weight` with `tie_word_embeddings` is expected (the head is the embedding)
  - anything else missing, unexpected or of the wrong shape -> ValueError listing them
  - FP8 weights with `weight_scale_inv` (the released V3 format) are dequantized (fp8.py)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from importlib import metadata

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.fp8 import dequantize_blocks
from nanoseek.hf import from_hf, to_hf
from nanoseek.model import Transformer
from nanoseek.rope import RotaryEmbedding

INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    try:
        _write_json(os.path.join(tmp, "config.json"), cfg_dict)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95}
        _write_json(os.path.join(tmp, "generation_config.json"), gen)
        _write_tensors(tmp, tensors, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
        _fsync_dir(tmp)
        _swap_in(tmp, path)
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


def _fsync_dir(dirname: str) -> None:
    for name in os.listdir(dirname):
        p = os.path.join(dirname, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _swap_in(tmp: str, path: str) -> None:
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=os.path.dirname(tmp))
        os.rmdir(old)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


# ------------------------------------------------------------------ load
def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or index + shards)."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{index}: unreadable index ({e})") from e
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path}: no model.safetensors or {INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        file = os.path.join(path, fname)
        try:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for bad headers / truncation
            raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return _dequantize_fp8(tensors)


def _dequantize_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name in [k for k in tensors if k.endswith("_scale_inv")]:
        weight = name[: -len("_scale_inv")]
        if weight in tensors:
            tensors[weight] = dequantize_blocks(tensors[weight], tensors.pop(name), dtype=torch.bfloat16)
    return tensors


def load_pretrained(path: str, dtype: torch.dtype | str | None = None) -> Transformer:
    cfg = ModelConfig.load(path)
    tensors = read_tensors(path)
    N = cfg.num_hidden_layers
    if cfg.is_mla and cfg.num_nextn_predict_layers and not any(
            k.startswith(f"model.layers.{N}.") for k in tensors):
        warnings.warn(f"{path}: no MTP tensors (model.layers.{N}.*); loading without MTP modules", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    state, problems = from_hf(tensors, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and state[k].shape != v.shape)
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            problems.append(f"{len(items)} {label} tensor(s): " + ", ".join(items[:12]) + (" …" if len(items) > 12 else ""))
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
