"""transformers' own generate() as the anchor: plain, prompt lookup and assisted generation.

HF reports no acceptance, so the arm counts it from what it observes itself, never from
generate()'s internals (a transformers release renamed the cache argument those counts used to
read, and the counts went negative): every call of the target is logged with the token ids it
was fed and the positions it was told they sit at (`position_ids`, which the model needs for its
rotary embedding, so generate() must pass them).  With the final sequence S = prompt + output in
hand, a call that feeds positions p .. p+L-1 while c tokens are committed
- re-feeds S[p:c] (committed tokens the target cache lacks; they must equal S there),
- proposes the L - (c - p) tokens at positions >= c: those are the drafts,
- commits the leading drafts that equal S at their positions, plus one token of its own.
Worked example, prompt of 7, prompt lookup of 3: call 0 feeds positions 0..9, none of the 3
lookups equals S[7], so call 0 commits 1 token (accept length 1); call 1 feeds positions 7..9
(S[7] and 2 drafts), both drafts match S[8:10], so it commits 3 tokens (accept length 3).
Under sampling a rejected draft that the target redraws as the same token counts as accepted.
When a call gives no positions, or its re-fed tokens disagree with S, the counts are
impossible; the arm then says so (`SpecStats.counts_unavailable`) instead of guessing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specplug.engine.rows import Request, RequestOutput
from specplug.stats import SpecStats


@dataclass
class _Call:
    start: int | None  # position of the first fed token; None when the call gave no positions
    ids: list[int]  # the token ids fed, in order
    ms: float = 0.0

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class _Recorder:
    """Forward hooks on the target (and the assistant) that log every call."""
    calls: list[_Call] = field(default_factory=list)
    draft_ms: float = 0.0
    _t0: float = 0.0
    _d0: float = 0.0

    def target_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)  # [1, L]
        positions = kwargs.get("position_ids")  # [1, L] when generate() passes them
        start = int(positions.reshape(-1)[0]) if torch.is_tensor(positions) else None
        # one host copy per call: the anchor is batch 1 and measured as a whole, not per op
        self.calls.append(_Call(start, ids.reshape(-1).tolist()))
        self._t0 = time.perf_counter()

    def target_post(self, module, args, kwargs, output):
        self.calls[-1].ms = (time.perf_counter() - self._t0) * 1e3

    def draft_pre(self, module, args, kwargs):
        self._d0 = time.perf_counter()

    def draft_post(self, module, args, kwargs, output):
        self.draft_ms += (time.perf_counter() - self._d0) * 1e3


class HFGenerate:
    """One arm of HF generate(): mode is 'plain', 'prompt_lookup' or 'assisted'."""

    def __init__(self, model, tokenizer, mode: str, gamma: int, temperature: float = 0.0,
                 assistant=None, max_ngram: int = 3):
        if mode == "assisted" and assistant is None:
            raise ValueError("HF assisted generation needs a draft model (--drafter PATH)")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.temperature = temperature
        self.kwargs: dict = {}
        if mode == "prompt_lookup":
            self.kwargs = {"prompt_lookup_num_tokens": gamma, "max_matching_ngram_size": max_ngram}
        elif mode == "assisted":
            # a fixed gamma, like every other arm, instead of HF's adaptive schedule
            gc = assistant.generation_config
            gc.num_assistant_tokens = gamma
            gc.num_assistant_tokens_schedule = "constant"
            gc.assistant_confidence_threshold = 0.0
            self.kwargs = {"assistant_model": assistant}
        self.assistant = assistant
        eos = model.generation_config.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = pad if pad is not None else (eos if isinstance(eos, int) else 0)

    def settings(self) -> dict:
        out = {"mode": self.mode, "batch_size": 1, "temperature": self.temperature}
        out.update({k: v for k, v in self.kwargs.items() if k != "assistant_model"})
        if self.assistant is not None:
            out["num_assistant_tokens_schedule"] = "constant"
        return out

    @torch.inference_mode()
    def generate(self, requests: list[Request], stats: SpecStats) -> list[RequestOutput]:
        """HF assisted generation is batch 1 only, so every HF arm runs batch 1."""
        return [self._one(req, stats) for req in requests]

    def _one(self, req: Request, stats: SpecStats) -> RequestOutput:
        rec = _Recorder()
        hooks = [self.model.register_forward_pre_hook(rec.target_pre, with_kwargs=True),
                 self.model.register_forward_hook(rec.target_post, with_kwargs=True)]
        if self.assistant is not None:
            hooks += [self.assistant.register_forward_pre_hook(rec.draft_pre, with_kwargs=True),
                      self.assistant.register_forward_hook(rec.draft_post, with_kwargs=True)]
        sample = {"do_sample": False}
        if self.temperature > 0:
            sample = {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}
            torch.manual_seed(req.seed or 0)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long)
        start = time.perf_counter()
        try:
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=req.max_new_tokens, pad_token_id=self.pad_id,
                                      **sample, **self.kwargs)
        finally:
            for h in hooks:
                h.remove()
        wall = time.perf_counter() - start
        new_ids = out[0, len(req.prompt_ids):].tolist()
        accept = _record(rec, list(req.prompt_ids) + new_ids, len(req.prompt_ids), stats)
        stats.timing_ms["prefill"] += rec.calls[0].ms if rec.calls else 0.0
        verify_ms = sum(c.ms for c in rec.calls[1:])
        stats.timing_ms["verify"] += verify_ms
        stats.timing_ms["draft"] += rec.draft_ms
        prefill = rec.calls[0].ms if rec.calls else 0.0
        stats.timing_ms["other"] += max(0.0, wall * 1e3 - prefill - verify_ms - rec.draft_ms)
        stats.wall_time_s += wall
        stats.num_prompts += 1
        stats.total_new_tokens += len(new_ids)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True) if self.tokenizer else ""
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        reason = "eos" if new_ids and new_ids[-1] in eos_ids else "length"
        return RequestOutput(req.prompt, list(req.prompt_ids), new_ids, text, accept, reason)


def _record(rec: _Recorder, sequence: list[int], prompt_len: int, stats: SpecStats) -> list[int]:
    """Per verify step accept lengths from the call log (see the module docstring).

    sequence: the prompt followed by every generated token.  Counts go into `stats` only when
    every call could be read; otherwise `stats.counts_unavailable` says why and [] is returned.
    """
    steps: list[tuple[int, int]] = []  # (drafts, tokens committed) per verify step
    committed, final = prompt_len, len(sequence)
    for i, call in enumerate(rec.calls):
        if call.start is None:
            return _unavailable(stats, f"target call {i} got no position_ids")
        refed = committed - call.start
        if not 0 <= refed <= call.length or call.ids[:refed] != sequence[call.start:committed]:
            return _unavailable(stats, f"target call {i} (positions {call.start}.."
                                       f"{call.start + call.length - 1}) does not continue the "
                                       f"{committed} committed tokens")
        drafts = call.ids[refed:]
        matched = 0
        while (matched < len(drafts) and committed + matched < final
               and drafts[matched] == sequence[committed + matched]):
            matched += 1
        gained = min(matched + 1, final - committed)  # the last call may be cut by the length
        committed += gained
        if gained == 0 or (i == 0 and not drafts):
            continue  # plain prefill: its one token is not a verify step (as in the engine)
        steps.append((len(drafts), gained))
    for drafts, gained in steps:
        stats.record_step(drafts, gained - 1)
    return [gained for _, gained in steps]


def _unavailable(stats: SpecStats, why: str) -> list[int]:
    stats.counts_unavailable = f"HF acceptance counts unavailable: {why}"
    return []
