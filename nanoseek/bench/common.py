"""Shared benchmark helpers: medians of timed repetitions and the JSON report (the matmul peak and
the FLOPs formula live in nanoseek/train/flops.py, shared with training's MFU)."""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable



def median_seconds(fn: Callable[[], object], reps: int = 5, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `reps` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name: str, config: dict, figures: dict, ratios: dict, as_json: bool) -> None:
    """Print the benchmark result: a table for people or one JSON object for machines."""
    if as_json:
        print(json.dumps({"bench": name, "config": config, "figures": figures, "ratios": ratios}))
        return
    print(f"nanoseek bench {name}  " + "  ".join(f"{k}={v}" for k, v in config.items()))
    for title, rows in (("figures", figures), ("ratios (> 1: nanoseek better)", ratios)):
        print(f"  {title}")
        for k, v in rows.items():
            print(f"    {k:<44} {v:>12.4g}" if isinstance(v, (int, float)) else f"    {k:<44} {v}")
