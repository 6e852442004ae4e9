"""The engine switch: each engine contributes arms (plain baseline, speculative, anchors) that all
run on the same requests in the same process.

  embedded  specplug's EmbeddedEngine: baseline = no drafter, spec = the drafter asked for
  hf        transformers generate(): plain (baseline), prompt lookup, assisted (with --drafter)
  vllm      real vLLM through specplug.integrations.vllm (extra `vllm`): one engine per arm and
            phase, each in a fresh process of a Python that has vLLM (vLLM cannot start a second
            engine in one process once numba is loaded)
  sglang    specplug.integrations.sglang.generate.run_sglang (extra `sglang`)

Other external engines plug in by providing a module function
  run_<engine>(target=PATH, requests=list[Request], drafter=DrafterSpec | None,
               num_draft_tokens=int, sampling=SamplingParams, batch_size=int)
      -> (list[RequestOutput], SpecStats)
which the switch calls once with drafter=None (their own baseline) and once with the drafter.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from specplug.drafters.base import DrafterSpec
from specplug.engine.rows import Request, RequestOutput
from specplug.stats import SpecStats
from specplug.types import SamplingParams

ENGINES = ("embedded", "hf", "vllm", "sglang")
# the HF arm that uses the same drafter as a specplug method: the "vs HF" column divides by it
HF_EQUIVALENT = {"draft": "hf/assisted", "ngram": "hf/prompt_lookup"}


class EngineUnavailable(RuntimeError):
    pass


RunFn = Callable[[list[Request], SpecStats], list[RequestOutput]]


@dataclass
class Arm:
    label: str  # "<engine>/<method>", e.g. embedded/ngram, hf/assisted
    engine: str
    method: str  # "none" for a plain baseline
    role: str  # "baseline" | "spec" | "anchor"
    run: RunFn = field(repr=False)
    settings: dict = field(default_factory=dict)
    # in-process arms take the requests a chunk at a time, interleaved with the other arms so
    # load on a shared machine hits every arm alike; external engines take a phase at once
    # (one engine start per call)
    whole_phase: bool = False


@dataclass
class BenchTarget:
    """What every engine's arms are built from."""
    path: str
    model: object  # HF causal LM (loaded once, shared by the embedded and HF arms)
    tokenizer: object
    drafter: DrafterSpec | None  # None: baseline and anchors only
    gamma: int
    sampling: SamplingParams
    batch_size: int
    compare: list = field(default_factory=list)  # [(label, DrafterSpec)]: more embedded arms
    budget: str = "off"  # embedded drafter arms: with the speculation budget, without, or both


def build_arms(engine: str, t: BenchTarget) -> list[Arm]:
    if engine == "embedded":
        return _embedded_arms(t)
    if engine == "hf":
        return _hf_arms(t)
    if engine == "vllm":
        return _vllm_arms(t)
    if engine == "sglang":
        return _external_arms(engine, t)
    raise EngineUnavailable(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


def _embedded_arms(t: BenchTarget) -> list[Arm]:
    from specplug.budget import SpeculationBudget
    from specplug.drafters.base import build_drafter
    from specplug.engine.embedded import EmbeddedEngine
    from specplug.models.loading import target_info

    def runner(engine: EmbeddedEngine) -> RunFn:
        return lambda reqs, stats: engine.generate(reqs, t.batch_size, stats)[0]

    base = EmbeddedEngine(t.model, t.tokenizer, sampling=t.sampling)
    arms = [Arm("embedded/none", "embedded", "none", "baseline", runner(base),
                {"batch_size": t.batch_size})]
    specs = ([(t.drafter.method, t.drafter)] if t.drafter is not None else []) + list(t.compare)
    modes = {"on": (True,), "off": (False,), "both": (False, True)}[t.budget]
    for label, dspec in specs:
        for with_budget in modes:
            # each arm its own drafter: drafters keep per-row state
            drafter = build_drafter(dspec, target_info(t.model, t.tokenizer))
            spec = EmbeddedEngine(t.model, t.tokenizer, drafter, num_draft_tokens=t.gamma,
                                  sampling=t.sampling,
                                  budget=SpeculationBudget(t.gamma) if with_budget else None)
            name = f"embedded/{label}" + ("/budget" if with_budget else "")
            arms.append(Arm(name, "embedded", dspec.method, "spec",
                            runner(spec), {"batch_size": t.batch_size, "gamma": t.gamma,
                                           "drafter_path": dspec.path, "budget": with_budget,
                                           "options": dict(dspec.options)}))
    return arms


def _hf_arms(t: BenchTarget) -> list[Arm]:
    from .hf_anchor import HFGenerate

    def arm(mode: str, role: str, assistant=None) -> Arm:
        gen = HFGenerate(t.model, t.tokenizer, mode, t.gamma, t.sampling.temperature, assistant,
                         max_ngram=int((t.drafter.options if t.drafter else {}).get("max_ngram", 3)))
        method = "none" if mode == "plain" else mode
        return Arm(f"hf/{method}", "hf", method, role, gen.generate, gen.settings())

    arms = [arm("plain", "baseline"), arm("prompt_lookup", "anchor")]
    if t.drafter is not None and t.drafter.method == "draft" and t.drafter.path:
        from specplug.models.loading import load_causal_lm
        assistant = load_causal_lm(t.drafter.path, dtype=t.model.dtype)
        arms.append(arm("assisted", "anchor", assistant))
    return arms


_EXTRAS = {"sglang": ("specplug.integrations.sglang.generate", "run_sglang")}


def check_engine(engine: str) -> None:
    """Fail before any model is loaded when an engine cannot run here."""
    if engine not in ENGINES:
        raise EngineUnavailable(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if engine == "vllm":
        _vllm_python()
    elif engine in _EXTRAS:
        _external_fn(engine)


def _external_fn(engine: str):
    module, fn_name = _EXTRAS[engine]
    try:
        return getattr(importlib.import_module(module), fn_name)
    except (ImportError, AttributeError) as e:
        raise EngineUnavailable(
            f"--engine {engine} needs {module}.{fn_name} and the '{engine}' extra "
            f"(pip install 'specplug[{engine}]'): {e}") from None


def _external_arms(engine: str, t: BenchTarget) -> list[Arm]:
    fn = _external_fn(engine)

    def runner(drafter: DrafterSpec | None) -> RunFn:
        def run(reqs: list[Request], stats: SpecStats) -> list[RequestOutput]:
            outs, got = fn(target=t.path, requests=reqs, drafter=drafter,
                           num_draft_tokens=t.gamma, sampling=t.sampling,
                           batch_size=t.batch_size)
            _merge(stats, got)
            return outs
        return run

    arms = [Arm(f"{engine}/none", engine, "none", "baseline", runner(None),
                {"batch_size": t.batch_size}, whole_phase=True)]
    if t.drafter is not None:
        arms.append(Arm(f"{engine}/{t.drafter.method}", engine, t.drafter.method, "spec",
                        runner(t.drafter), {"batch_size": t.batch_size, "gamma": t.gamma},
                        whole_phase=True))
    return arms


def _vllm_python() -> str:
    """The Python that runs vLLM: this one when it imports vllm, else the vLLM venv's."""
    import importlib.util
    import sys
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    try:
        from specplug.integrations.vllm.subprocess_job import vllm_python
        return vllm_python()
    except (ImportError, RuntimeError) as e:
        raise EngineUnavailable(f"--engine vllm needs the 'vllm' extra (pip install "
                                f"'specplug[vllm]') or a vLLM venv: {e}") from None


def _vllm_arms(t: BenchTarget) -> list[Arm]:
    import os
    import sys
    import tempfile

    from specplug.integrations.vllm import subprocess_job
    python = _vllm_python()
    if python == sys.executable:  # vLLM installed here: subprocess_job runs it with this Python
        os.environ.setdefault("SPECPLUG_VLLM_PYTHON", python)
    workdir = tempfile.mkdtemp(prefix="specplug-bench-vllm-")
    counter = iter(range(1 << 30))

    def runner(drafter: DrafterSpec | None) -> RunFn:
        def run(reqs: list[Request], stats: SpecStats) -> list[RequestOutput]:
            job = {"target": t.path, "prompt_ids": [r.prompt_ids for r in reqs],
                   "max_new_tokens": max(r.max_new_tokens for r in reqs),
                   "temperature": t.sampling.temperature, "seed": reqs[0].seed, "warmup": True,
                   "llm_kwargs": {"dtype": str(t.model.dtype).replace("torch.", ""),
                                  "max_num_seqs": t.batch_size}}
            if drafter is not None:
                job["specplug"] = {"method": drafter.method, "path": drafter.path,
                                   "options": dict(drafter.options), "num_draft_tokens": t.gamma}
            got = subprocess_job.run_job(job, workdir, f"arm{next(counter)}", timeout=3600)
            return _from_job(got, reqs, t.tokenizer, stats)
        return run

    arms = [Arm("vllm/none", "vllm", "none", "baseline", runner(None),
                {"batch_size": t.batch_size, "python": python}, whole_phase=True)]
    if t.drafter is not None:
        arms.append(Arm(f"vllm/{t.drafter.method}", "vllm", t.drafter.method, "spec",
                        runner(t.drafter), {"batch_size": t.batch_size, "gamma": t.gamma},
                        whole_phase=True))
    return arms


def _from_job(got: dict, reqs: list[Request], tokenizer, stats: SpecStats) -> list[RequestOutput]:
    """The vLLM job's JSON (summary + per-request tokens) back into outputs and stats."""
    s = got["summary"]
    outs = []
    for req, r in zip(reqs, got["requests"]):
        ids = r["output_token_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer else ""
        outs.append(RequestOutput(req.prompt, list(req.prompt_ids), ids, text,
                                  list(r["accept_lengths"]), r["finish_reason"]))
    one = SpecStats(num_prompts=s["num_prompts"], total_new_tokens=s["total_new_tokens"],
                    wall_time_s=s["wall_time_s"], num_drafts=s["num_drafts"],
                    num_draft_tokens=s["num_draft_tokens"],
                    num_accepted_tokens=s["num_accepted_tokens"],
                    accept_lengths=[a for o in outs for a in o.accept_lengths],
                    timing_ms=dict(s["timing_ms"]))
    _merge(stats, one)
    return outs


def _merge(into: SpecStats, other: SpecStats) -> None:
    """Add one call's stats into an arm's running total."""
    into.num_prompts += other.num_prompts
    into.total_new_tokens += other.total_new_tokens
    into.wall_time_s += other.wall_time_s
    into.num_drafts += other.num_drafts
    into.num_draft_tokens += other.num_draft_tokens
    into.num_accepted_tokens += other.num_accepted_tokens
    into.accept_lengths += other.accept_lengths
    for k, v in other.timing_ms.items():
        into.timing_ms[k] = into.timing_ms.get(k, 0.0) + v
