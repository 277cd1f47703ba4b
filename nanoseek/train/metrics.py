"""What a person sees of a run: metrics.jsonl (one line per step and per evaluation), the progress
bar, the balance summary and PNG plots.

Records are dicts with at least "step"; a training step's has the loss terms, lr, tokens and the
per-layer MaxVio, an evaluation's the stage's evaluation keys ("heldout_loss", or RL's pass@1…).
On resume the log drops the records from the resumed step on, so a run killed mid-way and resumed
writes exactly the log an uninterrupted run writes. Plots read the log back, so they can be
redrawn from a finished or running directory.
"""
from __future__ import annotations

import json
import os
import re


class MetricsLog:
    """metrics.jsonl on rank 0; on resume, records from `resume_step` on are dropped first."""

    def __init__(self, out: str, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = os.path.join(out, "metrics.jsonl"), enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] < resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


MTP_KEY = re.compile(r"^mtp(\d+)_loss$")


def mtp_depths(record: dict) -> list[int]:
    """The MTP depths a step record has losses for (any depth, not a fixed maximum)."""
    return sorted(int(m.group(1)) for m in map(MTP_KEY.match, record) if m)


def pyplot():
    """matplotlib's pyplot on the Agg backend (a runtime dependency: training writes plots)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out: str, name: str) -> str:
    plt = pyplot()
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(out: str) -> list[str]:
    """loss.png, lr.png, balance.png from metrics.jsonl; the paths written."""
    plt = pyplot()
    recs = read_metrics(out)
    train = [r for r in recs if "main_loss" in r]
    evals = [r for r in recs if "heldout_loss" in r]
    if not train:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["main_loss"] for r in train], lw=0.8, label="train (main)")
    for k in mtp_depths(train[-1]):
        pts = [(r["step"], r[f"mtp{k}_loss"]) for r in train if f"mtp{k}_loss" in r]
        ax.plot(*zip(*pts), lw=0.8, alpha=0.7, label=f"train (MTP depth {k})")
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o-", label="held-out (main)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="loss")
    ax.legend()
    written.append(save_figure(fig, out, "loss.png"))
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="LR schedule")
    written.append(save_figure(fig, out, "lr.png"))
    if train[0].get("maxvio"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in train[0]["maxvio"]:
            ax.plot([r["step"] for r in train], [r["maxvio"][name] for r in train], lw=0.8, label=name)
        ax.set(xlabel="step", ylabel="MaxVio (max load / mean − 1)", title="expert load balance per MoE layer")
        ax.legend()
        written.append(save_figure(fig, out, "balance.png"))
    return written


class Progress:
    """tqdm bar (rank 0) with the step's headline figures, the last evaluation, tokens/s and ETA;
    keeps the train-time totals. `keys`: the step record's figures shown (first present wins)."""

    def __init__(self, total: int | None, initial: int, enabled: bool, show: bool = True,
                 keys: tuple[str, ...] = ("main_loss",)):
        from tqdm import tqdm
        # disable=None: no bar when stderr is not a terminal (logs get the evaluation lines only)
        self.bar = tqdm(total=total, initial=initial, unit="step", disable=None if enabled else True,
                        dynamic_ncols=True)
        self.show, self.keys, self.tokens, self.seconds, self.times = show, keys, 0, 0.0, []
        self.evaluation: dict = {}
        self.last: dict = {}

    def update(self, rec: dict, dt: float) -> None:
        self.tokens, self.seconds, self.last = self.tokens + rec.get("tokens", 0), self.seconds + dt, rec
        self.times.append(dt)
        self.bar.update(1)
        post = {k: f"{rec[k]:.3f}" for k in self.keys if isinstance(rec.get(k), (int, float))}
        post["tok/s"] = f"{self.tokens_per_s:.0f}"
        post.update({k: f"{v:.3f}" for k, v in self.evaluation.items() if isinstance(v, (int, float))})
        self.bar.set_postfix(post, refresh=False)

    def note(self, step: int, evaluation: dict) -> None:
        self.evaluation = {k: v for k, v in evaluation.items() if k != "step"}
        if self.show:
            line = f"step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in self.evaluation.items()
                                                 if isinstance(v, (int, float)))
            shown = [k for k in self.keys if isinstance(self.last.get(k), (int, float))]
            if shown:
                line += " | " + " | ".join(f"train {k} {self.last[k]:.4f}" for k in shown)
                line += f" | {self.tokens_per_s:.0f} tok/s"
            self.bar.write(line) if not self.bar.disable else print(line, flush=True)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def median_step_s(self) -> float:
        return sorted(self.times)[len(self.times) // 2] if self.times else 1.0

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def balance_summary(recs: list[dict], tail: float = 0.1) -> dict:
    """MaxVio per layer and mean, averaged over the last `tail` of the training steps."""
    train = [r for r in recs if r.get("maxvio")]
    if not train:
        return {}
    last = train[-max(1, int(len(train) * tail)):]
    per_layer = {k: sum(r["maxvio"][k] for r in last) / len(last) for k in last[0]["maxvio"]}
    return {"maxvio_final": per_layer, "maxvio_final_mean": sum(per_layer.values()) / len(per_layer),
            "maxvio_first_mean": train[0]["maxvio_mean"]}


def tail_means(recs: list[dict], keys: list[str], frac: float = 0.05) -> dict:
    """Mean of each key over the last `frac` of the records that have it."""
    out = {}
    for k in keys:
        vals = [r[k] for r in recs if isinstance(r.get(k), (int, float))]
        if vals:
            tail = vals[-max(1, int(len(vals) * frac)):]
            out[k] = sum(tail) / len(tail)
    return out
