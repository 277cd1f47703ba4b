"""The R1-Zero figures from a GRPO run's metrics.jsonl: accuracy vs step (R1 Fig. 2: held-out
pass@1 and cons@k, and the batch's accuracy), response length vs step (Fig. 3), and what RL is
watched for — reward components, self-checking and language mixing, KL, entropy, clipping."""
from __future__ import annotations

from nanoseek.train.metrics import pyplot, read_metrics, save_figure


def _series(recs: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def plot_grpo(out: str) -> list[str]:
    """accuracy.png, length.png, behaviour.png, optimisation.png; the paths written."""
    plt = pyplot()
    recs = read_metrics(out)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style, label in (("accuracy", "-", "batch accuracy (T = rollout temperature)"),
                              ("heldout_pass@1", "o-", "held-out pass@1"),
                              ("heldout_cons@k", "s--", "held-out cons@k")):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, style, lw=1, ms=4, label=label)
    ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="accuracy during RL (R1 Fig. 2)")
    ax.legend()
    written.append(save_figure(fig, out, "accuracy.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("response_len_mean", "mean"), ("response_len_median", "median")):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, lw=1, label=label)
    ax.set(xlabel="step", ylabel="response length (tokens)", title="response length during RL (R1 Fig. 3)")
    ax.legend()
    written.append(save_figure(fig, out, "length.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("reward", "format", "language", "self_check_share", "language_mixed_share", "truncated_share"):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, lw=1, label=key)
    ax.set(xlabel="step", title="rewards and behaviour")
    ax.legend()
    written.append(save_figure(fig, out, "behaviour.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("kl", "entropy", "clip_frac", "grad_norm"):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, lw=1, label=key)
    ax.set(xlabel="step", title="optimisation")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    written.append(save_figure(fig, out, "optimisation.png"))
    return written
