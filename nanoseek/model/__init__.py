"""The model layer: DeepSeek-V3 (MLA + DeepSeekMoE + MTP) and dense Qwen2/Llama students.

Imports only torch and `nanoseek.config` (an import contract in pyproject.toml, checked by
`make test`). One concept per file:
    rope       RoPE (interleaved and half-split) and YaRN      norm       RMSNorm
    fastpath   the oneDNN linear dispatch, fused projections    mlp        SwiGLU MLP
    gemv       few-row products at memory speed (a C kernel, gemv.c)
    mla        multi-head latent attention (naive, absorbed)   gqa        grouped-query attention
    moe        router, experts, balancing                      mtp        multi-token prediction
    cache      the model's cache protocol (the caller owns it)  params     parameter counts
    transformer  embed → blocks → norm → head + MTP
"""
from nanoseek.model.params import param_counts
from nanoseek.model.transformer import ModelOutput, Transformer, build_model, cast_model

__all__ = ["Transformer", "ModelOutput", "build_model", "cast_model", "param_counts"]
