"""Hybrid drafter (lookup + head): greedy identity at batch 1 and 4 for draft-model and EAGLE-3
heads in both modes, lossless sampling, the per-row merge rules on literal tables, bad options."""
import pytest
import torch

from eagle_fixtures import (attention_only_target, bos_prompts, chi_square_p, eagle3_state, run,
                            save_head)
from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.head_gate import HeadGate
from specplug.drafters.hybrid import HybridDrafter, merge_trees, switch_rows
from specplug.models.loading import target_info
from specplug.models.tiny import build_tiny_llama, perturbed_copy, save_model
from specplug.types import PAD, ROOT, DraftProposal, SamplingParams

GAMMA = 4


def _repeating(prompts):
    # every other prompt repeats its own start, so lookup finds matches in some rows only
    return [p + p[1:1 + len(p) // 2] if i % 2 else p for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def llama():
    return build_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def draft_folder(llama, tmp_path_factory):
    return save_model(perturbed_copy(llama, 0.3), None, str(tmp_path_factory.mktemp("draft")))


@pytest.fixture(scope="module")
def llama_prompts():
    g = torch.Generator().manual_seed(5)
    return _repeating([torch.randint(1, 256, (int(n),), generator=g).tolist()
                       for n in torch.randint(4, 30, (16,), generator=g)])


@pytest.mark.parametrize("mode,lookup", [("switch", "ngram"), ("tree", "ngram"),
                                         ("switch", "suffix"), ("tree", "suffix")])
def test_greedy_identity_with_draft_model_head(llama, draft_folder, llama_prompts, mode, lookup):
    plain = run(llama, None, llama_prompts, 1, max_new=24)[0]
    taus = []
    for batch in (1, 4):
        drafter = build_drafter(DrafterSpec("hybrid", draft_folder, {"head_method": "draft",
                                                                     "mode": mode,
                                                                     "lookup": lookup}),
                                target_info(llama))
        outs, stats = run(llama, drafter, llama_prompts, batch, GAMMA, max_new=24)
        assert outs == plain
        assert drafter.used_lookup > 0 and drafter.used_head > 0
        taus.append(stats.mean_accept_length)
    if lookup == "ngram":  # suffix's shared index depends on the order requests finish
        assert taus[0] == pytest.approx(taus[1])


# tree-skip: a tree, except on steps where every row's suffix lookup expects 1.5 accepted
# tokens or more; those take the lookup alone and keep the head's features for later.
# tree-gate: a tree on the steps the head gate lets the head run (see _gate_that_never_pays)
EAGLE3_HYBRIDS = {"switch": {"mode": "switch"}, "tree": {"mode": "tree"},
                  "tree-skip": {"mode": "tree", "lookup": "suffix", "skip_head_tokens": 1.5},
                  "tree-gate": {"mode": "tree", "lookup": "suffix", "head_gate": "on"}}


def _gate_that_never_pays(drafter: HybridDrafter) -> None:
    """The hybrid's gate finds the head never pays: it runs on the first steps and on probes
    only (3 steps every 2 to 4 skipped), so skipped and run steps alternate in every row."""
    drafter.gate = HeadGate(min_steps=2, probe_every=2, probe_max=4)
    drafter.gate.pays = lambda: False


@pytest.mark.parametrize("kind", EAGLE3_HYBRIDS)
def test_greedy_identity_with_eagle3_head(tmp_path, kind):
    target = attention_only_target(0)
    state, cfg = eagle3_state(target, [0, 1, 1], noise=0.05, draft_vocab=200)
    folder = save_head(str(tmp_path / "e3"), state, cfg)
    prompts = _repeating(bos_prompts(16, seed=2))
    plain = run(target, None, prompts, 1)[0]
    for batch in (1, 4):
        # the head is detected from the folder; head_ options reach it (an EAGLE-2 tree)
        options = {**EAGLE3_HYBRIDS[kind], "head_tree_topk": 2, "head_tree_nodes": 6}
        drafter = build_drafter(DrafterSpec("hybrid", folder, options), target_info(target))
        assert drafter.needs.hidden_layers == (0, 1, 1)
        if kind == "tree-gate":
            _gate_that_never_pays(drafter)
        outs, stats = run(target, drafter, prompts, batch, GAMMA)
        assert outs == plain
        assert drafter.used_lookup > 0 and drafter.used_head > 0
        assert stats.num_accepted_tokens > 0
        if kind != "tree":  # steps served by the lookup alone never ran the head
            assert drafter.head_calls < len(stats.accept_lengths)
        else:
            assert drafter.head_calls == stats.num_steps


class _EagerHybrid(HybridDrafter):
    """Reference: the head sees every step's features as they come (no kept features)."""
    def propose(self, inp):
        from_lookup = self.lookup.propose(inp)
        found = from_lookup.num_nodes >= self.min_lookup_tokens
        return switch_rows(from_lookup, self.head.propose(inp), found)


def test_kept_features_reach_the_head_as_if_fed_every_step(tmp_path):
    target = attention_only_target(0)
    folder = save_head(str(tmp_path / "e3"), *eagle3_state(target, [0, 1, 1], noise=0.05,
                                                           draft_vocab=200))
    prompts = _repeating(bos_prompts(12, seed=3))
    for batch in (1, 4):
        runs = []
        for cls in (HybridDrafter, _EagerHybrid):
            built = build_drafter(DrafterSpec("hybrid", folder), target_info(target))
            drafter = cls(built.lookup, built.head)
            outs, stats = run(target, drafter, prompts, batch, GAMMA)
            runs.append((outs, stats.accept_lengths))
        assert runs[0] == runs[1]  # same drafts, step for step


def test_tree_mode_accepts_the_better_branch(llama, draft_folder, llama_prompts):
    """One step from the same state: the merged tree's greedy accept length is the max of the
    lookup's and the head's (walked against the target's own greedy continuation)."""
    from specplug.types import DraftInput
    info = target_info(llama)
    lookup_only = build_drafter(DrafterSpec("ngram", None, {"max_ngram": 4, "min_ngram": 2}), info)
    head_only = build_drafter(DrafterSpec("draft", draft_folder), info)
    tree = build_drafter(DrafterSpec("hybrid", draft_folder, {"head_method": "draft",
                                                             "mode": "tree"}), info)
    merged = 0
    for i, p in enumerate(llama_prompts):
        greedy = _greedy(llama, p, GAMMA)
        inp = DraftInput([i], [torch.tensor(p)], GAMMA)
        props = [d.propose(inp) for d in (lookup_only, head_only, tree)]
        lengths = [_greedy_accept(prop, greedy) for prop in props]
        assert lengths[2] == max(lengths[0], lengths[1])
        merged += int(props[0].num_nodes[0]) > 0 and not props[2].is_chain()
    assert merged > 0  # the repeating prompts give some rows a real two-branch tree


def _greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _greedy_accept(prop, greedy) -> int:
    """Draft tokens accepted by a greedy walk of row 0's tree."""
    toks, pars = prop.tokens[0].tolist(), prop.parents[0].tolist()
    node, n = ROOT, 0
    while True:
        nxt = next((j for j, (t, q) in enumerate(zip(toks, pars))
                    if t != PAD and q == node and n < len(greedy) and t == greedy[n]), None)
        if nxt is None:
            return n
        node, n = nxt, n + 1


@pytest.mark.parametrize("mode", ["switch", "tree", "tree-skip", "tree-gate"])
def test_sampling_is_lossless(tmp_path, mode):
    """T = 1: the second output token (the first one speculation decides) follows the target."""
    from eagle_fixtures import second_token_marginal
    target = build_tiny_llama(seed=0, sharpness=1.5)
    folder = save_model(perturbed_copy(target, 0.5), None, str(tmp_path / "d"))
    prompt = [10, 20, 30, 40, 10, 20, 30]  # lookup matches "20 30" (and "10 20 30")
    params = SamplingParams(temperature=1.0)
    options = {"head_method": "draft", "mode": mode}
    if mode == "tree-skip":  # a suffix lookup sure of "40" after "10 20 30": the head skipped
        options.update(mode="tree", lookup="suffix", skip_head_tokens=1.0)
    if mode == "tree-gate":
        options.update(mode="tree", lookup="suffix", head_gate="on")
    drafter = build_drafter(DrafterSpec("hybrid", folder, options), target_info(target))
    if mode == "tree-gate":
        _gate_that_never_pays(drafter)
    draws = 3000
    # a step skips the head only when every row's lookup is sure: rows one at a time there
    batch = 1 if mode == "tree-skip" else 100
    outs, stats = run(target, drafter, [prompt] * draws, batch, gamma=3, max_new=3,
                      sampling=params, seeds=list(range(draws)))
    assert drafter.used_lookup > 0 and drafter.used_head > 0
    if mode in ("tree-skip", "tree-gate"):  # some steps drafted with the lookup alone
        assert drafter.head_calls < stats.num_steps
    p = chi_square_p([o[1] for o in outs], second_token_marginal(target, prompt))
    assert p > 0.01, f"{mode}: p={p:.2e}"


# -- literal tables ---------------------------------------------------------------------------
def test_switch_rows_table():
    lookup = DraftProposal.chain(torch.tensor([[7, 8, 9], [PAD, PAD, PAD]]))
    head_probs = torch.full((2, 2, 10), 0.1, dtype=torch.float64)
    head = DraftProposal.chain(torch.tensor([[1, 2], [3, 4]]), head_probs)
    out = switch_rows(lookup, head, torch.tensor([True, False]))
    assert out.tokens.tolist() == [[7, 8, 9], [3, 4, PAD]]
    assert out.is_chain()
    assert out.draft_probs.shape == (2, 3, 10)
    # lookup tokens are one-hot (point masses); head rows keep the head's q
    assert out.draft_probs[0, 0].tolist() == [0.0] * 7 + [1.0, 0.0, 0.0]
    assert out.draft_probs[0, 2, 9] == 1.0
    assert torch.allclose(out.draft_probs[1, :2], head_probs[1])
    assert out.draft_probs[1, 2].sum() == 0


def test_merge_trees_table():
    lookup = DraftProposal.chain(torch.tensor([[5, 6, 7], [5, 6, PAD]]))
    head = DraftProposal(torch.tensor([[5, 9, 4], [8, 9, PAD]]), torch.tensor([[ROOT, 0, ROOT],
                                                                               [ROOT, 0, ROOT]]))
    out = merge_trees(lookup, head, torch.tensor([True, False]))
    # row 0: 5 shared; 6 and 9 both under it; 4 a second root child
    assert out.tokens.tolist() == [[5, 6, 7, 9, 4], [8, 9, PAD, PAD, PAD]]
    assert out.parents[0].tolist() == [ROOT, 0, 1, 0, ROOT]
    assert out.parents[1, :2].tolist() == [ROOT, 0]
    assert out.draft_probs is None


def test_scores_survive_the_merge_rules():
    lookup = DraftProposal.chain(torch.tensor([[5, 6, 7], [5, 6, PAD]]),
                                 scores=torch.tensor([[0.9, 0.5, 0.4], [0.8, 0.7, 0.0]]))
    head = DraftProposal(torch.tensor([[5, 9, 4], [8, 9, PAD]]),
                         torch.tensor([[ROOT, 0, ROOT], [ROOT, 0, ROOT]]),
                         scores=torch.tensor([[0.95, 0.3, 0.02], [0.6, 0.2, 0.0]]))
    out = merge_trees(lookup, head, torch.tensor([True, False]))
    # the shared node 5 keeps the higher of its two scores; every other node its own
    assert torch.allclose(out.scores, torch.tensor([[0.95, 0.5, 0.4, 0.3, 0.02],
                                                    [0.6, 0.2, 0.0, 0.0, 0.0]]))
    out = switch_rows(lookup, head, torch.tensor([True, False]))
    assert torch.allclose(out.scores, torch.tensor([[0.9, 0.5, 0.4], [0.6, 0.2, 0.0]]))
    # one side without scores: the merged proposal has none (the budget plans it instead)
    assert merge_trees(DraftProposal.chain(lookup.tokens), head,
                       torch.tensor([True, True])).scores is None


@pytest.mark.parametrize("lookup,scored", [("suffix", True), ("ngram", False)])
def test_hybrid_scores_nodes_when_both_halves_do(tmp_path, lookup, scored):
    target = attention_only_target(0)
    folder = save_head(str(tmp_path / "e3"), *eagle3_state(target, [0, 1, 1], noise=0.05))
    drafter = build_drafter(DrafterSpec("hybrid", folder, {"mode": "tree", "lookup": lookup}),
                            target_info(target))
    assert drafter.scores_nodes is scored


def test_bad_options(llama, draft_folder):
    info = target_info(llama)
    with pytest.raises(ValueError, match="hybrid mode 'both'"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"mode": "both"}), info)
    with pytest.raises(ValueError, match="min_match"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"min_match": 6}), info)
    with pytest.raises(ValueError, match="head_gate applies to mode 'tree'"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"head_gate": "on"}), info)
    with pytest.raises(ValueError, match="head_gate_credit must be > 0, got 0.0"):
        build_drafter(DrafterSpec("hybrid", draft_folder,
                                  {"mode": "tree", "head_gate": "on", "head_gate_credit": "0"}),
                      info)
    with pytest.raises(ValueError, match="head_gate must be on or off.*'maybe'"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"mode": "tree", "head_gate": "maybe"}),
                      info)
    with pytest.raises(ValueError, match="needs --drafter PATH"):
        build_drafter(DrafterSpec("hybrid", None, {}), info)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"head_method": "nope"}), info)
    with pytest.raises(ValueError, match="lookup must be 'ngram' or 'suffix'"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"lookup": "trie"}), info)
    with pytest.raises(ValueError, match="suffix: unknown options"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"lookup": "suffix", "lookup_x": 1}),
                      info)
    with pytest.raises(ValueError, match="skip_head_tokens applies to mode 'tree'"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"skip_head_tokens": 2}), info)
    with pytest.raises(ValueError, match="skip_head_tokens must be >= 0"):
        build_drafter(DrafterSpec("hybrid", draft_folder, {"mode": "tree",
                                                           "skip_head_tokens": -1}), info)
    assert isinstance(build_drafter(DrafterSpec("hybrid", draft_folder, {}), info), HybridDrafter)
