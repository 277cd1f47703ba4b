"""Rejection sampling and distillation: the filters on hand-written texts (and on the corpus's own
traces, which they must all pass), canned samples with every rejection reason counted once, the
R1-Zero -> chat conversion, the held-out split, atomic files; then a micro teacher that memorised
its answers: `nanoseek rejection-sample` writes a corpus `nanoseek sft` trains on, batching does
not change what is kept, and `nanoseek distill` end to end (skipped traces, SFT resumed)."""
from __future__ import annotations

import doctest
import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

import nanoseek.rl.rejection
from nanoseek import load_pretrained, save_pretrained
from nanoseek.cli import main as cli_main
from nanoseek.config import qwen2_tiny, tiny
from nanoseek.data.corpus import Writer, r1zero
from nanoseek.data.corpus import tiny as tiny_corpus
from nanoseek.engine import LLM, Completion
from nanoseek.model import Transformer
from nanoseek.rl import rewards as R
from nanoseek.rl.rejection import (MANIFEST, RejectionConfig, is_repetitive, is_unreadable, rejection_sample,
                                   split_heldout, to_conversation, write_traces)
from nanoseek.tasks import Problem, get_task
from nanoseek.tokenizer import Tokenizer, train_tokenizer

EN = Problem("What is 2 + 3?", "5", {"task": "arithmetic", "lang": "en"})
ZH = Problem("计算 4 + 4 等于多少？", "8", {"task": "arithmetic", "lang": "zh"})


def test_doctests():
    result = doctest.testmod(nanoseek.rl.rejection)
    assert result.failed == 0 and result.attempted >= 8


# ------------------------------------------------------------------ the filters, by hand
def test_readability_rules():
    redo = "Collect the numbers: 30 - 10 = 20.\nWait, let me check: no.\nCollect the numbers: 30 - 10 = 20.\nSo 4."
    assert not is_repetitive(redo)                                  # a redo writes a line twice
    assert is_repetitive(redo + "\nCollect the numbers: 30 - 10 = 20.")   # three times is a loop
    assert not is_repetitive(redo + "\nCollect the numbers: 30 - 10 = 20.", max_line_repeats=3)
    assert is_repetitive("Then 5 + 5 + 5 + 5 + 5")                 # " + 5" four times in a row
    assert not is_repetitive("Try 7 * 2 * 1 * 1: 7 * 2 = 14, 14 * 1 = 14, 14 * 1 = 14.")
    assert not is_repetitive("答案是 5。答案是 5。")
    assert is_unreadable("x" * 401) and not is_unreadable("x" * 400) and is_unreadable("a\n```\nb")
    assert is_unreadable("x" * 101, max_line_chars=100)


@pytest.mark.parametrize("preset", [tiny_corpus, r1zero], ids=["tiny", "r1zero"])
def test_the_corpus_cold_start_traces_pass_every_filter(preset):
    """What the cold-start SFT teaches (check and step-by-step traces, every task, EN and ZH) is
    readable, consistent and well formed by these rules: the filters reject loops, not our style."""
    w = Writer(preset(), seed=0)
    convs = [w.conversation("sft/train", i, "train") for i in range(300)]
    problems = [Problem(c["messages"][0]["content"], "", {"lang": c["lang"]}) for c in convs]
    texts = [Tokenizer.completion_text(c["messages"][1]["content"]) for c in convs]
    assert {c["task"] for c in convs} >= {"arithmetic", "linear"} and {c["lang"] for c in convs} == {"en", "zh"}
    assert R.format(texts, think_in_prompt=True) == [1.0] * len(texts)
    assert R.language_consistency(texts, problems) == [1.0] * len(texts)
    assert [t for t in texts if is_repetitive(t) or is_unreadable(t)] == []


def test_r1zero_samples_become_chat_conversations():
    text = " <think>\n先算 4 + 4 = 8。\n</think>\n<answer>\n8\n</answer>"
    conv = to_conversation(ZH, text, "r1zero")
    assert conv["messages"] == [
        {"role": "user", "content": ZH.prompt},
        {"role": "assistant", "content": "<think>\n先算 4 + 4 = 8。\n</think>\n\n答案是 \\boxed{8}。"}]
    assert (conv["task"], conv["lang"], conv["source"]) == ("arithmetic", "zh", "rejection")
    # the SFT form is the R1 chat form: well formed and right after the chat generation prompt
    completion = Tokenizer.completion_text(conv["messages"][1]["content"])
    assert R.format([completion], think_in_prompt=True) == [1.0] and R.accuracy([completion], [ZH]) == [1.0]


class CannedLLM:
    """The engine's generate(): per prompt, the given (text, finish) samples in order."""

    class tokenizer:                                  # noqa: N801 (stands in for the chat template)
        @staticmethod
        def apply_chat_template(messages, add_generation_prompt=False):
            return [0, len(messages[0]["content"])]

    def __init__(self, samples: dict[str, list[tuple[str, str]]]):
        self.samples, self.calls = samples, 0

    def generate(self, prompts, params):
        self.calls += 1
        outs = []
        for sp, key in zip(params, self.keys):
            assert sp.n == len(self.samples[key]) and (sp.temperature, sp.top_p) == (0.6, 0.95)
            outs.append([Completion(i, t, [7] * (len(t) // 4), f) for i, (t, f) in enumerate(self.samples[key])])
        self.keys = self.keys[len(prompts):]
        return outs


CHAT_SAMPLES = {
    EN.prompt: [("2 + 3 = 5\n</think>\n\nThe answer is \\boxed{5}.", "stop"),            # kept
                ("2 + 3 = 5\n</think>\n\nThe answer is \\boxed{5}.", "stop"),            # duplicate
                ("2 + 3 = 6\n</think>\n\nThe answer is \\boxed{6}.", "stop"),            # wrong
                ("2 + 3 = 5 = 5 = 5 = 5 = 5", "length"),                                  # truncated
                ("2 + 3 = 5\n\\boxed{5}", "stop"),                                        # format (right answer)
                ("First 2 + 3 = 5, 所以是 5\n</think>\n\n\\boxed{5}", "stop"),            # mixed language
                ("2 + 3 = 5\n2 + 3 = 5\n2 + 3 = 5\n</think>\n\n\\boxed{5}", "stop"),      # repetitive
                ("```\n2 + 3\n```\n</think>\n\n\\boxed{5}", "stop")],                     # unreadable
    ZH.prompt: [("4 + 4 = 8。\n</think>\n\n答案是 \\boxed{8}。", "stop"),
                ("先算 4 + 4 = 8。\n</think>\n\n答案是 \\boxed{8}。", "stop"),
                ("我们算 4 + 4 = 8。\n</think>\n\n\\boxed{8}", "stop")]                   # one of 3 is surplus
               + [(f"4 + 4 = {x}。\n</think>\n\n\\boxed{{{x}}}", "stop") for x in (7, 9, 10, 11, 12)],
}


def _canned(samples, problems):
    llm = CannedLLM(samples)
    llm.keys = [p.prompt for p in problems]
    return llm


def test_every_rejection_reason_counted_once():
    problems = [EN, ZH, EN]                                           # a repeated prompt is sampled once
    llm = _canned(CHAT_SAMPLES, problems[:2])
    kept, stats = rejection_sample(llm, problems, RejectionConfig(k=8, keep_per_problem=2, batch_problems=1))
    assert llm.calls == 2
    assert stats["rejected"] == {"truncated": 1, "format": 1, "wrong": 6, "mixed_language": 1, "repetitive": 1,
                                 "unreadable": 1, "short": 0, "duplicate": 1, "surplus": 1}
    assert (stats["problems"], stats["samples"], stats["kept"], stats["problems_with_kept"]) == (2, 16, 3, 2)
    assert stats["samples"] - stats["kept"] == sum(stats["rejected"].values())
    assert stats["accuracy"] == pytest.approx(9 / 16)                # right answers, whatever else rejected them
    assert stats["mean_kept_tokens"] == pytest.approx(sum(c["tokens"] for c in kept) / 3)
    en = [c for c in kept if c["lang"] == "en"]
    assert [c["messages"][1]["content"] for c in en] == ["<think>\n2 + 3 = 5\n</think>\n\nThe answer is \\boxed{5}."]
    zh = [c["messages"][1]["content"] for c in kept if c["lang"] == "zh"]
    firsts = [t for t, _ in CHAT_SAMPLES[ZH.prompt][:3]]
    assert len(zh) == 2 and [firsts.index(c[len("<think>\n"):]) for c in zh] == sorted(
        firsts.index(c[len("<think>\n"):]) for c in zh)              # two of the three, in sample order
    # the choice is seeded: the same seed keeps the same two, and batching changes nothing
    again, stats2 = rejection_sample(_canned(CHAT_SAMPLES, problems[:2]), problems,
                                     RejectionConfig(k=8, keep_per_problem=2, batch_problems=64))
    assert again == kept and stats2["rejected"] == stats["rejected"]


def test_r1zero_template_samples():
    samples = {EN.prompt: [(" <think>\n2 + 3 = 5\n</think>\n<answer>\n5\n</answer>", "stop"),
                           ("2 + 3 = 5\n</think>\n\nThe answer is \\boxed{5}.", "stop")]}   # chat shape: format
    kept, stats = rejection_sample(_canned(samples, [EN]), [EN], RejectionConfig(k=2, template="r1zero"))
    assert stats["rejected"]["format"] == 1 and len(kept) == 1
    assert kept[0]["messages"][1]["content"] == "<think>\n2 + 3 = 5\n</think>\n\nThe answer is \\boxed{5}."


def test_bare_guesses_rejected_on_request():
    samples = {EN.prompt: [("The answer is 5.\n</think>\n\n\\boxed{5}", "stop"),
                           ("2 + 3 = 5\nSo the answer is 5.\n</think>\n\n\\boxed{5}", "stop")]}
    for lines, kept_n in ((0, 2), (2, 1)):
        cfg = RejectionConfig(k=2, min_reasoning_lines=lines)
        kept, stats = rejection_sample(_canned(samples, [EN]), [EN], cfg)
        assert len(kept) == kept_n and stats["rejected"]["short"] == 2 - kept_n


def _convs(prompts, per=2):
    return [to_conversation(Problem(q, "1", {"lang": "en"}), f"t{i}\n</think>\n\n\\boxed{{1}}", "chat")
            for q in prompts for i in range(per)]


def test_heldout_split_is_by_problem_and_seeded():
    convs = _convs([f"q{i}" for i in range(40)])
    train, held = split_heldout(convs, 0.05, seed=0)
    held_q = {c["messages"][0]["content"] for c in held}
    assert len(held_q) == 2 and len(held) == 4 and len(train) == 76
    assert not held_q & {c["messages"][0]["content"] for c in train}
    assert split_heldout(list(reversed(convs)), 0.05, seed=0)[1] == list(reversed(held))   # order-free choice
    assert {c["messages"][0]["content"] for c in split_heldout(convs, 0.05, seed=1)[1]} != held_q
    assert len(split_heldout(_convs(["a", "b"]), 0.9, 0)[0]) == 2     # train always keeps a problem


def test_write_traces_files_fallbacks_and_marker(tmp_path):
    out = str(tmp_path / "rs")
    stats = {"samples": 8, "kept": 4, "accuracy": 0.5}
    m = write_traces(out, _convs(["a", "b"]), stats, heldout_frac=0.5, seed=0)
    assert (m["train_conversations"], m["heldout_conversations"], m["heldout_source"]) == (2, 2, "rejection")
    assert sorted(os.listdir(out)) == [MANIFEST, "sft"]
    assert sorted(os.listdir(os.path.join(out, "sft"))) == ["heldout-00000.jsonl", "train-00000.jsonl"]  # no temp files
    # one problem: the corpus's held-out conversations stand in; --min-conversations tops train up
    corpus = _convs(["c1", "c2", "c3"], per=1)
    m = write_traces(out, _convs(["a"]), stats, 0.05, 0, min_conversations=4, fallback_train=corpus,
                     fallback_heldout=corpus[:1])
    rows = [json.loads(x) for x in open(os.path.join(out, "sft", "train-00000.jsonl"), encoding="utf-8")]
    assert [r["source"] for r in rows] == ["rejection", "rejection", "corpus", "corpus"]
    assert (m["corpus_conversations"], m["heldout_source"]) == (2, "corpus")
    # nothing kept: an error, and no completion marker left behind from the earlier run
    with pytest.raises(ValueError, match="nothing to fine-tune on"):
        write_traces(out, [], stats)
    assert not os.path.exists(os.path.join(out, MANIFEST))


# ------------------------------------------------------------------ a micro teacher that memorised answers
def _memorise(model, tok, convs, steps=100, lr=3e-3):
    """Teacher-force the conversations' assistant tokens until the model has them by heart."""
    rows = [tok.encode_conversation(c) for c in convs]
    L = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [tok.pad_id] * (L - len(i)) for i, _ in rows])
    target = torch.tensor([[t if m else -100 for t, m in zip(i[1:], mk[1:])] + [-100] * (L - len(i) + 1)
                           for i, mk in rows])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(ids).logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A corpus dir (4 RL problems, a few SFT conversations), a V3 teacher that memorised a trace for
    each (the last one wrongly), a random dense Qwen2 student, all sharing one tokenizer."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("rs")
    task, rng = get_task("arithmetic", steps=[1, 1], digits=1), random.Random(0)
    problems = [task.sample(rng, lang="en") for _ in range(4)]
    answers = [p.answer for p in problems[:3]] + [str(int(problems[3].answer) + 1)]
    convs = [[{"role": "user", "content": p.prompt},
              {"role": "assistant", "content": f"<think>\n{p.meta['key']} = {a}\n</think>\n\n"
                                               f"The answer is \\boxed{{{a}}}."}] for p, a in zip(problems, answers)]
    data = root / "corpus"
    (data / "problems").mkdir(parents=True)
    (data / "sft").mkdir()
    (data / "problems" / "rl.jsonl").write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems))
    for split in ("train", "heldout"):
        (data / "sft" / f"{split}-00000.jsonl").write_text(
            "".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    tok = train_tokenizer([Tokenizer.render_chat(c) for c in convs] * 20, vocab_size=300)
    teacher = Transformer(tiny(vocab_size=tok.vocab_size).replace(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32,
        num_hidden_layers=2))
    assert _memorise(teacher, tok, convs) < 0.05
    save_pretrained(teacher.eval(), str(root / "teacher"), tokenizer=tok)
    student = Transformer(qwen2_tiny(vocab_size=tok.vocab_size).replace(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16))
    save_pretrained(student, str(root / "student"), tokenizer=tok)
    return root, str(data), str(root / "teacher"), str(root / "student"), problems


def test_batching_does_not_change_what_is_kept(micro):
    _, _, teacher, _, problems = micro
    llm = LLM(teacher, num_blocks=256, block_size=16)
    runs = [rejection_sample(llm, problems, RejectionConfig(k=4, max_tokens=40, batch_problems=b)) for b in (1, 4)]
    assert runs[0][0] == runs[1][0]
    drop = ("seconds", "tokens_per_s", "config")
    figures = [{k: v for k, v in stats.items() if k not in drop} for _, stats in runs]
    assert figures[0] == figures[1]
    kept, stats = runs[0]
    assert stats["problems_with_kept"] == 3 and stats["rejected"]["wrong"] >= 3     # the fourth is memorised wrong
    assert all(c["source"] == "rejection" for c in kept)


def test_rejection_sample_cli_writes_a_corpus_sft_reads(micro, tmp_path):
    root, data, teacher, _, _ = micro
    out = str(tmp_path / "rs")
    assert cli_main(["rejection-sample", "--model", teacher, "--data", data, "--out", out, "--k", "4",
                     "--max-tokens", "40", "--threads", "1"]) == 0
    m = json.load(open(os.path.join(out, MANIFEST)))
    assert (m["problems"], m["samples"], m["problems_with_kept"]) == (4, 16, 3)
    assert m["train_conversations"] >= 2 and m["heldout_conversations"] >= 1 and m["heldout_source"] == "rejection"
    assert set(m["rejected"]) == {"truncated", "format", "wrong", "mixed_language", "repetitive", "unreadable",
                                  "short", "duplicate", "surplus"}
    sft = str(tmp_path / "sft")
    assert cli_main(["sft", "--init", teacher, "--data", out, "--out", sft, "--steps", "2", "--batch-size", "2",
                     "--seq-len", "64", "--eval-every", "2", "--ckpt-every", "2", "--eval-rows", "2", "--threads", "1",
                     "--no-progress", "--no-plots"]) == 0
    assert os.path.exists(os.path.join(sft, "model", "model.safetensors"))


def test_distill_end_to_end_then_resume(micro, tmp_path, capsys):
    _, data, teacher, student, _ = micro
    out = str(tmp_path / "student")
    args = ["distill", "--teacher", teacher, "--student", student, "--data", data, "--out", out, "--k", "4",
            "--max-tokens", "40", "--batch-size", "2", "--seq-len", "64", "--eval-every", "2", "--ckpt-every", "2",
            "--eval-rows", "2", "--threads", "1", "--no-progress", "--no-plots"]
    assert cli_main(args + ["--steps", "2"]) == 0
    model = load_pretrained(os.path.join(out, "model"))
    assert model.config.model_type == "qwen2"
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["stage"] == "distill" and summary["steps"] == 2
    marker = os.path.join(out, "traces", MANIFEST)
    stamp = os.stat(marker).st_mtime_ns
    capsys.readouterr()
    assert cli_main(args + ["--steps", "4", "--resume"]) == 0           # traces kept, SFT continues at step 2
    assert os.stat(marker).st_mtime_ns == stamp and "not sampled again" in capsys.readouterr().err
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl")) if '"lr"' in x]
    assert steps == [0, 1, 2, 3]
