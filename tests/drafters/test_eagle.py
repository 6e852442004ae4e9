"""EAGLE-1/2 heads (SafeAILab layout) in the embedded engine: greedy identity, lossless sampling,
a head built to reproduce its target, heterogeneous heads, and loading errors."""
import json
import os

import pytest
import torch

from eagle_fixtures import (attention_only_target, bos_prompts, chi_square_p, eagle1_het_state,
                            eagle1_state, run, save_head, second_token_marginal)
from specplug.checkpoint_io import CheckpointError
from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.eagle import load_eagle, read_eagle_checkpoint
from specplug.models.loading import target_info
from specplug.models.tiny import build_tiny_llama
from specplug.types import SamplingParams

GAMMA = 4


@pytest.fixture(scope="module")
def target():
    return attention_only_target(0)


@pytest.fixture(scope="module")
def prompts():
    return bos_prompts(20, seed=0)


@pytest.fixture(scope="module")
def plain(target, prompts):
    return run(target, None, prompts, batch_size=1)[0]


# layout name -> (noise, fc bias, Qwen2 qkv biases, embed_tokens saved, file layout)
LAYOUTS = {
    "llama-safetensors": (0.003, False, False, True, "safetensors"),
    "qwen2-bias-bin": (0.003, True, True, True, "bin"),
    "no-embed-sharded": (0.01, True, False, False, "sharded"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tree", [None, {"tree_topk": 3, "tree_nodes": 12}])
def test_greedy_identical_to_target(tmp_path, target, prompts, plain, layout, tree):
    noise, fc_bias, qkv_bias, with_embed, files = LAYOUTS[layout]
    state, cfg = eagle1_state(target, noise=noise, fc_bias=fc_bias, qkv_bias=qkv_bias,
                              with_embed=with_embed)
    folder = save_head(str(tmp_path / layout), state, cfg, files)
    taus = []
    for batch in (1, 4):
        drafter = build_drafter(DrafterSpec("eagle", folder, tree or {}), target_info(target))
        outs, stats = run(target, drafter, prompts, batch, GAMMA)
        assert outs == plain
        taus.append(stats.mean_accept_length)
    assert taus[0] == pytest.approx(taus[1])  # acceptance does not depend on batching
    assert stats.num_accepted_tokens > 0  # drafts were kept and rejected: rollback exercised
    assert stats.acceptance_rate < 1.0


def test_greedy_identical_on_a_regular_target(tmp_path):
    target = build_tiny_llama(3)  # 2 layers: the head is only a rough guess here
    state, cfg = eagle1_state(target, noise=0.0, fc_bias=True)
    folder = save_head(str(tmp_path / "h"), state, cfg)
    prompts = bos_prompts(8, seed=5)
    plain = run(target, None, prompts, 1)[0]
    for batch in (1, 4):
        drafter = load_eagle(folder, target_info(target))
        assert run(target, drafter, prompts, batch, GAMMA)[0] == plain


def test_head_built_to_reproduce_target_reaches_gamma_plus_one(tmp_path, target, prompts, plain):
    folder = save_head(str(tmp_path / "exact"), *eagle1_state(target, noise=0.0))
    drafter = load_eagle(folder, target_info(target))
    outs, stats = run(target, drafter, prompts, 4, GAMMA, max_new=41)
    assert [o[:20] for o in outs] == plain
    # 40 tokens after the prefill token: 8 full steps of gamma + 1
    assert stats.acceptance_rate == 1.0
    assert stats.mean_accept_length == pytest.approx(GAMMA + 1)


@pytest.mark.parametrize("draft_vocab", [None, 200])
def test_heterogeneous_head(tmp_path, target, prompts, plain, draft_vocab):
    state, cfg = eagle1_het_state(target, hidden=32, draft_vocab=draft_vocab)
    folder = save_head(str(tmp_path / "het"), state, cfg)
    drafter = load_eagle(folder, target_info(target))
    assert drafter.head.l2s is not None and drafter.head.shape.hidden == 32
    for batch in (1, 4):
        assert run(target, load_eagle(folder, target_info(target)), prompts, batch, GAMMA)[0] == plain
    if draft_vocab:  # drafts come only from the reduced vocabulary, in target ids
        drafter = load_eagle(folder, target_info(target))
        allowed = set((torch.arange(draft_vocab) + state["d2t"]).tolist())
        proposal = _one_proposal(target, drafter, prompts[:4])
        real = proposal.tokens[proposal.tokens >= 0].tolist()
        assert real and set(real) <= allowed


def _one_proposal(target, drafter, prompts):
    from specplug.types import DraftInput
    feats, starts = [], []
    with torch.no_grad():
        for p in prompts:
            out = target(torch.tensor([p]), output_hidden_states=True)
            feats.append(out.hidden_states[-1][0, :-1])
            starts.append(0)
    inp = DraftInput(list(range(len(prompts))), [torch.tensor(p) for p in prompts], GAMMA,
                     hidden_states=feats, hidden_start=starts)
    return drafter.propose(inp)


@pytest.mark.parametrize("tree", [None, {"tree_topk": 3, "tree_nodes": 10}])
def test_sampling_is_lossless(tmp_path, target, tree):
    """T = 1: the second output token (the first one a draft can decide) follows the target's
    exact marginal.  The first comes from the prefill; drafts are sampled (chain) or top-k
    point masses (tree)."""
    folder = save_head(str(tmp_path / "s"), *eagle1_state(target, noise=0.0))
    prompt = bos_prompts(1, seed=11)[0]
    drafter = build_drafter(DrafterSpec("eagle", folder, tree or {}), target_info(target))
    n = 3000
    outs, stats = run(target, drafter, [prompt] * n, batch_size=100, gamma=3, max_new=3,
                      sampling=SamplingParams(temperature=1.0), seeds=list(range(n)))
    assert 0.0 < stats.acceptance_rate < 1.0  # both accept and reject paths were taken
    p = chi_square_p([o[1] for o in outs], second_token_marginal(target, prompt))
    assert p > 0.01


# -- loading errors ---------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path, target):
    state, cfg = eagle1_state(target, noise=0.0, fc_bias=True)
    return tmp_path, state, cfg


def _expect_error(folder, target, *fragments):
    with pytest.raises(CheckpointError) as err:
        load_eagle(folder, target_info(target))
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_key_is_named(good, target):
    tmp, state, cfg = good
    del state["layers.0.mlp.up_proj.weight"]
    folder = save_head(str(tmp / "m"), state, cfg)
    _expect_error(folder, target, "model.safetensors", "missing key layers.0.mlp.up_proj.weight")


def test_unexpected_key_is_named(good, target):
    tmp, state, cfg = good
    state["layers.0.input_layernorm.weight"] = torch.ones(64, dtype=torch.float64)
    folder = save_head(str(tmp / "u"), state, cfg, "bin")
    _expect_error(folder, target, "pytorch_model.bin", "unexpected key layers.0.input_layernorm.weight")


def test_wrong_shape_is_named(good, target):
    tmp, state, cfg = good
    state["fc.weight"] = state["fc.weight"].T.contiguous()
    folder = save_head(str(tmp / "w"), state, cfg)
    _expect_error(folder, target, "model.safetensors", "fc.weight", "(128, 64)", "(64, 128)")


def test_unknown_architecture_is_named(good, target):
    tmp, state, cfg = good
    folder = save_head(str(tmp / "a"), state, {**cfg, "architectures": ["GPT2LMHeadModel"]})
    _expect_error(folder, target, "config.json", "GPT2LMHeadModel")


def test_reduced_vocab_without_d2t_is_refused(tmp_path, target):
    state, cfg = eagle1_het_state(target, draft_vocab=100)
    del state["d2t"]
    folder = save_head(str(tmp_path / "v"), state, cfg)
    _expect_error(folder, target, "missing key d2t")


def test_target_hidden_size_mismatch(tmp_path, target):
    state, cfg = eagle1_het_state(target)
    folder = save_head(str(tmp_path / "t"), state, {**cfg, "target_hidden_size": 96})
    _expect_error(folder, target, "target hidden size 96", "64")


def test_reader_gives_normalised_keys(tmp_path, target):
    state, cfg = eagle1_state(target, fc_bias=True)
    folder = save_head(str(tmp_path / "p"), {"draft_model." + k: v for k, v in state.items()}, cfg)
    got, got_cfg = read_eagle_checkpoint(folder, target_info(target))
    assert sorted(got) == sorted(state) and got_cfg["hidden_size"] == 64
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
