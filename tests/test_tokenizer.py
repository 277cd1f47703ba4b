"""Tests for nanoseek.tokenizer and the `nanoseek tokenizer` stage (fast; no hub downloads)."""
from __future__ import annotations

import json
import random

import pytest

from nanoseek.tokenizer import (
    ADDED_TOKENS, ASSISTANT, BOS, END_THINK, EOS, SPECIAL_TOKENS, THINK, USER, Tokenizer,
    r1_zero_prompt, train_tokenizer,
)

VOCAB = 512
MIXED = ("The answer is 12345 + 678 = 13023.\n\n  Indented  line\twith tab\n"
         "我们来计算：３加４等于7。Wait, let me check... 1000000 - 1 = 999999!\r\n<think>\n</think>")
SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ch", "th", "ing", "er", "an", "qu"]
HANZI = "我们你他是的了在有和人这中大为上个国不以会到说时要就出也得里后自学加减乘除等于答案检查一下思考"


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """A deterministic English-ish / Chinese / arithmetic corpus rich enough for VOCAB merges."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(400)]
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        en = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        zh = "".join(rng.choices(HANZI, k=rng.randint(4, 20)))
        lines.append(rng.choice([f"{en}. {a} + {b} = {a + b}\n", f"{zh}。{a}-{b}={a - b}\n", f"{en} {zh}\n"]))
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(corpus(), VOCAB)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def hf(saved):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved))


def hf_chat_ids(hf, messages, **kw) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    if not isinstance(out, list):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


SINGLE = [{"role": "user", "content": "What is 12 + 30?"}]
MULTI = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>\n2 + 3 = 5, let me check: 5 - 3 = 2.\n</think>\n\n5"},
    {"role": "user", "content": "并且 5 × 4 呢？"},
]
SYSTEM = [{"role": "system", "content": "You are a careful calculator."}] + MULTI
SFT = MULTI + [{"role": "assistant", "content": "<think>\n5 × 4 = 20\n</think>\n\n20"}]


def test_round_trip_mixed_text(tok):
    assert tok.decode(tok.encode(MIXED)) == MIXED
    for s in ["", " ", "\n", "  \n\n\t", "中文", "x" * 300, "ÿ€😀 ok"]:
        assert tok.decode(tok.encode(s)) == s


def test_every_digit_is_its_own_token(tok):
    text = "x 1234567890 y 20250101"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == (
        [" 1"] + list("234567890") + [" 2"] + list("0250101"))  # a number's space rides on its first digit
    # an operand of an expression is one token, so copying one is one step
    pieces = [tok.decode([i]) for i in tok.encode("9 - 3 + 7")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["9", " 3", " 7"]
    digit_ids = [tok.encode(str(d)) for d in range(10)]
    assert all(len(ids) == 1 for ids in digit_ids)
    assert tok.encode("9876") == [d for c in "9876" for d in tok.encode(c)]


def test_special_token_ids_and_single_tokens(tok):
    assert SPECIAL_TOKENS[:2] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
    assert "\uff5c" in BOS and "\u2581" in BOS
    expected = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>",
                "<｜Assistant｜>", "<think>", "</think>", "<answer>", "</answer>"]
    assert SPECIAL_TOKENS + ADDED_TOKENS == expected
    for i, t in enumerate(expected):
        assert tok.encode(t) == [i]
        assert tok.encode(f"a{t}b") == tok.encode("a") + [i] + tok.encode("b")  # matched inside text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id) == (0, 1, 2, 3, 4)
    assert (tok.think_id, tok.end_think_id, tok.answer_id, tok.end_answer_id) == (5, 6, 7, 8)
    assert tok.encode("hi", add_bos=True)[0] == 0 and tok.encode("hi")[0] != 0


def test_skip_special_tokens_keeps_think_and_answer(tok):
    text = f"{BOS}{USER}q{ASSISTANT}<think>\nr</think>\n\n<answer>4</answer>{EOS}"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "q<think>\nr</think>\n\n<answer>4</answer>"


def test_vocab_size_exact_and_deterministic(tok):
    assert tok.vocab_size == VOCAB == len(tok)
    again = train_tokenizer(corpus(), VOCAB)
    assert again.backend.to_str() == tok.backend.to_str()
    small = train_tokenizer(["ab ab ab"], VOCAB)  # corpus too poor: fewer merges, smaller vocab
    assert 9 + 256 < small.vocab_size < VOCAB
    with pytest.raises(ValueError):
        train_tokenizer(corpus(10), 100)


def test_save_load_round_trip(tok, saved):
    files = {p.name for p in saved.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"} <= files
    assert not any(name.startswith(".") for name in files)  # no temp files left behind
    cfg = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["bos_token"] == BOS
    loaded = Tokenizer.load(saved)
    assert loaded.encode(MIXED) == tok.encode(MIXED) and loaded.vocab_size == tok.vocab_size
    tok.save(saved)  # into an existing directory
    assert Tokenizer.load(saved).encode(MIXED) == tok.encode(MIXED)


def test_chat_template_text():
    text = Tokenizer.render_chat(SYSTEM, add_generation_prompt=True)
    assert text == (f"{BOS}You are a careful calculator.{USER}What is 2 + 3?{ASSISTANT}\n\n5{EOS}"
                    f"{USER}并且 5 × 4 呢？{ASSISTANT}<think>\n")
    assert "let me check" not in text  # reasoning stripped from history
    assert Tokenizer.render_chat(SINGLE) == f"{BOS}{USER}What is 12 + 30?"
    with pytest.raises(ValueError):
        Tokenizer.render_chat([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("messages", [SINGLE, MULTI, SYSTEM, SFT], ids=["single", "multi", "system", "sft"])
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
def test_autotokenizer_chat_template_matches(tok, hf, messages, gen):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert hf_chat_ids(hf, messages, add_generation_prompt=gen) == ours
    assert hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == \
        tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_autotokenizer_encode_decode_matches(tok, hf):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf(MIXED, add_special_tokens=False)["input_ids"] == tok.encode(MIXED)
    assert hf(MIXED)["input_ids"] == tok.encode(MIXED, add_bos=True)
    ids = tok.encode_conversation(SFT)[0]
    for skip in (False, True):
        assert hf.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_loss_mask_covers_exactly_the_generated_tokens(tok):
    ids, mask = tok.encode_conversation(SFT)
    prompt = tok.apply_chat_template(MULTI, add_generation_prompt=True)
    assert len(ids) == len(mask) and ids[:len(prompt)] == prompt
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    generated = [i for i, m in zip(ids, mask) if m]
    assert generated[-1] == tok.eos_id and tok.eos_id in ids[:len(prompt)]  # history EOS not trained
    assert tok.decode(generated) == "5 × 4 = 20\n</think>\n\n20" + EOS
    assert tok.decode(ids) == tok.render_chat(MULTI, True) + "5 × 4 = 20\n</think>\n\n20" + EOS


def test_completion_without_reasoning_gets_empty_think(tok):
    ids, mask = tok.encode_conversation(SINGLE + [{"role": "assistant", "content": "42"}])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"\n{END_THINK}\n\n42{EOS}"
    with pytest.raises(ValueError):
        tok.encode_conversation(SINGLE)


def test_r1_zero_prompt():
    p = r1_zero_prompt("What is 3 + 4")
    assert p.startswith("A conversation between User and Assistant. The user asks a question, and the "
                        "Assistant solves it. The assistant first thinks")
    assert "<think> reasoning process here </think> <answer> answer here </answer>. " in p
    assert p.endswith("User: What is 3 + 4. Assistant:") and "\n" not in p
    assert r1_zero_prompt("What is 3 + 4?\n").endswith("User: What is 3 + 4? Assistant:")


def test_cli_trains_and_saves(tmp_path, capsys):
    from nanoseek.cli import main

    txt = tmp_path / "a.txt"
    txt.write_text("".join(corpus(1500, seed=1)), encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus(1500, seed=2)),
                     encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "--input", str(txt), str(jsonl), "--vocab-size", "400", "--out", str(out)]) == 0
    assert "vocab size 400" in capsys.readouterr().out
    loaded = Tokenizer.load(out)
    assert loaded.vocab_size == 400 and loaded.decode(loaded.encode(MIXED)) == MIXED
    assert THINK in loaded.backend.get_vocab()
