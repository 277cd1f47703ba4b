"""Parity with transformers' own DeepseekV3 / Qwen2 / Llama on random O(1)-logit weights.

Both directions: transformers writes (save_pretrained) and nanoseek loads; nanoseek writes and
transformers loads. Tolerance: max |Δlogit| ≤ 1e-4 · max(1, max |logit|) in fp32.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanoseek import load_pretrained, save_pretrained  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from tests.helpers import max_rel_diff, randomize_  # noqa: E402

TOL = 1e-4
BASE_V3 = dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
               num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
               num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=2.5,
               norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)

V3_CASES = {
    "base": {},
    "q_lora_none": dict(q_lora_rank=None),
    "groups_limited": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "no_norm_topk": dict(norm_topk_prob=False, routed_scaling_factor=1.0),
    "all_moe_shared2": dict(first_k_dense_replace=0, n_shared_experts=2),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                  "mscale": 0.707, "mscale_all_dim": 1.0}),
    "yarn_no_mscale": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                            "original_max_position_embeddings": 16}),
    "no_rope_interleave": dict(rope_interleave=False),
}


def _ids(vocab: int, B: int = 2, T: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_to_nanoseek(hf_model, tmp_path, T=40):
    randomize_(hf_model).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(str(tmp_path / "hf"))
    ids = _ids(hf_model.config.vocab_size, T=T)
    with torch.no_grad():
        ref, got = hf_model(ids).logits, ours(ids).logits
    assert ref.abs().max() > 1.0, "weights should give O(1) logits"
    return max_rel_diff(ref, got)


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_deepseek_v3_hf_to_nanoseek(case, tmp_path):
    cfg = transformers.DeepseekV3Config(**{**BASE_V3, **V3_CASES[case]})
    hf = transformers.DeepseekV3ForCausalLM(cfg)
    # yarn cases run past original_max_position_embeddings (16) with T = 40
    assert _hf_to_nanoseek(hf, tmp_path) <= TOL


def _nanoseek_to_hf(cfg: ModelConfig, tmp_path) -> float:
    """Random nanoseek weights saved, loaded by AutoModelForCausalLM: the parity measure of the logits."""
    ours = randomize_(Transformer(cfg)).eval()
    save_pretrained(ours, str(tmp_path / "ours"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        return max_rel_diff(hf(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("case", ["base", "groups_limited", "yarn"])
def test_deepseek_v3_nanoseek_to_hf(case, tmp_path):
    hf_cfg = transformers.DeepseekV3Config(**{**BASE_V3, **V3_CASES[case]})
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    assert _nanoseek_to_hf(cfg, tmp_path) <= TOL


def test_qwen2_tied_qkv_bias(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=256)
    hf = transformers.Qwen2ForCausalLM(cfg)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    assert _hf_to_nanoseek(hf, tmp_path) <= TOL
    ours = load_pretrained(str(tmp_path / "hf"))
    assert ours.lm_head.weight is ours.embed_tokens.weight


def test_llama_gqa(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                   attention_bias=True, max_position_embeddings=256)
    assert _hf_to_nanoseek(transformers.LlamaForCausalLM(cfg), tmp_path) <= TOL


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_dense_nanoseek_to_hf(arch, tmp_path):
    cfg = ModelConfig(model_type=arch, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, n_routed_experts=None,
                      num_nextn_predict_layers=0, rope_interleave=False, tie_word_embeddings=arch == "qwen2")
    assert _nanoseek_to_hf(cfg, tmp_path) <= TOL


def test_mtp_matches_transformers_mtp_layer(tmp_path):
    """Our MTP module == transformers' generic MtpLayer (emb-first concat, post norm) on the same weights."""
    from transformers.modeling_layers import MtpModel

    hf_cfg = transformers.DeepseekV3Config(**BASE_V3)
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    ours = randomize_(Transformer(cfg)).eval()
    save_pretrained(ours, str(tmp_path / "ours"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    mtp = MtpModel(hf, 1).eval()
    mapping = {"norm.weight": "post_norm.weight", "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
               "eh_proj.weight": "eh_proj.weight"}
    state = {}
    for k, v in ours.mtp[0].state_dict().items():
        if k.startswith("block."):
            name = "mtp_block." + k[len("block."):]
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                state["layers.0." + name] = v
                continue
            state["layers.0." + name] = v
        else:
            state["layers.0." + mapping[k]] = v
    missing, unexpected = mtp.load_state_dict(state, strict=False)
    assert not unexpected and all(not m.startswith("layers.") for m in missing), (missing, unexpected)
    ids = _ids(cfg.vocab_size, T=24)
    with torch.no_grad():
        ours.train()  # training mode computes MTP logits; no dropout anywhere, so numerics are eval's
        out = ours(ids)
        hidden = hf(ids, output_hidden_states=True).hidden_states[-1]
        pos = torch.arange(1, 24)[None].expand(2, -1)
        h = mtp.forward_layer(0, hidden[:, :-1], pos, None, input_ids=ids[:, 1:])
        ref = hf.lm_head(h)
    assert max_rel_diff(ref, out.mtp_logits[0]) <= TOL
