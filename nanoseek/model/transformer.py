"""The decoder: embed → blocks → norm → head, plus MTP modules. Owns no runtime state.

    model(input_ids, positions=None, cache=None, mtp=None, segments=None)
        -> ModelOutput(logits, mtp_logits, router_stats, hidden)

One class serves DeepSeek-V3 (MLA + dense-then-MoE FFNs + MTP) and the dense students (GQA +
SwiGLU), chosen by `config.model_type`. The caller owns the KV cache (model/cache.py documents the
protocol); the model only calls cache.begin / update / commit. It knows nothing of precision,
parallelism or training: FP8 and FSDP wrap a built model from outside, balancing and losses are
pure functions over `router_stats` and the logits.

Block (pre-norm, V3 `Block`): x += attn(input_layernorm(x)); x += ffn(post_attention_layernorm(x)).
Module names are transformers' (embed_tokens, layers.i.self_attn…, norm, lm_head) so the HF
mapping (hf.py) is the identity except for the stacked experts and the MTP modules.

`mtp_logits` are computed when `mtp` is True (all MTP modules) or an int D (the first D modules;
default: all in training mode without a cache, none otherwise): depth k gives [B, T−k, V] where
position i predicts token i+k+1.

`segments` [B, T] (training and prefill without a cache) packs several documents into a row:
attention stays within a document (block-diagonal causal) and positions restart at 0 for each,
so a packed row computes what its documents compute one by one (tests/model/test_documents.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.cache import document_starts
from nanoseek.model.fastpath import run_linear
from nanoseek.model.gqa import GQAttention
from nanoseek.model.mla import MLA
from nanoseek.model.mlp import MLP
from nanoseek.model.norm import RMSNorm
from nanoseek.model.moe import MoE, Router, Experts, RouterStats
from nanoseek.model.mtp import MTPModule
from nanoseek.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor                                      # [B, T, V]
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    router_stats: list[RouterStats] = field(default_factory=list)  # per MoE layer run: routing, scores
    hidden: torch.Tensor | None = None                        # final normed hidden [B, T, D]


class StatsSink:
    """Collects RouterStats during one forward. Not a list on purpose: FSDP2's pre-forward hook
    rebuilds list arguments that hold grad-requiring tensors, so appends made inside a sharded
    block would land in a copy and be lost (tests/train/test_distributed.py runs FSDP2)."""

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

    def forward(self, x, cos, sin, cache=None, batch=None, stats=None, segments=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, batch, segments)
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

    def forward_hidden(self, input_ids, positions=None, cache=None, stats=None, segments=None):
        """Run embed → blocks → norm. Returns (hidden [B, T, D], cos, sin)."""
        B, T = input_ids.shape
        if segments is not None and cache is not None:
            raise ValueError("segments pack documents for training and prefill without a cache")
        batch = cache.begin((B, T)) if cache is not None else None
        if positions is None:
            if batch is not None:
                positions = batch.positions
            elif segments is not None:
                positions = segment_positions(segments)
            else:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, batch, stats, segments)
        if cache is not None:
            cache.commit(batch)
        return self.norm(x), cos, sin

    def forward(self, input_ids, positions=None, cache=None, mtp: bool | int | None = None,
                segments=None) -> ModelOutput:
        stats = StatsSink()
        hidden, cos, sin = self.forward_hidden(input_ids, positions, cache, stats, segments)
        out = ModelOutput(logits=run_linear(self.lm_head, hidden), router_stats=stats.items, hidden=hidden)
        if mtp is None:
            mtp = self.training and cache is None
        depth = len(self.mtp) if mtp is True else min(int(mtp), len(self.mtp))
        if depth:
            if cache is not None:
                raise ValueError("mtp computes training MTP logits and takes no cache")
            emb, h = self.embed_tokens(input_ids), hidden
            for k, module in enumerate(self.mtp[:depth], start=1):
                Tk = input_ids.shape[1] - k
                if Tk <= 0:
                    break
                seg = None if segments is None else mtp_segments(segments, k)
                h = module(h[:, :Tk], emb[:, k:], cos[:, k:], sin[:, k:], stats=stats, segments=seg)
                out.mtp_logits.append(run_linear(self.lm_head, h))
        return out


def mtp_segments(segments: torch.Tensor, k: int) -> torch.Tensor:
    """Documents of MTP depth k's positions i (h_i with token i+k): the document when both lie in
    it, else a segment of its own (−2 − i), so a position straddling two documents (its target is
    never counted) attends to nothing but itself and no document sees it.

    >>> mtp_segments(torch.tensor([[0, 0, 0, 1, 1]]), 1).tolist()
    [[0, 0, -4, 1]]
    """
    Tk = segments.shape[1] - k
    lone = -2 - torch.arange(Tk, device=segments.device)
    return torch.where(segments[:, :Tk] == segments[:, k:], segments[:, k:], lone)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] document numbers (contiguous runs) -> position of each token within its document.

    >>> segment_positions(torch.tensor([[0, 0, 0, 1, 1, -1]])).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    return idx - document_starts(segments)


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
