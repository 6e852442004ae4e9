"""Property tests: invariants of verification for any logits and any draft tree."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specplug.sampling import probs_from_logits
from specplug.types import PAD, DraftProposal, SamplingParams
from specplug.verify import verify, verify_sampled_tree

VOCAB = 5


@st.composite
def trees(draw, max_nodes=6, batch=2):
    rows_tokens, rows_parents = [], []
    n = draw(st.integers(0, max_nodes))
    for _ in range(batch):
        toks, pars = [], []
        real = draw(st.integers(0, n))
        for j in range(n):
            if j < real:
                toks.append(draw(st.integers(0, VOCAB - 1)))
                pars.append(draw(st.integers(-1, j - 1)))
            else:
                toks.append(PAD)
                pars.append(-1)
        rows_tokens.append(toks)
        rows_parents.append(pars)
    tokens = torch.tensor(rows_tokens, dtype=torch.long).reshape(batch, n)
    parents = torch.tensor(rows_parents, dtype=torch.long).reshape(batch, n)
    seed = draw(st.integers(0, 2**31 - 1))
    logits = torch.randn(batch, n + 1, VOCAB, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64) * 3
    return DraftProposal(tokens, parents), logits


def _path_is_connected(prop, res, r):
    node = -1
    for j in res.accepted_nodes[r, :int(res.num_accepted[r])].tolist():
        assert int(prop.parents[r, j]) == node and int(prop.tokens[r, j]) != PAD
        node = j
    return node


@settings(max_examples=150, deadline=None)
@given(trees())
def test_greedy_output_is_target_argmax_along_accepted_path(case):
    prop, logits = case
    res = verify(logits, prop, SamplingParams())
    for r in range(prop.tokens.shape[0]):
        node = -1
        out = res.row_tokens(r)
        assert len(out) == int(res.num_accepted[r]) + 1
        for tok in out:
            assert tok == int(logits[r, node + 1].argmax())  # every output is the target's choice
            kids = [j for j in range(prop.tokens.shape[1])
                    if int(prop.tokens[r, j]) == tok and int(prop.parents[r, j]) == node]
            if not kids:
                break
            node = kids[0]
        _path_is_connected(prop, res, r)


@settings(max_examples=150, deadline=None)
@given(trees(), st.floats(0.3, 2.0), st.integers(0, 2**31 - 1))
def test_sampled_output_stays_on_tree_and_in_support(case, temperature, seed):
    prop, logits = case
    params = SamplingParams(temperature=temperature, top_k=3)
    probs = probs_from_logits(logits, params)
    res = verify_sampled_tree(probs, prop, [torch.Generator().manual_seed(seed)] * prop.tokens.shape[0])
    for r in range(prop.tokens.shape[0]):
        last = _path_is_connected(prop, res, r)
        final = int(res.tokens[r, int(res.num_accepted[r])])
        assert probs[r, last + 1, final] > 0  # the recovered/bonus token is in the target's support
        assert (res.tokens[r, int(res.num_accepted[r]) + 1:] == PAD).all()


@settings(max_examples=60, deadline=None)
@given(trees(), st.integers(0, 1000))
def test_seeded_sampling_is_deterministic(case, seed):
    prop, logits = case
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0))
    a = verify_sampled_tree(probs, prop, [torch.Generator().manual_seed(seed)] * 2)
    b = verify_sampled_tree(probs, prop, [torch.Generator().manual_seed(seed)] * 2)
    assert torch.equal(a.tokens, b.tokens)
