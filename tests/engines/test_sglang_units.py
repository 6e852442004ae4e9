"""The SGLang adapter's pure parts (no SGLang needed): batch translation, algorithm names and
server-arg resolution, result translation, and the tests-only CPU tree kernels on literal cases."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from specplug.integrations.sglang import algorithms, compat, launch_cpu
from specplug.integrations.sglang.batch import RowIds, chain_tokens, draft_input
from specplug.integrations.sglang.cpu import STANDINS, cpu_env
from specplug.integrations.sglang.generate import accept_lengths_of, speculative_kwargs
from specplug.integrations.sglang.server import cli_args
from specplug.types import PAD, DraftProposal



def req(rid, prompt, output):
    return SimpleNamespace(rid=rid, origin_input_ids_unpadded=prompt, output_ids=output)


def test_draft_input_rows_and_stable_ids():
    rows = RowIds()
    inp = draft_input([req("a", [5, 6], [7]), req("b", [9], [4, 2])], rows, 3,
                      torch.tensor([7, 2], dtype=torch.int32))
    assert [t.tolist() for t in inp.token_ids] == [[5, 6, 7], [9, 4, 2]]
    assert inp.row_ids == [0, 1] and inp.num_draft_tokens == 3
    assert inp.num_new_committed == [3, 3]  # first calls: the whole context
    again = draft_input([req("b", [9], [4, 2, 8, 1])], rows, 3, torch.tensor([1]))
    assert again.row_ids == [1] and again.num_new_committed == [2]
    assert rows.pop("a") == 0 and rows.pop("a") is None
    back = draft_input([req("a", [5, 6], [7, 3])], rows, 3, torch.tensor([3]))
    assert back.row_ids == [2] and back.num_new_committed == [4]  # a popped id starts afresh


def test_draft_input_rejects_a_stale_root():
    with pytest.raises(RuntimeError, match="request x: last committed token \\[7\\] is not the "
                                           "verify root 3"):
        draft_input([req("x", [5], [7])], RowIds(), 2, torch.tensor([3]))


def test_chain_tokens_pads_short_rows_with_their_last_token():
    prop = DraftProposal.chain(torch.tensor([[8, 1, 3, 4], [6, PAD, PAD, PAD], [PAD] * 4]))
    out = chain_tokens(prop, roots=torch.tensor([7, 2, 9]), num_steps=3)
    assert out.tolist() == [[8, 1, 3], [6, 6, 6], [9, 9, 9]]
    # a proposal narrower than the verify width, and one with no drafts at all
    narrow = DraftProposal.chain(torch.tensor([[5, 6], [4, PAD]]))
    assert chain_tokens(narrow, torch.tensor([1, 2]), 4).tolist() == [[5, 6, 6, 6], [4, 4, 4, 4]]
    none = DraftProposal.empty(2)
    assert chain_tokens(none, torch.tensor([1, 2]), 2).tolist() == [[1, 1], [2, 2]]


def test_chain_tokens_refuses_trees():
    tree = DraftProposal(torch.tensor([[1, 2]]), torch.tensor([[-1, -1]]))
    with pytest.raises(ValueError, match="verifies chains"):
        chain_tokens(tree, torch.tensor([0]), 2)


def test_algorithm_names_and_methods():
    assert algorithms.algorithm_for("draft") == "SPECPLUG_DRAFT"
    assert algorithms.algorithm_for("specdiff") == "SPECPLUG_SPECDIFF"
    assert algorithms.algorithm_for("eagle3") == "EAGLE3"  # SGLang's own worker
    assert algorithms.resolve_method("SPECPLUG", None) == "ngram"
    with pytest.raises(ValueError, match="needs --speculative-draft-model-path"):
        algorithms.resolve_method("SPECPLUG_DRAFT", None)
    with pytest.raises(ValueError, match="not a specplug algorithm"):
        algorithms.resolve_method("EAGLE", None)


def test_auto_name_sends_eagle_checkpoints_to_sglangs_worker(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    with pytest.raises(ValueError, match="--speculative-algorithm EAGLE3"):
        algorithms.resolve_method("SPECPLUG", str(tmp_path))


def args(**kw):
    base = dict(speculative_algorithm="SPECPLUG_NGRAM", speculative_draft_model_path=None,
                speculative_eagle_topk=None, speculative_num_steps=None,
                speculative_num_draft_tokens=None, disable_overlap_schedule=False,
                enable_mixed_chunk=True)
    return SimpleNamespace(**{**base, **kw})


def test_server_args_resolve_to_a_chain_without_overlap():
    a = args(speculative_num_draft_tokens=6)
    algorithms.handle_server_args(a)
    assert (a.speculative_num_steps, a.speculative_eagle_topk, a.speculative_num_draft_tokens) == (5, 1, 6)
    assert a.disable_overlap_schedule and not a.enable_mixed_chunk
    b = args()
    algorithms.handle_server_args(b)
    assert b.speculative_num_steps == algorithms.DEFAULT_NUM_STEPS


@pytest.mark.parametrize("kw, msg", [
    ({"speculative_eagle_topk": 4}, "--speculative-eagle-topk must be 1"),
    ({"speculative_draft_model_path": "/nope/x"}, "does not exist"),
    ({"speculative_algorithm": "SPECPLUG_SPECDIFF"}, "needs --speculative-draft-model-path"),
])
def test_server_args_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        algorithms.handle_server_args(args(**kw))


def test_bad_drafter_options_env(monkeypatch):
    monkeypatch.setenv(algorithms.OPTIONS_ENV, "[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        algorithms.drafter_options()


def test_version_gate():
    assert compat.version_supported("0.5.23")
    assert not compat.version_supported("0.5.24") and not compat.version_supported("0.0.1")


def test_result_and_cli_translation():
    assert accept_lengths_of({"spec_correct_drafts_histogram": [2, 0, 1]}) == [1, 1, 3]
    kw = speculative_kwargs("draft", "/d", 3)
    assert kw["speculative_num_draft_tokens"] == 4 and kw["speculative_draft_model_path"] == "/d"
    assert "speculative_draft_model_path" not in speculative_kwargs("specdiff", "/d", 3)
    assert cli_args({"model_path": "/t", "disable_cuda_graph": True, "x": None}) == [
        "--model-path", "/t", "--disable-cuda-graph"]


@pytest.fixture
def tree_kernels():
    sys.path.insert(0, STANDINS)
    try:
        from sgl_kernel.tree import build_tree_kernel_efficient_cpu, verify_tree_greedy_cpu
        yield build_tree_kernel_efficient_cpu, verify_tree_greedy_cpu
    finally:
        sys.path.remove(STANDINS)


def test_cpu_shim_chain_tree_and_greedy_verify(tree_kernels):
    build, verify = tree_kernels
    n, steps = 4, 3  # root + a chain of 3
    parents = torch.arange(-1, steps - 1).repeat(1, 1)
    selected = torch.arange(steps).repeat(1, 1)
    mask = torch.zeros(n * n, dtype=torch.bool)
    pos = torch.zeros(n, dtype=torch.long)
    idx, nxt, sib = (torch.full((1, n), -1, dtype=torch.long) for _ in range(3))
    build(parents, selected, torch.tensor([10]), mask, pos, idx, nxt, sib, 1, steps, n, 1)
    assert pos.tolist() == [10, 11, 12, 13]
    assert nxt.tolist() == [[1, 2, 3, -1]] and sib.tolist() == [[-1, -1, -1, -1]]
    assert mask.view(n, n).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # drafts [5, 6, 9] after root; target argmax per node [5, 6, 7, 8]: two accepted, then 7
    predicts = torch.zeros(n, dtype=torch.int32)
    accept_index = torch.full((1, n), -1, dtype=torch.int32)
    accepted = torch.zeros(1, dtype=torch.int32)
    verify(predicts, accept_index, accepted, torch.tensor([[3, 5, 6, 9]]), idx, nxt, sib,
           torch.tensor([[5, 6, 7, 8]]))
    assert accepted.tolist() == [2]
    assert accept_index.tolist() == [[0, 1, 2, -1]]
    assert predicts.tolist()[:3] == [5, 6, 7]


def test_cpu_env_puts_the_standins_first_once():
    env = cpu_env({"PYTHONPATH": os.pathsep.join(["/a", STANDINS, "/b"])})
    assert env["PYTHONPATH"].split(os.pathsep) == [STANDINS, "/a", "/b"]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert cpu_env(env) == env


def test_cpu_launcher_adds_only_the_cpu_settings_not_given():
    cmd = launch_cpu.command(["--model-path", "T", "--attention-backend", "torch_native"])
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert cmd.count("--attention-backend") == 1 and cmd[cmd.index("--attention-backend") + 1] == "torch_native"
    assert cmd[cmd.index("--device") + 1] == "cpu"
    assert "--sleep-on-idle" in cmd and "--disable-cuda-graph" in cmd


def test_cpu_launcher_without_sglang_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "specplug.integrations.sglang.launch_cpu",
                           "--model-path", "T"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "has no SGLang" in proc.stderr, proc.stderr
