"""Numeric formats applied to a built model from outside: fine-grained FP8 (fp8.py)."""
