"""`nanoseek corpus`: write the synthetic pretraining/SFT corpus, RL and evaluation problems.

    nanoseek corpus --preset tiny --out runs/tiny/corpus

The builder, its presets and the reasons behind every knob are in nanoseek/data/corpus.py.
"""
from __future__ import annotations

import argparse

from nanoseek.data.corpus import PRESETS, build, scaled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="corpus preset: the task/style/format mix, openings and difficulty")
    parser.add_argument("--out", required=True, help="output directory (pretrain/, sft/, problems/, "
                                                     "manifest.json; those are replaced)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every problem, trace and the held-out split")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every size of the preset (documents, conversations, problems)")


def main(args: argparse.Namespace) -> int:
    preset = scaled(PRESETS[args.preset](), args.scale)
    manifest = build(preset, args.out, seed=args.seed)
    for part, t in manifest["totals"].items():
        print(f"{part:9s} {t['docs']:8d} records {t['chars']:11,d} chars {t['bytes']:11,d} bytes")
    train = manifest["mix"]["pretrain/train"]
    print("pretrain/train styles:", train["style"], "formats:", train["format"])
    print(f"wrote {args.out}/manifest.json")
    return 0
