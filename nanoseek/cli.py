"""The `nanoseek` command: argparse subcommands, one per pipeline stage or tool.

Each subcommand lives in its own module that exposes two functions:
    add_arguments(parser)  -- declares its flags (each with help=)
    main(args)             -- runs it; returns an exit code or None
Modules are imported lazily, so `nanoseek params` does not pay for importing the engine or
transformers. Nothing in the package imports this file (dependencies point one way).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Pipeline order first, then tools.
COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": ("nanoseek.stages.corpus", "write the synthetic pretraining/SFT corpus"),
    "tokenizer": ("nanoseek.stages.tokenizer", "train the byte-level BPE tokenizer"),
    "pretrain": ("nanoseek.stages.pretrain", "pretrain a model on the corpus"),
    "sft": ("nanoseek.stages.sft", "supervised fine-tuning on conversations"),
    "grpo": ("nanoseek.stages.grpo", "reinforcement learning from rule rewards (GRPO; R1-Zero from a base model)"),
    "rejection-sample": ("nanoseek.stages.rejection_sample",
                         "k samples per prompt, the verified and readable ones kept as an SFT corpus (R1 stage 3)"),
    "distill": ("nanoseek.stages.distill", "SFT of a small dense student on a teacher's verified traces (R1 §2.4)"),
    "eval": ("nanoseek.stages.eval", "R1-style evaluation: pass@1 over k samples, cons@k, pass@k"),
    "speedrun": ("nanoseek.stages.speedrun", "the main job: every stage end to end on the tiny preset"),
    "generate": ("nanoseek.stages.generate", "generate text from a checkpoint directory"),
    "chat": ("nanoseek.stages.chat", "chat with a checkpoint in the terminal"),
    "serve": ("nanoseek.stages.serve", "DeepSeek/OpenAI-compatible API server and chat page"),
    "bench": ("nanoseek.bench", "side-by-side benchmarks against the anchors (model, engine, fp8, grpo, serve)"),
    "params": ("nanoseek.stages.params", "count total and activated parameters of a config"),
}


def build_parser(available: dict[str, tuple[str, str]] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3/R1, end to end, small.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in (available or COMMANDS).items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # import only the chosen subcommand's module (fast start, no heavy imports for `params`)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    available = {chosen: COMMANDS[chosen]} if chosen in COMMANDS else COMMANDS
    args = build_parser(available).parse_args(argv)
    rc = importlib.import_module(args._module).main(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
