"""report.md: what a speedrun measured, for a newcomer, from the files its stages left behind.

    write_report("runs/tiny", stages, state)     # -> runs/tiny/report.md (+ PNGs next to it)

Everything is read back from the run directory — the evaluations' JSON and per-problem records
(OUT/eval/), the training runs' metrics.jsonl and summary.json, OUT/speedrun.json — so the report
can be rebuilt from a finished run at any time, and a missing piece says which file is missing
instead of failing. The sections (`SECTIONS`, each always present, even on micro sizes):
  - the results table, laid out like R1 Tables 2 and 5: one row per model (base, R1-Zero, R1, the
    distilled student, the RL-only student), per benchmark pass@1 / cons@k / pass@k (R1's
    protocol, eval/evaluate.py), the mean response length and the decode speed (generated tokens /
    seconds of the held-out evaluation: one engine batch of n x k sequences, prefill included);
    then the claims of the issue and of DESIGN.md, each with its measured numbers;
  - R1-Zero's accuracy and length curves (R1 Fig. 2 and 3: the grpo stage's own plots, copied);
  - language mixing with and without the consistency reward: the GRPO runs' language-mixed share
    of rollouts first vs last steps (R1-Zero has no language reward, rl1 and the final RL have
    it; they start from different models, so this is not a controlled comparison and the report
    says so), and the share of language-mixed answers of every model on the same held-out problems;
  - FP8 vs fp32: the FP8 side run's training loss against the fp32 base's over the same steps
    (same seed, data order and init; the LR of both runs is read from their logs and its largest
    difference printed), held-out loss where both evaluated;
  - MoE balance: MaxVio per MoE layer over pretraining (V3 §2.1.2's measure);
  - wall time and tokens per stage (OUT/speedrun.json), with the budget and every attempt;
  - an "aha" transcript found automatically: a sampled evaluation response that checks itself
    (a SELF_CHECK phrase, rl/rollout.py) and ends right, preferring one whose reasoning wrote a
    wrong step before the check (it corrected itself), shown verbatim.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

from nanoseek import recipe
from nanoseek.eval.metrics import step_accuracy
from nanoseek.rl.rewards import language_consistency, reasoning_text
from nanoseek.tasks import Problem
from nanoseek.train.metrics import pyplot, save_figure

SECTIONS = ("Results", "Claims", "R1-Zero: accuracy and length during RL", "Language mixing",
            "FP8 vs fp32 loss", "MoE balance (MaxVio) over pretraining", "Wall time and tokens per stage",
            "An \"aha\" transcript", "Files")
GRPO_RUNS = {"r1zero": "R1-Zero (from the base)", "rl1": "reasoning RL (from the cold start)",
             "rl2": "final RL (-> R1)", "student_rl": "student, RL only"}


# --- reading ----------------------------------------------------------------------------------------
def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_jsonl(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def mean(xs) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def num(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def ends(recs: list[dict], key: str, n: int = 5) -> tuple[float | None, float | None]:
    """Mean of `key` over the first and the last n records that have it."""
    vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
    return (mean(vals[:n]), mean(vals[-n:])) if vals else (None, None)


def evaluation(out: str, model: str, bench: str) -> dict | None:
    return read_json(recipe.eval_file(out, model, bench))


def top_k(r: dict) -> int:
    return int(r.get("k", 1))


def decode_tps(r: dict | None) -> float | None:
    if not r or not r.get("seconds"):
        return None
    return r["mean_length"] * r["n_problems"] * r["k"] / r["seconds"]


# --- sections ---------------------------------------------------------------------------------------
def results(out: str) -> list[str]:
    """The R1 Table 2 / 5 layout: rows = models, per benchmark pass@1 / cons@k / pass@k."""
    ks = {top_k(r) for m in recipe.MODELS for b in recipe.BENCHMARKS if (r := evaluation(out, m, b))}
    k = max(ks) if ks else 16
    head = ["model"] + [f"{b} p@1 / c@{k} / p@{k}" for b in recipe.BENCHMARKS] + ["mean length", "decode tok/s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in recipe.MODELS:
        cells = [recipe.MODEL_TITLES[m]]
        for b in recipe.BENCHMARKS:
            r = evaluation(out, m, b)
            kk = top_k(r) if r else k
            cells.append(" / ".join(pct(r.get(key)) for key in ("pass@1", f"cons@{kk}", f"pass@{kk}")) if r else "—")
        held = evaluation(out, m, "heldout")
        cells += [num(held and held.get("mean_length")), num(decode_tps(held), ".0f")]
        rows.append("| " + " | ".join(cells) + " |")
    any_r = next((r for m in recipe.MODELS for b in recipe.BENCHMARKS if (r := evaluation(out, m, b))), None)
    cfg = any_r["config"] if any_r else {}
    notes = [f"- **{b}**: {title}; {(evaluation(out, 'base', b) or {}).get('n_problems', '—')} problems"
             for b, (_, title) in recipe.BENCHMARKS.items()]
    templates = ", ".join(f"{recipe.MODEL_TITLES[m]}: {t}" for m, (_, _, t) in recipe.MODELS.items())
    return ["## Results", "",
            f"R1's protocol (§3; deepseek_spec §11): k = {k} samples a problem at T = {cfg.get('temperature', 0.6)}, "
            f"top-p {cfg.get('top_p', 0.95)}, at most {cfg.get('max_tokens', '?')} tokens; pass@1 = the mean "
            f"correctness over the k samples, cons@{k} = the majority answer's, pass@{k} = any right "
            "(unbiased estimator). Percent. Mean length: tokens per response on the held-out problems; "
            "decode tok/s: generated tokens / seconds of that evaluation (one engine batch of all its samples, prefill "
            "included, evaluations running side by side: compare rows, not machines).",
            "", *rows, "", *notes, f"- prompt template per model: {templates}", ""]


def claims(out: str, preset: str) -> list[str]:
    """The issue's and DESIGN.md's targets, each with what was measured."""
    def p1(m: str, b: str = "heldout") -> float | None:
        r = evaluation(out, m, b)
        return r.get("pass@1") if r else None

    z = read_jsonl(os.path.join(out, "r1zero", "metrics.jsonl"))
    evals = [r for r in z if "heldout_pass@1" in r]
    acc0, acc1 = (evals[0]["heldout_pass@1"], evals[-1]["heldout_pass@1"]) if evals else (None, None)
    # length on the held-out problems at T = 0.6 (the evaluation's sampling), first vs last evaluation;
    # the T = 1 rollouts' length is shown beside it (the base rambles longer at T = 1)
    len0, len1 = (evals[0].get("heldout_len"), evals[-1].get("heldout_len")) if evals else (None, None)
    roll0, roll1 = ends(z, "response_len_mean")
    chk0, chk1 = ends(z, "self_check_share")
    mix_z, mix_r1 = mixed_share(out, "r1zero"), mixed_share(out, "r1")
    rows = [
        ("base pass@1 ≤ 25 % at T = 0.6 (R1-Zero prompt)", f"{pct(p1('base'))} %", _ok(p1("base"), None, 0.25)),
        ("R1-Zero: held-out pass@1 ≥ 85 % after GRPO", f"{pct(acc0)} → {pct(acc1)} %", _ok(acc1, 0.85)),
        ("R1-Zero: mean response length ≥ 1.5× (held-out, T = 0.6)",
         f"{num(len0)} → {num(len1)} tokens (rollouts at T = 1, first / last 5 steps: {num(roll0)} → {num(roll1)})",
         _ok(len1 / len0 if len0 and len1 else None, 1.5)),
        ("R1-Zero: responses that check themselves < 5 % → > 30 %", f"{pct(chk0)} → {pct(chk1)} %",
         _ok(chk1, 0.30) if chk0 is not None and chk0 < 0.05 else "✗" if chk0 is not None else "—"),
        ("distilled student beats the RL-only student on held-out pass@1 (R1 §4.1)",
         f"{pct(p1('student'))} vs {pct(p1('student_rl'))} %", _cmp(p1("student"), p1("student_rl"), strict=True)),
        ("R1 at least as accurate as R1-Zero (held-out pass@1)", f"{pct(p1('r1'))} vs {pct(p1('r1zero'))} %",
         _cmp(p1("r1"), p1("r1zero"))),
        ("R1 mixes languages less than R1-Zero (held-out answers)", f"{pct(mix_r1)} vs {pct(mix_z)} % mixed",
         _cmp(mix_z, mix_r1, strict=True)),
    ]
    note = (["*Preset smoke: micro models and a few steps; these numbers only show that every piece runs.*", ""]
            if preset == "smoke" else [])
    return ["## Claims", "", *note, "| claim | measured | holds |", "|---|---|---|",
            *[f"| {a} | {b} | {c} |" for a, b, c in rows], ""]


def _ok(x: float | None, lo: float | None = None, hi: float | None = None) -> str:
    if x is None:
        return "—"
    return "✓" if (lo is None or x >= lo) and (hi is None or x <= hi) else "✗"


def _cmp(a: float | None, b: float | None, strict: bool = False) -> str:
    if a is None or b is None:
        return "—"
    return "✓" if (a > b if strict else a >= b) else "✗"


def r1zero_curves(out: str) -> list[str]:
    run = os.path.join(out, "r1zero")
    lines = ["## R1-Zero: accuracy and length during RL", "",
             "GRPO from the base with accuracy + format rewards only (R1 §2.2), the R1-Zero prompt. "
             "Left: held-out pass@1 and cons@k every few steps and the batch accuracy (R1 Fig. 2); right: "
             "mean response length (R1 Fig. 3).", ""]
    for name in ("accuracy", "length"):
        src = os.path.join(run, f"{name}.png")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, f"r1zero_{name}.png"))
            lines.append(f"![R1-Zero {name}](r1zero_{name}.png)")
        else:
            lines.append(f"*{src} is missing (the r1zero stage has not finished).*")
    evals = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if "heldout_pass@1" in r]
    if evals:
        lines += ["", "| step | held-out pass@1 | cons@k | mean length |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {pct(r['heldout_pass@1'])} | {pct(r.get('heldout_cons@k'))} | "
                  f"{num(r.get('heldout_len'))} |" for r in evals]
    return lines + [""]


def mixed_share(out: str, model: str, bench: str = "heldout") -> float | None:
    """Share of a model's evaluation responses whose reasoning is not all in the prompt's language
    (GRPO's language_mixed_share, on the same held-out problems for every model)."""
    base = recipe.eval_file(out, model, bench)[: -len(".json")]
    recs = read_jsonl(base + ".records.jsonl")
    texts = [t for r in recs for t in r["texts"]]
    problems = [Problem(r["prompt"], r["answer"]) for r in recs for _ in r["texts"]]
    return sum(m < 1.0 for m in language_consistency(texts, problems)) / len(texts) if texts else None


def language(out: str) -> list[str]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = ["| GRPO run | language reward weight | mixed share, first 5 steps | last 5 steps |", "|---|---|---|---|"]
    for run, title in GRPO_RUNS.items():
        recs = read_jsonl(os.path.join(out, run, "metrics.jsonl"))
        pts = [(r["step"], r["language_mixed_share"]) for r in recs if "language_mixed_share" in r]
        info = (read_json(os.path.join(out, run, "model", "nanoseek.json")) or {}).get("info", {})
        weight = info.get("grpo", {}).get("language_weight")
        if pts:
            ax.plot(*zip(*pts), lw=1, label=f"{title}, weight {num(weight, 'g')}")
        a, b = ends(recs, "language_mixed_share")
        rows.append(f"| {title} | {num(weight, 'g')} | {pct(a)} % | {pct(b)} % |")
    ax.set(xlabel="step", ylabel="share of rollouts", title="language-mixed reasoning during GRPO", ylim=(0, 1))
    if ax.lines:
        ax.legend()
    save_figure(fig, out, "language_mixing.png")
    evals = ["| model | language-mixed held-out responses |", "|---|---|"]
    evals += [f"| {recipe.MODEL_TITLES[m]} | {pct(mixed_share(out, m))} % |" for m in recipe.MODELS]
    return ["## Language mixing", "",
            "With and without R1's language-consistency reward (§2.3.2: the share of the reasoning's words in "
            "the prompt's language, added to the reward). R1-Zero has no language reward; the reasoning RL and "
            "the final RL have it (weight 1). They start from different models (base vs cold-start SFT) with "
            "different prompts, so the first table is not a controlled comparison; the second compares every "
            "model on the same held-out problems (English and Chinese prompts).", "",
            "![language mixing](language_mixing.png)", "", *rows, "", *evals, ""]


def fp8(out: str) -> list[str]:
    f8 = [r for r in read_jsonl(os.path.join(out, "fp8", "metrics.jsonl"))]
    f32 = [r for r in read_jsonl(os.path.join(out, "pretrain", "metrics.jsonl"))]
    head = ["## FP8 vs fp32 loss", ""]
    t8 = [r for r in f8 if "main_loss" in r]
    if not t8:
        return head + [f"*{os.path.join(out, 'fp8', 'metrics.jsonl')} is missing (the fp8 stage has not run).*", ""]
    n = t8[-1]["step"] + 1
    t32 = [r for r in f32 if "main_loss" in r and r["step"] < n]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for recs, label in ((t32, "fp32 (the base's pretraining)"), (t8, "FP8 (E4M3, 1x128 / 128x128 scales)")):
        ax.plot([r["step"] for r in recs], [r["main_loss"] for r in recs], lw=0.8, label=label)
    ax.set(xlabel="step", ylabel="training loss (nats/token)", yscale="log", title="FP8 vs fp32 pretraining")
    ax.legend()
    save_figure(fig, out, "fp8_loss.png")
    tail = max(1, n // 10)
    l32, l8 = mean(r["main_loss"] for r in t32[-tail:]), mean(r["main_loss"] for r in t8[-tail:])
    lr = {r["step"]: r["lr"] for r in t32}
    lr_diff = max((abs(r["lr"] - lr[r["step"]]) / lr[r["step"]] for r in t8 if lr.get(r["step"])), default=None)
    h32 = {r["step"]: r["heldout_loss"] for r in f32 if "heldout_loss" in r}
    h8 = {r["step"]: r["heldout_loss"] for r in f8 if "heldout_loss" in r}
    both = sorted(set(h32) & set(h8))
    s32 = read_json(os.path.join(out, "pretrain", "summary.json")) or {}
    s8 = read_json(os.path.join(out, "fp8", "summary.json")) or {}
    rel = abs(l8 - l32) / l32 if l8 and l32 else None
    rows = ["| | fp32 | FP8 | relative difference |", "|---|---|---|---|",
            f"| training loss, last {tail} of {n} steps | {num(l32, '.4f')} | {num(l8, '.4f')} | {pct(rel)} % |"]
    for s in both[-1:]:
        rows.append(f"| held-out loss at step {s} | {num(h32[s], '.4f')} | {num(h8[s], '.4f')} | "
                    f"{pct(abs(h8[s] - h32[s]) / h32[s])} % |")
    rows.append(f"| training tokens/s (whole run) | {num(s32.get('tokens_per_s'), '.0f')} | "
                f"{num(s8.get('tokens_per_s'), '.0f')} | |")
    return head + [f"A side run repeats the base's first {n} pretraining steps with FP8 GEMMs (V3 §3.3; "
                   "precision/fp8.py; emulated on CPU, so slower) from the same seed, initial weights and data "
                   f"order; the fp32 curve is the base's own. Largest LR difference between the two runs: "
                   f"{pct(lr_diff)} % (read from both logs).", "", "![FP8 vs fp32](fp8_loss.png)", "", *rows, ""]


def balance(out: str) -> list[str]:
    recs = [r for r in read_jsonl(os.path.join(out, "pretrain", "metrics.jsonl")) if r.get("maxvio")]
    head = ["## MoE balance (MaxVio) over pretraining", ""]
    if not recs:
        return head + ["*No MaxVio records in pretrain/metrics.jsonl (the pretrain stage has not run).*", ""]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in recs[0]["maxvio"]:
        ax.plot([r["step"] for r in recs], [r["maxvio"].get(layer) for r in recs], lw=0.8, label=layer)
    ax.set(xlabel="step", ylabel="MaxVio (max load / mean - 1)", title="expert load balance per MoE layer")
    ax.legend()
    save_figure(fig, out, "maxvio.png")
    tail = recs[-max(1, len(recs) // 10):]
    rows = ["| MoE layer | first step | last 10 % of steps |", "|---|---|---|"]
    for layer in recs[0]["maxvio"]:
        last = mean(r["maxvio"].get(layer) for r in tail)
        rows.append(f"| {layer} | {num(recs[0]['maxvio'][layer], '.3f')} | {num(last, '.3f')} |")
    return head + ["MaxVio = max expert load / mean load − 1 over each batch (V3 §2.1.2), per MoE layer and the "
                   "MTP module; the auxiliary-loss-free bias update (γ) drives it down.", "",
                   "![MaxVio](maxvio.png)", "", *rows, ""]


def stage_times(stages: list, state: dict) -> list[str]:
    rows = ["| # | stage | status | budget | wall | tokens | attempts |", "|---|---|---|---|---|---|---|"]
    total = 0.0
    for k, s in enumerate(stages, 1):
        st = state.get("stages", {}).get(s.name, {})
        secs = st.get("seconds") or 0.0
        total += secs
        tries = runs_of([a["action"] + ("" if a.get("result") in ("done", None) else f" ({a['result']})")
                         for a in st.get("attempts", [])])
        tok = st.get("tokens")
        rows.append(f"| {k} | {s.name} | {st.get('status', 'pending')} | {recipe.clock(s.budget_s)} | "
                    f"{recipe.clock(secs)} | "
                    f"{'—' if tok is None else f'{tok:,}'} | {', '.join(tries) or '—'} |")
    budget = sum(s.budget_s for s in stages)
    return ["## Wall time and tokens per stage", "",
            "Wall seconds of each stage summed over its attempts (an attempt killed mid-way counts until its log's "
            "last write); tokens: trained tokens of a training run, generated tokens of sampling and evaluation.",
            "", *rows, f"| | **total** | | {recipe.clock(budget)} | {recipe.clock(total)} | | |", ""]


def runs_of(items: list[str]) -> list[str]:
    """Consecutive repeats counted.

    >>> runs_of(["fresh (killed)", "resume", "skipped", "skipped"])
    ['fresh (killed)', 'resume', 'skipped x2']
    """
    groups: list[list] = []
    for item in items:
        if groups and groups[-1][0] == item:
            groups[-1][1] += 1
        else:
            groups.append([item, 1])
    return [f"{item} x{n}" if n > 1 else item for item, n in groups]


def find_aha(out: str) -> tuple[dict, str] | None:
    """The best self-correcting, right evaluation response: (its record, the completion text)."""
    import re
    from nanoseek.rl.rollout import SELF_CHECK   # here: rollout imports torch and the engine
    marker = re.compile("|".join(re.escape(m) for m in SELF_CHECK), re.IGNORECASE)
    best, best_key = None, None
    for rank, model in enumerate(("r1zero", "r1", "student", "student_rl", "base")):
        for bench in recipe.BENCHMARKS:
            base = recipe.eval_file(out, model, bench)[: -len(".json")]
            for i, rec in enumerate(read_jsonl(base + ".records.jsonl")):
                for j, (text, score) in enumerate(zip(rec["texts"], rec["scores"])):
                    thinking = reasoning_text(text)
                    m = marker.search(thinking)
                    if score < 1.0 or m is None:
                        continue
                    right, written = step_accuracy([thinking[: m.start()]])
                    key = (written == right, rank, len(text), i, j)      # a wrong step first, then R1-Zero
                    if best_key is None or key < best_key:
                        best, best_key = ({**rec, "model": model, "bench": bench, "slip": written > right}, text), key
    return best


def aha(out: str) -> list[str]:
    head = ["## An \"aha\" transcript", "",
            "Found automatically in the evaluation samples: a response that checks itself (a phrase such as "
            "\"Wait\" or \"let me check\", rl/rollout.py's SELF_CHECK) and ends with the right answer, preferring "
            "one that wrote a wrong step before the check (it corrected itself), then R1-Zero's.", ""]
    found = find_aha(out)
    if found is None:
        return head + ["*No evaluation response both checked itself and ended right in this run.*", ""]
    rec, text = found
    fence = "~~~~~~"
    why = "wrote a wrong step, checked, and ended right" if rec["slip"] else "checked itself and ended right"
    return head + [f"{recipe.MODEL_TITLES[rec['model']]} on {rec['bench']} ({why}); reference answer "
                   f"`{rec['answer']}`.", "", "Prompt:", "", fence, rec["prompt"], fence, "", "Response, verbatim:",
                   "", fence, text, fence, ""]


def files(out: str) -> list[str]:
    return ["## Files", "",
            f"- `{out}/r1/`: the R1 model, a Hugging Face directory (`nanoseek chat --model {out}/r1`, "
            "`nanoseek.load_pretrained`, `transformers.AutoModelForCausalLM`)",
            f"- `{out}/student/`: the distilled dense student, likewise",
            f"- `{out}/<stage>/`: each training run (checkpoints/, model/, metrics.jsonl, summary.json, plots); "
            "the final RL trains in rl2/ and the distillation in distill/",
            f"- `{out}/eval/`: every evaluation's JSON and per-problem records (every sampled response)",
            f"- `{out}/logs/`: each stage's output; `{out}/speedrun.json`: status, wall time and tokens per stage", ""]


def write_report(out: str, stages: list, state: dict) -> str:
    """Write OUT/report.md (and its PNGs); returns its path."""
    preset = state.get("preset", "?")
    total = sum((state.get("stages", {}).get(s.name, {}).get("seconds") or 0.0) for s in stages)
    lines = [f"# nanoseek speedrun: the DeepSeek-R1 recipe, preset {preset}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} from `{out}/`; {len(stages)} stages, {recipe.clock(total)} "
             "of stage wall time. Stages: corpus → tokenizer → V3 tiny pretraining (MLA + MoE + MTP) → R1-Zero "
             "(GRPO from the base) → cold-start SFT → reasoning RL → rejection sampling → SFT of the base → final "
             "RL (R1) → a dense student pretrained, distilled from R1, and trained with RL alone → FP8 side run → "
             "evaluation.", ""]
    for part in (results(out), claims(out, preset), r1zero_curves(out), language(out), fp8(out), balance(out),
                 stage_times(stages, state), aha(out), files(out)):
        lines += part
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path
