"""The corpus builder: write the synthetic world the base model learns from, and is judged in
(`nanoseek corpus` is its command line, stages/corpus.py).

What. From the task families (nanoseek/tasks) this writes, under --out:
    pretrain/train-00000.jsonl …   pretraining documents, one a line:
                                   {"text", "task", "style", "lang", "prompt_lang", "format",
                                    "correct", "split"}
    pretrain/heldout-00000.jsonl   the same, from held-out problems only (validation loss)
    sft/train-00000.jsonl …        cold-start SFT conversations {"messages": [...], ...}
    sft/heldout-00000.jsonl
    problems/rl.jsonl              train-split problems for GRPO prompts (Problem.to_dict())
    problems/eval.jsonl            held-out problems for evaluation
    manifest.json                  the preset's knobs, the mix actually drawn, files and sizes
Output is byte-identical for the same preset and seed: every document draws from its own
`random.Random(f"{seed}/{part}/{i}")`, no timestamps or timings are written, JSON keys keep
their order. The tokenizer is trained on pretrain/*.jsonl ("text"), so this stage comes first.

Formats of a pretraining document:
    r1zero  r1_zero_prompt(question) + " " + "<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>"
            (the R1-Zero template of spec §8.1; the prompt ends "Assistant:", the model writes
            the space itself; no BOS/EOS: the packer separates documents)
    chat    <｜begin▁of▁sentence｜><｜User｜>{q}<｜Assistant｜><think>\\n…\\n</think>\\n\\n{summary
            with \\boxed{}}<｜end▁of▁sentence｜>  (the R1 chat template, spec §12)
    plain   true one-operation facts, a line each (the pilot's "lines of correct sums")
SFT assistant messages are "<think>\\n…\\n</think>\\n\\n{summary}" (Tokenizer.encode_conversation
drops the leading "<think>\\n", which the generation prompt holds).

Why the knobs (DESIGN.md pilot). The base model's pass@1 at T = 0.6 is set by which style owns the
most likely first tokens after "<think>", not by the document mix: at low temperature the mode
wins. So the tiny preset gives the direct (guessing) style one fixed opening and the largest
share, and spreads the step-by-step styles over several openings, each with a different first
word: then the guess is the mode and base pass@1 starts low, and RL has to discover the
step-by-step openings. The arithmetic has products and 2-digit operands so that plain step by
step is often wrong for a small model and checking ("Wait, let me check", which recomputes by
the inverse operation) pays: RL should then grow reflection and length. `mix` is the share of
traces that switch language sentence by sentence, which the language-consistency reward removes.

Measured (tiny, seed 0, 2 cores): 6-7 s wall on an idle machine (~6 s CPU, 1.5 s of it imports).
    pretrain/train  40,000 docs, 16.1M chars, 5.6M tokens with a BPE of vocab 1024 trained on it
                    (it stops at 785: every word of the synthetic text is one token by then).
                    By format: r1zero 23.8k docs / 4.0M tokens (168 a doc, 90 of them the
                    template: 38 % of all tokens are the fixed R1-Zero template), chat 4.0k / 0.45M,
                    plain 12.2k / 1.13M. By style (task docs): direct 14.0k, steps 7.0k,
                    mistake 4.1k, check 2.8k. First tokens after "<think>": "The" (the direct
                    opening) in 48 % of English R1-Zero documents; each step-by-step opening ~8 %.
    sft/train       4,000 conversations, 0.85M tokens (213 a conversation).
"""
from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanoseek.tasks import Problem, get_task, sample_split
from nanoseek.tasks.base import DEFAULT_OPENINGS, r1_zero_completion
from nanoseek.tokenizer import ASSISTANT, BOS, EOS, USER, r1_zero_prompt


@dataclass
class CorpusPreset:
    """What to write. Shares are weights (normalised when drawn)."""
    name: str
    docs: int                      # pretraining documents, train split
    heldout_docs: int              # pretraining documents from held-out problems
    sft_docs: int                  # cold-start SFT conversations (train split)
    rl_problems: int               # train-split problems for GRPO
    eval_problems: int             # held-out problems for evaluation
    tasks: dict[str, float]        # task family -> share of task documents
    knobs: dict[str, dict]         # task family -> difficulty knobs (get_task(name, **knobs))
    formats: dict[str, float]      # "r1zero" / "chat" / "plain" -> share
    styles: dict[str, float]       # "direct" / "steps" / "mistake" / "check" -> share
    langs: dict[str, float]        # prompt language -> share
    openings: dict[str, dict[str, list[str]]]  # "direct"/"steps" -> lang -> openings (uniform)
    mix: float = 0.1               # share of traces whose reasoning mixes languages
    direct_accuracy: float = 0.15  # how often a direct answer is right
    verify: float = 0.0            # check style: share of correct steps also re-checked
    sft_styles: dict[str, float] = field(default_factory=lambda: {"check": 0.6, "steps": 0.4})
    sft_verify: float = 1.0        # cold start: long traces that verify every step
    rl_tasks: dict[str, float] | None = None  # task mix of rl/eval problems (None: `tasks`)
    template: float = 1.0          # share of r1zero documents with the template's preamble (the
                                   # rest start at "User: {q} Assistant:"; 1.0 draws no RNG)
    heldout: float = 0.05          # share of each task's problem space held out
    shard_docs: int = 50_000       # lines per shard


def tiny() -> CorpusPreset:
    """The CPU preset: ~40k short documents, arithmetic-heavy, most documents guess directly."""
    return CorpusPreset(
        name="tiny", docs=40_000, heldout_docs=1_000, sft_docs=4_000, rl_problems=4_096,
        eval_problems=512,
        tasks={"arithmetic": 0.7, "linear": 0.2, "countdown": 0.1},
        knobs={"arithmetic": {"steps": [3, 5], "digits": 2, "mul": 0.3},
               "linear": {"coef": 9, "x_max": 20, "both_sides": 0.5},
               "countdown": {"numbers": [3, 4], "max_number": 10, "max_target": 100}},
        formats={"r1zero": 0.6, "chat": 0.1, "plain": 0.3},
        styles={"direct": 0.5, "steps": 0.25, "mistake": 0.15, "check": 0.1},
        langs={"en": 0.7, "zh": 0.3},
        openings={k: {lang: list(v) for lang, v in d.items()} for k, d in DEFAULT_OPENINGS.items()},
        rl_tasks={"arithmetic": 0.8, "linear": 0.2},
    )


def small() -> CorpusPreset:
    """A GPU-sized preset: 10x the documents, longer chains and 3-digit numbers."""
    p = tiny()
    p.name, p.docs, p.heldout_docs, p.sft_docs = "small", 400_000, 5_000, 40_000
    p.rl_problems, p.eval_problems = 32_768, 1_024
    p.knobs["arithmetic"] = {"steps": [4, 7], "digits": 3, "mul": 0.3}
    p.knobs["countdown"] = {"numbers": [4, 5], "max_number": 12, "max_target": 200}
    return p


def r1zero() -> CorpusPreset:
    """The tiny preset sized to what a 4M-parameter model can learn to carry out step by step in
    ~half an hour of pretraining on 2 cores (the issue: the tiny base wrote `12 * 7 = 85` and
    miscopied operands, so RL had nothing to select):
    - single-digit operands (a step is one of ~1,000 facts, each seen dozens of times), chains of
      2–5 operations so that plain step by step still slips now and then, products by 2..9 in a
      fifth of the operations; RL and evaluation on arithmetic only;
    - traces in the running form (tasks/arithmetic.py: each line rewrites what is left of the
      expression, so a step's operands are a few tokens back; with operands fetched from the
      question or a restatement, a base pretrained 800 steps wrote right arithmetic on the wrong
      numbers: 0 of 32 restatements copied, pass@1 2 %);
    - the check style re-checks a third of its correct steps and catches its slip, so a trace that
      checks is longer and right, one that slips without checking is wrong;
    - the template's 90-token preamble on 30 % of the R1-Zero documents only (38 % of all tokens
      were the preamble, learned in the first hundred steps); English 80 %, Chinese 20 %.
    The guessing style keeps its single opening and the largest share, so base pass@1 at T = 0.6
    stays low and RL has to find the step-by-step openings."""
    p = tiny()
    p.name = "r1zero"
    p.tasks = {"arithmetic": 0.9, "linear": 0.1}
    p.knobs = {"arithmetic": {"steps": [2, 5], "digits": 1, "mul": 0.2, "running": True},
               "linear": {"coef": 5, "x_max": 10, "both_sides": 0.3},
               "countdown": {"numbers": [3, 3], "max_number": 9, "max_target": 50}}
    p.formats = {"r1zero": 0.7, "chat": 0.05, "plain": 0.25}
    p.styles = {"direct": 0.45, "steps": 0.25, "mistake": 0.15, "check": 0.15}
    p.verify = 0.3
    p.langs = {"en": 0.8, "zh": 0.2}
    p.template = 0.3
    p.rl_tasks = {"arithmetic": 1.0}
    return p


PRESETS = {"tiny": tiny, "small": small, "r1zero": r1zero}


def pick(shares: dict[str, float], rng: random.Random) -> str:
    return rng.choices(list(shares), weights=list(shares.values()))[0]


class Writer:
    """Draws documents for one preset and seed; one RNG per document, so any order gives the same."""

    def __init__(self, preset: CorpusPreset, seed: int):
        self.p, self.seed = preset, seed
        names = list(preset.tasks) + [n for n in (preset.rl_tasks or {}) if n not in preset.tasks]
        self.tasks = {name: get_task(name, **preset.knobs.get(name, {})) for name in names}

    def rng(self, part: str, i: int) -> random.Random:
        return random.Random(f"{self.seed}/{part}/{i}")

    def problem(self, rng: random.Random, split: str, shares: dict[str, float]) -> Problem:
        name = pick(shares, rng)
        return sample_split(self.tasks[name], rng, split, self.seed, self.p.heldout, lang=pick(self.p.langs, rng))

    def trace_opts(self, style: str, lang: str, rng: random.Random, verify: float) -> dict:
        group = "direct" if style == "direct" else "steps"
        first = rng.choice(("en", "zh")) if lang == "mix" else lang
        return {"opening": rng.choice(self.p.openings[group][first]),
                "direct_accuracy": self.p.direct_accuracy, "verify": verify}

    def document(self, part: str, i: int, split: str) -> dict:
        rng = self.rng(part, i)
        fmt = pick(self.p.formats, rng)
        if fmt == "plain":
            name = pick(self.p.tasks, rng)
            return {"text": self.tasks[name].drill(rng), "task": name, "style": "drill", "lang": None,
                    "prompt_lang": None, "format": fmt, "correct": True, "split": split}
        prob = self.problem(rng, split, self.p.tasks)
        style = pick(self.p.styles, rng)
        lang = "mix" if rng.random() < self.p.mix else prob.lang
        task = self.tasks[prob.task]
        w = task.worked(prob, rng, style, lang, **self.trace_opts(style, lang, rng, self.p.verify))
        if fmt == "r1zero":
            prompt = r1_zero_prompt(prob.prompt)
            if self.p.template < 1.0 and rng.random() >= self.p.template:
                prompt = prompt[prompt.rindex("User: "):]
            text = prompt + " " + r1_zero_completion(w)
        else:
            text = f"{BOS}{USER}{prob.prompt}{ASSISTANT}<think>\n{w.thinking}\n</think>\n\n{w.summary}{EOS}"
        return {"text": text, "task": prob.task, "style": style, "lang": lang, "prompt_lang": prob.lang,
                "format": fmt, "correct": w.correct, "split": split}

    def conversation(self, part: str, i: int, split: str) -> dict:
        rng = self.rng(part, i)
        prob = self.problem(rng, split, self.p.tasks)
        style = pick(self.p.sft_styles, rng)
        task = self.tasks[prob.task]
        w = task.worked(prob, rng, style, prob.lang,
                        **self.trace_opts(style, prob.lang, rng, self.p.sft_verify))
        messages = [{"role": "user", "content": prob.prompt},
                    {"role": "assistant", "content": f"<think>\n{w.thinking}\n</think>\n\n{w.summary}"}]
        return {"messages": messages, "task": prob.task, "style": style, "lang": prob.lang,
                "correct": w.correct, "split": split}

    def rl_problem(self, part: str, i: int, split: str) -> dict:
        prob = self.problem(self.rng(part, i), split, self.p.rl_tasks or self.p.tasks)
        return {**prob.to_dict(), "split": split}


# --- files --------------------------------------------------------------------------------------
PARTS = ("pretrain", "sft", "problems")


def write_jsonl(path: Path, records) -> dict:
    """Write records a line each; return {"docs", "chars", "bytes"} ("chars": of the text, the
    messages or the prompt)."""
    n = chars = size = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            n, size = n + 1, size + len(line.encode("utf-8"))
            chars += len(rec.get("text") or rec.get("prompt") or "") + sum(
                len(m["content"]) for m in rec.get("messages", []))
    return {"docs": n, "chars": chars, "bytes": size}


def write_sharded(out: Path, part: str, split: str, count: int, make, shard_docs: int,
                  tally: Counter) -> dict[str, dict]:
    """`count` records from make(part/split, i, split) in shards of `shard_docs` lines."""
    files = {}
    for k, start in enumerate(range(0, max(count, 1), shard_docs)):
        def records(start=start):
            for i in range(start, min(start + shard_docs, count)):
                rec = make(f"{part}/{split}", i, split)
                tally[(part, split, rec.get("task"), rec.get("format", "conversation"), rec.get("style"),
                       rec.get("lang"))] += 1
                yield rec
        name = f"{part}/{split}-{k:05d}.jsonl"
        files[name] = write_jsonl(out / name, records())
    return files


def mix_table(tally: Counter, part: str, split: str) -> dict[str, dict[str, int]]:
    """Counts by task, format, style and language of one part/split (sorted, for the manifest)."""
    table: dict[str, Counter] = {k: Counter() for k in ("task", "format", "style", "lang")}
    for (p, s, task, fmt, style, lang), n in tally.items():
        if (p, s) == (part, split):
            for k, v in zip(table, (task, fmt, style, lang)):
                table[k][str(v)] += n
    return {k: dict(sorted(c.items())) for k, c in table.items()}


def build(preset: CorpusPreset, out: str | Path, seed: int = 0) -> dict:
    """Write the whole corpus into `out` (our subdirectories are replaced) and return the manifest."""
    out = Path(out)
    for part in PARTS:
        shutil.rmtree(out / part, ignore_errors=True)
        (out / part).mkdir(parents=True)
    w, tally, files = Writer(preset, seed), Counter(), {}
    n = preset.shard_docs
    files.update(write_sharded(out, "pretrain", "train", preset.docs, w.document, n, tally))
    files.update(write_sharded(out, "pretrain", "heldout", preset.heldout_docs, w.document, n, tally))
    files.update(write_sharded(out, "sft", "train", preset.sft_docs, w.conversation, n, tally))
    files.update(write_sharded(out, "sft", "heldout", max(1, preset.sft_docs // 20), w.conversation, n,
                               tally))
    files["problems/rl.jsonl"] = write_jsonl(
        out / "problems/rl.jsonl", (w.rl_problem("rl", i, "train") for i in range(preset.rl_problems)))
    files["problems/eval.jsonl"] = write_jsonl(
        out / "problems/eval.jsonl", (w.rl_problem("eval", i, "heldout") for i in range(preset.eval_problems)))
    manifest = {
        "preset": asdict(preset), "seed": seed,
        "mix": {f"{p}/{s}": mix_table(tally, p, s)
                for p, s in (("pretrain", "train"), ("pretrain", "heldout"), ("sft", "train"))},
        "files": files,
        "totals": {part: {k: sum(f[k] for name, f in files.items() if name.startswith(part + "/"))
                          for k in ("docs", "chars", "bytes")} for part in PARTS},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
                                       encoding="utf-8")
    return manifest


def scaled(preset: CorpusPreset, scale: float) -> CorpusPreset:
    """The preset with every count multiplied by `scale` (at least 1 each)."""
    for k in ("docs", "heldout_docs", "sft_docs", "rl_problems", "eval_problems"):
        setattr(preset, k, max(1, round(getattr(preset, k) * scale)))
    return preset
