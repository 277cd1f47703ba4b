"""`nanoseek bench NAME [options]`: side-by-side benchmarks, one module per NAME.

Each `nanoseek/bench/<name>.py` exposes `add_arguments(parser)` and `main(args)`, measures nanoseek
against the anchor a user would otherwise pick (transformers, TRL, …) in one run on the same
weights, several repetitions after warm-up, medians, and with `--json` prints one object:
    {"bench": NAME, "config": {...}, "figures": {...}, "ratios": {...}}
where every ratio is "nanoseek is this many times better" (> 1 is better). `common.py` holds the
shared timing and reporting helpers. Anchors are imported inside the benchmark, never by the library.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil


HELPERS = ("common", "loadgen")   # modules the benchmarks share, not benchmarks themselves


def available() -> list[str]:
    import nanoseek.bench as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in HELPERS)


def add_arguments(p):
    p.add_argument("name", help=f"which benchmark ({', '.join(available()) or 'none yet'})")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (see NAME --help)")


def main(args) -> int:
    if args.name not in available():
        print(f"unknown benchmark {args.name!r}; available: {', '.join(available()) or 'none'}")
        return 2
    module = importlib.import_module(f"nanoseek.bench.{args.name}")
    parser = argparse.ArgumentParser(prog=f"nanoseek bench {args.name}", description=module.__doc__)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(args.rest)) or 0)
