"""`make test-gpu`: specplug on a CUDA target (issue #13, part 8).  Runs only with --gpu, and then
fails at once on a machine without CUDA (tests/conftest.py) rather than passing.

1. The embedded engine, every drafter family (weighted, hidden-state, sampled): each drafter is
   built beside a CUDA target, every parameter and buffer of its own is on CUDA, and its greedy
   output equals the target alone (float32).  A sampled run must also complete: a drafter that
   draws with a CPU generator on CUDA probabilities fails there.
2. vLLM and SGLang, each with a specplug draft model through the plugin, on the GPU with the
   engine's default graph settings: greedy output equal to the same engine without speculation,
   and the drafter's log line naming a CUDA device.  The engines' Pythons come from
   SPECPLUG_VLLM_PYTHON / SPECPLUG_SGLANG_PYTHON (default: the repo's .venv-vllm/.venv-sglang);
   an engine that cannot be imported there fails with that reason.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.types import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "core"))
sys.path.insert(0, os.path.join(REPO, "tests", "engines", "vllm_scripts"))
from test_engine_sampled_families import FAMILIES  # noqa: E402

pytestmark = pytest.mark.gpu

GAMMA = 3
MAX_NEW = 24


def _own_tensors(drafter) -> dict[str, torch.Tensor]:
    """name -> every parameter and buffer of the drafter's modules (borrowed target ones too:
    they must be on CUDA all the more)."""
    found = {}
    for i, module in enumerate(drafter.torch_modules()):
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            found[f"{type(module).__name__}[{i}].{name}"] = t
    return found


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_family_on_cuda_is_greedy_identical_and_lives_on_cuda(family, tmp_path):
    # built with CUDA as the default device (the fixtures make the target there); run with the
    # CPU as default again, so a tensor made without device= lands on the CPU and fails
    with torch.device("cuda"):
        target, drafter, prompt = family(str(tmp_path))
    assert target.device.type == "cuda"
    tensors = _own_tensors(drafter)
    weightless = family.__name__ in ("ngram", "suffix")
    assert bool(tensors) != weightless, f"{family.__name__}: {len(tensors)} drafter tensors"
    off = [name for name, t in tensors.items() if t.device.type != "cuda"]
    assert not off, f"drafter tensors off the GPU: {off[:5]}"

    requests = [Request(list(prompt), max_new_tokens=MAX_NEW) for _ in range(3)]
    plain, _ = EmbeddedEngine(target, None, None, 0).generate(requests, batch_size=3)
    spec, stats = EmbeddedEngine(target, None, drafter, GAMMA).generate(requests, batch_size=3)
    for i, (got, want) in enumerate(zip(spec, plain)):
        assert got.output_token_ids == want.output_token_ids, f"request {i} differs"
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0, stats.summary()

    sampled = [Request(list(prompt), max_new_tokens=8, seed=s) for s in range(4)]
    outs, _ = EmbeddedEngine(target, None, drafter, GAMMA,
                             SamplingParams(temperature=1.0)).generate(sampled, batch_size=4)
    assert all(o.num_new_tokens == 8 for o in outs)


def _engine_python(variable: str, venv: str, module: str) -> str:
    path = os.environ.get(variable, os.path.join(REPO, venv, "bin", "python"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"no {module} Python at {path}: set {variable} to a Python with a CUDA build "
                    f"of {module} and specplug installed")
    probe = subprocess.run([path, "-c", f"import {module}, torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "True":
        last = (probe.stderr.strip().splitlines() or ["torch sees no GPU"])[-1]
        pytest.fail(f"{path} cannot run {module} on CUDA: {last}")
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    import harness
    root = str(tmp_path_factory.mktemp("gpu-engines"))
    target, tok = harness.build_target(os.path.join(root, "target"))
    return {"root": root, "target": os.path.join(root, "target"),
            "draft": harness.build_draft(os.path.join(root, "draft"), target, tok, noise=0.1),
            "prompts": harness.tiny_prompts(tok, n=4)}


def test_vllm_plugin_draft_model_on_cuda(tiny_models):
    from specplug.integrations.vllm import subprocess_job
    python = _engine_python("SPECPLUG_VLLM_PYTHON", ".venv-vllm", "vllm")
    os.environ["SPECPLUG_VLLM_PYTHON"] = python
    # vLLM's GPU defaults: CUDA graphs and compile stay on
    base = {"target": tiny_models["target"], "prompt_ids": tiny_models["prompts"],
            "max_new_tokens": MAX_NEW, "ignore_eos": True,
            "llm_kwargs": {"dtype": "float32", "enforce_eager": False, "max_model_len": 512,
                           "gpu_memory_utilization": 0.3}}
    spec = dict(base, specplug={"method": "draft", "path": tiny_models["draft"],
                                "num_draft_tokens": GAMMA})
    want = subprocess_job.run_job(base, tiny_models["root"], "plain", timeout=600)
    job_path = os.path.join(tiny_models["root"], "spec.job.json")
    out_path = os.path.join(tiny_models["root"], "spec.out.json")
    with open(job_path, "w") as f:
        json.dump(spec, f)
    proc = subprocess_job.run_python(["-m", "specplug.integrations.vllm.generate", job_path,
                                      out_path], tiny_models["root"], timeout=600)
    with open(out_path) as f:
        got = json.load(f)
    assert ([r["output_token_ids"] for r in got["requests"]]
            == [r["output_token_ids"] for r in want["requests"]])
    assert got["summary"]["num_accepted_tokens"] > 0, got["summary"]
    assert "specplug draft drafter ready on cuda" in proc.stdout + proc.stderr


@pytest.mark.parametrize("method", ["eagle3", "hybrid"])
def test_vllm_plugin_hidden_state_drafters_with_cuda_graphs(tmp_path, method):
    """specplug's EAGLE-3 head and the hybrid through the plugin on CUDA with vLLM's defaults
    (compile and CUDA graphs on): the target's aux hidden-state outputs feed them, greedy
    output equals vLLM's own no-spec output."""
    import converted_fixtures as CF
    from specplug.integrations.vllm import subprocess_job
    os.environ["SPECPLUG_VLLM_PYTHON"] = _engine_python("SPECPLUG_VLLM_PYTHON", ".venv-vllm",
                                                        "vllm")
    target, folder = CF.attention_target(str(tmp_path / "tiny"))
    head = CF.eagle3_head(str(tmp_path / "tiny-eagle3"), target)
    base = {"target": folder, "prompt_ids": CF.prompts_for("attention", 4),
            "max_new_tokens": MAX_NEW, "ignore_eos": True,
            "llm_kwargs": {"dtype": "float32", "enforce_eager": False, "max_model_len": 512,
                           "enable_prefix_caching": False, "gpu_memory_utilization": 0.3}}
    spec = dict(base, specplug={"method": method, "path": head, "num_draft_tokens": GAMMA,
                                "via_plugin": True})
    jobs = subprocess_job.run_jobs({"plain": base, "spec": spec}, str(tmp_path), workers=1,
                                   timeout=600)
    got, want = jobs["spec"], jobs["plain"]
    assert ([r["output_token_ids"] for r in got["requests"]]
            == [r["output_token_ids"] for r in want["requests"]])
    assert got["summary"]["num_accepted_tokens"] > 0, got["summary"]
    assert got["compilation_mode"] != "NONE"


def test_sglang_plugin_draft_model_on_cuda(tiny_models):
    from specplug.integrations.sglang.generate import speculative_kwargs
    from specplug.integrations.sglang.server import SGLangServer
    python = _engine_python("SPECPLUG_SGLANG_PYTHON", ".venv-sglang", "sglang")
    spec = speculative_kwargs("draft", tiny_models["draft"], GAMMA)
    outs = {}
    logs = {}
    for name, settings in (("plain", None), ("spec", spec)):
        log = os.path.join(tiny_models["root"], f"sglang-{name}.log")
        with SGLangServer(tiny_models["target"], python, spec=settings, log_path=log,
                          env={"SGLANG_USE_CPU_ENGINE": "0"}) as server:
            outs[name] = [server.generate(p, temperature=0, max_new_tokens=MAX_NEW,
                                          ignore_eos=True)["output_ids"]
                          for p in tiny_models["prompts"]]
            logs[name] = server.log_text()
    assert outs["spec"] == outs["plain"]
    assert "drafter ready on cuda" in logs["spec"], logs["spec"][-2000:]


@pytest.mark.parametrize("method,topk", [("eagle3", 1), ("hybrid", 1), ("eagle3", 2)])
def test_sglang_plugin_hidden_state_drafters_with_cuda_graphs(tmp_path, method, topk):
    """specplug's EAGLE-3 head and the hybrid through SGLang's plugin worker on CUDA with SGLang's
    defaults (CUDA graphs on): SGLang's aux capture feeds them (the decode graphs recaptured in
    FULL mode), chains and a topk-2 tree; greedy output equals SGLang without speculation."""
    import converted_fixtures as CF
    from specplug.integrations.sglang.generate import speculative_kwargs
    from specplug.integrations.sglang.server import SGLangServer
    python = _engine_python("SPECPLUG_SGLANG_PYTHON", ".venv-sglang", "sglang")
    target, folder = CF.attention_target(str(tmp_path / "tiny"))
    head = CF.eagle3_head(str(tmp_path / "tiny-eagle3"), target)
    spec = speculative_kwargs(method, head, GAMMA, native=False)
    if topk > 1:
        spec.update(speculative_eagle_topk=topk, speculative_num_draft_tokens=topk * GAMMA + 1)
    outs, logs = {}, {}
    for name, settings in (("plain", None), ("spec", spec)):
        log = os.path.join(str(tmp_path), f"sglang-{name}.log")
        with SGLangServer(folder, python, spec=settings, log_path=log,
                          env={"SGLANG_USE_CPU_ENGINE": "0"}) as server:
            outs[name] = [server.generate(p, temperature=0, max_new_tokens=MAX_NEW,
                                          ignore_eos=True)["output_ids"]
                          for p in CF.prompts_for("attention", 4)]
            logs[name] = server.log_text()
    assert outs["spec"] == outs["plain"]
    assert "drafter ready on cuda" in logs["spec"], logs["spec"][-2000:]
