"""Checkpoint directories: round trips, sharding, atomic writes, FP8 weights and the loading rules."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import load_pretrained, save_pretrained
from nanoseek.config import ModelConfig, qwen2_tiny, tiny
from nanoseek.precision.fp8 import dequantize_blocks, quantize_blocks
from nanoseek.model import Transformer
from tests.helpers import randomize_


def _cfg(**kw) -> ModelConfig:
    base = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32,
                num_hidden_layers=2)
    return tiny(vocab_size=200).replace(**{**base, **kw})


def _saved(tmp_path, cfg=None, **kw):
    model = randomize_(Transformer(cfg or _cfg())).eval()
    path = str(tmp_path / "ck")
    save_pretrained(model, path, **kw)
    return model, path


def _same(a: Transformer, b: Transformer) -> bool:
    ids = torch.randint(0, a.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(ids).logits, b(ids).logits)


def test_round_trip_with_mtp_and_layout(tmp_path):
    model, path = _saved(tmp_path)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    keys = load_file(os.path.join(path, "model.safetensors")).keys()
    N = model.config.num_hidden_layers
    assert f"model.layers.{N}.eh_proj.weight" in keys and f"model.layers.{N}.shared_head.head.weight" in keys
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] == 1
    loaded = load_pretrained(path)
    assert _same(model, loaded) and len(loaded.mtp) == 1
    assert torch.equal(loaded.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)


def test_sharded_round_trip(tmp_path):
    model, path = _saved(tmp_path, max_shard_bytes=200_000)
    files = sorted(os.listdir(path))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert _same(model, load_pretrained(path))


def test_bf16_dtype_and_router_bias_stays_fp32(tmp_path):
    _, path = _saved(tmp_path)
    m = load_pretrained(path, dtype=torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    assert m.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_atomic_overwrite_keeps_old_on_failure(tmp_path):
    model, path = _saved(tmp_path)

    def boom(tmp):
        raise RuntimeError("killed mid-write")

    other = randomize_(Transformer(_cfg()), seed=5)
    with pytest.raises(RuntimeError):
        save_pretrained(other, path, write_extra=boom)
    assert _same(model, load_pretrained(path))
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".tmp-")]
    save_pretrained(other, path)  # a successful overwrite replaces it
    assert _same(other, load_pretrained(path))


def test_no_mtp_tensors_loads_without_mtp_with_warning(tmp_path):
    _, path = _saved(tmp_path)
    f = os.path.join(path, "model.safetensors")
    tensors = {k: v for k, v in load_file(f).items() if not k.startswith("model.layers.2.")}
    save_file(tensors, f)
    with pytest.warns(UserWarning, match="no MTP tensors"):
        m = load_pretrained(path)
    assert len(m.mtp) == 0


def test_tied_head_absent_is_expected(tmp_path):
    model, path = _saved(tmp_path, cfg=qwen2_tiny(vocab_size=200).replace(hidden_size=64, head_dim=16,
                                                                          intermediate_size=96))
    assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    loaded = load_pretrained(path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight and _same(model, loaded)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight"),
     r"missing tensor\(s\): model\.layers\.0\.self_attn\.kv_b_proj\.weight \(model\.safetensors\)"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)),
     r"unexpected tensor\(s\): model\.layers\.0\.self_attn\.extra\.weight \(model\.safetensors\)"),
    (lambda t: t.__setitem__("model.norm.weight", torch.zeros(3)),
     r"mis-shaped tensor\(s\): model\.norm\.weight \(model\.safetensors\): checkpoint \(3,\) vs model \(64,\)"),
    (lambda t: t.pop("lm_head.weight"), r"missing tensor\(s\): lm_head\.weight \(model\.safetensors\)"),
    (lambda t: t.__setitem__("model.layers.2.embed_tokens.weight", torch.zeros(200, 64)),
     r"model\.layers\.2\.embed_tokens\.weight \(model\.safetensors\) differs from model\.embed_tokens\.weight"),
    (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
     r"missing tensor\(s\): model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight \(model\.safetensors\)"),
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.3.up_proj.weight", torch.zeros(5, 64)),
     r"mis-shaped tensor\(s\): model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight \(model\.safetensors\)"),
])
def test_bad_tensors_refused_with_names(tmp_path, edit, message):
    _, path = _saved(tmp_path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)
    with pytest.raises(ValueError, match=message):
        load_pretrained(path)


def _shard_of(path: str, name: str) -> str:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][name]


KV = "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize("case", ["missing", "unexpected", "mis-shaped"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_refusals_name_the_checkpoint_key_and_its_file(tmp_path, case, sharded):
    # the key as the checkpoint spells it (not nanoseek's `layers.1...`) and the file holding it
    _, path = _saved(tmp_path, **({"max_shard_bytes": 100_000} if sharded else {}))
    fname = _shard_of(path, KV) if sharded else "model.safetensors"
    assert not sharded or fname.startswith("model-0000")
    f = os.path.join(path, fname)
    tensors = load_file(f)
    name = KV if case != "unexpected" else "model.layers.1.self_attn.extra.weight"
    if case == "missing":
        tensors.pop(KV)                                 # the index (if any) still lists it
    else:
        tensors[name] = torch.zeros(3, 5)
    save_file(tensors, f)
    with pytest.raises(ValueError) as e:
        load_pretrained(path)
    msg = str(e.value)
    assert f"{case} tensor(s): {name} ({fname})" in msg, msg
    assert not re.search(r"(?<!model\.)layers\.1\.self_attn", msg), msg   # no internal names


def test_missing_tensor_the_index_does_not_list_names_the_index(tmp_path):
    _, path = _saved(tmp_path, max_shard_bytes=100_000)
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as fh:
        meta = json.load(fh)
    f = os.path.join(path, meta["weight_map"].pop(KV))
    with open(index, "w") as fh:
        json.dump(meta, fh)
    save_file({k: v for k, v in load_file(f).items() if k != KV}, f)
    with pytest.raises(ValueError, match=re.escape(f"missing tensor(s): {KV} (not in model.safetensors.index.json)")):
        load_pretrained(path)


def test_unknown_model_type_refused(tmp_path):
    _, path = _saved(tmp_path)
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="unknown model_type 'mamba'"):
        load_pretrained(path)


def test_corrupt_safetensors_refused_naming_the_file(tmp_path):
    _, path = _saved(tmp_path)
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(path)


def test_fp8_block_quantization_layout_and_error():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, s = quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = dequantize_blocks(q, s)
    assert float((back - w).abs().max() / w.abs().max()) < 0.07   # E4M3: 3 mantissa bits
    assert float((back - w).norm() / w.norm()) < 0.04


def test_released_fp8_format_is_dequantized_on_load(tmp_path):
    model, path = _saved(tmp_path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    q, s = quantize_blocks(tensors[name])
    tensors[name], tensors[name + "_scale_inv"] = q, s
    save_file(tensors, f)
    loaded = load_pretrained(path)
    expect = dequantize_blocks(q, s, dtype=torch.bfloat16).float()
    assert torch.equal(loaded.layers[0].self_attn.kv_b_proj.weight, expect)


def test_config_reads_old_and_new_rope_keys():
    yarn = {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}
    base = tiny().to_hf_dict("v5")
    new = {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e4, **yarn}}
    old = {**{k: v for k, v in base.items() if k not in ("rope_parameters", "dtype")},
           "rope_theta": 5e4, "rope_scaling": {"type": "yarn", **yarn}, "torch_dtype": "bfloat16"}
    a, b = ModelConfig.from_hf_dict(new), ModelConfig.from_hf_dict(old)
    assert a.rope_theta == b.rope_theta == 5e4 and a.rope_scaling == b.rope_scaling
    assert b.dtype == "bfloat16"
    v4 = a.to_hf_dict("v4")
    assert v4["rope_scaling"]["rope_type"] == "yarn" and "rope_parameters" not in v4
    assert ModelConfig.from_hf_dict(v4) == a
