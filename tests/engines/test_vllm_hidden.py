"""Drafters that read target hidden states (specplug's eagle3, hybrid) inside real vLLM through
the custom_class proposer, fed by the target's auxiliary hidden-state outputs the way vLLM feeds
its own EAGLE-3 (integrations/vllm/target_features.py), with vLLM's default compile mode (no
enforce_eager).  One engine per subprocess, in vLLM's CPU venv, float32.

Shown here:
  * greedy output equals vLLM's own no-spec output, batch >= 4: specplug eagle3 on a tiny
    target, eagle3 and hybrid with the shipped SmolLM2 EAGLE-3 head on SmolLM2-135M-Instruct;
  * the features vLLM hands the drafter equal HF's hidden_states[i] on the same tokens (vLLM's
    aux output i is hidden + residual after layer i - 1);
  * vLLM accepts step by step what the embedded engine accepts with the same drafter (tiny
    target: exactly, bar vLLM's last step, see test_vllm_converted.clip_last_step).
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vllm_scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import converted_fixtures as CF  # noqa: E402
import harness  # noqa: E402

from hidden_checks import assert_features_match, clip_last_step, embedded_outputs, hf_features  # noqa: E402

from specplug.integrations.vllm.subprocess_job import run_python  # noqa: E402
from specplug.models.loading import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.engine

GAMMA = 4
TINY_NEW = 40
SMOL_NEW = 24
SMOL_HEAD = os.path.join(harness.REPO, "specplug", "assets", "drafters", "smollm2-eagle3")
SMOL_QUESTIONS = ["Write a short poem about the sea.", "Explain what a hash table is.",
                  "List three tips for staying focused while studying.",
                  "Describe how a bicycle works."]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2):
    root = str(tmp_path_factory.mktemp("vllm-hidden"))
    tiny, tiny_dir = CF.attention_target(os.path.join(root, "tiny"))
    head = CF.eagle3_head(os.path.join(root, "tiny-eagle3"), tiny)  # aux = HF indices 0, 1, 2
    tok = load_tokenizer(smollm2)
    smol_prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}],
                                                       tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False) for q in SMOL_QUESTIONS]
    return {"root": root, "tiny": tiny_dir, "tiny_head": head, "tiny_prompts": CF.prompts_for("attention", 6),
            "smol": smollm2, "smol_prompts": smol_prompts}


def _job(target, prompts, max_new, ignore_eos, specplug=None, kv_mib=64) -> dict:
    # vLLM's default compile mode (no enforce_eager): on CPU the target is traced by Dynamo
    # (DYNAMO_TRACE_ONCE); the features come out as outputs of that graph
    job = {"target": target, "prompt_ids": prompts, "max_new_tokens": max_new,
           "ignore_eos": ignore_eos,
           "llm_kwargs": {"max_model_len": 512, "kv_cache_memory_bytes": kv_mib << 20,
                          "enforce_eager": False}}
    if specplug:
        job["specplug"] = {"num_draft_tokens": GAMMA, "via_plugin": True, **specplug}
    return job


def _run(name: str, job: dict, root: str, record: bool) -> dict:
    """One engine in its own vLLM process; with record, also the features the drafter got."""
    paths = {k: os.path.join(root, f"{name}.{k}") for k in ("job.json", "out.json", "feats.pt")}
    with open(paths["job.json"], "w") as f:
        json.dump(job, f)
    if record:
        args = [os.path.join(harness.SCRIPTS, "record_features.py"), paths["job.json"],
                paths["out.json"], paths["feats.pt"]]
    else:
        args = ["-m", "specplug.integrations.vllm.generate", paths["job.json"], paths["out.json"]]
    # VLLM_CPU_CI_ENV: vLLM's own CPU CI setting: the default compile mode still traces the
    # target once with Dynamo (the graph that would drop forward hooks), then runs the traced
    # graph eagerly instead of building C++ kernels with inductor (minutes per engine here)
    run_python(args, root, timeout=400, env_extra={"VLLM_CPU_CI_ENV": "1"})
    with open(paths["out.json"]) as f:
        result = json.load(f)
    if record:
        result["features"] = torch.load(paths["feats.pt"], weights_only=False)
    return result


@pytest.fixture(scope="module")
def runs(models):
    tiny = (models["tiny"], models["tiny_prompts"], TINY_NEW, True)
    smol = (models["smol"], models["smol_prompts"], SMOL_NEW, False)
    jobs = {"tiny-base": (_job(*tiny), False),
            "tiny-eagle3": (_job(*tiny, {"method": "eagle3", "path": models["tiny_head"]}), True),
            "smol-base": (_job(*smol, kv_mib=128), False),
            "smol-eagle3": (_job(*smol, {"method": "eagle3", "path": SMOL_HEAD}, kv_mib=128), True),
            "smol-hybrid": (_job(*smol, {"method": "hybrid", "path": SMOL_HEAD}, kv_mib=128), True)}
    workers = int(os.environ.get("SPECPLUG_VLLM_WORKERS", "2"))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {n: pool.submit(_run, n, job, models["root"], rec) for n, (job, rec) in jobs.items()}
        return {n: f.result() for n, f in futures.items()}


def _outputs(res) -> list[list[int]]:
    return [r["output_token_ids"] for r in res["requests"]]


@pytest.mark.parametrize("case,base", [("tiny-eagle3", "tiny-base"), ("smol-eagle3", "smol-base"),
                                       ("smol-hybrid", "smol-base")])
def test_greedy_identity_with_vllm_no_spec(runs, case, base):
    got, want = _outputs(runs[case]), _outputs(runs[base])
    assert len(got) == len(want) >= 4
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{case}: request {i} differs from vLLM's no-spec output"
    s = runs[case]["summary"]
    assert 0 < s["num_accepted_tokens"] <= s["num_draft_tokens"], s
    # the target ran traced (vLLM's default on CPU), not in eager mode
    assert runs[case]["compilation_mode"] == runs[base]["compilation_mode"] == "DYNAMO_TRACE_ONCE"
    # vLLM's aggregate counter agrees with its per-request record
    lengths = [a for r in runs[case]["requests"] for a in r["accept_lengths"]]
    assert s["num_accepted_tokens"] == sum(a - 1 for a in lengths)


@pytest.mark.parametrize("case,indices", [("tiny-eagle3", (0, 1, 2)), ("smol-hybrid", (2, 15, 27))])
def test_features_equal_hf_hidden_states(runs, models, case, indices):
    folder = models["tiny"] if case.startswith("tiny") else models["smol"]
    records = runs[case]["features"]
    assert len(records) >= 4
    pairs = hf_features(folder, records, indices)
    assert_features_match(pairs, indices, case)


def test_tiny_eagle3_accepts_what_the_embedded_engine_accepts(runs, models):
    res = runs["tiny-eagle3"]
    outs = embedded_outputs(models["tiny"], "eagle3", models["tiny_head"], models["tiny_prompts"],
                            TINY_NEW, GAMMA)
    assert [o.output_token_ids for o in outs] == _outputs(res)
    for i, (o, r) in enumerate(zip(outs, res["requests"])):
        assert clip_last_step(r["accept_lengths"], TINY_NEW) == o.accept_lengths, (
            f"request {i}: vLLM accept lengths {r['accept_lengths']} vs embedded {o.accept_lengths}")
    s = res["summary"]
    assert 0 < s["num_accepted_tokens"] < s["num_draft_tokens"], s


@pytest.mark.parametrize("family", ["eagle3", "hybrid"])
def test_smollm2_accepts_what_the_embedded_engine_accepts(runs, models, family):
    """The shipped head on the real model, float32.  vLLM's and HF's kernels differ in the last
    bits (features agree to ~1e-6 relative), which could flip a near-tie of the head's argmax;
    none did on these prompts: every step agrees (vLLM's last step clipped as above)."""
    res = runs[f"smol-{family}"]
    outs = embedded_outputs(models["smol"], family, SMOL_HEAD, models["smol_prompts"], SMOL_NEW, GAMMA)
    assert [o.output_token_ids for o in outs] == _outputs(res), "HF and vLLM targets disagree"
    for i, (o, r) in enumerate(zip(outs, res["requests"])):
        v = r["accept_lengths"]
        if o.finish_reason == "length":
            v = clip_last_step(v, SMOL_NEW)
        assert v == o.accept_lengths, f"{family}, request {i}: vLLM {v} vs embedded {o.accept_lengths}"
    # the shipped head is weak (tau ~1.3 on MT-Bench) but does get drafts accepted
    assert res["summary"]["num_accepted_tokens"] > 0


def test_feature_rows_keep_the_latest_write_and_name_gaps():
    """The per-request feature store, without vLLM (a literal table)."""
    from specplug.integrations.vllm.target_features import FeatureGap, _Rows
    f = lambda *v: torch.tensor(v, dtype=torch.float32)[:, None]  # noqa: E731  [n, 1]
    rows = _Rows()
    rows.write("a", 0, f(0, 1, 2, 3))  # prefill: positions 0..3
    rows.write("a", 3, f(13, 14, 15))  # verify step: [last token, 2 drafts] at 3..5
    assert rows.take("a", 0, 4).flatten().tolist() == [0, 1, 2, 13]  # 1 draft accepted
    rows.write("a", 5, f(25, 26))  # the rejected draft's position 5 is recomputed
    assert rows.take("a", 4, 6).flatten().tolist() == [14, 25]
    with pytest.raises(FeatureGap, match=r"positions \[4, 5\).*enable_prefix_caching=False"):
        rows.take("a", 4, 5)  # already handed over: the store no longer has it
    rows.write("b", 16, f(1, 2))  # a prefix-cache hit: positions 0..15 never ran
    with pytest.raises(FeatureGap, match="request b"):
        rows.take("b", 0, 17)
    rows.drop(["a", "b"])
    assert rows.buf == {} and rows.offset == {}
