"""Logits to sampling distributions, applied identically to target (p) and draft (q)."""
from __future__ import annotations

import torch

from .types import SamplingParams


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., vocab] -> [...] int64, the index of each row's first maximum (argmax's
    answer).  torch.max over the last dim gives the same index 3-5x faster on CPU: measured on
    [10, 6, 49152] logits (1 thread), 10.1 ms for argmax against 2.3 ms in bf16, 4.2 against
    1.5 ms in fp32."""
    return logits.max(dim=-1).indices


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., vocab] -> probs [..., vocab] in float64 after temperature, top-k, top-p.

    Greedy settings give a one-hot of the argmax so that callers can treat both modes alike.
    float64 keeps p / q ratios and residuals exact enough for the chi-square tests.
    """
    logits = logits.double()
    if params.greedy:
        return torch.nn.functional.one_hot(greedy_tokens(logits), logits.shape[-1]).double()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from a 1-D distribution."""
    return int(torch.multinomial(probs.float() if probs.dtype == torch.float16 else probs, 1,
                                 generator=generator))


def next_tokens(logits: torch.Tensor, params: SamplingParams,
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """logits [batch, vocab] -> [batch] tokens, per-row generators for sampling."""
    if params.greedy:
        return greedy_tokens(logits)
    probs = probs_from_logits(logits, params)
    gens = generators or [None] * probs.shape[0]
    return torch.tensor([sample(probs[r], gens[r]) for r in range(probs.shape[0])],
                        dtype=torch.long, device=logits.device)
