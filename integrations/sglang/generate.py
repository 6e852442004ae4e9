"""Run a batch through real SGLang (`sglang.Engine`) with a specplug drafter, and return what the
embedded engine returns: per-request outputs and one SpecStats.

    run_sglang(cfg: specplug.api.GenerateConfig) -> (list[RequestOutput], SpecStats)
    run_sglang(target=, requests=, drafter=DrafterSpec | None, num_draft_tokens=, sampling=,
               batch_size=)                                       (the benchmark tool's call)

Acceptance comes from SGLang itself: per request, meta_info's spec_verify_ct and
spec_correct_drafts_histogram (k correct drafts = accept length k + 1, bonus included).  SGLang
reports counts, not their order, so a request's `accept_lengths` come sorted by length.

When this Python has no SGLang, the batch runs in a fresh process of the SGLang venv's Python
(SPECPLUG_SGLANG_PYTHON, else <repo>/.venv-sglang/bin/python; integrations/sglang/install_cpu.sh
builds it):  python -m specplug.integrations.sglang.generate JOB.json RESULT.json
(or --session FD: one engine kept across batches, see specplug/jobfile.py).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Iterator

from specplug.drafter_block import DrafterBlock
from specplug.drafters.base import DrafterSpec, option_is_set
from specplug.jobfile import run_job_files
from specplug.runners import register_runner
from specplug.engine.rows import Request, RequestOutput
from specplug.stats import SpecStats
from specplug.types import SamplingParams

from .algorithms import algorithm_for, tree_shape
from .cpu import cpu_env, on_cpu, standins_active
from .drafter_card import card_needed, temporary_card

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def speculative_kwargs(method: str | None, path: str | None, num_draft_tokens: int,
                       native: bool = True, options: dict | None = None) -> dict:
    """sglang.Engine / launch_server settings that run specplug `method` (empty: no speculation);
    native False runs specplug's own EAGLE/DFlash heads where SGLang has a worker for them.
    path is what --speculative-draft-model-path gets: the drafter's folder, or a drafter card
    (`drafter_path_for`).  Drafter options that ask for a tree (tree_topk, head_tree_topk, ...)
    set SGLang's tree shape."""
    if method in (None, "none"):
        return {}
    topk, steps, width = tree_shape(method, options or {}, num_draft_tokens)
    kwargs = {"speculative_algorithm": algorithm_for(method, native),
              "speculative_num_steps": steps, "speculative_eagle_topk": topk,
              "speculative_num_draft_tokens": width}
    if path:
        kwargs["speculative_draft_model_path"] = path
    return kwargs


@contextlib.contextmanager
def drafter_path_for(method: str | None, path: str | None, options: dict | None = None,
                     budget: bool = False, native: bool = True) -> Iterator[str | None]:
    """What --speculative-draft-model-path gets for the length of the block: a temporary drafter
    card (drafter_card.py) where specplug's worker needs options, the budget, or a folder SGLang
    cannot read; else the drafter's folder as it is.  SGLang's own workers get the folder."""
    options = dict(options or {})
    budget = option_is_set(options.pop("budget", budget), "option budget")
    ours = method not in (None, "none") and algorithm_for(method, native).startswith("SPECPLUG")
    if ours and card_needed(method, options, budget):
        with temporary_card(DrafterBlock(method, path, options, budget)) as card:
            yield card
    else:
        yield path


def device_kwargs(cpu: bool | None = None) -> dict:
    """SGLang's CPU engine needs its own attention backend for speculative decoding; GPUs take
    SGLang's defaults.  cpu None: cpu.on_cpu() decides (SGLANG_USE_CPU_ENGINE, else no GPU)."""
    if not (on_cpu() if cpu is None else cpu):
        return {}
    # On CPU SGLang sizes its KV pool as a fraction of host RAM (14 GB seen for a tiny model);
    # a token cap keeps two servers side by side within a 24 GB machine.
    cap = int(os.environ.get("SPECPLUG_SGLANG_MAX_TOTAL_TOKENS", "16384"))
    # sleep_on_idle: otherwise an idle CPU scheduler polls its sockets in a busy loop and holds
    # a core (measured: 10 s of CPU per 10 s idle), starving every other process on the machine
    return {"device": "cpu", "attention_backend": "intel_amx",
            "speculative_draft_attention_backend": "intel_amx", "disable_cuda_graph": True,
            "max_total_tokens": cap, "sleep_on_idle": True}


class SglangSession:
    """One sglang.Engine on `target` in this process, kept for any number of batches.
    longest: the most prompt + new tokens any request will need (sets context_length)."""

    def __init__(self, target: str, longest: int, spec: dict, engine_kwargs: dict | None = None):
        import sglang
        kwargs = dict(model_path=target, dtype="float32", log_level="error",
                      context_length=_round_up(
                          longest + spec.get("speculative_num_draft_tokens", 1) + 8, 64))
        kwargs.update(device_kwargs(), **spec, **(engine_kwargs or {}))
        self.engine = sglang.Engine(**kwargs)

    def generate(self, requests: list[Request], sampling: SamplingParams, ignore_eos: bool = False,
                 max_tokens: int | None = None) -> tuple[list[RequestOutput], SpecStats]:
        """requests as one batch; max_tokens caps every request (warm-up runs)."""
        start = time.perf_counter()
        results = self.engine.generate(
            input_ids=[r.prompt_ids for r in requests],
            sampling_params=[_params(r, sampling, ignore_eos,
                                     min(r.max_new_tokens, max_tokens or r.max_new_tokens))
                             for r in requests])
        wall = time.perf_counter() - start
        outputs = [to_output(r, res) for r, res in zip(requests, results)]
        return outputs, stats_of(outputs, results, wall)

    def close(self) -> None:
        self.engine.shutdown()


def run_engine(target: str, requests: list[Request], spec: dict, sampling: SamplingParams,
               ignore_eos: bool = False, engine_kwargs: dict | None = None, warmup: bool = False,
               ) -> tuple[list[RequestOutput], SpecStats]:
    """Start one sglang.Engine on `target` in this process, run `requests` as one batch."""
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    session = SglangSession(target, longest, spec, engine_kwargs)
    try:
        if warmup:
            session.generate(requests[:1], sampling, ignore_eos, max_tokens=8)
        return session.generate(requests, sampling, ignore_eos)
    finally:
        session.close()


def run_sglang(cfg=None, *, target: str | None = None, requests: list[Request] | None = None,
               drafter: DrafterSpec | None = None, num_draft_tokens: int = 4,
               sampling: SamplingParams = SamplingParams(), batch_size: int = 0,
               budget: bool = False) -> tuple[list[RequestOutput], SpecStats]:
    """`specplug generate --engine sglang` (cfg: GenerateConfig), or the benchmark's keywords.
    budget: the speculation budget picks each step's width (specplug's own algorithms; SGLang's
    EAGLE workers keep theirs)."""
    if cfg is not None:
        target, requests, drafter, num_draft_tokens, sampling, batch_size = _from_config(cfg)
        budget = bool(cfg.budget)
    method = drafter.method if drafter else None
    engine_kwargs = {"max_running_requests": batch_size} if batch_size else {}
    if getattr(cfg, "dtype", None):
        engine_kwargs["dtype"] = cfg.dtype
    options = drafter.options if drafter else None
    with drafter_path_for(method, drafter.path if drafter else None, options, budget) as path:
        spec = speculative_kwargs(method, path, num_draft_tokens, options=options)
        here = importlib.util.find_spec("sglang") is not None
        if here and (standins_active() or not on_cpu()):
            return run_engine(target, requests, spec, sampling, engine_kwargs=engine_kwargs)
        job = {"target": target, "spec": spec, "engine_kwargs": engine_kwargs,
               "temperature": sampling.temperature, "top_p": sampling.top_p,
               "top_k": sampling.top_k,
               "requests": [{"prompt_ids": r.prompt_ids, "max_new_tokens": r.max_new_tokens,
                             "stop": list(r.stop), "prompt": r.prompt} for r in requests]}
        # on CPU the stand-ins must be on PYTHONPATH from interpreter start: a fresh process
        result = run_job_subprocess(job, python=sys.executable if here else None)
    outputs = [RequestOutput(**o) for o in result["outputs"]]
    stats = SpecStats.from_dict(result["stats"])
    return outputs, stats


def _from_config(cfg):
    from specplug.drafters.base import gamma_for
    from specplug.drafters.detect import resolve_method
    from specplug.models.loading import load_tokenizer
    from specplug.prompts import drafter_folder, requests_for
    cfg.method = resolve_method(cfg.method, cfg.drafter)
    if cfg.gamma is None:
        # SGLang verifies every request at its full width, drafted or not: a lookup's long
        # default cap (suffix's 24) would verify 25 tokens a step, so the short default it is
        cfg.gamma = gamma_for(None, None)
    requests = requests_for(cfg, load_tokenizer(cfg.target), seeded=False)
    path = drafter_folder(cfg)
    drafter = None if cfg.method == "none" else DrafterSpec(cfg.method, path, dict(cfg.options))
    return cfg.target, requests, drafter, cfg.gamma, cfg.sampling, cfg.batch_size


# -- translation of SGLang's results ----------------------------------------------------------
def _params(req: Request, sampling: SamplingParams, ignore_eos: bool, max_new: int | None = None):
    params = {"temperature": sampling.temperature, "top_p": sampling.top_p,
              "top_k": sampling.top_k if sampling.top_k > 0 else -1,
              "max_new_tokens": max_new or req.max_new_tokens, "ignore_eos": ignore_eos}
    if req.stop:
        params["stop"] = list(req.stop)
    return params


def to_output(req: Request, result: dict) -> RequestOutput:
    meta = result["meta_info"]
    reason = (meta.get("finish_reason") or {}).get("type", "length")
    if reason == "abort":  # SGLang refused the request (e.g. worker.refuse_sampled): say why
        raise RuntimeError(f"SGLang aborted a request: {meta['finish_reason'].get('message')}")
    if reason == "stop":  # SGLang says "stop" for EOS too; a stop string sets "matched" to it
        matched = (meta.get("finish_reason") or {}).get("matched")
        reason = "stop" if isinstance(matched, str) else "eos"
    return RequestOutput(req.prompt, list(req.prompt_ids), list(result["output_ids"]),
                         result.get("text", ""), accept_lengths_of(meta), reason)


def accept_lengths_of(meta: dict) -> list[int]:
    """Accept length per verify step (drafts accepted + the bonus token), from meta_info."""
    hist = meta.get("spec_correct_drafts_histogram") or []
    return [k + 1 for k, count in enumerate(hist) for _ in range(count)]


def stats_of(outputs: list[RequestOutput], results: list[dict], wall: float) -> SpecStats:
    stats = SpecStats(num_prompts=len(outputs), wall_time_s=wall,
                      total_new_tokens=sum(o.num_new_tokens for o in outputs))
    for o, res in zip(outputs, results):
        meta = res["meta_info"]
        stats.accept_lengths += o.accept_lengths
        stats.num_drafts += int(meta.get("spec_verify_ct", 0))
        stats.num_draft_tokens += int(meta.get("spec_num_proposed_drafts", 0))
        stats.num_accepted_tokens += int(meta.get("spec_num_correct_drafts", 0))
    stats.timing_ms["other"] = wall * 1e3  # SGLang does not split its step time
    return stats


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


# -- subprocess in the SGLang venv ------------------------------------------------------------
def sglang_python() -> str:
    """SPECPLUG_SGLANG_PYTHON, else <repo>/.venv-sglang/bin/python."""
    path = os.environ.get("SPECPLUG_SGLANG_PYTHON",
                          os.path.join(REPO, ".venv-sglang", "bin", "python"))
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no SGLang venv python at {path}: run integrations/sglang/install_cpu.sh "
                           "(or set SPECPLUG_SGLANG_PYTHON, or pip install 'specplug[sglang]')")
    return path


def run_job_subprocess(job: dict, timeout: float = 600, env_extra: dict | None = None,
                       python: str | None = None) -> dict:
    """run_job(job) in a fresh process of `python` (default: the SGLang venv's), with the CPU
    stand-ins active where SGLang runs on the CPU; raises with the log tail on failure."""
    with tempfile.TemporaryDirectory(prefix="specplug-sglang-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        env = dict(os.environ, **(env_extra or {}))
        if on_cpu():
            env = cpu_env(env)
        proc = subprocess.run([python or sglang_python(), "-m", "specplug.integrations.sglang.generate",
                               job_path, out_path], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).splitlines()
            # the error itself first: a CLI prints only the first line
            raise RuntimeError(f"SGLang subprocess failed: {lines[-1] if lines else proc.returncode}"
                               "\n" + "\n".join(lines[-30:]))
        with open(out_path) as f:
            return json.load(f)


def _requests_of(job: dict) -> list[Request]:
    return [Request(list(r["prompt_ids"]), int(r["max_new_tokens"]), tuple(r.get("stop", ())),
                    None, r.get("prompt", "")) for r in job["requests"]]


def _sampling_of(job: dict) -> SamplingParams:
    return SamplingParams(float(job.get("temperature", 0.0)), int(job.get("top_k", 0)),
                          float(job.get("top_p", 1.0)))


def _result(outputs: list[RequestOutput], stats: SpecStats) -> dict:
    return {"outputs": [o.__dict__ for o in outputs], "stats": stats.to_dict(),
            "summary": stats.summary()}


def run_job(job: dict) -> dict:
    """One JSON job: {"target", "spec", "requests": [{"prompt_ids", "max_new_tokens", ...}],
    "temperature", "top_p", "top_k", "ignore_eos", "engine_kwargs", "warmup"};
    or {"jobs": {name: job}}: engines one after another in this process (SGLang's import is
    paid once), -> {"results": {name: result, or {"error": "Type: message"} if it raised}}."""
    if "jobs" in job:
        return {"results": {name: _result_or_error(sub) for name, sub in job["jobs"].items()}}
    outputs, stats = run_engine(job["target"], _requests_of(job), job.get("spec") or {},
                                _sampling_of(job), bool(job.get("ignore_eos", False)),
                                job.get("engine_kwargs"), bool(job.get("warmup", False)))
    return _result(outputs, stats)


class _JobSession:
    """`--session` (specplug/jobfile.py): open = {"target", "spec", "engine_kwargs", "longest"};
    run = {"requests", "temperature", "top_p", "top_k", "ignore_eos", "max_tokens"}."""

    def __init__(self, job: dict):
        self.session = SglangSession(job["target"], int(job["longest"]), job.get("spec") or {},
                                     job.get("engine_kwargs"))

    def environment(self) -> dict:
        import sglang
        import torch
        return {"versions": {"sglang": sglang.__version__, "torch": torch.__version__},
                "threads": {"torch": torch.get_num_threads()},
                "cpu_standins": standins_active()}

    def run(self, batch: dict) -> dict:
        return _result(*self.session.generate(_requests_of(batch), _sampling_of(batch),
                                              bool(batch.get("ignore_eos", False)),
                                              batch.get("max_tokens")))

    def close(self) -> None:
        self.session.close()


def _result_or_error(job: dict) -> dict:
    try:
        return run_job(job)
    except Exception as e:  # noqa: BLE001 -- reported per job; the caller decides
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    return run_job_files(argv, "specplug.integrations.sglang.generate", run_job,
                         open_session=_JobSession)


register_runner("sglang", run_sglang)  # `specplug generate --engine sglang` (specplug/runners.py)


if __name__ == "__main__":
    sys.exit(main())
