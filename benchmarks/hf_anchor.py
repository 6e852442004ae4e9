"""transformers' own generate() as the anchor: plain, prompt lookup and assisted generation.

HF does not report acceptance, so it is read off the target's forward calls: before call i the
cache holds s_i tokens and the call feeds L_i tokens.  Every call after the first feeds
[last committed token, drafts...], so it carries L_i - 1 drafts, and the tokens it committed
are s_{i+1} + 1 - (s_i + 1) (HF crops the cache to the committed tokens before the next call).
Worked example, prompt of 7, prompt lookup of 3:  call 0 feeds 7 + 3 (s=0), call 1 sees s=7:
no draft kept, 1 token (the recovered one) committed, accept length 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specplug.engine.rows import Request, RequestOutput
from specplug.stats import SpecStats


@dataclass
class _Call:
    start: int  # cache length before the call
    length: int  # tokens fed
    ms: float = 0.0


@dataclass
class _Recorder:
    """Forward hooks on the target (and the assistant) that log every call."""
    calls: list[_Call] = field(default_factory=list)
    draft_ms: float = 0.0
    _t0: float = 0.0
    _d0: float = 0.0

    def target_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        start = cache.get_seq_length() if cache is not None else 0
        self.calls.append(_Call(int(start), int(ids.shape[1])))
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
        accept = _record(rec, len(req.prompt_ids), len(new_ids), stats)
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


def _record(rec: _Recorder, prompt_len: int, num_new: int, stats: SpecStats) -> list[int]:
    """Per verify step accept lengths from the call log (see the module docstring)."""
    accept = []
    committed = prompt_len
    final = prompt_len + num_new
    for i, call in enumerate(rec.calls):
        nxt = rec.calls[i + 1].start + 1 if i + 1 < len(rec.calls) else final
        gained = max(0, min(nxt, final) - committed)
        drafts = call.length - (committed - call.start)
        committed += gained
        if i == 0 and drafts == 0:
            continue  # plain prefill: its one token is not a verify step (as in the engine)
        if gained == 0:
            continue
        stats.record_step(drafts, min(drafts, gained - 1))
        accept.append(gained)
    return accept
