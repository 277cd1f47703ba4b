"""Total and activated parameter counts from a config alone (no tensors are built).

`nanoseek params --preset v3_671b` gives 671,026,419,200 total and 37.55B activated, V3's figures
(tests/model/test_model.py checks the counts against built models).
"""
from __future__ import annotations

from nanoseek.config import ModelConfig


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
