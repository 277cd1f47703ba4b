"""What the engine reads from a model directory besides the weights (checkpoint.load_pretrained):
the tokenizer (nanoseek's, with R1's specials and chat template, or any plain tokenizer.json) and
the sampling defaults of generation_config.json (R1's T = 0.6, top-p 0.95).
"""
from __future__ import annotations

import json
import os


def sampling_defaults(model_dir: str) -> tuple[float, float]:
    """(temperature, top_p) from a model directory's generation_config.json (R1: 0.6, 0.95);
    greedy (0, 1) when it has none or does not sample."""
    try:
        with open(os.path.join(model_dir, "generation_config.json")) as f:
            g = json.load(f)
    except (OSError, ValueError):
        return 0.0, 1.0
    if not g.get("do_sample", False):
        return 0.0, 1.0
    return float(g.get("temperature", 1.0)), float(g.get("top_p", 1.0))


def load_tokenizer(path: str):
    """The directory's tokenizer.json: nanoseek's Tokenizer (R1 specials, chat template) when it has
    DeepSeek's BOS/EOS, else a plain `tokenizers` wrapper (encode/decode only); None without one."""
    from nanoseek.tokenizer import Tokenizer
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        return None
    try:
        return Tokenizer.load(path)
    except ValueError:
        return PlainTokenizer(os.path.join(path, "tokenizer.json"))


class PlainTokenizer:
    """Any tokenizer.json without DeepSeek's special tokens (no chat template)."""

    def __init__(self, file: str):
        import tokenizers
        self.backend = tokenizers.Tokenizer.from_file(file)
        self.bos_id = self.eos_id = None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
