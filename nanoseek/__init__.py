"""nanoseek: DeepSeek-V3/R1 end to end, small enough for a laptop CPU.

Top level: `load_pretrained(path, dtype=None)` and `save_pretrained(model, path, tokenizer=None)`
read and write Hugging Face model directories (checkpoint.py); `ModelConfig` and the presets live
in config.py, the model in model.py.
"""
from nanoseek.checkpoint import load_pretrained, save_pretrained
from nanoseek.config import ModelConfig

__all__ = ["load_pretrained", "save_pretrained", "ModelConfig"]
