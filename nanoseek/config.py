"""ModelConfig: one small dataclass for DeepSeek-V3 (MLA + DeepSeekMoE + MTP) and dense students.

Field names are transformers' own (`DeepseekV3Config`, `Qwen2Config`, `LlamaConfig`), so a
`config.json` written by transformers loads here key for key and ours loads there. `model_type`
picks the architecture:
  deepseek_v3   MLA attention, dense MLP in the first `first_k_dense_replace` layers, MoE after,
                `num_nextn_predict_layers` MTP modules (V3 §2.2)
  qwen2 / llama grouped-query attention (GQA), SwiGLU MLP; qwen2 has q/k/v biases, llama has
                `attention_bias` on all four projections

RoPE settings: transformers 5 writes one `rope_parameters` dict ({"rope_type", "rope_theta",
"factor", ...}); older versions wrote `rope_theta` + `rope_scaling` ({"type": "yarn", ...}). Both
are read; `to_hf_dict(style=...)` writes the style of the installed transformers ("v5" unless told
otherwise — the library never imports transformers to find out; `hf.py` callers may pass it).

Presets are functions (STYLE 7): `tiny()` is the CPU default (about 4M parameters with a 1k vocab),
`small()` ~12M for longer CPU runs, `v3_671b()` the official DeepSeek-V3 values (never built here,
only counted by `nanoseek params`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
# keys of rope_parameters that are not scaling settings
_ROPE_CORE = ("rope_type", "rope_theta")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512          # dense MLP width (dense layers; dense students)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # GQA students; MLA ignores it
    head_dim: int | None = None            # GQA students; default hidden_size // heads
    # --- MLA (V3 §2.1.1) ---
    q_lora_rank: int | None = 64           # None: a single q_proj (V2-Lite style)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_interleave: bool = True           # released V3 weights rotate interleaved pairs
    # --- DeepSeekMoE (V3 §2.1.2) ---
    moe_intermediate_size: int = 128
    n_routed_experts: int | None = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    # --- MTP (V3 §2.2) ---
    num_nextn_predict_layers: int = 1
    # --- shared ---
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # {"rope_type": "yarn", "factor": ..., ...} or None
    attention_bias: bool = False           # llama: all projections; deepseek_v3: q_a / kv_a
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, written back unchanged

    # ---------------------------------------------------------------- derived
    @property
    def is_mla(self) -> bool:
        return self.model_type == "deepseek_v3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        """Per-head dim of a GQA student."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def is_moe_layer(self, i: int) -> bool:
        """V3 rule: MoE iff routed experts exist, i >= first_k_dense_replace and i % freq == 0."""
        return (self.is_mla and bool(self.n_routed_experts) and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    def cache_width(self) -> int:
        """Values cached per token per layer: latent + rope key for MLA, K and V for GQA."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_heads * self.attn_head_dim

    def validate(self) -> "ModelConfig":
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"config.json: unknown model_type {self.model_type!r}; "
                             f"nanoseek knows {sorted(ARCHITECTURES)}")
        if self.is_mla and self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                raise ValueError("num_experts_per_tok exceeds the experts of the topk_group groups")
            if self.scoring_func != "sigmoid":
                raise ValueError(f"scoring_func={self.scoring_func!r}: only V3's sigmoid routing is implemented")
        if not self.is_mla and self.num_attention_heads % self.kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_type not in ("default", "yarn", "linear"):
            raise ValueError(f"rope type {self.rope_type!r} is not supported (default, linear, yarn)")
        return self

    # ---------------------------------------------------------------- HF interop
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        model_type = d.pop("model_type", None)
        if model_type not in ARCHITECTURES:
            raise ValueError(f"config.json: unknown model_type {model_type!r}; nanoseek knows {sorted(ARCHITECTURES)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_scaling", "model_type", "dtype"}
        kw: dict[str, Any] = {"model_type": model_type}
        # RoPE: transformers 5 `rope_parameters`, or older `rope_theta` + `rope_scaling`
        rope = dict(d.pop("rope_parameters", None) or {})
        legacy = d.pop("rope_scaling", None)
        if legacy:
            rope = {**legacy, **rope}
        theta = rope.pop("rope_theta", None) or d.pop("rope_theta", None)
        d.pop("rope_theta", None)
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        if theta is not None:
            kw["rope_theta"] = float(theta)
        if rope.get("rope_type", "default") != "default":
            kw["rope_scaling"] = rope
        dtype = d.pop("dtype", None) or d.pop("torch_dtype", None)
        d.pop("torch_dtype", None)
        if dtype:
            kw["dtype"] = str(dtype).replace("torch.", "")
        # defaults that differ between architectures when the key is absent
        if model_type != "deepseek_v3":
            kw.update(n_routed_experts=None, num_nextn_predict_layers=0, rope_interleave=False)
        if "q_lora_rank" in d and d["q_lora_rank"] in (0,):
            d["q_lora_rank"] = None  # the official 16B config writes 0 for "no query compression"
        extra = {}
        for k, v in d.items():
            if k in names:
                kw[k] = v
            else:
                extra[k] = v
        if model_type == "deepseek_v3" and "num_mtp_layers" in extra and "num_nextn_predict_layers" not in d:
            kw["num_nextn_predict_layers"] = extra.pop("num_mtp_layers")
        kw["extra"] = extra
        return cls(**kw).validate()

    def to_hf_dict(self, style: str = "v5") -> dict:
        """The config.json transformers writes for this architecture (style "v5" or "v4")."""
        d = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type}
        d.update(self.extra)
        skip = {"extra", "rope_theta", "rope_scaling", "dtype", "model_type"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                d[f.name] = getattr(self, f.name)
        if self.is_mla:
            for k in ("num_key_value_heads", "head_dim"):
                d.pop(k)
            d["num_key_value_heads"] = self.num_attention_heads
        else:
            for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                      "rope_interleave", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                      "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                      "first_k_dense_replace", "moe_layer_freq", "scoring_func", "num_nextn_predict_layers"):
                d.pop(k)
            d["num_key_value_heads"] = self.kv_heads
            d["head_dim"] = self.attn_head_dim
            if self.model_type == "qwen2":
                d.pop("attention_bias")
        if style == "v5":
            d["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
            d["dtype"] = self.dtype
        else:
            d["rope_theta"] = self.rope_theta
            d["rope_scaling"] = self.rope_scaling
            d["torch_dtype"] = self.dtype
        return d

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            with open(file) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: cannot read config ({e})") from e
        return cls.from_hf_dict(d)

    def replace(self, **kw) -> "ModelConfig":
        unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {', '.join(unknown)}; fields are "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **kw).validate()


# ------------------------------------------------------------------ presets
def tiny(vocab_size: int = 1024) -> ModelConfig:
    """The CPU default: hidden 256, 4 layers (1 dense + 3 MoE), 8 routed experts top-2 + 1 shared, one MTP module."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, moe_intermediate_size=128, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                       num_nextn_predict_layers=1, max_position_embeddings=2048).validate()


def small(vocab_size: int = 4096) -> ModelConfig:
    """~12M parameters, 8 layers: 16 routed experts in 4 groups (top-2 groups), top-4 + 1 shared."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=320, intermediate_size=768, num_hidden_layers=8,
                       num_attention_heads=6, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, moe_intermediate_size=96, n_routed_experts=16,
                       n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                       routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=1,
                       max_position_embeddings=4096).validate()


def v3_671b() -> ModelConfig:
    """The official DeepSeek-V3 / R1 configuration (Hub config.json)."""
    return ModelConfig(vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                       num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=2048, n_routed_experts=256,
                       n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                       routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3,
                       num_nextn_predict_layers=1, max_position_embeddings=163840,
                       rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                       dtype="bfloat16").validate()


def qwen2_tiny(vocab_size: int = 1024) -> ModelConfig:
    """A dense Qwen2-style student (R1-Distill layout): GQA 4 heads / 2 KV heads, qkv bias, tied embeddings."""
    return ModelConfig(model_type="qwen2", vocab_size=vocab_size, hidden_size=256, intermediate_size=640,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       n_routed_experts=None, num_nextn_predict_layers=0, tie_word_embeddings=True,
                       rope_interleave=False, max_position_embeddings=2048, rope_theta=10000.0).validate()


def r1_distill_qwen_1p5b() -> ModelConfig:
    """The shape of DeepSeek-R1-Distill-Qwen-1.5B (its Hub config.json): Qwen2, hidden 1536, 28 layers,
    12 heads / 2 KV heads of 128, intermediate 8960, vocab 151,936, untied head, qkv bias; 1.78B
    parameters. What a laptop runs: `nanoseek bench engine --preset r1_distill_qwen_1p5b`."""
    return ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                       n_routed_experts=None, num_nextn_predict_layers=0, tie_word_embeddings=False,
                       rope_interleave=False, max_position_embeddings=131072, rope_theta=10000.0,
                       rms_norm_eps=1e-6, bos_token_id=151646, eos_token_id=151643).validate()


PRESETS = {"tiny": tiny, "small": small, "v3_671b": v3_671b, "qwen2_tiny": qwen2_tiny,
           "r1_distill_qwen_1p5b": r1_distill_qwen_1p5b}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


def parse_value(text: str) -> Any:
    """A `--set` value: int, float, true/false/null (any case), a JSON list or object, else the string.

    >>> [parse_value(v) for v in ["128", "-1", "1e-3", "true", "False", "null", "[1, 2]", '{"a": 1}']]
    [128, -1, 0.001, True, False, None, [1, 2], {'a': 1}]
    >>> [parse_value(v) for v in ["float32", "nope", "-x", "", "tiny"]]
    ['float32', 'nope', '-x', '', 'tiny']
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false", "null", "none"):
        return {"true": True, "false": False}.get(lowered)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip().startswith(("[", "{")):
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"not valid JSON: {text!r} ({e})") from e
    return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["key=value", …] -> {key: parse_value(value)}; a clear error for a missing '=' or key.

    >>> parse_overrides(["hidden_size=128", "dtype=float32", "rope_scaling=null", "x="])
    {'hidden_size': 128, 'dtype': 'float32', 'rope_scaling': None, 'x': ''}
    """
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out
