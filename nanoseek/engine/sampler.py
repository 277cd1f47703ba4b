"""Sampling: pure functions over a [R, V] block of logits with per-row parameters.

Order (transformers' and vLLM's): temperature, then top-k, then top-p over what top-k kept, then
one draw. Greedy rows (temperature 0) take the argmax of the raw logits.

The draw is an inverse-CDF lookup with one uniform per row from that row's own torch.Generator
(`uniforms`): a row's token depends only on its logits and its generator, never on what else
shares the batch, which is what makes seeds reproducible under continuous batching. (The logits
themselves can differ in the last bit with the batch's shape, as in every batched engine; a draw
flips only when its uniform falls within that distance of a bucket edge.)

`logprobs` reports log-softmax(logits / T) of the chosen token (raw logits for greedy): the
distribution the policy samples from before truncation, which is what RL ratios (TRL's
`selective_log_softmax(logits / temperature)`) need; top-k / top-p only truncate it.
"""
from __future__ import annotations

import torch


def row_params(params_list, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperature (1 where greedy), top_k (V or 0 = off) and top_p tensors."""
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params_list], device=device)
    top_k = torch.tensor([p.top_k for p in params_list], dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params_list], device=device)
    return temp, top_k, top_p


def processed_logits(logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor) -> torch.Tensor:
    """logits [R, V] -> temperature-scaled fp32 logits with the top-k / top-p rejects at -inf."""
    x = logits.float() / temp[:, None]
    if not bool((top_k > 0).any() or (top_p < 1).any()):
        return x
    V = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    sorted_x = sorted_x.masked_fill(torch.arange(V, device=x.device) >= k[:, None], float("-inf"))
    probs = sorted_x.softmax(-1)
    mass_before = probs.cumsum(-1) - probs                       # mass of strictly better tokens
    sorted_x = sorted_x.masked_fill(mass_before >= top_p[:, None], float("-inf"))  # the first always stays
    return torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)


def uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: row r takes the first token whose cumulative mass exceeds u[r]·total."""
    cum = probs.cumsum(-1)
    target = (u.to(cum.dtype) * cum[:, -1])[:, None]
    return torch.searchsorted(cum, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, params_list, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row. Returns (tokens [R], probs [R, V] after temperature / top-k / top-p,
    greedy rows at T = 1, or None if all rows are greedy)."""
    greedy = [p.temperature == 0 for p in params_list]
    tokens = logits.argmax(-1)
    if all(greedy):
        return tokens, None
    temp, top_k, top_p = row_params(params_list, logits.device)
    probs = processed_logits(logits, temp, top_k, top_p).softmax(-1)
    rows = [i for i, g in enumerate(greedy) if not g]
    drawn = draw(probs[rows], uniforms([generators[i] for i in rows]))
    tokens[rows] = drawn
    return tokens, probs


def logprobs(logits: torch.Tensor, params_list, tokens: torch.Tensor,
             top: int = 0) -> tuple[list[float], list[dict[int, float]] | None]:
    """log-softmax(logits / T) at the chosen tokens, and the top `top` entries per row."""
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params_list], device=logits.device)
    lp = (logits.float() / temp[:, None]).log_softmax(-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1).tolist()
    if not top:
        return chosen, None
    vals, idx = lp.topk(top, dim=-1)
    return chosen, [dict(zip(i.tolist(), v.tolist())) for i, v in zip(idx, vals)]
