"""The engine switch: each engine contributes arms (plain baseline, speculative, anchors) that all
run on the same requests in the same process.

  embedded  specplug's EmbeddedEngine: baseline = no drafter, spec = the drafter asked for
  hf        transformers generate(): plain (baseline), prompt lookup, assisted (with --drafter)
  vllm      real vLLM through specplug.integrations.vllm (extra `vllm`): one engine session per
            arm (specplug/jobfile.py), each a process of a Python that has vLLM (vLLM cannot
            start a second engine in one process once numba is loaded)
  sglang    real SGLang: one engine session per arm, in the SGLang venv's Python (extra `sglang`)

Every arm takes one block of requests at a time, and engine processes live for a whole
repetition (the runner builds fresh arms for each), so the runner can alternate arms block by
block.  Other external engines plug in by providing a
module function
  run_<engine>(target=PATH, requests=list[Request], drafter=DrafterSpec | None,
               num_draft_tokens=int, sampling=SamplingParams, batch_size=int)
      -> (list[RequestOutput], SpecStats)
which the switch calls per block with drafter=None (their own baseline) and with the drafter.
"""
from __future__ import annotations

import contextlib

import importlib
from dataclasses import dataclass, field
from typing import Callable

from specplug.drafters.base import DrafterSpec, option_is_set
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
    close: Callable[[], None] = field(default=lambda: None, repr=False)
    # what the engine process reports once started (versions, threads, CPU stand-ins)
    environment: Callable[[], dict] = field(default=lambda: {}, repr=False)


@dataclass
class BenchTarget:
    """What every engine's arms are built from."""
    path: str
    model: object  # HF causal LM (loaded once, shared by the embedded and HF arms)
    tokenizer: object
    drafter: DrafterSpec | None  # None: baseline and anchors only
    gamma: int | None  # draft tokens per step for every arm; None: each method's own default
    sampling: SamplingParams
    batch_size: int
    compare: list = field(default_factory=list)  # [(label, DrafterSpec)]: more drafter arms
    budget: str = "off"  # embedded drafter arms: with the speculation budget, without, or both
    longest: int = 4096  # the most prompt + new tokens a request may need (engine sessions)

    def gamma_of(self, method: str | None) -> int:
        """The draft tokens per step of an arm running `method`."""
        from specplug.drafters.base import gamma_for
        return gamma_for(method, self.gamma)


def build_arms(engine: str, t: BenchTarget) -> list[Arm]:
    if engine == "embedded":
        return _embedded_arms(t)
    if engine == "hf":
        return _hf_arms(t)
    if engine == "vllm":
        return _vllm_arms(t)
    if engine == "sglang":
        return _sglang_arms(t)
    if engine in _EXTRAS:
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
    modes = _budget_modes(t)
    for label, dspec in specs:
        gamma = t.gamma_of(dspec.method)
        for with_budget in modes:
            # each arm its own drafter: drafters keep per-row state
            drafter = build_drafter(dspec, target_info(t.model, t.tokenizer))
            spec = EmbeddedEngine(t.model, t.tokenizer, drafter, num_draft_tokens=gamma,
                                  sampling=t.sampling,
                                  budget=(SpeculationBudget(gamma, verify_pads_rows=True)
                                          if with_budget else None))
            name = f"embedded/{label}" + ("/budget" if with_budget else "")
            arms.append(Arm(name, "embedded", dspec.method, "spec",
                            runner(spec), {"batch_size": t.batch_size, "gamma": gamma,
                                           "drafter_path": dspec.path, "budget": with_budget,
                                           "options": dict(dspec.options)}))
    return arms


def _hf_arms(t: BenchTarget) -> list[Arm]:
    from .hf_anchor import HFGenerate

    def arm(mode: str, role: str, assistant=None) -> Arm:
        # prompt lookup drafts as n-gram does, assisted generation as the draft model does
        gamma = t.gamma_of("draft" if mode == "assisted" else "ngram")
        gen = HFGenerate(t.model, t.tokenizer, mode, gamma, t.sampling.temperature, assistant,
                         max_ngram=int((t.drafter.options if t.drafter else {}).get("max_ngram", 3)))
        method = "none" if mode == "plain" else mode
        settings = gen.settings() if mode == "plain" else dict(gen.settings(), gamma=gamma)
        return Arm(f"hf/{method}", "hf", method, role, gen.generate, settings)

    arms = [arm("plain", "baseline"), arm("prompt_lookup", "anchor")]
    if t.drafter is not None and t.drafter.method == "draft" and t.drafter.path:
        from specplug.models.loading import load_causal_lm
        assistant = load_causal_lm(t.drafter.path, dtype=t.model.dtype)
        arms.append(arm("assisted", "anchor", assistant))
    return arms


# the module each session engine runs as `python -m MODULE --session FD` (specplug/jobfile.py)
SESSION_MODULES = {"vllm": "specplug.integrations.vllm.generate",
                   "sglang": "specplug.integrations.sglang.generate"}
# engines reached through a module's run_<engine> function (see the module docstring)
_EXTRAS: dict[str, tuple[str, str]] = {}


def check_engine(engine: str) -> None:
    """Fail before any model is loaded when an engine cannot run here."""
    if engine not in ENGINES and engine not in _EXTRAS:
        raise EngineUnavailable(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if engine == "vllm":
        _vllm_python()
    elif engine == "sglang":
        _sglang_python()
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
                           num_draft_tokens=t.gamma_of(drafter and drafter.method),
                           sampling=t.sampling,
                           batch_size=t.batch_size)
            stats.merge(got)
            return outs
        return run

    arms = [Arm(f"{engine}/none", engine, "none", "baseline", runner(None),
                {"batch_size": t.batch_size})]
    if t.drafter is not None:
        arms.append(Arm(f"{engine}/{t.drafter.method}", engine, t.drafter.method, "spec",
                        runner(t.drafter), {"batch_size": t.batch_size,
                                            "gamma": t.gamma_of(t.drafter.method)}))
    return arms


def _engine_python(engine: str) -> str:
    """The Python that runs vllm / sglang: this one when it imports the engine, else the
    engine's venv (integrations/<engine>/install_cpu.sh)."""
    import importlib.util
    import sys
    if importlib.util.find_spec(engine) is not None:
        return sys.executable
    try:
        if engine == "vllm":
            from specplug.integrations.vllm.subprocess_job import vllm_python as venv_python
        else:
            from specplug.integrations.sglang.generate import sglang_python as venv_python
        return venv_python()
    except (ImportError, RuntimeError) as e:
        raise EngineUnavailable(f"--engine {engine} needs the '{engine}' extra (pip install "
                                f"'specplug[{engine}]') or a venv with it: {e}") from None


def _vllm_python() -> str:
    return _engine_python("vllm")


def _sglang_python() -> str:
    return _engine_python("sglang")


class _SessionRun:
    """An arm's run function over one engine session (specplug/jobfile.py), started on first
    use: the engine process stays up for every block until the arm is closed (the runner closes
    it at the end of each repetition)."""

    def __init__(self, python: str, module: str, env: dict, open_msg: dict, to_batch, from_result,
                 log_path: str):
        self.args = (python, module, env, log_path)
        self.open_msg, self.to_batch, self.from_result = open_msg, to_batch, from_result
        self.client = None
        self.env: dict = {}
        self.failed = False  # a failed session's log stays: the error message points at it

    def __call__(self, reqs: list[Request], stats: SpecStats) -> list[RequestOutput]:
        from specplug.jobfile import SessionClient
        try:
            if self.client is None:
                self.client = SessionClient(*self.args)
                self.env = self.client.call({"open": self.open_msg}, timeout=1800)["environment"]
            return self.from_result(self.client.call({"run": self.to_batch(reqs)}), reqs, stats)
        except Exception:
            self.failed = True
            raise

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            if not self.failed:
                _remove_log(self.args[3])


def _remove_log(path: str) -> None:
    """A clean session's log, and its folder once the folder's last log is gone."""
    import os
    with contextlib.suppress(OSError):
        os.remove(path)
        os.rmdir(os.path.dirname(path))


def _drafter_arms(t: BenchTarget) -> list[tuple[str, DrafterSpec]]:
    """(label, drafter) of the asked drafter, then of each --compare one."""
    return ([(t.drafter.method, t.drafter)] if t.drafter is not None else []) + list(t.compare)


def _session_arms(engine: str, t: BenchTarget, python: str, module: str, env_for, open_for,
                  to_batch, from_result, drafters: list | None = None,
                  gamma_for_session=None) -> list[Arm]:
    """A plain arm and one per (label, drafter) (default: the asked drafter and each --compare
    one), each its own engine session; gamma_for_session(method): its draft tokens per step."""
    import tempfile
    logs = tempfile.mkdtemp(prefix=f"specplug-bench-{engine}-")
    arms = []
    drafters = _drafter_arms(t) if drafters is None else drafters
    gamma_for_session = gamma_for_session or t.gamma_of
    for label, drafter in [("none", None)] + drafters:
        method = drafter.method if drafter else "none"
        run = _SessionRun(python, module, env_for(drafter), open_for(drafter), to_batch,
                          from_result, f"{logs}/{label.replace('/', '-')}.log")
        settings = {"batch_size": t.batch_size, "python": python}
        if drafter is not None:
            settings.update(gamma=gamma_for_session(drafter.method), drafter_path=drafter.path,
                            options=dict(drafter.options))
        arms.append(Arm(f"{engine}/{label}", engine, method,
                        "spec" if drafter else "baseline", run, settings, close=run.close,
                        environment=lambda run=run: run.env))
    return arms


def _vllm_arms(t: BenchTarget) -> list[Arm]:
    from specplug.integrations.vllm.subprocess_job import vllm_env
    dtype = str(t.model.dtype).replace("torch.", "")

    def open_for(drafter: DrafterSpec | None) -> dict:
        job = {"target": t.path, "longest": t.longest,
               "llm_kwargs": {"dtype": dtype, "max_num_seqs": t.batch_size}}
        if drafter is not None:
            options = dict(drafter.options)
            job["specplug"] = {"method": drafter.method, "path": drafter.path,
                               "num_draft_tokens": t.gamma_of(drafter.method),
                               "budget": option_is_set(options.pop("budget", False),
                                                       "option budget"),
                               "options": options}
        return job

    def to_batch(reqs: list[Request]) -> dict:
        return {"prompt_ids": [r.prompt_ids for r in reqs],
                "max_new_tokens": max(r.max_new_tokens for r in reqs),
                "seeds": [r.seed for r in reqs], "temperature": t.sampling.temperature}

    arms = _session_arms("vllm", t, _vllm_python(), SESSION_MODULES["vllm"],
                         lambda drafter: vllm_env(False), open_for, to_batch,
                         lambda got, reqs, stats: _from_job(got, reqs, t.tokenizer, stats),
                         _vllm_drafter_arms(t))
    for arm in arms[1:]:
        options = arm.settings["options"]
        arm.settings["native"] = option_is_set(options.get("native", False), "option native")
        arm.settings["budget"] = option_is_set(options.pop("budget", False), "option budget")
    return arms


def _vllm_drafter_arms(t: BenchTarget) -> list[tuple[str, DrafterSpec]]:
    """Each drafter arm with the budget (label /budget, option budget=1: it runs inside the
    plugin, integrations/vllm/proposer.py), without it, or both, as --budget says.  An arm
    running vLLM's own method (option native=1) has no budget: it never reaches the plugin."""
    modes = _budget_modes(t)
    out = []
    for label, drafter in _drafter_arms(t):
        native = option_is_set(drafter.options.get("native", False), "option native")
        for on in ((False,) if native else modes):
            options = dict(drafter.options, budget=1) if on else dict(drafter.options)
            out.append((label + ("/budget" if on else ""),
                        DrafterSpec(drafter.method, drafter.path, options)))
    return out


def _budget_modes(t: BenchTarget) -> tuple[bool, ...]:
    """Each drafter arm runs without the budget, with it, or both (--budget off | on | both)."""
    return {"on": (True,), "off": (False,), "both": (False, True)}[t.budget]


def _sglang_arms(t: BenchTarget) -> list[Arm]:
    import atexit
    import os

    from specplug.integrations.sglang import generate as sg
    from specplug.integrations.sglang.cpu import cpu_env, on_cpu

    env = cpu_env(dict(os.environ)) if on_cpu() else dict(os.environ)
    cards = contextlib.ExitStack()  # the arms' drafter cards, kept until the benchmark ends
    atexit.register(cards.close)

    def open_for(drafter: DrafterSpec | None) -> dict:
        method, options = drafter and drafter.method, drafter and drafter.options
        path = cards.enter_context(sg.drafter_path_for(method, drafter and drafter.path, options))
        spec = sg.speculative_kwargs(method, path, sglang_gamma(method), options=options)
        return {"target": t.path, "longest": t.longest, "spec": spec,
                "engine_kwargs": {"dtype": str(t.model.dtype).replace("torch.", ""),
                                  "max_running_requests": t.batch_size}}

    def sglang_gamma(method: str | None) -> int:
        # SGLang verifies every request at its full width, drafted or not: a lookup's long
        # default cap (suffix's 24) would verify 25 tokens a step, so it keeps the short one
        return t.gamma if t.gamma is not None else t.gamma_of(None)

    def to_batch(reqs: list[Request]) -> dict:
        return {"requests": [{"prompt_ids": r.prompt_ids, "max_new_tokens": r.max_new_tokens,
                              "stop": list(r.stop), "prompt": r.prompt} for r in reqs],
                "temperature": t.sampling.temperature, "top_p": t.sampling.top_p,
                "top_k": t.sampling.top_k}

    def from_result(got: dict, reqs: list[Request], stats: SpecStats) -> list[RequestOutput]:
        stats.merge(SpecStats.from_dict(got["stats"]))
        return [RequestOutput(**o) for o in got["outputs"]]

    return _session_arms("sglang", t, _sglang_python(), SESSION_MODULES["sglang"],
                         lambda drafter: env, open_for, to_batch, from_result,
                         gamma_for_session=sglang_gamma)


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
    stats.merge(one)
    return outs
