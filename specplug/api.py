"""The Python API under `specplug generate`: load target + drafter, run, return the stats JSON."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field

import torch

from .budget import SpeculationBudget
from .drafters.base import DrafterSpec, build_drafter, family_of, gamma_for
from .drafters.detect import resolve_method
from .engine.embedded import EmbeddedEngine
from .engine.rows import RequestOutput
from .prompts import drafter_folder, requests_for
from .stats import SpecStats
from .types import SamplingParams



@dataclass
class GenerateConfig:
    target: str
    prompts: list[str]
    method: str | None = None  # None: inferred from drafter (ngram / draft / none)
    drafter: str | None = None
    gamma: int | None = None  # draft tokens per step; None: the method's default (gamma_for)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    batch_size: int = 1
    seed: int | None = 0
    engine: str = "embedded"
    chat_template: bool = False
    stop: tuple[str, ...] = ()
    dtype: str = "float32"
    options: dict = field(default_factory=dict)  # drafter options (tree sizes, steps, ...)
    # the automatic speculation budget (specplug/budget.py): each row's draft length per step,
    # 0 allowed, so speculation that does not pay turns itself off.  On by default (measured in
    # benchmarks/README.md: at batch 4 and 10 well above the same drafter without it, at batch 1
    # within 3% of it; plain decoding is beaten at batch 1 only).  Embedded engine, and vLLM
    # for drafters that run through specplug's proposer, and SGLang's specplug worker (chains).
    budget: bool = True

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)


def environment() -> dict:
    import transformers

    from .tested_versions import untested
    return {"versions": {"specplug": __import__("specplug").__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "untested_versions": untested(),
            "threads": torch.get_num_threads(), "device": "cpu",
            "cpu": platform.processor() or platform.machine()}


def stats_json(cfg: GenerateConfig, outputs: list[RequestOutput], stats: SpecStats) -> dict:
    return {
        "summary": stats.summary(),
        "requests": [{"prompt": o.prompt, "output_text": o.output_text,
                      "output_token_ids": o.output_token_ids, "num_new_tokens": o.num_new_tokens,
                      "accept_lengths": o.accept_lengths, "finish_reason": o.finish_reason}
                     for o in outputs],
        "config": {k: v for k, v in asdict(cfg).items() if k != "prompts"},
        "environment": environment(),
    }


def load_target(path: str, dtype: str = "float32"):
    from .models.loading import load_causal_lm, load_tokenizer
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float64": torch.float64}[dtype]
    return load_causal_lm(path, torch_dtype), load_tokenizer(path)


def build_embedded(cfg: GenerateConfig, model, tokenizer) -> EmbeddedEngine:
    from .models.loading import target_info
    method = resolve_method(cfg.method, cfg.drafter)
    drafter = None
    if method != "none":
        if family_of(method).needs_weights and not cfg.drafter:
            raise ValueError(f"method {method!r} needs --drafter PATH")
        path = drafter_folder(cfg)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"drafter path not found: {path}")
        drafter = build_drafter(DrafterSpec(method, path, dict(cfg.options)),
                                target_info(model, tokenizer))
    # a tree drafter's depth is the number of draft tokens on its longest path
    depth = int(cfg.options.get("tree_depth") or gamma_for(method, cfg.gamma))
    # the embedded engine verifies the batch as one block padded to the widest row
    budget = (SpeculationBudget(depth, verify_pads_rows=True)
              if cfg.budget and drafter is not None else None)
    return EmbeddedEngine(model, tokenizer, drafter, depth, cfg.sampling, budget)


def generate(cfg: GenerateConfig, model=None, tokenizer=None) -> tuple[list[RequestOutput], SpecStats]:
    if cfg.engine != "embedded":
        return _generate_other_engine(cfg)  # each engine's runner settles gamma its own way
    cfg.method = resolve_method(cfg.method, cfg.drafter)
    cfg.gamma = gamma_for(cfg.method, cfg.gamma)  # the stats JSON records what ran
    if model is None:
        model, tokenizer = load_target(cfg.target, cfg.dtype)
    engine = build_embedded(cfg, model, tokenizer)
    return engine.generate(requests_for(cfg, tokenizer), cfg.batch_size)


def _generate_other_engine(cfg: GenerateConfig):
    from .runners import runner
    return runner(cfg.engine)(cfg)


def write_stats(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
