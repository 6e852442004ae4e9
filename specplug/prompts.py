"""A generate job's prompts as engine requests: one recipe for the embedded engine, vLLM and
SGLang, so every engine sees the same token ids."""
from __future__ import annotations

from .engine.rows import Request


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    ids = []
    for p in prompts:
        if chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
            ids.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            ids.append(tokenizer.encode(p))
    return ids


def requests_for(cfg, tokenizer, seeded: bool = True) -> list[Request]:
    """cfg: a specplug.api.GenerateConfig.  seeded: request i samples with seed cfg.seed + i
    (where the engine takes per-request seeds)."""
    ids = encode_prompts(tokenizer, cfg.prompts, cfg.chat_template)
    return [Request(p, cfg.max_new_tokens, tuple(cfg.stop),
                    None if cfg.seed is None or not seeded else cfg.seed + i, prompt)
            for i, (p, prompt) in enumerate(zip(ids, cfg.prompts))]


def drafter_folder(cfg) -> str | None:
    """The drafter checkpoint folder of cfg, if it names one (`--drafter ngram` does not)."""
    return cfg.drafter if cfg.drafter and cfg.drafter != "ngram" else None
