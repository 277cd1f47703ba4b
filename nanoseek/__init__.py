"""nanoseek: DeepSeek-V3/R1 end to end, small enough for a laptop CPU.

Top level: `load_pretrained(path, dtype=None)` and `save_pretrained(model, path, tokenizer=None)`
read and write Hugging Face model directories (checkpoint.py); `ModelConfig` and the presets live
in config.py, the model in model/. Names load lazily, so importing a torch-free part of the
package (tasks, rewards, the corpus writer, math-verify worker processes) does not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {"load_pretrained": "nanoseek.checkpoint", "save_pretrained": "nanoseek.checkpoint",
         "ModelConfig": "nanoseek.config"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
