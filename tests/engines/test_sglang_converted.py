"""Converted checkpoints in real SGLang 0.5.23 on CPU (its own venv, tests-only CPU shims).

Native EAGLE-1 and EAGLE-3 heads are converted by `specplug convert --to sglang` and run by
SGLang's own EAGLE / EAGLE3 workers through `sglang.Engine` (the settings `specplug generate
--engine sglang` uses), one engine per subprocess, one at a time.  Greedy output must equal
SGLang's no-spec output for the batch, and SGLang must accept what specplug's embedded engine
accepts with the UNconverted head on the same float32 weights.

SGLang reports a request's accept lengths as a histogram (counts, no order), so the comparison
is per request, as multisets.  Like vLLM, SGLang counts a request's last step in full and then
cuts the output at max_new_tokens, while the embedded engine never drafts past the budget: the
embedded engine's last step may be shorter than the one SGLang counted.

DFlash: SGLang refuses `--speculative-algorithm DFLASH` on CPU (checked here with its exact
message), so its worker cannot run.  Instead SGLang's own DFlashDraftModel, built in the SGLang
venv, loads the converted weights (every key reaches a parameter loader once, no parameter left
unset) and its block logits equal specplug's DFlash head on the same inputs
(sglang_scripts/dflash_block_logits.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "vllm_scripts"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "drafters"))
import converted_fixtures as CF  # noqa: E402
import eagle_fixtures as ef  # noqa: E402

from specplug.converters.cli import main as convert_main  # noqa: E402
from specplug.drafters.base import DrafterSpec, build_drafter  # noqa: E402
from specplug.drafters.dflash import load_dflash_head  # noqa: E402
from specplug.engine.embedded import EmbeddedEngine  # noqa: E402
from specplug.engine.rows import Request  # noqa: E402
from specplug.integrations.sglang.cpu import cpu_env  # noqa: E402
from specplug.integrations.sglang.generate import run_job_subprocess, speculative_kwargs  # noqa: E402
from specplug.models.loading import load_causal_lm, load_tokenizer, target_info  # noqa: E402

pytestmark = pytest.mark.engine

REPO = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = os.path.join(HERE, "sglang_scripts")
GAMMA = 4
MAX_NEW = 40
BATCH = 6
FAMILIES = ("eagle", "eagle3")
DFLASH_REFUSAL = "DFLASH speculative decoding is not supported by CpuSRTPlatform on device 'cpu'."
# no PYTHONPATH or SGLANG_USE_CPU_ENGINE here: specplug turns its CPU stand-ins on itself
SGLANG_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "SPECPLUG_SGLANG_MAX_TOTAL_TOKENS": "4096"}


# -- heads SGLang can load --------------------------------------------------------------------
def eagle3_head(folder: str, target, aux: list[int]) -> str:
    """EAGLE-3 head in SGLang's layout (residual taken before hidden_norm) whose fc notices
    misrouted target layers.  On the attention target hidden_states[0] = (e, 0) and
    hidden_states[1] = hidden_states[2] = (e, a) (embedding half, attention half): fc reads the
    attention half of feature 0 and feature 1 - feature 2, both exactly zero when the engine
    hands over the right layers, large (acceptance collapses) when it is off by one."""
    state, cfg = ef.eagle3_state(target.double(), aux, noise=0.05, draft_vocab=200)
    target.float()
    h = target.config.hidden_size
    g = torch.Generator().manual_seed(11)
    fc = torch.zeros(h, 3 * h, dtype=torch.float64)
    fc[h // 2:, h // 2:h] = torch.randn(h // 2, h // 2, generator=g, dtype=torch.float64)
    fc[:, h:2 * h] = torch.randn(h, h, generator=g, dtype=torch.float64)
    fc[:, 2 * h:] = -fc[:, h:2 * h]
    state["fc.weight"] = fc
    cfg.update(torch_dtype="float32", norm_before_residual=False)
    return ef.save_head(folder, CF._f32(state), cfg)


def random_dflash_head(folder: str, target, seed: int = 5) -> str:
    """The markov DFlash fixture's layout and config with random weights: every matrix, norm
    and RoPE shows in the block logits."""
    from safetensors.torch import load_file, save_file
    native = CF.dflash_head(folder + "-layout", target)
    shutil.copytree(native, folder)
    g = torch.Generator().manual_seed(seed)
    state = load_file(os.path.join(folder, "model.safetensors"))
    state = {k: (1 + 0.2 * torch.randn(v.shape, generator=g)) if k.endswith("norm.weight")
             else 0.15 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    return folder


def convert(native: str, verifier: str) -> str:
    out = native + "-sglang"
    assert convert_main([native, out, "--to", "sglang", "--verifier", verifier]) == 0, native
    return out


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def python(sglang_venv_python):
    return sglang_venv_python


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sglang-converted"))
    attention, attention_dir = CF.attention_target(os.path.join(root, "attention"))
    markov, markov_dir = CF.markov_target(os.path.join(root, "markov"))
    native = {"eagle": CF.eagle1_head(os.path.join(root, "eagle"), attention),
              "eagle3": eagle3_head(os.path.join(root, "eagle3"), attention, CF.EAGLE3_AUX),
              "dflash": random_dflash_head(os.path.join(root, "dflash"), markov)}
    converted = {f: convert(p, markov_dir if f == "dflash" else attention_dir)
                 for f, p in native.items()}
    return {"root": root, "attention": attention_dir, "markov": markov_dir, "native": native,
            "converted": converted, "prompts": CF.prompts_for("attention", BATCH)}


def sglang_job(models, spec: dict) -> dict:
    return {"target": models["attention"], "spec": spec, "ignore_eos": True,
            "requests": [{"prompt_ids": p, "max_new_tokens": MAX_NEW} for p in models["prompts"]]}


@pytest.fixture(scope="module")
def sglang_runs(python, models):
    """SGLang alone, each converted head, and DFLASH (refused on CPU): engines one after
    another in one process of the SGLang venv (its import is paid once)."""
    jobs = {"no-spec": sglang_job(models, {})}
    jobs.update({f: sglang_job(models, speculative_kwargs(f, models["converted"][f], GAMMA))
                 for f in FAMILIES})
    jobs["dflash"] = dict(sglang_job(models, speculative_kwargs(
        "dflash", models["converted"]["dflash"], GAMMA)), target=models["markov"])
    env = dict(SGLANG_ENV, SPECPLUG_SGLANG_PYTHON=python)
    results = run_job_subprocess({"jobs": jobs}, timeout=500, env_extra=env)["results"]
    for name in ("no-spec",) + FAMILIES:
        assert "error" not in results[name], f"SGLang {name}: {results[name].get('error')}"
    return results


def embedded_run(models, family: str, path: str):
    """A native head in specplug's embedded engine (float32, batch BATCH)."""
    folder = models["attention"]
    target = load_causal_lm(folder, dtype=torch.float32)
    drafter = build_drafter(DrafterSpec(family, path), target_info(target, load_tokenizer(folder)))
    reqs = [Request(p, MAX_NEW) for p in models["prompts"]]
    outs, stats = EmbeddedEngine(target, None, drafter, num_draft_tokens=GAMMA).generate(
        reqs, batch_size=BATCH)
    return [o.output_token_ids for o in outs], [o.accept_lengths for o in outs], stats


# -- the last-step rule ------------------------------------------------------------------------
def same_steps(sglang: list[int], embedded: list[int], max_new: int) -> bool:
    """sglang: a request's accept lengths in any order; embedded: the same request's, in step
    order.  Equal step for step, except that SGLang may count more on the last step when the
    embedded engine stopped it at the budget (the first output token comes from the prefill)."""
    if len(sglang) != len(embedded) or not embedded:
        return False
    extra = Counter(sglang) - Counter(embedded[:-1])
    if sum(extra.values()) != 1:
        return False
    last = next(extra.elements())
    return last == embedded[-1] or (last > embedded[-1] and sum(embedded) == max_new - 1)


def test_same_steps_table():
    assert same_steps([1, 5, 3], [3, 1, 5], 10)            # order does not matter
    assert same_steps([5, 5, 1, 2], [5, 2, 5, 1], 14)      # budget 13: last step cut from 2 to 1
    assert same_steps([1, 3, 5], [3, 1, 4], 9)             # last step 5 cut to 4 at the budget
    assert not same_steps([1, 3, 5], [3, 1, 4], 20)        # ... but not when room was left
    assert not same_steps([1, 3, 5], [3, 2, 5], 11)        # an earlier step differs
    assert not same_steps([1, 3], [3, 1, 1], 6)            # a step missing
    assert not same_steps([1, 3, 3], [3, 1, 5], 10)        # SGLang's last step shorter


# -- EAGLE-1 / EAGLE-3 in SGLang's workers -----------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_head_in_sglang_matches_no_spec_and_embedded_accepts(models, sglang_runs, family):
    want = [o["output_token_ids"] for o in sglang_runs["no-spec"]["outputs"]]
    assert len(want) == BATCH >= 2 and all(len(w) == MAX_NEW for w in want)
    res = sglang_runs[family]
    got = [o["output_token_ids"] for o in res["outputs"]]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{family}: request {i} differs from SGLang's no-spec output"

    emb_outputs, emb_lengths, emb_stats = embedded_run(models, family, models["native"][family])
    assert emb_outputs == got, f"{family}: embedded engine and SGLang disagree on the output"
    sglang_lengths = [o["accept_lengths"] for o in res["outputs"]]
    for i, (s, e) in enumerate(zip(sglang_lengths, emb_lengths)):
        assert same_steps(s, e, MAX_NEW), f"{family}, request {i}: SGLang {sorted(s)} vs embedded {e}"
    stats = res["stats"]
    # aggregates: SGLang's counters agree with its histograms; verify steps equal the embedded
    # engine's, accepted drafts too once the last steps' budget cut is taken off
    assert stats["num_drafts"] == sum(len(s) for s in sglang_lengths) == sum(map(len, emb_lengths))
    assert stats["num_accepted_tokens"] == sum(a - 1 for s in sglang_lengths for a in s)
    cut = sum(sum(s) - sum(e) for s, e in zip(sglang_lengths, emb_lengths))
    assert stats["num_accepted_tokens"] - cut == emb_stats.num_accepted_tokens
    # the comparison means something: some drafts accepted, not all of them
    assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"], res["summary"]


def test_eagle3_fixture_notices_misrouted_target_layers(models, tmp_path):
    """The EAGLE-3 comparison would catch an off-by-one in the aux-layer ids the converter
    writes: the same head fed hidden_states [1, 2, 3] instead of [0, 1, 2] accepts far less."""
    model = load_causal_lm(models["attention"], dtype=torch.float32)
    shifted = eagle3_head(str(tmp_path / "shifted"), model, [i + 1 for i in CF.EAGLE3_AUX])
    _, _, right = embedded_run(models, "eagle3", models["native"]["eagle3"])
    _, _, wrong = embedded_run(models, "eagle3", shifted)
    assert right.num_accepted_tokens > 2 * wrong.num_accepted_tokens + 20, (right, wrong)


# -- DFlash ------------------------------------------------------------------------------------
def test_sglang_refuses_dflash_on_cpu(sglang_runs):
    assert DFLASH_REFUSAL in sglang_runs["dflash"].get("error", ""), sglang_runs["dflash"]


def test_sglang_dflash_model_loads_converted_weights_and_matches_block_logits(python, models):
    from safetensors.torch import load_file, save_file
    target = load_causal_lm(models["markov"], dtype=torch.float32)
    info = target_info(target, load_tokenizer(models["markov"]))
    head, cfg = load_dflash_head(models["native"]["dflash"], info)  # the unconverted head
    g = torch.Generator().manual_seed(3)
    inputs, want, shifted = {}, {}, {}
    for r, n in enumerate((5, 11)):  # two rows, context lengths 5 and 11, a full block each
        feats = torch.randn(n, head.fc.in_features, generator=g)
        ids = torch.full((cfg.block_size,), cfg.mask_token_id)
        ids[0] = 17 + r
        ctx_pos, pos = torch.arange(n), torch.arange(n, n + cfg.block_size)
        inputs.update({f"feats.{r}": feats, f"ctx_pos.{r}": ctx_pos, f"ids.{r}": ids, f"pos.{r}": pos})
        with torch.no_grad():
            kv = head.context_kv(feats[None], ctx_pos[None])
            valid = torch.ones(1, n, dtype=torch.bool)
            noise = info.embed_tokens(ids[None])
            want[r] = info.lm_head(head.block(noise, pos[None], kv, valid))[0].double()
            # a control one position off: the tolerance below is far tighter than that
            shifted[r] = info.lm_head(head.block(noise, pos[None] + 1, kv, valid))[0].double()
    root = models["root"]
    save_file(inputs, os.path.join(root, "dflash-inputs.safetensors"))
    out = os.path.join(root, "dflash-sglang-out")
    env = cpu_env(dict(os.environ, **SGLANG_ENV))  # a script of ours, not specplug's launcher
    proc = subprocess.run([python, os.path.join(SCRIPTS, "dflash_block_logits.py"),
                           models["converted"]["dflash"], models["markov"],
                           os.path.join(root, "dflash-inputs.safetensors"), out],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "load.json")) as f:
        report = json.load(f)
    assert report["class"] == "DFlashDraftModel"
    keys = set(load_file(os.path.join(models["converted"]["dflash"], "model.safetensors")))
    assert set(report["calls"]) == keys
    assert all(n == 1 for n in report["calls"].values()), report["calls"]  # every key consumed
    assert report["unloaded"] == [], report["unloaded"]  # no parameter left at its init
    got = load_file(os.path.join(out, "logits.safetensors"))
    for r in want:
        scale = float(want[r].abs().max())
        assert torch.allclose(got[f"logits.{r}"], want[r], rtol=0, atol=1e-5 * scale), (
            f"row {r}: max diff {float((got[f'logits.{r}'] - want[r]).abs().max())}")
        assert torch.equal(got[f"logits.{r}"].argmax(-1), want[r].argmax(-1))
        assert float((shifted[r] - want[r]).abs().max()) > 1e-3 * scale
