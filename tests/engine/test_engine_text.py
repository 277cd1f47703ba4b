"""Text in and out: tokenizer, stop strings across token boundaries, checkpoint directories, CLI."""
from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import pytest

from nanoseek import save_pretrained
from nanoseek.config import qwen2_tiny
from nanoseek.engine import LLM, SamplingParams
from nanoseek.tokenizer import train_tokenizer
from tests.engine.test_engine import _model, _v3

TEXTS = ["the quick brown fox jumps over the lazy dog 12+34=46", "你好，世界。 hello world", "<think>\n1+1=2\n</think>\n\n2"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return _model(_v3(vocab_size=tok.vocab_size))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tok):
    path = str(tmp_path_factory.mktemp("ck") / "v3")
    save_pretrained(model, path, tokenizer=tok)
    return path


def test_stop_strings_across_token_boundaries(model, tok):
    llm = LLM(model, tok, num_blocks=64, block_size=4)
    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, skip_special_tokens=False)
    out = llm.generate("the quick", free)[0][0]
    ids, full = out.token_ids, tok.decode(out.token_ids)
    assert full.startswith(out.text) and len(out.text) >= len(full) - 1   # all but an unfinished character
    # a stop string made of the last character of token i and the first of token i+1
    for i in range(3, len(ids) - 1):
        head, nxt = tok.decode(ids[:i + 1]), tok.decode(ids[i + 1:i + 2])
        if nxt and "\ufffd" not in head + nxt and full.startswith(head + nxt) and full.find(head[-1] + nxt[0]) == len(head) - 1:
            break
    else:
        pytest.fail("no clean token boundary in the sample")
    stop = head[-1] + nxt[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, skip_special_tokens=False, stop=[stop, "@@"])
    got = llm.generate("the quick", params)[0][0]
    assert got.finish_reason == "stop"
    assert got.text == full[:len(head) - 1]                  # the stop string is not in the text
    assert got.token_ids == ids[:i + 2]                      # it ended on the token completing it


def test_text_prompts_chat_and_directory_loading(model_dir, model, tok):
    llm = LLM(model_dir, num_blocks=64, block_size=4)
    assert llm.tokenizer is not None and llm.encode("hello")[0] == tok.bos_id
    a = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0][0]
    b = LLM(model, tok, num_blocks=64, block_size=4).generate(
        [tok.bos_id] + tok.encode("hello world"), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0][0]
    assert a.token_ids == b.token_ids and a.text == tok.decode(a.token_ids, skip_special_tokens=True)
    chat = llm.chat([{"role": "user", "content": "1+1?"}], SamplingParams(temperature=0, max_tokens=4))[0][0]
    assert chat.finish_reason in ("stop", "length")


def test_qwen2_directory(tmp_path, tok):
    cfg = qwen2_tiny(vocab_size=tok.vocab_size).replace(hidden_size=64, num_hidden_layers=2)
    model = _model(cfg)
    save_pretrained(model, str(tmp_path / "q"), tokenizer=tok)
    llm = LLM(str(tmp_path / "q"), num_blocks=32, block_size=4)
    assert llm.cache.width == 2 * cfg.kv_heads * cfg.attn_head_dim
    assert len(llm.generate("the", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0][0].token_ids) == 5


def test_cli_generate(model_dir, capsys):
    from nanoseek.cli import main
    assert main(["generate", "--model", model_dir, "--prompt", "hello", "--prompt", "the", "--n", "2",
                 "--temperature", "0.7", "--seed", "1", "--max-tokens", "5", "--json"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["prompt"] for l in lines] == ["hello", "the"] and all(len(l["completions"]) == 2 for l in lines)
    assert main(["generate", "--model", model_dir, "--prompt", "hello", "--max-tokens", "4"]) == 0
    assert "tokens]" in capsys.readouterr().out


def test_cli_chat_prints_reasoning_dimmed_then_the_answer(model_dir, monkeypatch, capsys):
    from nanoseek.stages import chat
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/clear\nagain\n/exit\n"))
    args = SimpleNamespace(model=model_dir, system=None, temperature=0.0, top_p=None, max_tokens=5, seed=None,
                           no_color=True)
    assert chat.main(args) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2
    shown = []
    printer = chat.ReplyPrinter(shown.append, color=True)
    for text in ["Let", "Let me </th", "Let me </think>\n\n4", "Let me </think>\n\n42"]:
        printer.update(text)
    printer.update("Let me </think>\n\n42", final=True)
    assert shown == [chat.DIM + "Let" + chat.RESET, chat.DIM + " me " + chat.RESET, "\n", "\n\n4", "2"]
