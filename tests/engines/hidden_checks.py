"""Checks shared by the engine tests of drafters that read target hidden states (vLLM, SGLang):
the features an engine handed the drafter against HF's hidden_states on the same tokens, and the
embedded engine's outputs with the same drafter as the reference for accept lengths."""
from __future__ import annotations

import torch

from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.loading import load_causal_lm, load_tokenizer, target_info


def clip_last_step(lengths: list[int], max_new: int) -> list[int]:
    """vLLM drafts gamma tokens on a request's last step and counts them before cutting the
    output at max_tokens; the embedded engine never drafts past the budget."""
    room = max_new - 1 - sum(lengths[:-1])
    return lengths[:-1] + [min(lengths[-1], room)]


def hf_features(folder: str, records: dict, indices: tuple[int, ...]):
    """(features the engine handed the drafter, HF's hidden_states on the same tokens), per row."""
    model = load_causal_lm(folder, dtype=torch.float32)
    pairs = []
    for rid, rec in records.items():
        chunks = sorted(rec["chunks"], key=lambda c: c[0])
        assert chunks and chunks[0][0] == 0, f"row {rid}: features do not start at position 0"
        for (s0, f0), (s1, _) in zip(chunks, chunks[1:]):
            assert s0 + f0.shape[0] == s1, f"row {rid}: features skip or repeat a position at {s1}"
        got = torch.cat([c[1] for c in chunks])
        tokens = rec["tokens"]
        assert got.shape[0] == len(tokens) - 1  # every committed position but the last
        with torch.no_grad():
            out = model(torch.tensor([tokens]), output_hidden_states=True)
        want = torch.cat([out.hidden_states[i][0] for i in indices], dim=-1)[:got.shape[0]]
        pairs.append((got.float(), want.float()))
    return pairs


def assert_features_match(pairs, indices: tuple[int, ...], case: str, tol: float = 1e-4) -> None:
    """Each layer's block of every row within `tol` of HF's, relative to that layer's largest
    value (scales differ a lot between layers)."""
    width = pairs[0][1].shape[-1] // len(indices)
    for got, want in pairs:
        assert got.shape == want.shape
        for k, i in enumerate(indices):
            g, w = got[:, k * width:(k + 1) * width], want[:, k * width:(k + 1) * width]
            err = (g - w).abs().max() / w.abs().max()
            assert err < tol, f"{case}: hidden_states[{i}] differs from HF by {err:.2e} (relative)"


def embedded_outputs(folder: str, family: str, head: str, prompts, max_new: int, gamma: int,
                     options: dict | None = None):
    """The embedded engine's outputs (tokens, accept lengths) with the same drafter, one batch."""
    target = load_causal_lm(folder, dtype=torch.float32)
    tok = load_tokenizer(folder, required=False)
    drafter = build_drafter(DrafterSpec(family, head, dict(options or {})), target_info(target, tok))
    outs, _ = EmbeddedEngine(target, tok, drafter, num_draft_tokens=gamma).generate(
        [Request(p, max_new) for p in prompts], batch_size=len(prompts))
    return outs
