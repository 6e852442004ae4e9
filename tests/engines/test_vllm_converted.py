"""Converted checkpoints in real vLLM (CPU build, its own venv), one engine per subprocess.

Native EAGLE-1, EAGLE-3 and DFlash heads are converted by `specplug convert --to speculators`
and run by vLLM's built-in methods (eagle / eagle3 / dflash, through specplug's
`speculative_settings`, i.e. `specplug generate --engine vllm`).  Greedy output must equal vLLM's
no-spec output for the batch, and vLLM must accept exactly what specplug's embedded engine
accepts with the UNconverted head on the same float32 weights, step by step.

One difference is by design, not numerics: on a request's last step vLLM still drafts
num_speculative_tokens and counts every accepted draft, then cuts the output at max_tokens;
the embedded engine never drafts past the token budget.  So the last step is compared after
clipping vLLM's count to the tokens the request had room for.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vllm_scripts"))
import converted_fixtures as CF  # noqa: E402
import harness  # noqa: E402

from specplug.converters.cli import main as convert_main  # noqa: E402
from specplug.drafters.base import DrafterSpec, build_drafter  # noqa: E402
from specplug.engine.embedded import EmbeddedEngine  # noqa: E402
from specplug.engine.rows import Request  # noqa: E402
from specplug.integrations.vllm.subprocess_job import run_jobs  # noqa: E402
from specplug.models.loading import load_causal_lm, load_tokenizer, target_info  # noqa: E402

pytestmark = pytest.mark.engine

GAMMA = 4
MAX_NEW = 40
BATCH = 6
# family -> (target kind, native head builder); EAGLE heads read the attention target
FAMILIES = {"eagle": ("attention", CF.eagle1_head), "eagle3": ("attention", CF.eagle3_head),
            "dflash": ("markov", CF.dflash_head)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vllm-converted"))
    targets = {"attention": CF.attention_target(os.path.join(root, "attention")),
               "markov": CF.markov_target(os.path.join(root, "markov"))}
    heads = {}
    for family, (kind, build) in FAMILIES.items():
        model, target_dir = targets[kind]
        native = build(os.path.join(root, family), model)
        converted = os.path.join(root, family + "-speculators")
        rc = convert_main([native, converted, "--to", "speculators", "--verifier", target_dir])
        assert rc == 0, f"specplug convert failed for {family}"
        heads[family] = (native, converted)
    return {"root": root, "targets": {k: v[1] for k, v in targets.items()}, "heads": heads,
            "prompts": {k: CF.prompts_for(k, BATCH) for k in targets}}


def vllm_job(models, kind: str, **extra) -> dict:
    return {"target": models["targets"][kind], "prompt_ids": models["prompts"][kind],
            "max_new_tokens": MAX_NEW, "ignore_eos": True, "llm_kwargs": dict(harness.LLM_KWARGS),
            **extra}


@pytest.fixture(scope="module")
def vllm_runs(models):
    """Every vLLM engine of this file, each in its own process, two at a time: vLLM alone on
    each target (what every drafter must reproduce) and each converted head."""
    jobs = {f"no-spec-{kind}": vllm_job(models, kind) for kind in models["targets"]}
    for family, (kind, _) in FAMILIES.items():
        jobs[f"converted-{family}"] = vllm_job(
            models, kind, specplug={"method": family, "path": models["heads"][family][1],
                                    "num_draft_tokens": GAMMA})
    return run_jobs(jobs, models["root"])


@pytest.fixture(scope="module")
def no_spec(vllm_runs, models):
    out = {}
    for kind in models["targets"]:
        out[kind] = [r["output_token_ids"] for r in vllm_runs[f"no-spec-{kind}"]["requests"]]
        assert all(len(o) == MAX_NEW for o in out[kind])
    return out


def embedded_accept_lengths(models, family: str):
    """The unconverted native head in specplug's embedded engine (float32, batch BATCH)."""
    kind = FAMILIES[family][0]
    folder = models["targets"][kind]
    target = load_causal_lm(folder, dtype=torch.float32)
    drafter = build_drafter(DrafterSpec(family, models["heads"][family][0]),
                            target_info(target, load_tokenizer(folder)))
    reqs = [Request(p, MAX_NEW) for p in models["prompts"][kind]]
    outs, _ = EmbeddedEngine(target, None, drafter, num_draft_tokens=GAMMA).generate(
        reqs, batch_size=BATCH)
    return [o.output_token_ids for o in outs], [o.accept_lengths for o in outs]


def clip_last_step(lengths: list[int], max_new: int) -> list[int]:
    """vLLM's per-step accept lengths with the last step cut to the room the request had left
    (the first output token comes from the prefill)."""
    room = max_new - 1 - sum(lengths[:-1])
    return lengths[:-1] + [min(lengths[-1], room)]


def test_clip_last_step_table():
    assert clip_last_step([5, 5, 2], 12) == [5, 5, 1]
    assert clip_last_step([5, 5, 1], 12) == [5, 5, 1]
    assert clip_last_step([3], 4) == [3]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_head_in_vllm_matches_no_spec_and_embedded_accepts(models, vllm_runs, no_spec,
                                                                    family):
    kind = FAMILIES[family][0]
    res = vllm_runs[f"converted-{family}"]
    got = [r["output_token_ids"] for r in res["requests"]]
    assert len(got) == BATCH >= 4
    for i, (g, want) in enumerate(zip(got, no_spec[kind])):
        assert g == want, f"{family}: request {i} differs from vLLM's no-spec output"

    emb_outputs, emb_lengths = embedded_accept_lengths(models, family)
    assert emb_outputs == got, f"{family}: embedded engine and vLLM disagree on the output"
    vllm_lengths = [r["accept_lengths"] for r in res["requests"]]
    for i, (v, e) in enumerate(zip(vllm_lengths, emb_lengths)):
        assert clip_last_step(v, MAX_NEW) == e, (
            f"{family}, request {i}: vLLM accept lengths {v} vs embedded {e}")
    s = res["summary"]
    # vLLM's aggregate counter agrees with its own per-request record
    assert s["num_accepted_tokens"] == sum(a - 1 for v in vllm_lengths for a in v)
    # the comparison means something: some drafts accepted, not all of them
    assert 0 < s["num_accepted_tokens"] < s["num_draft_tokens"], s
