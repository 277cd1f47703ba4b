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
