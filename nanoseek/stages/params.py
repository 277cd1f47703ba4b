"""`nanoseek params`: total and activated parameters of a preset or a config.json.

Counts come from the config alone (model.param_counts), so the 671B config is counted without
building anything. Every checkpoint tensor counts (norms and the router's e_score_correction_bias
included); embedding and head are both activated. The official V3 config gives a total of exactly
671,026,419,200 and ~37.55B activated; with MTP the checkpoint holds ~684.5B ("685B" on the Hub).
"""
from __future__ import annotations

import json

from nanoseek.config import PRESETS, ModelConfig, preset
from nanoseek.model.params import param_counts


def add_arguments(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="a named configuration")
    src.add_argument("--config", help="path to a config.json (or a checkpoint directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args) -> int:
    cfg = ModelConfig.load(args.config) if args.config else preset(args.preset)
    counts = param_counts(cfg)
    if args.json:
        print(json.dumps(counts))
        return 0
    name = args.config or args.preset
    print(f"{name} ({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})")
    for key, label in (("total", "total"), ("activated", "activated per token"),
                       ("total_with_mtp", "total with MTP"), ("activated_with_mtp", "activated with MTP")):
        n = counts[key]
        print(f"  {label:<22} {n:>20,}  ({n / 1e9:.2f}B)" if n >= 1e9 else f"  {label:<22} {n:>20,}  ({n / 1e6:.2f}M)")
    return 0
