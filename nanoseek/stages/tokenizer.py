"""`nanoseek tokenizer`: train the byte-level BPE on text files and save an AutoTokenizer directory.

Inputs are plain text files (each line, newline kept, is one training text, so newline runs are
learned too) or `.jsonl` files (the "text" field of each line, as `nanoseek corpus` writes them).
Files are streamed, never held whole in memory.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

from nanoseek.tokenizer import GENERATION_PROMPT, USER, train_tokenizer

SAMPLE = USER + "What is 127 + 45? 请计算。" + GENERATION_PROMPT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="TEXT_FILE",
                        help="training text: plain text files (one text per line) or .jsonl files "
                             "(the \"text\" field of each line)")
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="final vocabulary size, special tokens and the 256 bytes included "
                             "(smaller if the corpus runs out of pairs seen twice)")
    parser.add_argument("--out", required=True,
                        help="output directory (tokenizer.json, tokenizer_config.json, chat template)")


def read_texts(paths: list[str]) -> Iterator[str]:
    """Stream training texts from plain text and .jsonl files, in the order given."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if Path(path).suffix == ".jsonl":
                for line in f:
                    if line.strip():
                        yield json.loads(line)["text"]
            else:
                yield from f


def main(args: argparse.Namespace) -> int:
    tok = train_tokenizer(read_texts(args.input), args.vocab_size)
    tok.save(args.out)
    print(f"vocab size {tok.vocab_size} (asked {args.vocab_size}) -> {args.out}")
    ids = tok.encode(SAMPLE, add_bos=True)
    # a piece that is part of a multi-byte character decodes to U+FFFD: show its byte-level form
    pieces = [p if "\ufffd" not in p else tok.id_to_token(i) for i, p in ((i, tok.decode([i])) for i in ids)]
    print(f"sample: {len(SAMPLE)} chars -> {len(ids)} tokens")
    print(" ".join(f"{p!r}:{i}" for p, i in zip(pieces, ids)))
    return 0
