"""Run a batch through real vLLM (`LLM.generate`) with a specplug drafter, and return what the
embedded engine returns: per-request outputs and one SpecStats.

    run_vllm(cfg: specplug.api.GenerateConfig) -> (list[RequestOutput], SpecStats)

Acceptance comes from vLLM itself: the aggregate counters of `LLM.get_metrics()`
(vllm:spec_decode_num_drafts / _num_draft_tokens / _num_accepted_tokens) and, per request, the
ordered accepted counts of `per_request_spec_decode_metrics="detailed"`.  Accept lengths include
the bonus token, as everywhere in specplug.  A decode step in which no draft was proposed counts
as accept length 1 (as in the embedded engine); vLLM does not say when those happened, so they
follow the drafted steps in a request's `accept_lengths`.

Also a command for subprocesses in vLLM's own venv (tests, benchmarks):
    python -m specplug.integrations.vllm.generate JOB.json RESULT.json
    python -m specplug.integrations.vllm.generate --session FD     (specplug/jobfile.py)
JOB: {"target", "prompt_ids": [[...]], "max_new_tokens", "speculative_config" | "specplug"
      ({"method", "path", "options", "num_draft_tokens", "via_plugin", "budget"}),
      "temperature", "seed" (every request) | "seeds" (one per request), "ignore_eos",
      "llm_kwargs", "warmup", "repeats"}; see `run_job`.
"""
from __future__ import annotations

import sys
import time

from specplug.drafters.base import family_of, option_is_set
from specplug.engine.rows import Request, RequestOutput
from specplug.jobfile import run_job_files
from specplug.runners import register_runner
from specplug.stats import SpecStats
from specplug.types import SamplingParams

from .proposer import CLASS_PATH, CONFIG_KEY


# settings that worked for vLLM on CPU (ENGINE_NOTES); callers may override any of them
DEFAULT_LLM_KWARGS = {"dtype": "float32", "enforce_eager": True}


def speculative_settings(method: str, path: str | None, options: dict | None,
                         num_draft_tokens: int, via_plugin: bool = False, budget: bool = False,
                         ) -> tuple[dict | None, dict]:
    """(speculative_config, additional_config) that run specplug `method` inside vLLM.
    via_plugin: run eagle / eagle3 / dflash through specplug's own drafter (custom_class)
    instead of vLLM's implementation of the family; hybrid always runs through the plugin.
    budget: the speculation budget picks each request's draft length.  It lives in specplug's
    proposer, so it applies to what runs through the plugin; a family vLLM implements itself
    stays vLLM's own unless via_plugin (the budget being on by default must not reroute it).
    options may carry `via_plugin=1` (same as the argument) or `native=1`: vLLM's own method of
    a checkpoint-free family (its `ngram`, its `suffix`), the arm a benchmark compares against;
    the other options are then that method's speculative_config keys."""
    if method in (None, "none"):
        return None, {}
    options = dict(options or {})
    via_plugin = option_is_set(options.pop("via_plugin", via_plugin), "option via_plugin")
    family = family_of(method)
    if option_is_set(options.pop("native", False), "option native"):
        return _native_lookup(family, options, num_draft_tokens), {}
    # a family vLLM implements itself (family.vllm_method) runs as vLLM's own on the same
    # checkpoint, unless via_plugin asks for specplug's drafter through the custom_class proposer
    native = family.vllm_method
    if native and not via_plugin:
        if not path:
            raise ValueError(f"method {method!r} needs a drafter checkpoint folder")
        return {"method": native, "model": path, "num_speculative_tokens": num_draft_tokens}, {}
    block = {"method": method, "options": options}
    if budget:
        block["budget"] = True
    if path:
        block["path"] = path
    return ({"method": "custom_class", "model": CLASS_PATH,
             "num_speculative_tokens": num_draft_tokens}, {CONFIG_KEY: block})


def _native_lookup(family, options: dict, num_draft_tokens: int) -> dict:
    """vLLM's own checkpoint-free method for `family` (Family.vllm_lookup_method)."""
    native = family.vllm_lookup_method
    if native is None:
        raise ValueError(f"native=1: vLLM has no checkpoint-free method like {family.method!r}")
    spec = {"method": native, "num_speculative_tokens": num_draft_tokens}
    if native == "ngram":
        # specplug's n-gram defaults (longest match 3, down to 1), so the two arms look up the
        # same way unless asked otherwise; vLLM's own default is exactly 5
        spec.update(prompt_lookup_max=int(options.pop("max_ngram", 3)),
                    prompt_lookup_min=int(options.pop("min_ngram", 1)))
    spec.update(options)
    return spec


class VllmSession:
    """One vLLM engine on `target`, kept for any number of batches.  longest: the most prompt +
    new tokens any request will need (sets max_model_len)."""

    def __init__(self, target: str, longest: int, speculative_config: dict | None = None,
                 additional_config: dict | None = None, llm_kwargs: dict | None = None):
        from vllm import LLM

        gamma = (speculative_config or {}).get("num_speculative_tokens", 0)
        kwargs = dict(DEFAULT_LLM_KWARGS, max_model_len=_round_up(longest + gamma + 1, 64),
                      disable_log_stats=False)
        if speculative_config:
            kwargs.update(speculative_config=speculative_config,
                          per_request_spec_decode_metrics="detailed")
        if additional_config:
            kwargs["additional_config"] = additional_config
            method = (additional_config.get(CONFIG_KEY) or {}).get("method")
            if method and family_of(method).reads_hidden_states:
                # every prompt position needs its features: the prompt must run through the target
                kwargs["enable_prefix_caching"] = False
        kwargs.update(llm_kwargs or {})
        self.llm = LLM(model=target, **kwargs)
        # what vLLM made of the settings (e.g. DYNAMO_TRACE_ONCE on CPU without enforce_eager)
        config = getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None)
        self.compilation_mode = (config.compilation_config.mode.name if config is not None
                                 else "unknown")

    def generate(self, requests: list[Request], sampling: SamplingParams = SamplingParams(),
                 ignore_eos: bool = False, max_tokens: int | None = None,
                 ) -> tuple[list[RequestOutput], SpecStats]:
        """requests as one batch; max_tokens caps every request (warm-up runs)."""
        from vllm import SamplingParams as VllmSampling

        params = [VllmSampling(temperature=sampling.temperature, top_k=sampling.top_k,
                               top_p=sampling.top_p, seed=r.seed,
                               max_tokens=min(r.max_new_tokens, max_tokens or r.max_new_tokens),
                               stop=list(r.stop) or None, ignore_eos=ignore_eos)
                  for r in requests]
        before = _spec_counters(self.llm.get_metrics())
        start = time.perf_counter()
        results = self.llm.generate([{"prompt_token_ids": r.prompt_ids} for r in requests],
                                    params, use_tqdm=False)
        wall = time.perf_counter() - start
        after = _spec_counters(self.llm.get_metrics())
        outputs = [_to_output(req, res) for req, res in zip(requests, results)]
        return outputs, _stats(outputs, {k: after[k] - before[k] for k in after}, wall)


def run_vllm_requests(target: str, requests: list[Request], speculative_config: dict | None = None,
                      additional_config: dict | None = None,
                      sampling: SamplingParams = SamplingParams(), ignore_eos: bool = False,
                      llm_kwargs: dict | None = None, warmup: bool = False, repeats: int = 1,
                      ) -> tuple[list[RequestOutput], SpecStats]:
    """Start one vLLM engine on `target`, run `requests` as one batch, read vLLM's counters.
    warmup: run the whole batch once, 8 tokens each, untimed; repeats: time the batch this many
    times and report the median wall time (outputs and counters are from the last run)."""
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    session = VllmSession(target, longest, speculative_config, additional_config, llm_kwargs)
    return _timed(session, requests, sampling, ignore_eos, warmup, repeats)


def _timed(session: VllmSession, requests: list[Request], sampling: SamplingParams,
           ignore_eos: bool, warmup: bool, repeats: int) -> tuple[list[RequestOutput], SpecStats]:
    if warmup:  # first-call costs (allocation, lazy init at every batch row) stay untimed
        session.generate(requests, sampling, ignore_eos, max_tokens=8)
    runs = [session.generate(requests, sampling, ignore_eos) for _ in range(max(1, repeats))]
    outputs, stats = runs[-1]
    stats.wall_time_s = sorted(s.wall_time_s for _, s in runs)[len(runs) // 2]
    stats.timing_ms["other"] = stats.wall_time_s * 1e3
    return outputs, stats


def run_vllm(cfg) -> tuple[list[RequestOutput], SpecStats]:
    """`specplug generate --engine vllm`: cfg is a specplug.api.GenerateConfig."""
    from specplug.drafters.base import gamma_for
    from specplug.drafters.detect import resolve_method
    from specplug.models.loading import load_tokenizer
    from specplug.prompts import drafter_folder, requests_for
    cfg.method = resolve_method(cfg.method, cfg.drafter)
    cfg.gamma = gamma_for(cfg.method, cfg.gamma)  # vLLM verifies each request's own length
    requests = requests_for(cfg, load_tokenizer(cfg.target))
    path = drafter_folder(cfg)
    # --option via_plugin=1: eagle / eagle3 / dflash through specplug's drafter, not vLLM's;
    # --option native=1: vLLM's own ngram / suffix (see speculative_settings)
    spec, extra = speculative_settings(cfg.method, path, cfg.options, cfg.gamma,
                                       budget=bool(getattr(cfg, "budget", False)))
    # vLLM schedules its own continuous batch; batch_size caps how many run at once
    return run_vllm_requests(cfg.target, requests, spec, extra, cfg.sampling,
                             llm_kwargs={"dtype": cfg.dtype, "max_num_seqs": cfg.batch_size})


# -- translation of vLLM's results ------------------------------------------------------------
def _to_output(req: Request, result) -> RequestOutput:
    done = result.outputs[0]
    finish = done.finish_reason or "length"
    if finish == "stop":  # vLLM says "stop" for EOS too; a stop string sets stop_reason
        finish = "stop" if isinstance(done.stop_reason, str) else "eos"
    out_ids = list(done.token_ids)
    accepted = list(done.spec_decode_metrics.per_step_accepted) if done.spec_decode_metrics else []
    lengths = [a + 1 for a in accepted]
    # decode steps that carried no draft: every token not yet explained, minus the prefill's
    lengths += [1] * max(0, len(out_ids) - 1 - sum(lengths))
    return RequestOutput(req.prompt, list(req.prompt_ids), out_ids, done.text, lengths, finish)


def _spec_counters(metrics) -> dict[str, int]:
    names = {"vllm:spec_decode_num_drafts": "num_drafts",
             "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens"}
    totals = dict.fromkeys(names.values(), 0)
    for m in metrics:  # one series per engine index: sum them
        if m.name in names:
            totals[names[m.name]] += int(m.value)
    return totals


def _stats(outputs: list[RequestOutput], counters: dict[str, int], wall: float) -> SpecStats:
    stats = SpecStats(num_prompts=len(outputs),
                      total_new_tokens=sum(o.num_new_tokens for o in outputs),
                      wall_time_s=wall, **counters)
    for o in outputs:
        stats.accept_lengths += o.accept_lengths
    stats.timing_ms["other"] = wall * 1e3  # vLLM does not split its step time
    return stats


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


# -- subprocess entry -------------------------------------------------------------------------
def _requests_of(job: dict) -> list[Request]:
    seeds = job.get("seeds") or [job.get("seed")] * len(job["prompt_ids"])
    return [Request(list(p), int(job["max_new_tokens"]), seed=s)
            for p, s in zip(job["prompt_ids"], seeds)]


def _engine_settings(job: dict) -> tuple[dict | None, dict]:
    spec, extra = job.get("speculative_config"), {}
    if "specplug" in job:
        s = job["specplug"]
        spec, extra = speculative_settings(s["method"], s.get("path"), s.get("options"),
                                           int(s["num_draft_tokens"]), bool(s.get("via_plugin")),
                                           bool(s.get("budget")))
    return spec, extra


def _result(outputs: list[RequestOutput], stats: SpecStats) -> dict:
    return {"summary": stats.summary(),
            "requests": [{"output_token_ids": o.output_token_ids, "accept_lengths": o.accept_lengths,
                          "finish_reason": o.finish_reason} for o in outputs]}


def run_job(job: dict) -> dict:
    """Run one JSON job (see module docstring); return outputs + summary as JSON-ready dicts,
    and the compilation mode vLLM ran the target in."""
    reqs = _requests_of(job)
    spec, extra = _engine_settings(job)
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in reqs)
    session = VllmSession(job["target"], longest, spec, extra, job.get("llm_kwargs"))
    outputs, stats = _timed(session, reqs, SamplingParams(float(job.get("temperature", 0.0))),
                            bool(job.get("ignore_eos", False)), bool(job.get("warmup", False)),
                            int(job.get("repeats", 1)))
    return dict(_result(outputs, stats), compilation_mode=session.compilation_mode)


class _JobSession:
    """`--session`: open = a job without prompts plus "longest"; run = {"prompt_ids",
    "max_new_tokens", "seeds" | "seed", "temperature", "ignore_eos", "max_tokens"}."""

    def __init__(self, job: dict):
        spec, extra = _engine_settings(job)
        self.session = VllmSession(job["target"], int(job["longest"]), spec, extra,
                                   job.get("llm_kwargs"))

    def environment(self) -> dict:
        import torch
        import vllm
        return {"versions": {"vllm": vllm.__version__, "torch": torch.__version__},
                "threads": {"torch": torch.get_num_threads()},
                "compilation_mode": self.session.compilation_mode}

    def run(self, batch: dict) -> dict:
        outputs, stats = self.session.generate(
            _requests_of(batch), SamplingParams(float(batch.get("temperature", 0.0))),
            bool(batch.get("ignore_eos", False)), batch.get("max_tokens"))
        return _result(outputs, stats)

    def close(self) -> None:
        del self.session


def _freeze_vllm_import() -> None:
    import gc

    import vllm  # noqa: F401
    # vLLM runs gc.collect() several times while it starts; the import-time heap is never
    # garbage, and freezing it keeps those passes from walking it again (~2 s CPU per engine)
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    return run_job_files(argv, "specplug.integrations.vllm.generate", run_job, _freeze_vllm_import,
                         _JobSession)


register_runner("vllm", run_vllm)  # `specplug generate --engine vllm` (specplug/runners.py)


if __name__ == "__main__":
    sys.exit(main())
