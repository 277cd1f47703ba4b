"""`--set KEY=VALUE` overrides: parsed by config.parse_overrides, refused with a message, never a traceback."""
from __future__ import annotations

import pytest

from nanoseek.cli import main
from nanoseek.config import parse_overrides, preset
from tests.train.fixtures import make_corpus, pretrain_args


def test_values_that_start_like_json_are_strings_unless_they_parse():
    # these raised JSONDecodeError: the old parser sent anything starting with t, f, n, -, a digit, [ or { to json
    got = parse_overrides(["dtype=float32", "name=nope", "tag=-x", "empty=", "n=12", "lr=-1e-3", "flag=TRUE",
                           "rope_scaling=null", "sizes=[1, 2]", 'rope={"factor": 4}'])
    assert got == {"dtype": "float32", "name": "nope", "tag": "-x", "empty": "", "n": 12, "lr": -1e-3, "flag": True,
                   "rope_scaling": None, "sizes": [1, 2], "rope": {"factor": 4}}
    assert preset("tiny", **parse_overrides(["dtype=float32"])).dtype == "float32"


@pytest.mark.parametrize("item, message", [("hidden_size", "not KEY=VALUE"), ("=3", "not KEY=VALUE"),
                                           ("sizes=[1,", "not valid JSON"), ("not_a_field=1", "unknown ModelConfig")])
def test_bad_overrides_are_refused_with_a_message(item, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **parse_overrides([item]))


def test_pretrain_accepts_string_overrides_and_refuses_bad_ones(tmp_path, capsys):
    data, tok = make_corpus(str(tmp_path))
    out = str(tmp_path / "run")
    assert main(pretrain_args(data, tok, out, 1, "--set", "dtype=float32", "--no-plots")) == 0
    assert main(pretrain_args(data, tok, out, 1, "--set", "x=")) == 2
    assert "unknown ModelConfig field(s) x" in capsys.readouterr().err


def test_r1_distill_qwen_1p5b_preset_has_the_hub_shape():
    """DeepSeek-R1-Distill-Qwen-1.5B's config.json: its 1,777,088,000 parameters, counted by hand:
    2 × 151,936 × 1,536 (untied) + 28 × (q, k, v with bias, o, SwiGLU 8,960, 2 norms) + final norm."""
    from nanoseek.config import preset
    from nanoseek.model import param_counts
    cfg = preset("r1_distill_qwen_1p5b")
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size,
            cfg.tie_word_embeddings) == ("qwen2", 1536, 28, 12, 2, 128, 8960, 151936, False)
    layer = (1536 * 1536 + 1536) + 2 * (1536 * 256 + 256) + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    assert param_counts(cfg)["total"] == 2 * 151936 * 1536 + 28 * layer + 1536 == 1_777_088_000
