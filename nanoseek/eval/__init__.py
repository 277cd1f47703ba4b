"""Evaluation, R1's way (spec §11): k samples per problem, pass@1, cons@k, pass@k, from one batch.

    metrics.py   pass@k (unbiased, Chen et al. 2021), pass@1, majority vote, cons@k (pure, torch-free)
    problems.py  which problems: a task's held-out split, reasoning-gym, corpus or benchmark JSONL files
    evaluate.py  EvalConfig and evaluate(llm, problems, cfg): prompts -> engine -> checker -> metrics

Import the submodules (`from nanoseek.eval.evaluate import evaluate`): this file imports nothing,
so `nanoseek.eval.metrics` stays free of torch.
"""
