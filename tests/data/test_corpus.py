"""`nanoseek corpus`: byte-identical per seed, well-formed documents, disjoint held-out problems."""
import functools
import json
from pathlib import Path

import pytest

from nanoseek.cli import main as cli_main
from nanoseek.rl.rewards import format, language_consistency
from nanoseek.data.corpus import build, r1zero, scaled, tiny
from nanoseek.tasks import Problem, score
from nanoseek.tokenizer import BOS, EOS, Tokenizer

SCALE = 0.01  # 400 pretraining documents, 40 SFT conversations, ~40 RL problems


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    assert cli_main(["corpus", "--preset", "tiny", "--out", str(out), "--seed", "3",
                     "--scale", str(SCALE)]) == 0
    return out


def test_byte_identical_for_a_seed(corpus, tmp_path):
    build(scaled(tiny(), SCALE), tmp_path / "again", seed=3)
    build(scaled(tiny(), SCALE), tmp_path / "other", seed=4)
    first, again, other = files(corpus), files(tmp_path / "again"), files(tmp_path / "other")
    assert first == again
    assert first.keys() == other.keys() and first != other


def test_manifest(corpus):
    m = json.loads((corpus / "manifest.json").read_text(encoding="utf-8"))
    assert m["seed"] == 3 and m["preset"]["name"] == "tiny" and m["preset"]["docs"] == 400
    for name, f in m["files"].items():
        assert len(read(corpus / name)) == f["docs"]
    train = m["mix"]["pretrain/train"]
    assert sum(train["format"].values()) == sum(train["style"].values()) == 400
    assert set(train["style"]) == {"direct", "steps", "mistake", "check", "drill"}
    assert train["style"]["direct"] == max(v for k, v in train["style"].items() if k != "drill")
    assert m["totals"]["pretrain"]["docs"] == 410 and m["totals"]["pretrain"]["chars"] > 0


def test_pretraining_documents(corpus):
    docs = read(corpus / "pretrain/train-00000.jsonl") + read(corpus / "pretrain/heldout-00000.jsonl")
    keys = {"text", "task", "style", "lang", "prompt_lang", "format", "correct", "split"}
    assert all(set(d) == keys for d in docs)
    assert {d["lang"] for d in docs} == {"en", "zh", "mix", None}
    for d in docs:
        if d["format"] == "r1zero":
            prompt, completion = d["text"].split(" Assistant:")
            assert prompt.startswith("A conversation between User and Assistant.")
            assert format([completion]) == [1.0], completion
        elif d["format"] == "chat":
            assert d["text"].startswith(BOS + "<｜User｜>") and d["text"].endswith(EOS)
            assert "<｜Assistant｜><think>\n" in d["text"] and "\\boxed{" in d["text"]
        if d["style"] in ("steps", "check"):
            assert d["correct"]
        if d["style"] == "mistake":
            assert not d["correct"]


def test_r1zero_preset(tmp_path):
    """The R1-Zero preset: running-form arithmetic traces, the template's preamble on a share of
    the R1-Zero documents only (the rest start at "User: "), every document still well formed."""
    m = build(scaled(r1zero(), 0.01), tmp_path, seed=0)
    assert m["preset"]["template"] == 0.3
    docs = [d for d in read(tmp_path / "pretrain/train-00000.jsonl") if d["format"] == "r1zero"]
    full = [d for d in docs if d["text"].startswith("A conversation between User and Assistant.")]
    short = [d for d in docs if d["text"].startswith("User: ")]
    assert len(full) + len(short) == len(docs) and 0.15 < len(full) / len(docs) < 0.45
    assert all(format([d["text"].split(" Assistant:")[1]]) == [1.0] for d in docs)
    steps = [d["text"] for d in docs if d["task"] == "arithmetic" and d["style"] == "steps"]
    assert steps and all(", leaving " in t or "，剩下 " in t or t.count(" = ") == 1 for t in steps)


def test_sft_conversations(corpus):
    convs = read(corpus / "sft/train-00000.jsonl")
    fmt = functools.partial(format, think_in_prompt=True)
    for c in convs:
        user, assistant = c["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and c["correct"]
        assert c["style"] in ("check", "steps")
        completion = Tokenizer.completion_text(assistant["content"])
        assert fmt([completion]) == [1.0]
        p = Problem(user["content"], "", {"lang": c["lang"]})
        assert language_consistency([completion], [p]) == [1.0]  # cold start data is not mixed


def test_rl_and_eval_problems_are_disjoint_from_training(corpus):
    rl = [Problem.from_dict(r) for r in read(corpus / "problems/rl.jsonl")]
    ev = [Problem.from_dict(r) for r in read(corpus / "problems/eval.jsonl")]
    assert rl and ev and {p.task for p in rl + ev} <= {"arithmetic", "linear"}
    assert all(score(p, p.answer) == 1.0 for p in rl + ev)
    assert not {p.meta["key"] for p in rl} & {p.meta["key"] for p in ev}
    train_text = "\n".join(d["text"] for d in read(corpus / "pretrain/train-00000.jsonl"))
    train_text += "\n".join(json.dumps(c, ensure_ascii=False) for c in read(corpus / "sft/train-00000.jsonl"))
    assert not any(p.meta["key"] in train_text for p in ev)
