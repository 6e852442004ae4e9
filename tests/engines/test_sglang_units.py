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
from specplug.integrations.sglang.batch import (RowIds, chain_tokens, draft_input,
                                               tree_verify_tensors)
from specplug.integrations.sglang.cpu import STANDINS, cpu_env
from specplug.drafter_block import DrafterBlock
from specplug.integrations.sglang.drafter_card import read_card, write_card
from specplug.integrations.sglang.generate import (accept_lengths_of, drafter_path_for,
                                                   speculative_kwargs)
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
    assert rows.unseen("b", 5) == 2 and rows.unseen("new", 4) == 4  # a peek marks no call
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
    assert algorithms.algorithm_for("eagle3", native=False) == "SPECPLUG_EAGLE3"
    assert algorithms.algorithm_for("hybrid") == "SPECPLUG_HYBRID"
    assert algorithms.resolve_method("SPECPLUG", read_card(None)) == "ngram"
    with pytest.raises(ValueError, match="needs --speculative-draft-model-path"):
        algorithms.resolve_method("SPECPLUG_DRAFT", read_card(None))
    with pytest.raises(ValueError, match="not a specplug algorithm"):
        algorithms.resolve_method("EAGLE", read_card(None))


def test_auto_name_detects_a_head_for_specplugs_worker(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    assert algorithms.resolve_method("SPECPLUG", read_card(str(tmp_path))) == "eagle3"


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


def test_server_args_resolve_a_tree():
    a = args(speculative_eagle_topk=2, speculative_num_steps=3)
    algorithms.handle_server_args(a)  # EAGLE-2's default size: topk nodes per depth
    assert (a.speculative_num_steps, a.speculative_eagle_topk, a.speculative_num_draft_tokens) == (3, 2, 7)
    assert algorithms.tree_options("eagle3", 2, 3, 6) == {"tree_topk": 2, "tree_depth": 3, "tree_nodes": 6}
    assert algorithms.tree_options("hybrid", 2, 3, 6)["head_tree_nodes"] == 6
    assert algorithms.tree_options("draft", 2, 3, 6) == {}
    # the bench's way in: drafter options asking for a tree set SGLang's tree shape
    for method in ("eagle3", "hybrid"):
        opts = algorithms.tree_options(method, 2, 3, 6)
        assert algorithms.tree_shape(method, opts, 4) == (2, 3, 7)
    assert algorithms.tree_shape("hybrid", {"head_tree_topk": 3}, 4) == (3, 4, 13)
    assert algorithms.tree_shape("suffix", {"tree_nodes": 6}, 4) == (2, 4, 7)
    assert algorithms.tree_shape("eagle3", {}, 4) == (1, 4, 5)
    kw = speculative_kwargs("hybrid", "/h", 4, options={"head_tree_topk": 2})
    assert (kw["speculative_eagle_topk"], kw["speculative_num_draft_tokens"]) == (2, 9)


def test_server_args_for_hidden_state_drafters(tmp_path):
    """No radix cache (a cached prefix has no hidden states); with CUDA graphs, graphs captured
    with the FULL hidden-state mode verify runs with."""
    a = args(speculative_algorithm="SPECPLUG_EAGLE3", speculative_draft_model_path=str(tmp_path),
             disable_radix_cache=False, disable_cuda_graph=False, enable_return_hidden_states=False)
    algorithms.handle_server_args(a)
    assert a.disable_radix_cache and a.enable_return_hidden_states
    b = args(disable_radix_cache=False, disable_cuda_graph=True, enable_return_hidden_states=False)
    algorithms.handle_server_args(b)  # n-gram on CPU: both untouched
    assert not b.disable_radix_cache and not b.enable_return_hidden_states


@pytest.mark.parametrize("kw, msg", [
    ({"speculative_eagle_topk": 2, "speculative_num_draft_tokens": 1}, "a tree needs"),
    ({"speculative_eagle_topk": -1}, "must be >= 1"),
    ({"speculative_draft_model_path": "/nope/x"}, "does not exist"),
    ({"speculative_algorithm": "SPECPLUG_SPECDIFF"}, "needs --speculative-draft-model-path"),
])
def test_server_args_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        algorithms.handle_server_args(args(**kw))


def test_a_drafter_card_carries_folder_options_and_budget(tmp_path):
    """What `specplug sglang-card` writes is what the worker reads back: the drafter's folder
    (absolute), its options and the budget; AutoConfig can read the card's config.json."""
    head = tmp_path / "head"
    head.mkdir()
    card = write_card(str(tmp_path / "card"), DrafterBlock(None, str(head), {"lookup": "suffix"},
                                                           True))
    got = read_card(card)
    assert (got.method, got.path, got.options, got.budget) == (None, str(head),
                                                               {"lookup": "suffix"}, True)
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(card).architectures == ["SpecplugDrafterCard"]
    a = args(speculative_algorithm="SPECPLUG_HYBRID", speculative_draft_model_path=card)
    algorithms.handle_server_args(a)  # the card's folder is the head's: resolved, no error
    # a folder without a card is the drafter itself, with no options
    plain = read_card(str(head))
    assert (plain.path, plain.options, plain.budget) == (str(head), {}, False)
    # a checkpoint folder with a specplug.json beside its config is a card for itself
    (head / "specplug.json").write_text('{"options": {"max_ngram": 2}}')
    assert read_card(str(head)).path == str(head)
    assert read_card(str(head)).options == {"max_ngram": 2}


@pytest.mark.parametrize("content, msg", [
    ("[1, 2]", "must be a JSON object"),
    ("{nope", "is not JSON"),
    ('{"optoins": {}}', "unknown keys \\['optoins'\\]"),
    ('{"budget": "maybe"}', "'budget' must be on or off"),
    ('{"method": "draft"}', "names method 'draft', but --speculative-algorithm SPECPLUG_SUFFIX"),
    ('{"path": "gone"}', "the drafter card's folder .*gone does not exist"),
])
def test_bad_drafter_cards_fail_with_one_line(tmp_path, content, msg):
    (tmp_path / "specplug.json").write_text(content)
    with pytest.raises(ValueError, match=msg):
        algorithms.handle_server_args(args(speculative_algorithm="SPECPLUG_SUFFIX",
                                           speculative_draft_model_path=str(tmp_path)))


def test_write_card_leaves_nothing_behind_on_bad_input(tmp_path):
    with pytest.raises(ValueError, match="drafter folder .*missing does not exist"):
        write_card(str(tmp_path / "card"), DrafterBlock(None, str(tmp_path / "missing"), {}, False))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty folder"):
        write_card(str(tmp_path / "full"), DrafterBlock(None, None, {}, False))
    assert sorted(os.listdir(tmp_path)) == ["full"]


def test_drafter_path_for_writes_a_card_only_where_needed(tmp_path):
    """Options, the budget or a folder AutoConfig rejects (specdiff) need a card; a plain drafter
    folder and SGLang's own workers get the folder as it is; the card goes with the block."""
    with drafter_path_for("draft", "/d", None) as p:
        assert p == "/d"
    with drafter_path_for("eagle3", str(tmp_path), {"tree_topk": 2}, budget=True) as p:
        assert p == str(tmp_path)  # EAGLE3: SGLang's own worker, which takes no card
    with drafter_path_for("suffix", None, {"tree_nodes": 6, "budget": 1}) as p:
        card = read_card(p)
        assert (card.method, card.path == p, card.options, card.budget) == (
            "suffix", True, {"tree_nodes": 6}, True)
    assert not os.path.exists(p)
    with drafter_path_for("specdiff", str(tmp_path), None) as p:
        assert p != str(tmp_path) and read_card(p).path == str(tmp_path)


def test_version_gate():
    assert compat.version_supported("0.5.23")
    assert not compat.version_supported("0.5.24") and not compat.version_supported("0.0.1")


def test_result_and_cli_translation():
    assert accept_lengths_of({"spec_correct_drafts_histogram": [2, 0, 1]}) == [1, 1, 3]
    kw = speculative_kwargs("draft", "/d", 3)
    assert kw["speculative_num_draft_tokens"] == 4 and kw["speculative_draft_model_path"] == "/d"
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


def test_tree_tensors_worked_example():
    prop = DraftProposal(torch.tensor([[3, 5]]), torch.tensor([[-1, 0]]))
    t = tree_verify_tensors(prop, torch.tensor([7]), [10], num_draft_tokens=4, max_depth=3,
                            full_mask=False)
    assert t.draft_tokens.tolist() == [7, 3, 5, 3]  # a filler copy of the first node
    assert t.positions.tolist() == [10, 11, 12, 11]
    assert t.retrieve_next_token.tolist() == [[1, 2, -1, -1]]
    assert t.retrieve_next_sibling.tolist() == [[-1, 3, -1, -1]]
    assert t.tree_mask.view(4, 4).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                                                     [1, 0, 0, 1]]
    full = tree_verify_tensors(prop, torch.tensor([7]), [2], 4, 3, full_mask=True)
    assert full.tree_mask.view(4, 6)[:, :2].all() and torch.equal(
        full.tree_mask.view(4, 6)[:, 2:], t.tree_mask.view(4, 4))
    deep = tree_verify_tensors(prop, torch.tensor([7]), [10], 4, max_depth=1, full_mask=False)
    assert deep.draft_tokens.tolist() == [7, 3, 3, 3]  # depth 2 dropped: past the verify steps


def test_tree_tensors_of_a_chain_equal_sglangs_chain_kernel(tree_kernels):
    build, _ = tree_kernels
    n, steps = 5, 4
    mask = torch.zeros(n * n, dtype=torch.bool)
    pos = torch.zeros(n, dtype=torch.long)
    idx, nxt, sib = (torch.full((1, n), -1, dtype=torch.long) for _ in range(3))
    build(torch.arange(-1, steps - 1)[None], torch.arange(steps)[None], torch.tensor([9]), mask,
          pos, idx, nxt, sib, 1, steps, n, 1)
    t = tree_verify_tensors(DraftProposal.chain(torch.tensor([[4, 5, 6, 7]])), torch.tensor([3]),
                            [9], n, steps, full_mask=False)
    assert torch.equal(t.tree_mask, mask) and torch.equal(t.positions, pos)
    assert torch.equal(t.retrieve_index, idx) and torch.equal(t.retrieve_next_token, nxt)
    assert torch.equal(t.retrieve_next_sibling, sib)


def test_tree_tensors_verify_as_specplugs_own_tree_verify(tree_kernels):
    """Random trees through SGLang's greedy tree walk (the stand-in kernel) accept what
    specplug.verify accepts, for a target whose argmax follows a random path."""
    from specplug.verify import verify_greedy_tree
    _, walk = tree_kernels
    gen = torch.Generator().manual_seed(0)
    vocab, n = 6, 8
    for _ in range(200):
        m = int(torch.randint(1, n, (1,), generator=gen))
        parents = [-1] + [int(torch.randint(-1, j, (1,), generator=gen)) for j in range(1, m)]
        tokens = torch.randint(0, vocab, (1, m), generator=gen)
        prop = DraftProposal(tokens, torch.tensor([parents]))
        # target argmax per node, random: logits over the proposal's nodes (root first)
        argmax = torch.randint(0, vocab, (1, m + 1), generator=gen)
        want = verify_greedy_tree(torch.nn.functional.one_hot(argmax, vocab).float(), prop)
        t = tree_verify_tensors(prop, torch.tensor([0]), [5], n, max_depth=n, full_mask=False)
        # the target's argmax at each SGLang node: the proposal node's, root's at node 0,
        # and a filler copies node 0's token (so its argmax is unreached)
        target = torch.cat([argmax[0], torch.full((n - 1 - m,), vocab)])[None]
        predicts = torch.zeros(n, dtype=torch.int32)
        accept_index = torch.full((1, n), -1, dtype=torch.int32)
        accepted = torch.zeros(1, dtype=torch.int32)
        walk(predicts, accept_index, accepted, t.draft_tokens.view(1, n), t.retrieve_index,
             t.retrieve_next_token, t.retrieve_next_sibling, target)
        k = int(accepted[0])
        assert k == int(want.num_accepted[0]), (tokens, parents, argmax)
        path = [int(i) for i in accept_index[0, :k + 1]]
        assert [int(predicts[i]) for i in path] == want.row_tokens(0)


def test_run_sglang_passes_the_budget_to_specplug_algorithms_only(monkeypatch, tmp_path):
    """GenerateConfig's budget (on by default) reaches specplug's worker in the drafter card;
    SGLang's own EAGLE worker gets its folder and no card, and --no-budget writes no card."""
    from specplug.api import GenerateConfig
    from specplug.integrations.sglang import generate
    from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_model
    target = save_model(build_tiny_llama(0), build_tiny_tokenizer(), str(tmp_path / "t"))
    jobs, budgets = [], []

    def run(job, **kw):  # the card exists while the job runs, and is read back here
        path = job["spec"].get("speculative_draft_model_path")
        budgets.append(read_card(path).budget if path else None)
        jobs.append(job)
        return {"outputs": [], "stats": {}}
    monkeypatch.setattr(generate, "run_job_subprocess", run)
    monkeypatch.setattr(generate.importlib.util, "find_spec", lambda name: None)
    for method, budget in (("suffix", True), ("suffix", False), ("eagle3", True)):
        cfg = GenerateConfig(target=target, prompts=["a b"], method=method, budget=budget,
                             drafter=str(tmp_path) if method == "eagle3" else None)
        generate.run_sglang(cfg)
    assert budgets == [True, None, False]  # the head's own folder: no card, so no budget
    assert jobs[2]["spec"]["speculative_algorithm"] == "EAGLE3"
    # no gamma given: SGLang verifies at full width, so suffix keeps the short default here
    assert jobs[0]["spec"]["speculative_num_steps"] == 5


# Stands in for launch_server: binds --port and answers /health, or (like SGLang's uvicorn,
# whose workers keep the process alive) logs the bind error and hangs.
FAKE_LAUNCHER = """
import http.server, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
try:
    server = http.server.HTTPServer(("127.0.0.1", port), Health)
except OSError as e:
    print("ERROR:", e, flush=True)
    time.sleep(600)
server.serve_forever()
"""


def test_server_start_moves_to_a_new_port_when_its_port_was_taken(monkeypatch):
    import socket
    from specplug.integrations.sglang import server as server_mod
    holder = socket.socket()  # another process won the race for the first port
    holder.bind((server_mod.HOST, 0))
    holder.listen()
    taken, picks = holder.getsockname()[1], []
    real_free_port = server_mod.free_port

    def pick():
        picks.append(taken if not picks else real_free_port())
        return picks[-1]
    monkeypatch.setattr(server_mod, "free_port", pick)
    srv = server_mod.SGLangServer("unused-model", python=sys.executable,
                                  prefix=["-c", FAKE_LAUNCHER])
    try:
        srv.start(timeout=60)
        assert picks[0] == taken and srv.port == picks[1] != taken
        assert srv._get("/health") == "ok"
    finally:
        srv.stop()
        holder.close()


def test_free_port_stays_below_the_ephemeral_range():
    from specplug.integrations.sglang.server import PORT_RANGE, free_port
    ports = {free_port() for _ in range(20)}
    assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] < 32768 for p in ports)


def test_sglang_card_command(tmp_path, capsys):
    """`specplug sglang-card`: the card it writes is what the worker reads; what SGLang could not
    run is one line and leaves no folder."""
    from specplug.cli import main
    card = tmp_path / "suffix16"
    assert main(["sglang-card", str(card), "--method", "suffix", "--option", "tree_nodes=16",
                 "--budget"]) == 0
    assert "--speculative-algorithm SPECPLUG_SUFFIX" in capsys.readouterr().out
    got = read_card(str(card))
    assert (got.method, got.options, got.budget) == ("suffix", {"tree_nodes": 16}, True)
    for argv, msg in ((["--method", "hybrid"], "needs --drafter"),
                      (["--method", "ngram", "--drafter", str(tmp_path)], "has no weights"),
                      (["--method", "nope"], "unknown method 'nope'"),
                      (["--method", "ngram", "--option", "budget=1"], "is --budget / --no-budget")):
        assert main(["sglang-card", str(tmp_path / "bad"), *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
    assert sorted(os.listdir(tmp_path)) == ["suffix16"]
