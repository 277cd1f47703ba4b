"""Shared benchmark helpers: medians of timed repetitions and the JSON report (the matmul peak and
the FLOPs formula live in nanoseek/train/flops.py, shared with training's MFU)."""
from __future__ import annotations

import json
import os
import sys
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


# ------------------------------------------------------------------ timing on a shared machine
def cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process); zeros where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(vals) - vals[3] - vals[4], int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return 0, 0


def other_cores(before, after, seconds: float) -> float:
    """Cores' worth of CPU other processes used between two cpu_jiffies() samples."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0, (after[0] - before[0]) - (after[1] - before[1])) / hz / max(seconds, 1e-9)


def busy_now(seconds: float = 1.0) -> bool:
    """Do other processes use a quarter of a core or more (sampled for `seconds`)?"""
    j0 = cpu_jiffies()
    time.sleep(seconds)
    return other_cores(j0, cpu_jiffies(), seconds) >= 0.25


def omp_wait(mode: str, bench: str) -> None:
    """OMP_WAIT_POLICY for `nanoseek bench <bench>`: "passive" re-executes the command with it set,
    "auto" does so when the machine is busy (spinning threads fight other processes for the
    cores; bench/model.py's docstring has the numbers), "keep" leaves the environment's."""
    if mode == "keep" or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" \
            or sys.argv[1:3] != ["bench", bench]:
        return
    if mode == "auto" and not busy_now():
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "nanoseek", *sys.argv[1:]],
              dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
