"""Rejection sampling: k samples per prompt from a model, keep the verified and readable ones, and
write them as an SFT corpus (R1 §2.3.3, stage 3 of the R1 pipeline; R1 §2.4's distillation data).

    cfg = RejectionConfig(k=8, template="chat", keep_per_problem=2)
    convs, stats = rejection_sample(llm, problems, cfg)           # the kept conversations + figures
    manifest = write_traces("runs/x/rs", convs, stats, heldout_frac=0.05, seed=0)

What R1 does (spec §9.3): several samples per prompt from the reasoning-RL checkpoint, keep only
the correct ones, filter out chains of thought with mixed languages, long paragraphs and code
blocks; ~600k reasoning samples, then SFT of the *base* model on them (and the distilled students
on the same data, §10). Here every problem's k samples are one engine request (`SamplingParams(n=k)`,
one prefill), drawn by `eval.evaluate.sample` with the seed `problem_seed(seed, problem)`: a hash of
the prompt, so what is kept does not depend on batching, order or a subset (problems go to the
engine `batch_problems` at a time only so that a progress bar can move).

Which samples are kept. Each sample gets the FIRST reason that rejects it, in this order (so the
per-reason counts add up to samples − kept):
    truncated       cut by max_tokens (finish "length"): no complete answer, unreadable ending
    format          not "<think>reasoning</think>" + one answer block (rl.rewards.format; with the
                    chat template the prompt opened the think block)
    wrong           the answer fails the problem's own checker (rl.rewards.accuracy < 1): the call
                    the RL reward and evaluation make, so "verified" means the same everywhere
    mixed_language  reasoning words not all in the prompt's language (rl.rewards.language_consistency
                    < 1: R1 filters mixed-language CoT outright, it does not weigh it)
    repetitive      a degenerate loop, the small-model failure R1's greedy warning is about:
                    a line (stripped) written more than `max_line_repeats` times (default 2: the
                    check style legitimately redoes a step once, so a line may appear twice), or a
                    span of 3–40 characters repeated back to back 4 or more times ("= 5 = 5 = 5 = 5")
    unreadable      R1's other two filters: a paragraph (line) longer than `max_line_chars`
                    characters, or a code block (```)
    short           reasoning of fewer than `min_reasoning_lines` non-empty lines; off by default
                    (R1 has no such filter), 2 drops a bare lucky guess ("<think>The answer is 7.
                    </think>", the corpus's direct style when it happens to be right)
    duplicate       the same normalised conversation as an earlier survivor of this prompt
    surplus         more than `keep_per_problem` survivors for this prompt
Which survivors are kept (the cap): a seeded random choice, not the shortest or the longest.
Rejection sampling should estimate p(trace | prompt, trace is right), the policy's own correct
behaviour. Preferring short ones would favour lucky guesses ("The answer is 42" right by chance is
the shortest correct trace: the corpus's direct style, RL's first victim) and throw away the
checking traces RL grew; preferring long ones would favour padding. Kept samples are written in
their sample order.

The SFT form. Every kept sample becomes {"messages": [{"role": "user", "content": question},
{"role": "assistant", "content": "<think>\\n{reasoning}\\n</think>\\n\\n{summary}"}], "task", "lang",
"source": "rejection", "tokens"}: the corpus's cold-start layout (data/corpus.py), so `nanoseek sft`
trains the R1 chat format from it. With the chat template the summary is the model's own text
after </think>; with the R1-Zero template (" <think>…</think>\\n<answer>…</answer>") the answer
tags go and the summary is the answer line the corpus writes ("The answer is \\boxed{x}." or
"答案是 \\boxed{x}。"), so traces sampled from R1-Zero still teach the chat format.

The files (`write_traces`): OUT/sft/train-00000.jsonl and OUT/sft/heldout-00000.jsonl, each
written to a temporary name and renamed, then OUT/manifest.json last: the manifest is the
completion marker, and it is removed first when a run starts again. The held-out split is by
problem (a problem's conversations are all on one side, so the held-out loss is on unseen
questions): problems ordered by a seeded hash of the prompt, the first round(frac × n) (at least
one when n ≥ 2) held out. If no problem is held out (n < 2) the held-out file takes the corpus's
own SFT held-out conversations when given (`fallback_heldout`), else a copy of train (marked in
the manifest). `min_conversations` tops train up with the corpus's SFT conversations when fewer
were kept (R1 mixes ~200k reused SFT samples into the 600k; here it is what keeps a micro smoke
run going when its model is right too rarely); the manifest counts them apart.

Measured: stages/rejection_sample.py (on the 800-step R1-Zero base: 17.8 % of samples right, all
of those readable; 72 of 512 kept from 46 of 64 problems, 10 of them bare lucky guesses).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from nanoseek.eval.evaluate import EvalConfig, sample
from nanoseek.rl import rewards as R
from nanoseek.tasks import Problem
from nanoseek.tasks.base import COMMON

__all__ = ["RejectionConfig", "REASONS", "MANIFEST", "reject_reason", "is_repetitive", "is_unreadable",
           "to_conversation", "select", "distinct", "rejection_sample", "statistics_of", "split_heldout",
           "write_traces", "start_over", "is_complete", "corpus_conversations", "build_traces", "describe"]

REASONS = ("truncated", "format", "wrong", "mixed_language", "repetitive", "unreadable", "short", "duplicate",
           "surplus")
MANIFEST = "manifest.json"
_LOOP = re.compile(r"(.{3,40}?)\1{3,}", re.DOTALL)   # a 3–40 character span, then 3+ more copies of it


@dataclass
class RejectionConfig:
    """R1's sampling settings (T 0.6, top-p 0.95) and the filters; defaults sized for a CPU."""
    k: int = field(default=8, metadata={"help": "samples per problem"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (R1: 0.6)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass (R1: 0.95)"})
    max_tokens: int = field(default=256, metadata={"help": "new tokens per sample at most (truncated ones are "
                                                            "rejected)"})
    template: str = field(default="chat", metadata={
        "help": "prompt: the R1 chat template opening <think>, or the R1-Zero text template (its samples are "
                "converted to the chat form)", "choices": ["chat", "r1zero"]})
    keep_per_problem: int = field(default=2, metadata={"help": "verified samples kept per problem at most "
                                                               "(a seeded random choice among them)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (each problem's samples derive from it)"})
    max_line_repeats: int = field(default=2, metadata={"help": "a line written more often is a loop: rejected"})
    max_line_chars: int = field(default=400, metadata={"help": "a longer line (paragraph) is unreadable: "
                                                               "rejected"})
    min_reasoning_lines: int = field(default=0, metadata={"help": "reject reasoning of fewer lines (2 drops bare "
                                                                  "guesses such as 'The answer is 7.'; 0: off, as R1)"})
    batch_problems: int = field(default=64, metadata={"help": "problems per engine call (the progress bar's "
                                                              "step; results do not depend on it)"})

    def __post_init__(self):
        if min(self.k, self.max_tokens, self.keep_per_problem, self.batch_problems) < 1:
            raise ValueError("k, max_tokens, keep_per_problem and batch_problems must be >= 1")
        if self.template not in ("chat", "r1zero"):
            raise ValueError(f"template must be chat or r1zero, not {self.template!r}")


# --- the filters (pure) ----------------------------------------------------------------------------
def is_repetitive(text: str, max_line_repeats: int = 2) -> bool:
    """A line written more than `max_line_repeats` times, or a 3–40 character span 4+ times in a row.

    >>> is_repetitive("2 + 3 = 5\\nWait, let me check: 5 - 3 = 2.\\n2 + 3 = 5\\nSo 5.")  # twice is a redo
    False
    >>> is_repetitive("2 + 3 = 5\\n2 + 3 = 5\\n2 + 3 = 5"), is_repetitive("so 5 = 5 = 5 = 5 = 5")
    (True, True)
    """
    lines = Counter(line.strip() for line in text.splitlines() if line.strip())
    if lines and max(lines.values()) > max_line_repeats:
        return True
    return _LOOP.search(text) is not None


def is_unreadable(text: str, max_line_chars: int = 400) -> bool:
    """R1's other filters: a paragraph (line) over `max_line_chars` characters, or a code block.

    >>> is_unreadable("2 + 3 = 5\\nSo 5."), is_unreadable("x" * 401), is_unreadable("```python\\nprint(5)\\n```")
    (False, True, True)
    """
    return "```" in text or any(len(line) > max_line_chars for line in text.splitlines())


def reject_reason(text: str, finish: str | None, well_formed: bool, right: bool, consistent: bool,
                  cfg: RejectionConfig) -> str | None:
    """The first reason (REASONS order) that rejects one sample, or None when it survives the
    filters (dedupe and the per-problem cap come after, in `select`).

    >>> cfg = RejectionConfig()
    >>> reject_reason("2 + 3 = 5\\n</think>\\n\\n\\\\boxed{5}", "stop", True, True, True, cfg) is None
    True
    >>> reject_reason("2 + 3 = 5 = 5 = 5 = 5", "length", False, False, True, cfg)
    'truncated'
    >>> reject_reason("x\\n</think>\\n\\n\\\\boxed{6}", "stop", True, False, True, cfg)
    'wrong'
    """
    if finish != "stop":
        return "truncated"
    if not well_formed:
        return "format"
    if not right:
        return "wrong"
    if not consistent:
        return "mixed_language"
    if is_repetitive(text, cfg.max_line_repeats):
        return "repetitive"
    if is_unreadable(text, cfg.max_line_chars):
        return "unreadable"
    if sum(bool(line.strip()) for line in R.reasoning_text(text).splitlines()) < cfg.min_reasoning_lines:
        return "short"
    return None


def to_conversation(problem: Problem, text: str, template: str) -> dict:
    """A well-formed completion as an SFT conversation in the R1 chat form (see the module docstring).

    >>> p = Problem("What is 2 + 3?", "5", {"task": "arithmetic", "lang": "en"})
    >>> to_conversation(p, " <think>\\n2 + 3 = 5\\n</think>\\n<answer>\\n5\\n</answer>", "r1zero")["messages"][1]
    {'role': 'assistant', 'content': '<think>\\n2 + 3 = 5\\n</think>\\n\\nThe answer is \\\\boxed{5}.'}
    >>> to_conversation(p, "2 + 3 = 5\\n</think>\\n\\nSo \\\\boxed{5}.", "chat")["messages"][1]["content"]
    '<think>\\n2 + 3 = 5\\n</think>\\n\\nSo \\\\boxed{5}.'
    """
    if template == "r1zero":
        reasoning = text.split("<think>", 1)[-1].split("</think>", 1)[0]
        summary = COMMON("boxed", "zh" if problem.lang == "zh" else "en", None, x=R.extract_answer(text))
    else:
        reasoning, summary = text.rsplit("</think>", 1)
    content = f"<think>\n{reasoning.strip()}\n</think>\n\n{summary.strip()}"
    return {"messages": [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": content}],
            "task": problem.task, "lang": problem.lang, "source": "rejection"}


def select(candidates: list[dict], keep: int, rng: random.Random) -> tuple[list[dict], int, int]:
    """Drop duplicate conversations, keep at most `keep` at random (in sample order):
    (kept, duplicates, surplus).

    >>> c = [{"messages": [m]} for m in "abab"] + [{"messages": ["c"]}]
    >>> kept, dup, sur = select(c, 2, random.Random(0))
    >>> len(kept), dup, sur, kept == sorted(kept, key=c.index)
    (2, 2, 1, True)
    """
    unique, seen = [], set()
    for c in candidates:
        key = json.dumps(c["messages"], ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    chosen = sorted(rng.sample(range(len(unique)), min(keep, len(unique))))
    return [unique[i] for i in chosen], len(candidates) - len(unique), len(unique) - len(chosen)


# --- sampling --------------------------------------------------------------------------------------
def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def _judge(problems: list[Problem], outs, cfg: RejectionConfig, tally: Counter) -> list[dict]:
    """The kept conversations of one engine batch; every sample's fate counted in `tally` (its
    rejection reason, and "right" for every verified answer whatever else rejects it)."""
    flat = [(p, c) for p, comps in zip(problems, outs) for c in comps]
    texts, probs = [c.text for _, c in flat], [p for p, _ in flat]
    formed = R.format(texts, think_in_prompt=cfg.template == "chat")
    right = R.accuracy(texts, probs)
    consistent = R.language_consistency(texts, probs)
    tally["right"] += sum(r >= 1 for r in right)
    tally["samples"] += len(flat)
    kept, i = [], 0
    for p, comps in zip(problems, outs):
        candidates = []
        for c in comps:
            why = reject_reason(c.text, c.finish_reason, formed[i] >= 1, right[i] >= 1, consistent[i] >= 1, cfg)
            if why:
                tally[why] += 1
            else:
                candidates.append({**to_conversation(p, c.text, cfg.template), "tokens": len(c.token_ids)})
            i += 1
        chosen, duplicates, surplus = select(candidates, cfg.keep_per_problem,
                                             random.Random(_hash(cfg.seed, "keep", p.prompt)))
        tally["duplicate"] += duplicates
        tally["surplus"] += surplus
        kept.extend(chosen)
    return kept


def distinct(problems: list[Problem]) -> list[Problem]:
    """The first problem of each prompt, in order (a repeated prompt would get the same samples)."""
    first: dict[str, Problem] = {}
    for p in problems:
        first.setdefault(p.prompt, p)
    return list(first.values())


def rejection_sample(llm, problems: list[Problem], cfg: RejectionConfig | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], dict]:
    """k samples per problem from `llm` (engine batches of cfg.batch_problems problems), filtered and
    capped: (kept conversations, statistics). A repeated prompt is sampled once. `progress(done,
    total)` is called after each batch."""
    cfg = cfg or RejectionConfig()
    problems = distinct(problems)
    ecfg = EvalConfig(k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                      template=cfg.template, seed=cfg.seed, n_problems=len(problems))
    kept, lengths, tally = [], [], Counter()
    t0 = time.perf_counter()
    for start in range(0, len(problems), cfg.batch_problems):
        batch = problems[start:start + cfg.batch_problems]
        outs = sample(llm, batch, ecfg)
        kept.extend(_judge(batch, outs, cfg, tally))
        lengths.extend(len(c.token_ids) for comps in outs for c in comps)
        if progress:
            progress(start + len(batch), len(problems))
    return kept, statistics_of(len(problems), kept, lengths, tally, time.perf_counter() - t0, cfg)


def statistics_of(n_problems: int, kept: list[dict], lengths: list[int], tally: Counter, seconds: float,
                  cfg: RejectionConfig) -> dict:
    """The figures of a run (JSON-able): what was sampled, kept, rejected and why."""
    samples = tally["samples"]
    kept_lengths = [c["tokens"] for c in kept]
    return {
        "problems": n_problems, "samples": samples, "kept": len(kept),
        "problems_with_kept": len({c["messages"][0]["content"] for c in kept}),
        "kept_share": len(kept) / max(1, samples),
        "accuracy": tally["right"] / max(1, samples),          # verified answers among all samples (pass@1)
        "rejected": {r: tally[r] for r in REASONS},
        "mean_kept_tokens": statistics.fmean(kept_lengths) if kept_lengths else 0.0,
        "mean_sample_tokens": statistics.fmean(lengths) if lengths else 0.0,
        "generated_tokens": sum(lengths), "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(lengths) / max(seconds, 1e-9), 1),
        "config": asdict(cfg),
    }


# --- the SFT corpus on disk ------------------------------------------------------------------------
def split_heldout(conversations: list[dict], frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout) by problem: the first round(frac × problems) problems in a seeded hash order
    (at least one when there are two or more) are held out with all their conversations.

    >>> convs = [{"messages": [{"content": q}, {"content": a}]} for q in "abcd" for a in "xy"]
    >>> train, held = split_heldout(convs, 0.25, 0)
    >>> question = lambda convs: {c["messages"][0]["content"] for c in convs}
    >>> len(train), len(held), question(held) & question(train)
    (6, 2, set())
    >>> split_heldout(convs[:2], 0.5, 0)[1]        # one problem: nothing held out
    []
    """
    prompts = list(dict.fromkeys(c["messages"][0]["content"] for c in conversations))
    n = min(len(prompts) - 1, max(1, round(frac * len(prompts)))) if len(prompts) >= 2 and frac > 0 else 0
    held = set(sorted(prompts, key=lambda q: _hash(seed, "heldout", q))[:n])
    return ([c for c in conversations if c["messages"][0]["content"] not in held],
            [c for c in conversations if c["messages"][0]["content"] in held])


def _write_atomic(path: str, text: str) -> None:
    """Write to a temporary file in the same directory, then rename: a killed run leaves no half file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def is_complete(out: str) -> bool:
    """Whether `out` holds a finished trace corpus (its manifest is written last)."""
    return os.path.exists(os.path.join(out, MANIFEST))


def write_traces(out: str, conversations: list[dict], stats: dict, heldout_frac: float = 0.05, seed: int = 0,
                 min_conversations: int = 0, fallback_train: list[dict] | None = None,
                 fallback_heldout: list[dict] | None = None, info: dict | None = None) -> dict:
    """OUT/sft/train-00000.jsonl, OUT/sft/heldout-00000.jsonl, then OUT/manifest.json (returned).
    `fallback_train` tops train up to `min_conversations`; `fallback_heldout` stands in for an empty
    held-out split (both: the corpus's own SFT conversations). Raises ValueError when train would
    be empty; the manifest is then not written."""
    start_over(out)
    train, heldout = split_heldout(conversations, heldout_frac, seed)
    topped = [dict(c, source="corpus") for c in (fallback_train or [])[:max(0, min_conversations - len(train))]]
    train += topped
    heldout_source = "rejection"
    if not heldout:
        heldout, heldout_source = ([dict(c, source="corpus") for c in fallback_heldout], "corpus") \
            if fallback_heldout else (list(train), "train (overlap: too few problems kept)")
    if not train:
        raise ValueError(f"no verified traces kept from {stats.get('samples', 0)} samples (accuracy "
                         f"{stats.get('accuracy', 0):.1%}): nothing to fine-tune on")
    files = {"sft/train-00000.jsonl": train, "sft/heldout-00000.jsonl": heldout}
    for name, records in files.items():
        _write_atomic(os.path.join(out, name), _jsonl(records))
    manifest = {**stats, "train_conversations": len(train), "heldout_conversations": len(heldout),
                "corpus_conversations": len(topped), "heldout_source": heldout_source,
                "heldout_frac": heldout_frac, "files": {k: len(v) for k, v in files.items()}, **(info or {})}
    _write_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
    return manifest


def start_over(out: str) -> None:
    """Remove a previous run's completion marker first, then its conversation files."""
    marker = os.path.join(out, MANIFEST)
    if os.path.exists(marker):
        os.remove(marker)
    sft = os.path.join(out, "sft")
    for name in os.listdir(sft) if os.path.isdir(sft) else []:
        if name.endswith(".jsonl") and name.startswith(("train-", "heldout-")):
            os.remove(os.path.join(sft, name))


def corpus_conversations(corpus: str, split: str, limit: int | None = None) -> list[dict]:
    """The first `limit` records of CORPUS/sft/{split}-*.jsonl (the fallbacks of write_traces); []
    when there are none."""
    out: list[dict] = []
    if limit == 0:
        return out
    for path in sorted(glob.glob(os.path.join(corpus, "sft", f"{split}-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
        if limit is not None and len(out) >= limit:
            break
    return out[:limit]


# --- the whole job, for `nanoseek rejection-sample` and `nanoseek distill` ---------------------------
def build_traces(model: str, corpus: str, out: str, cfg: RejectionConfig, n_problems: int = 256,
                 heldout_frac: float = 0.05, min_conversations: int = 0, dtype: str | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Sample the first `n_problems` distinct prompts of CORPUS/problems/rl.jsonl (0: all) from the
    model directory `model`, keep, write OUT (write_traces) and return the manifest. Progress: a
    tqdm bar on a terminal, else a `log` line per engine batch. Raises OSError/ValueError when
    there are no problems or nothing to fine-tune on."""
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.engine import LLM
    from nanoseek.eval.problems import read_problem_file
    problems = read_problem_file(os.path.join(corpus, "problems", "rl.jsonl"))
    problems = distinct(problems)
    problems = problems[:n_problems] if n_problems > 0 else problems
    if not problems:
        raise ValueError(f"no problems in {corpus}/problems/rl.jsonl")
    start_over(out)
    model = resolve_model_dir(model)
    llm = LLM(model, dtype=dtype, max_num_seqs=256, max_num_batched_tokens=4096, kv_cache_memory=512 << 20)
    log(f"rejection sampling {len(problems)} problems x {cfg.k} from {model} ({cfg.template} template, T "
        f"{cfg.temperature}, top-p {cfg.top_p}, <= {cfg.max_tokens} tokens), keeping <= {cfg.keep_per_problem} each")
    convs, stats = rejection_sample(llm, problems, cfg, progress=_progress(len(problems), log))
    return write_traces(out, convs, stats, heldout_frac, cfg.seed, min_conversations,
                        corpus_conversations(corpus, "train", min_conversations),
                        corpus_conversations(corpus, "heldout"), info={"model": model, "data": corpus})


def _progress(total: int, log: Callable[[str], None]) -> Callable[[int, int], None]:
    from tqdm import tqdm
    bar = tqdm(total=total, unit="problem", disable=None, dynamic_ncols=True)

    def progress(done: int, _total: int) -> None:
        if bar.disable:
            log(f"  {done}/{total} problems")
        else:
            bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return progress


def describe(m: dict, out: str) -> str:
    """A manifest for people: what was sampled, kept and rejected, and where it went."""
    rejected = ", ".join(f"{k} {v}" for k, v in m["rejected"].items() if v)
    return "\n".join([
        f"rejection sampling: {m['problems']} problems x {m['config']['k']} = {m['samples']} samples in "
        f"{m['seconds']:.1f} s ({m['tokens_per_s']:.0f} tokens/s)",
        f"  verified right  {m['accuracy']:6.1%} of samples",
        f"  kept            {m['kept']} ({m['kept_share']:.1%}) from {m['problems_with_kept']} problems; "
        f"mean {m['mean_kept_tokens']:.1f} tokens (all samples {m['mean_sample_tokens']:.1f})",
        f"  rejected        {rejected or 'none'}",
        f"  wrote           {out}/sft: {m['train_conversations']} train ({m['corpus_conversations']} from the "
        f"corpus), {m['heldout_conversations']} held out ({m['heldout_source']})"])
