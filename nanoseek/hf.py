"""Key mapping between nanoseek's state dict and transformers' DeepseekV3 / Qwen2 / Llama layouts.

nanoseek names its modules as transformers does, so the table is short:

  nanoseek                                 checkpoint (HF / released V3)
  embed_tokens.weight                      model.embed_tokens.weight
  layers.{i}.<rest>                        model.layers.{i}.<rest>
  layers.{i}.mlp.experts.gate_up_proj      model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight  (split)
  layers.{i}.mlp.experts.down_proj         model.layers.{i}.mlp.experts.{e}.down_proj.weight       (split)
  norm.weight                              model.norm.weight
  lm_head.weight                           lm_head.weight               (absent when tied)
  mtp.{k}.{enorm,hnorm,eh_proj}.weight     model.layers.{N+k}.{enorm,hnorm,eh_proj}.weight
  mtp.{k}.norm.weight                      model.layers.{N+k}.shared_head.norm.weight
  mtp.{k}.block.<rest>                     model.layers.{N+k}.<rest>
  (embed / head, shared)                   model.layers.{N+k}.embed_tokens.weight, .shared_head.head.weight

N = num_hidden_layers. The MTP copies of embedding and head are written (as the released V3
checkpoint has them) and on load must equal the main ones; nanoseek shares one tensor.
Released FP8 weights come with `<name>_scale_inv` (128×128 block scales): `fp8.dequantize_blocks`
turns them into dense weights on load.
"""
from __future__ import annotations

import re

import torch

_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_HF_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")


def to_hf(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """nanoseek state dict -> checkpoint tensors (HF names, per-expert 2-D weights, MTP as layers N+k)."""
    N = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[key] = t
            continue
        if key.startswith("mtp."):
            _, k, rest = key.split(".", 2)
            prefix = f"model.layers.{N + int(k)}."
            if rest == "norm.weight":
                name = prefix + "shared_head.norm.weight"
            elif rest in MTP_OWN:
                name = prefix + rest
            else:
                name = prefix + rest.removeprefix("block.")
        else:
            name = "model." + key
        m = _EXPERTS.match(name)
        if m is None:
            out[name] = t
            continue
        base, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = t[e]
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"] = gate
                out[f"{base}.{e}.up_proj.weight"] = up
    for k in range(len([1 for key in state if key.startswith("mtp.") and key.endswith(".eh_proj.weight")])):
        out[f"model.layers.{N + k}.embed_tokens.weight"] = state["embed_tokens.weight"]
        out[f"model.layers.{N + k}.shared_head.head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(tensors: dict[str, torch.Tensor], cfg,
            where: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint tensors -> (nanoseek state dict, problems). MTP copies of embed/head are checked
    against the main ones and dropped; per-expert weights are stacked. Problems name tensors as the
    checkpoint does, with their file when `where` (name -> file) is given."""
    N = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    hf_base: dict[str, str] = {}  # stacked key prefix -> its checkpoint spelling, for messages
    copies: list[tuple[str, str]] = []
    problems: list[str] = []
    for name, t in tensors.items():
        key = name
        if name.startswith("model.layers."):
            idx, rest = name[len("model.layers."):].split(".", 1)
            if int(idx) >= N:  # an MTP module
                k = int(idx) - N
                if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                    copies.append((name, "embed_tokens.weight" if rest.startswith("embed") else "lm_head.weight"))
                    continue
                if rest == "shared_head.norm.weight":
                    key = f"mtp.{k}.norm.weight"
                elif rest in MTP_OWN:
                    key = f"mtp.{k}.{rest}"
                else:
                    key = f"mtp.{k}.block.{rest}"
            else:
                key = f"layers.{idx}.{rest}"
        elif name.startswith("model."):
            key = name[len("model."):]
        m = _HF_EXPERT.match(key)
        if m:
            base, e, kind = m.groups()
            experts.setdefault(base, {}).setdefault(int(e), {})[kind] = t
            hf_base[base] = _HF_EXPERT.match(name).group(1)
            continue
        out[key] = t
    for base, per in experts.items():
        n = max(per) + 1
        lost = [f"{hf_base[base]}.{e}.{kind}.weight" for e in range(n)
                for kind in ("gate_proj", "up_proj", "down_proj") if kind not in per.get(e, {})]
        if lost:
            problems.append("missing expert tensors: " + ", ".join(lost[:12]) + (" …" if len(lost) > 12 else ""))
            continue
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in range(n)])
        out[f"{base}.down_proj"] = torch.stack([per[e]["down_proj"] for e in range(n)])
    if "lm_head.weight" not in out and cfg.tie_word_embeddings and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]

    def at(name: str) -> str:
        return f"{name} ({where[name]})" if where and name in where else name
    for name, main in copies:
        if main in out and (out[main].shape != tensors[name].shape or not torch.equal(out[main], tensors[name].to(out[main].dtype))):
            hf_main = main if main == "lm_head.weight" else "model." + main
            problems.append(f"{at(name)} differs from {at(hf_main)}: MTP modules must share the main model's "
                            f"embedding and head")
    return out, problems
