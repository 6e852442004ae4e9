"""specplug algorithms inside real SGLang 0.5.23 on CPU (its own venv, tests-only CPU shims).

Two real `launch_server` processes serve the same tiny float32 target: one with the
SPECPLUG_DRAFT algorithm (drafter = a copy of the target, so drafts agree), one without
speculation, started with SGLang's version patched so the plugin must refuse to register.
Greedy output must be identical between them, concurrent requests must equal their sequential
runs, and `specplug generate --engine sglang` (engine mode) must run the diffusion drafter.
"""
from __future__ import annotations

import os
import shutil
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest

from specplug.integrations.sglang.generate import sglang_python, speculative_kwargs
from specplug.integrations.sglang.server import SGLangServer

pytestmark = pytest.mark.engine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
MAX_NEW = 24
FAKE_VERSION = "0.0.1"
# the launcher, with the SGLang version the plugin reads patched in that process
PATCHED_LAUNCH = ["-c", "import runpy, sglang; sglang.__version__ = '%s'; "
                        "runpy.run_module('sglang.launch_server', run_name='__main__')" % FAKE_VERSION]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def python(sglang_venv_python):
    os.environ.setdefault("SPECPLUG_SGLANG_PYTHON", sglang_venv_python)
    return sglang_python()


@pytest.fixture(scope="module")
def cpu_env(monkeypatch_module):
    """One thread per engine process, offline.  Neither PYTHONPATH nor SGLANG_USE_CPU_ENGINE:
    specplug sees there is no GPU and turns its CPU stand-ins on itself, as for a user."""
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for k, v in env.items():
        monkeypatch_module.setenv(k, v)
    return env


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Llama target (head_dim 64: hidden 128 over 2 heads), its copy as draft, and the same
    weights in Dream's layout as a diffusion drafter that agrees with the target."""
    import sys

    import torch

    from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_model
    root = tmp_path_factory.mktemp("sglang-models")
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model = build_tiny_llama(0, dtype=torch.float32, hidden=128, heads=2, kv_heads=1, layers=2)
    target = save_model(model, tok, str(root / "target"))
    draft = str(root / "draft")
    shutil.copytree(target, draft)
    sys.path.insert(0, os.path.join(REPO, "tests", "engines", "vllm_scripts"))
    from harness import build_causal_dream  # the vLLM tests' Dream-layout builder, reused
    dream = build_causal_dream(str(root / "dream"), model)
    prompts = [tok.encode(t) for t in ("the cat sat on the mat. the dog", "def add(a, b): return",
                                       "one two three four five", "hello world, hello")]
    prompts += [[5, 6, 7, 8, 9, 10], [100, 7, 100, 7], [40, 41, 42]]
    return {"root": str(root), "target": target, "draft": draft, "dream": dream,
            "prompts": prompts, "tokenizer": tok}


@pytest.fixture(scope="module")
def spec_server(python, cpu_env, models):
    spec = speculative_kwargs("draft", models["draft"], STEPS)
    with SGLangServer(models["target"], python, spec=spec, extra={"context_length": 256},
                      log_path=os.path.join(models["root"], "spec.log")) as server:
        yield server


@pytest.fixture(scope="module")
def plain_server(python, cpu_env, models):
    """No speculation, and SGLang's version patched in the launcher: the plugin must refuse."""
    with SGLangServer(models["target"], python, extra={"context_length": 256},
                      prefix=PATCHED_LAUNCH,
                      log_path=os.path.join(models["root"], "plain.log")) as server:
        yield server


def greedy(server, ids, max_new=MAX_NEW):
    return server.generate(ids, temperature=0, max_new_tokens=max_new, ignore_eos=True)


def test_generate_identical_to_no_spec_with_high_acceptance(spec_server, plain_server, models):
    for i, ids in enumerate(models["prompts"]):
        got, want = greedy(spec_server, ids), greedy(plain_server, ids)
        assert len(want["output_ids"]) == MAX_NEW
        assert got["output_ids"] == want["output_ids"], f"prompt {i}: speculative output differs"
        meta = got["meta_info"]
        assert meta["spec_verify_ct"] > 0
        assert meta["spec_accept_length"] > 1.5, f"prompt {i}: {meta}"
        # SGLang's own bookkeeping agrees with the accept lengths the worker reported
        hist = meta["spec_correct_drafts_histogram"]
        assert sum(hist) == meta["spec_verify_ct"]
        assert "spec_verify_ct" not in want["meta_info"] or not want["meta_info"]["spec_verify_ct"]


def test_chat_completions_identical_to_no_spec(spec_server, plain_server):
    params = {"temperature": 0, "max_tokens": 16}
    got = spec_server.chat("the cat sat on", **params)
    want = plain_server.chat("the cat sat on", **params)
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] > 0


def test_16_chat_clients_some_streaming_equal_their_sequential_runs(spec_server):
    """The server as the README starts it on CPU (launch_cpu.py), 16 concurrent OpenAI-style
    clients, every other one streaming: each reply arrives whole and equals that request's reply
    when it was sent alone."""
    assert "specplug.integrations.sglang.launch_cpu" in spec_server.command
    starts = ["the cat sat on", "one two three", "hello world, hello", "def add(a, b):"]
    questions = [f"{starts[i % 4]} {i}" for i in range(16)]
    params = {"temperature": 0, "max_tokens": 12}

    def alone(q: str) -> str:
        return spec_server.chat(q, **params)["choices"][0]["message"]["content"]
    sequential = [alone(q) for q in questions]

    def client(i: int) -> str:
        return spec_server.chat_stream(questions[i], **params) if i % 2 else alone(questions[i])
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(client, range(16)))
    for i, (got, want) in enumerate(zip(concurrent, sequential)):
        assert got == want, f"client {i} ({'streamed' if i % 2 else 'whole'}): {got!r} vs {want!r}"
    assert len(set(sequential)) > 1  # the replies differ: a mix-up between clients would show
    assert "Traceback" not in spec_server.log_text()


def test_32_concurrent_requests_equal_their_sequential_runs(spec_server, models):
    base = models["prompts"]
    prompts = [base[i % len(base)] + [(7 * i) % 200 + 20] for i in range(32)]
    sequential = [greedy(spec_server, p, 16)["output_ids"] for p in prompts]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda p: greedy(spec_server, p, 16), prompts))
    assert all("output_ids" in r for r in results), "a concurrent request failed"
    for i, (r, seq) in enumerate(zip(results, sequential)):
        assert r["output_ids"] == seq, f"request {i}: concurrent output differs from sequential"
    assert max(r["meta_info"]["spec_accept_length"] for r in results) > 1.5
    assert "Traceback" not in spec_server.log_text()


def test_sampling_is_refused_on_cpu_with_the_reason(spec_server, models):
    """SGLang's CPU verify is greedy whatever the temperature: the worker ends a sampled request
    with an abort naming why, never an argmax answer passed off as a sample."""
    from specplug.integrations.sglang.algorithms import SAMPLING_REFUSED
    ids = models["prompts"][0]
    try:
        out = spec_server.generate(ids, temperature=0.8, max_new_tokens=8)
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "abort", out["meta_info"]
        message = reason["message"]
    except urllib.error.HTTPError as e:  # SGLang answers an aborted request with its status
        assert e.code == 400
        message = e.read().decode()
    assert SAMPLING_REFUSED in message.replace("\\'", "'")
    assert len(greedy(spec_server, ids, 8)["output_ids"]) == 8  # greedy requests still served


def test_mismatched_version_registers_nothing_and_sglang_still_serves(plain_server, models):
    out = greedy(plain_server, models["prompts"][0], 4)
    assert len(out["output_ids"]) == 4
    log = plain_server.log_text()
    assert "specplug plugin registered nothing" in log
    assert f"SGLang {FAKE_VERSION} is not a supported version" in log


def test_unknown_algorithm_fails_at_start_with_sglangs_message(python, cpu_env, models):
    server = SGLangServer(models["target"], python,
                          extra={"speculative_algorithm": "SPECPLUG_NOPE"},
                          log_path=os.path.join(models["root"], "unknown.log"))
    with pytest.raises(RuntimeError, match="exited"):
        server.start(timeout=240)
    assert "Unknown speculative algorithm name: SPECPLUG_NOPE" in server.log_text()


def test_specplug_generate_engine_sglang_runs_diffusion_and_suffix_drafters(python, cpu_env, models,
                                                                    plain_server, spec_server):
    """`specplug generate --engine sglang` path: run_sglang(GenerateConfig) in engine mode
    (sglang.Engine in the SGLang venv), SPECPLUG_SPECDIFF with a Dream drafter that agrees."""
    from specplug.api import GenerateConfig
    from specplug.integrations.sglang.generate import run_sglang
    tok = models["tokenizer"]
    prompts = ["the cat sat on the mat.", "one two three"]
    wants = [plain_server.generate(tok.encode(p), temperature=0, max_new_tokens=MAX_NEW)
             for p in prompts]
    # the servers are done: give their cores to the engine (2-core machines)
    spec_server.stop()
    plain_server.stop()
    cfg = GenerateConfig(target=models["target"], prompts=prompts, method="specdiff",
                         drafter=models["dream"], gamma=STEPS, max_new_tokens=MAX_NEW,
                         options={"unmask_order": "left_to_right"}, budget=False)
    outputs, stats = run_sglang(cfg)
    for out, want in zip(outputs, wants):
        assert out.output_token_ids == want["output_ids"]
    assert stats.num_drafts > 0 and stats.mean_accept_length > 1.5, stats.summary()
    # SPECPLUG_SUFFIX: suffix decoding over each request's own tokens, same engine path
    cfg = GenerateConfig(target=models["target"], prompts=prompts, method="suffix", gamma=STEPS,
                         max_new_tokens=MAX_NEW, budget=False)
    outputs, stats = run_sglang(cfg)
    assert [o.output_token_ids for o in outputs] == [w["output_ids"] for w in wants]
    assert stats.mean_accept_length > 1.0, stats.summary()  # some drafts were accepted
