"""The inference engine: `LLM(model_dir or model).generate(prompts, SamplingParams)`.

llm.py describes the design and lists the files; each file's docstring is its design note.
"""
from nanoseek.engine.llm import LLM
from nanoseek.engine.sequence import Completion, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion", "RequestOutput"]
