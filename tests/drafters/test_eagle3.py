"""EAGLE-3 heads (SafeAILab, SpecForge export and training folder, speculators naming) in the
embedded engine: greedy identity, lossless sampling, reproducing head, aux-layer conventions,
heterogeneous heads and loading errors."""
import pytest
import torch

from eagle_fixtures import (attention_only_target, bos_prompts, chi_square_p, eagle3_state, run,
                            save_head, second_token_marginal)
from specplug.checkpoint_io import CheckpointError
from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.eagle3 import aux_hidden_indices, load_eagle3, read_eagle3_checkpoint
from specplug.models.loading import target_info
from specplug.models.tiny import build_tiny_llama
from specplug.types import PAD, SamplingParams

GAMMA = 4
AUX = [0, 1, 1]  # the 1-layer target: embeddings, and the final hidden twice


@pytest.fixture(scope="module")
def target():
    return attention_only_target(0)


@pytest.fixture(scope="module")
def prompts():
    return bos_prompts(20, seed=1)


@pytest.fixture(scope="module")
def plain(target, prompts):
    return run(target, None, prompts, batch_size=1)[0]


def _speculators_names(state, cfg):
    state = {k.replace("midlayer.", "layers.0."): v for k, v in state.items()}
    return state, {**cfg, "architectures": ["Eagle3LlamaForCausalLM"]}


# layout -> (draft vocab, aux id config key, file layout, rename)
LAYOUTS = {
    "safeailab": (None, "eagle_aux_hidden_state_layer_ids", "safetensors", None),
    "specforge-export": (180, "eagle_aux_hidden_state_layer_ids", "bin", None),
    "specforge-train": (200, "eagle_aux_hidden_state_layer_ids", "specforge_train", None),
    "speculators-names": (220, "eagle_aux_hidden_state_layer_ids", "sharded", _speculators_names),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tree", [None, {"tree_topk": 3, "tree_nodes": 12}])
def test_greedy_identical_to_target(tmp_path, target, prompts, plain, layout, tree):
    vocab, key, files, rename = LAYOUTS[layout]
    state, cfg = eagle3_state(target, AUX, noise=0.05, draft_vocab=vocab, id_key=key)
    if rename:
        state, cfg = rename(state, cfg)
    folder = save_head(str(tmp_path / layout), state, cfg, files)
    taus = []
    for batch in (1, 4):
        drafter = build_drafter(DrafterSpec("eagle3", folder, tree or {}), target_info(target))
        outs, stats = run(target, drafter, prompts, batch, GAMMA)
        assert outs == plain
        taus.append(stats.mean_accept_length)
    assert taus[0] == pytest.approx(taus[1])
    assert 0 < stats.acceptance_rate < 1.0


def test_default_aux_layers_on_a_deeper_target(tmp_path):
    target = build_tiny_llama(4, layers=5)  # default HF indices [2, 2, 2]
    state, cfg = eagle3_state(target, None, noise=0.0, draft_vocab=150)
    folder = save_head(str(tmp_path / "d"), state, cfg)
    drafter = load_eagle3(folder, target_info(target))
    assert drafter.needs.hidden_layers == (2, 2, 2)
    prompts = bos_prompts(8, seed=6)
    plain = run(target, None, prompts, 1)[0]
    for batch in (1, 4):
        assert run(target, load_eagle3(folder, target_info(target)), prompts, batch, GAMMA)[0] == plain


def test_aux_index_conventions():
    assert aux_hidden_indices({}, 32) == (2, 16, 29)
    # speculators / vLLM: index = id
    assert aux_hidden_indices({"eagle_aux_hidden_state_layer_ids": [1, 15, 28]}, 32) == (1, 15, 28)
    # SpecForge / SGLang: id is the layer whose OUTPUT is used: index = id + 1
    nested = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 15, 28]}}
    assert aux_hidden_indices(nested, 32) == (2, 16, 29)
    assert aux_hidden_indices(nested, 32, {"aux_hidden_indices": [3, 4, 5]}) == (3, 4, 5)
    with pytest.raises(CheckpointError, match="outside"):
        aux_hidden_indices({}, 2)


def test_nested_aux_ids_load_with_the_offset(tmp_path, target):
    state, cfg = eagle3_state(target, [-1, 0, 0], noise=0.0, id_key="eagle_config")
    folder = save_head(str(tmp_path / "n"), state, cfg)
    assert load_eagle3(folder, target_info(target)).needs.hidden_layers == (0, 1, 1)


def test_head_built_to_reproduce_target_reaches_gamma_plus_one(tmp_path, target, prompts, plain):
    folder = save_head(str(tmp_path / "exact"), *eagle3_state(target, AUX, noise=0.0))
    outs, stats = run(target, load_eagle3(folder, target_info(target)), prompts, 4, GAMMA, max_new=41)
    assert [o[:20] for o in outs] == plain
    assert stats.acceptance_rate == 1.0
    assert stats.mean_accept_length == pytest.approx(GAMMA + 1)


def test_heterogeneous_head(tmp_path, target, prompts, plain):
    """Own width 32 over a 64-wide target: fc [32, 3 * 64], its own embedding, reduced vocab."""
    g = torch.Generator().manual_seed(9)
    h, h_t, vocab, dv = 32, 64, 256, 120
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.2  # noqa: E731
    ids = torch.randperm(vocab, generator=g)[:dv].sort().values
    state = {"fc.weight": rnd(h, 3 * h_t), "norm.weight": torch.ones(h, dtype=torch.float64),
             "lm_head.weight": rnd(dv, h), "embed_tokens.weight": rnd(vocab, h),
             "d2t": ids - torch.arange(dv),
             "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill(0, ids, True),
             "midlayer.self_attn.q_proj.weight": rnd(32, 2 * h),
             "midlayer.self_attn.k_proj.weight": rnd(16, 2 * h),
             "midlayer.self_attn.v_proj.weight": rnd(16, 2 * h),
             "midlayer.self_attn.o_proj.weight": rnd(h, 32),
             "midlayer.mlp.gate_proj.weight": rnd(64, h), "midlayer.mlp.up_proj.weight": rnd(64, h),
             "midlayer.mlp.down_proj.weight": rnd(h, 64)}
    for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        state[f"midlayer.{n}.weight"] = torch.ones(h, dtype=torch.float64)
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": h, "intermediate_size": 64,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "num_hidden_layers": 1,
           "rms_norm_eps": 1e-6, "vocab_size": vocab, "draft_vocab_size": dv,
           "target_hidden_size": h_t, "max_position_embeddings": 512,
           "eagle_aux_hidden_state_layer_ids": AUX}
    folder = save_head(str(tmp_path / "het"), state, cfg)
    for batch in (1, 4):
        assert run(target, load_eagle3(folder, target_info(target)), prompts, batch, GAMMA)[0] == plain


@pytest.mark.parametrize("tree", [None, {"tree_topk": 2, "tree_nodes": 6}, {"min_confidence": 0.4}])
def test_sampling_is_lossless(tmp_path, target, tree):
    folder = save_head(str(tmp_path / "s"), *eagle3_state(target, AUX, noise=0.02, draft_vocab=200))
    prompt = bos_prompts(1, seed=12)[0]
    drafter = build_drafter(DrafterSpec("eagle3", folder, tree or {}), target_info(target))
    n = 3000
    outs, stats = run(target, drafter, [prompt] * n, batch_size=100, gamma=3, max_new=3,
                      sampling=SamplingParams(temperature=1.0), seeds=list(range(n)))
    assert 0.0 < stats.acceptance_rate < 1.0
    assert chi_square_p([o[1] for o in outs], second_token_marginal(target, prompt)) > 0.01


def test_min_confidence_drafts_less_and_stays_identical(tmp_path, target, prompts, plain):
    folder = save_head(str(tmp_path / "c"), *eagle3_state(target, AUX, noise=0.05, draft_vocab=200))
    drafted = {}
    for threshold in (0.0, 0.9):
        for batch in (1, 4):
            drafter = build_drafter(DrafterSpec("eagle3", folder, {"min_confidence": threshold}),
                                    target_info(target))
            outs, stats = run(target, drafter, prompts, batch, GAMMA)
            assert outs == plain
            drafted[threshold] = stats.num_draft_tokens / max(1, stats.num_drafts)
    # the first draft is always kept; unsure rows stop early (near the length limit the engine
    # asks for fewer than GAMMA, hence no exact GAMMA on the left)
    assert 1 <= drafted[0.9] < drafted[0.0], drafted


def test_min_confidence_with_a_tree_is_refused(tmp_path, target):
    folder = save_head(str(tmp_path / "t"), *eagle3_state(target, AUX, noise=0.05, draft_vocab=200))
    with pytest.raises(ValueError, match="min_confidence"):
        build_drafter(DrafterSpec("eagle3", folder, {"min_confidence": 0.5, "tree_topk": 2}),
                      target_info(target))


# -- loading errors ---------------------------------------------------------------------------
def _expect_error(folder, target, *fragments):
    with pytest.raises(CheckpointError) as err:
        load_eagle3(folder, target_info(target))
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_reduced_vocab_without_d2t_is_refused(tmp_path, target):
    state, cfg = eagle3_state(target, AUX, draft_vocab=200)
    del state["d2t"], state["t2d"]
    folder = save_head(str(tmp_path / "v"), state, cfg)
    _expect_error(folder, target, "model.safetensors", "no d2t", "200", "256")


def test_full_vocab_without_d2t_loads(tmp_path, target):
    state, cfg = eagle3_state(target, AUX)
    del state["d2t"], state["t2d"]
    folder = save_head(str(tmp_path / "f"), state, cfg)
    assert load_eagle3(folder, target_info(target)).head.vocab_map is None


def test_missing_unexpected_and_wrong_shape_keys(tmp_path, target):
    state, cfg = eagle3_state(target, AUX)
    missing = dict(state)
    del missing["midlayer.hidden_norm.weight"]
    _expect_error(save_head(str(tmp_path / "m"), missing, cfg), target,
                  "model.safetensors", "missing key midlayer.hidden_norm.weight")
    extra = {**state, "midlayer.self_attn.rope.scale": torch.ones(1)}
    _expect_error(save_head(str(tmp_path / "x"), extra, cfg, "bin"), target,
                  "pytorch_model.bin", "unexpected key midlayer.self_attn.rope.scale")
    wrong = {**state, "fc.weight": torch.zeros(64, 128, dtype=torch.float64)}
    _expect_error(save_head(str(tmp_path / "w"), wrong, cfg), target,
                  "fc.weight", "(64, 128)", "(64, 192)")


def test_unknown_architecture_is_named(tmp_path, target):
    state, cfg = eagle3_state(target, AUX)
    folder = save_head(str(tmp_path / "a"), state, {**cfg, "architectures": ["LlamaForCausalLM"]})
    _expect_error(folder, target, "config.json", "unknown EAGLE-3 architecture", "LlamaForCausalLM")


def test_training_folder_reads_prefix_and_mapping_beside(tmp_path, target):
    state, cfg = eagle3_state(target, AUX, draft_vocab=200)
    folder = save_head(str(tmp_path / "t"), state, cfg, "specforge_train")
    got, _ = read_eagle3_checkpoint(folder, target_info(target))
    assert sorted(got) == sorted(state)
    assert torch.equal(got["d2t"], state["d2t"])


def _recording(drafter):
    """drafter whose proposals ([batch, nodes] tokens and scores per call) are kept."""
    calls = []
    propose = drafter.propose

    def wrapped(inp):
        out = propose(inp)
        calls.append((out.tokens.clone(), out.scores.clone()))
        return out
    drafter.propose = wrapped
    return calls


def test_chain_scores_are_the_heads_path_probabilities(tmp_path, target, prompts, plain):
    # two code paths that must agree: the chain's running product of softmax maxima, and a
    # top-1 tree's cumulative log-probabilities (expand_tree); plus the budget's invariants
    folder = save_head(str(tmp_path / "s"), *eagle3_state(target, AUX, noise=0.3, draft_vocab=200))
    records = []
    for opts in ({}, {"tree_topk": 1, "tree_nodes": GAMMA}):
        drafter = build_drafter(DrafterSpec("eagle3", folder, opts), target_info(target))
        assert drafter.scores_nodes
        calls = _recording(drafter)
        outs, _ = run(target, drafter, prompts, 4, GAMMA)
        assert outs == plain
        records.append(calls)
    chain, tree = records
    assert len(chain) == len(tree)
    spread = []
    for (tok_c, sc_c), (tok_t, sc_t) in zip(chain, tree):
        assert torch.equal(tok_c, tok_t)
        assert torch.allclose(sc_c, sc_t, rtol=1e-4, atol=1e-6)
        real = tok_c != PAD
        assert bool((sc_c[~real] == 0).all()) and bool((sc_c[real] > 0).all())
        assert bool((sc_c[:, 1:] <= sc_c[:, :-1] + 1e-7).all())  # a path only loses mass
        spread += sc_c[real].tolist()
    assert min(spread) < 0.9 < max(spread)  # a noisy head: confident and unsure drafts
