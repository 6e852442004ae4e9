"""Drafters that read target hidden states (specplug's eagle3 head, hybrid) inside real SGLang
0.5.23 on CPU through specplug's worker, fed by SGLang's own aux hidden-state capture
(integrations/sglang/target_features.py), float32, batch of 6 in one engine.

Shown here (eagle3, hybrid, eagle3's topk-2 tree, dflash, EAGLE-1 `eagle`):
  * greedy output equals SGLang's own output without speculation;
  * the features SGLang hands the drafter equal HF's hidden_states[i] on the same tokens
    (SGLang captures `hidden + residual` entering layer i; index 0 is the embedding);
  * SGLang accepts step by step what the embedded engine accepts with the same drafter.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "vllm_scripts"))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "drafters"))
import converted_fixtures as CF  # noqa: E402
import diffusion_fixtures as DF  # noqa: E402
from hidden_checks import assert_features_match, embedded_outputs, hf_features  # noqa: E402

from specplug.drafter_block import DrafterBlock  # noqa: E402
from specplug.integrations.sglang.cpu import cpu_env  # noqa: E402
from specplug.integrations.sglang.drafter_card import write_card  # noqa: E402
from specplug.integrations.sglang.generate import speculative_kwargs  # noqa: E402

pytestmark = pytest.mark.engine

GAMMA = 4
MAX_NEW = 40
AUX = (0, 1, 2)  # CF.eagle3_head's HF indices on the 3-layer attention target
RECORDER = os.path.join(HERE, "sglang_scripts", "record_features.py")
SGLANG_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "SPECPLUG_SGLANG_MAX_TOTAL_TOKENS": "4096"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sglang-hidden"))
    tiny, folder = CF.attention_target(os.path.join(root, "tiny"))
    head = CF.eagle3_head(os.path.join(root, "tiny-eagle3"), tiny)
    # a random DFlash head reading hidden_states[1], [2] of the 3-layer target
    dflash = DF.random_dflash(os.path.join(root, "tiny-dflash"), tiny, target_layer_ids=(0, 1))
    weights = os.path.join(dflash, "model.safetensors")
    save_file({k: v.float() for k, v in load_file(weights).items()}, weights)
    eagle1 = CF.eagle1_head(os.path.join(root, "tiny-eagle1"), tiny)  # reads the final state
    return {"root": root, "target": folder, "head": head, "dflash": dflash, "eagle1": eagle1,
            "prompts": CF.prompts_for("attention", 6)}


def _path(models, method: str) -> str:
    return {"dflash": models["dflash"], "eagle": models["eagle1"]}.get(method, models["head"])


def _job(models, method=None, options=None, topk=1) -> dict:
    """A generate job; options travel in a drafter card (drafter_card.py) SGLang is given as
    the draft model path, as `specplug sglang-card` writes one."""
    path = _path(models, method) if method else None
    if options:
        options = dict(options)
        block = DrafterBlock(None, path, options, bool(options.pop("budget", False)))
        path = write_card(os.path.join(tempfile.mkdtemp(dir=models["root"]), "card"), block)
    spec = speculative_kwargs(method, path, GAMMA, native=False)
    if topk > 1:  # SGLang's tree flags: depth GAMMA, topk nodes per depth (EAGLE-2's size)
        spec.update(speculative_eagle_topk=topk, speculative_num_draft_tokens=topk * GAMMA + 1)
    job = {"target": models["target"], "spec": spec, "ignore_eos": True,
           "engine_kwargs": {"max_running_requests": 8},
           "requests": [{"prompt_ids": p, "max_new_tokens": MAX_NEW} for p in models["prompts"]]}
    return job


@pytest.fixture(scope="module")
def runs(sglang_venv_python, models):
    """Every engine in one SGLang process, one after another; the drafters' inputs recorded."""
    jobs = {"base": _job(models), "eagle3": _job(models, "eagle3"),
            "hybrid": _job(models, "hybrid", {"lookup": "suffix"}),
            "eagle3-tree": _job(models, "eagle3", topk=2),
            "dflash": _job(models, "dflash"), "eagle": _job(models, "eagle"),
            # the budget's width each step, scripted so that every width from 0 (root only) to
            # GAMMA runs: SGLang verifies fewer tokens on some steps, and features still line up
            "eagle3-budget": {**_job(models, "eagle3", {"budget": True}),
                              "test_widths": "4,0,1,0,0,2,3,1"}}
    root = models["root"]
    paths = [os.path.join(root, k) for k in ("jobs.json", "results.json", "features")]
    with open(paths[0], "w") as f:
        json.dump({"jobs": jobs}, f)
    # one SGLang process, the engines one after another: SGLang's import is paid once
    proc = subprocess.run([sglang_venv_python, RECORDER, *paths],
                          env=cpu_env(dict(os.environ, **SGLANG_ENV)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(paths[1]) as f:
        results = json.load(f)["results"]
    for name, res in results.items():
        res["features"] = {}
        for path in glob.glob(os.path.join(paths[2], name, "*.pt")):
            res["features"].update(torch.load(path, weights_only=False))
    return results


def _outputs(res) -> list[list[int]]:
    return [o["output_token_ids"] for o in res["outputs"]]


@pytest.mark.parametrize("case", ["eagle3", "hybrid", "eagle3-tree", "dflash", "eagle",
                                  "eagle3-budget"])
def test_greedy_identity_with_sglang_no_spec(runs, case):
    got, want = _outputs(runs[case]), _outputs(runs["base"])
    assert len(got) == len(want) == 6 and all(len(w) == MAX_NEW for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{case}: request {i} differs from SGLang's no-spec output"
    lengths = [a for o in runs[case]["outputs"] for a in o["accept_lengths"]]
    if case != "dflash":  # a random DFlash head: its drafts are rarely right
        assert max(lengths) > 1, f"{case}: no draft was ever accepted"


@pytest.mark.parametrize("case,indices", [("eagle3", AUX), ("hybrid", AUX), ("eagle3-tree", AUX),
                                          ("eagle", (3,)), ("eagle3-budget", AUX)])
def test_features_equal_hf_hidden_states(runs, models, case, indices):
    """indices: HF hidden_states read; (3,) is the 3-layer target's final normed state, which
    SGLang returns without aux layers (EAGLE-1)."""
    records = runs[case]["features"]
    assert len(records) == 6
    pairs = hf_features(models["target"], records, indices)
    assert_features_match(pairs, indices, case)


TREE = {"tree_topk": 2, "tree_depth": GAMMA, "tree_nodes": 2 * GAMMA}  # what topk=2 asks for


@pytest.mark.parametrize("case,tree", [("eagle3", None), ("eagle3-tree", TREE), ("dflash", None),
                                       ("eagle", None)])
def test_accepts_what_the_embedded_engine_accepts(runs, models, case, tree):
    """The same drafter (a chain, or the same EAGLE-2 tree verified by SGLang's tree verify) in
    the embedded engine: the same outputs and, request by request, the same accept lengths."""
    res = runs[case]
    method = case.split("-")[0]
    embedded = embedded_outputs(models["target"], method, _path(models, method), models["prompts"],
                                MAX_NEW, GAMMA, tree)
    assert [o.output_token_ids for o in embedded] == _outputs(res)
    for i, (mine, theirs) in enumerate(zip(embedded, res["outputs"])):
        assert sorted(mine.accept_lengths) in _clip_histogram(theirs["accept_lengths"], MAX_NEW), (
            f"{case} request {i}: SGLang {sorted(theirs['accept_lengths'])} vs embedded "
            f"{sorted(mine.accept_lengths)}")


def test_the_tree_takes_fewer_steps_than_the_chain(runs):
    steps = {c: sum(len(o["accept_lengths"]) for o in runs[c]["outputs"])
             for c in ("eagle3", "eagle3-tree")}
    assert steps["eagle3-tree"] < steps["eagle3"], steps


def _clip_histogram(lengths: list[int], max_new: int) -> list[list[int]]:
    """SGLang reports accept lengths as a histogram (meta_info), so their order is gone; like
    vLLM it counts its last step whole before cutting the output at max_new_tokens, while the
    embedded engine never drafts past the budget.  Every sorted list the last step could have
    come from once clipped (the prefill's token is not a verify step)."""
    excess = sum(lengths) - (max_new - 1)
    if excess <= 0:
        return [sorted(lengths)]
    out = []
    for x in set(lengths):
        if x - excess >= 1:
            rest = list(lengths)
            rest.remove(x)
            out.append(sorted(rest + [x - excess]))
    return out


def test_budget_widths_narrow_the_verify(runs):
    """The scripted widths (0 included) make SGLang run more, narrower verify steps than the
    same head at its full width, with the same output (test_greedy_identity above)."""
    steps = {case: sum(len(o["accept_lengths"]) for o in runs[case]["outputs"])
             for case in ("eagle3", "eagle3-budget")}
    assert steps["eagle3-budget"] > steps["eagle3"], steps
