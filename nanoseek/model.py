"""The decoder: embed → blocks → norm → head, plus MTP modules. Owns no runtime state.

    model(input_ids, positions=None, cache=None) -> ModelOutput(logits, mtp_logits, router_stats, hidden)

One class serves DeepSeek-V3 (MLA + dense-then-MoE FFNs + MTP) and the dense students (GQA +
SwiGLU), chosen by `config.model_type`. The caller owns the KV cache (cache.py documents the
protocol); the model only calls cache.begin / update / commit. It knows nothing of precision,
parallelism or training: FP8 and FSDP wrap a built model from outside, balancing and losses are
pure functions over `router_stats` and the logits.

Block (pre-norm, V3 `Block`): x += attn(input_layernorm(x)); x += ffn(post_attention_layernorm(x)).
Module names are transformers' (embed_tokens, layers.i.self_attn…, norm, lm_head) so the HF
mapping (hf.py) is the identity except for the stacked experts and the MTP modules.

`mtp_logits` are computed when `mtp=True` (default: in training mode, without a cache): depth k
gives [B, T−k, V] where position i predicts token i+k+1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.attention import GQAttention
from nanoseek.config import ModelConfig
from nanoseek.layers import MLP, RMSNorm, run_linear
from nanoseek.mla import MLA
from nanoseek.moe import MoE, Router, Experts, RouterStats
from nanoseek.mtp import MTPModule
from nanoseek.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor                                      # [B, T, V]
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    router_stats: list[RouterStats] = field(default_factory=list)  # per MoE layer: load, scores
    hidden: torch.Tensor | None = None                        # final normed hidden [B, T, D]

    def expert_load(self) -> torch.Tensor:
        """Tokens per expert per MoE layer [n_moe_layers, E]."""
        return torch.stack([s.counts for s in self.router_stats])


class StatsSink:
    """Collects RouterStats during one forward. Not a list on purpose: FSDP2's pre-forward hook
    rebuilds list arguments that hold grad-requiring tensors, so appends made inside a sharded
    block would land in a copy and be lost (tests/test_distributed.py runs FSDP2)."""

    def __init__(self):
        self.items: list[RouterStats] = []

    def append(self, s: RouterStats) -> None:
        self.items.append(s)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx) if cfg.is_mla else GQAttention(cfg, layer_idx)
        self.mlp = MoE(cfg, layer_idx) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache=None, batch=None, stats=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, batch)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, stats) if isinstance(self.mlp, MoE) else self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n_mtp = cfg.num_nextn_predict_layers if cfg.is_mla else 0
        N = cfg.num_hidden_layers  # MTP blocks are MoE and use cache layer ids N, N+1, …
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, N + k, bool(cfg.n_routed_experts))) for k in range(n_mtp))
        rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.attn_head_dim
        self.rotary = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling)
        init_weights(self, cfg.initializer_range)

    def num_cache_layers(self, with_mtp: bool = False) -> int:
        return self.config.num_hidden_layers + (len(self.mtp) if with_mtp else 0)

    def forward_hidden(self, input_ids, positions=None, cache=None, stats=None):
        """Run embed → blocks → norm. Returns (hidden [B, T, D], positions, cos, sin)."""
        B, T = input_ids.shape
        batch = cache.begin((B, T)) if cache is not None else None
        if positions is None:
            positions = batch.positions if batch is not None else torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, batch, stats)
        if cache is not None:
            cache.commit(batch)
        return self.norm(x), cos, sin

    def forward(self, input_ids, positions=None, cache=None, mtp: bool | None = None) -> ModelOutput:
        stats = StatsSink()
        hidden, cos, sin = self.forward_hidden(input_ids, positions, cache, stats)
        out = ModelOutput(logits=run_linear(self.lm_head, hidden), router_stats=stats.items, hidden=hidden)
        if mtp is None:
            mtp = self.training and cache is None
        if mtp and len(self.mtp):
            if cache is not None:
                raise ValueError("mtp=True computes training MTP logits and takes no cache")
            emb, h = self.embed_tokens(input_ids), hidden
            for k, module in enumerate(self.mtp, start=1):
                Tk = input_ids.shape[1] - k
                if Tk <= 0:
                    break
                h = module(h[:, :Tk], emb[:, k:], cos[:, k:], sin[:, k:], stats=stats)
                out.mtp_logits.append(run_linear(self.lm_head, h))
        return out


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) for every matrix (V3 used 0.006 at scale), zero biases and router bias, unit norms."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Experts):
            nn.init.normal_(m.gate_up_proj, 0.0, std)
            nn.init.normal_(m.down_proj, 0.0, std)
        elif isinstance(m, Router):
            nn.init.normal_(m.weight, 0.0, std)
            m.e_score_correction_bias.zero_()
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


def build_model(cfg: ModelConfig, dtype: torch.dtype | None = None) -> Transformer:
    model = Transformer(cfg)
    if dtype is not None:
        model = cast_model(model, dtype)
    return model


def cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast parameters to dtype; the router bias stays fp32 (V3 keeps gating in high precision)."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Router):
            m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
    return model


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and activated parameters from the config alone (no tensors are built).

    Every tensor a checkpoint holds is counted (norms, router bias). Activated = what one token
    touches: embedding and head, all attention and norms, dense MLPs, and per MoE layer the router,
    its bias, the shared experts and top-k routed experts. With MTP, total adds every tensor of the
    MTP layers as the released checkpoint stores them (incl. their copies of embedding and head),
    activated adds the MTP module's own weights (its embedding and head are the main model's).
    """
    D, V = cfg.hidden_size, cfg.vocab_size
    emb = V * D
    head = 0 if cfg.tie_word_embeddings else V * D
    attn = _attention_params(cfg) + 2 * D  # + the two block norms
    E, expert = cfg.n_routed_experts or 0, 3 * D * cfg.moe_intermediate_size
    moe_fixed = E * (D + 1) + cfg.n_shared_experts * expert   # router + its bias + shared experts
    total = emb + head + D
    active = total
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            total += attn + moe_fixed + E * expert
            active += attn + moe_fixed + cfg.num_experts_per_tok * expert
        else:
            total += attn + 3 * D * cfg.intermediate_size
            active += attn + 3 * D * cfg.intermediate_size
    n_mtp = cfg.num_nextn_predict_layers if cfg.is_mla else 0
    mtp_own = 2 * D * D + 3 * D  # eh_proj, enorm, hnorm, shared_head.norm
    mtp_total = n_mtp * (mtp_own + attn + moe_fixed + E * expert + emb + V * D)
    mtp_active = n_mtp * (mtp_own + attn + moe_fixed + cfg.num_experts_per_tok * expert)
    return {"total": total, "activated": active, "total_with_mtp": total + mtp_total,
            "activated_with_mtp": active + mtp_active}


def _attention_params(cfg: ModelConfig) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if not cfg.is_mla:
        d, kv = cfg.attn_head_dim, cfg.kv_heads
        n = D * H * d + 2 * D * kv * d + H * d * D
        if cfg.model_type == "qwen2":
            n += H * d + 2 * kv * d
        elif cfg.attention_bias:
            n += H * d + 2 * kv * d + D
        return n
    qk = cfg.qk_head_dim
    q = D * H * qk if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = H * cfg.v_head_dim * D
    bias = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim + D if cfg.attention_bias else 0
    return q + kv + o + bias
