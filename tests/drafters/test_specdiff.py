"""SpecDiff: Dream-layout checkpoints (and LoRA adapters) load, greedy output equals the
target's for every unmasking order, cache mode and candidate count, sampling is lossless, the
target's own weights drafting causally reach tau = gamma + 1, and another tokenizer works."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_fixtures import (assert_lossless_on_markov_target, constant_dream,  # noqa: E402
                                dream_from_llama, generate, mixed_prompts, random_dream,
                                repeat_target, rewrite_checkpoint, write_checkpoint,
                                write_lora_adapter)

from specplug.checkpoint_io import CheckpointError, load_state_dict, read_config  # noqa: E402
from specplug.drafters.base import DrafterSpec, build_drafter  # noqa: E402
from specplug.drafters.diffusion_model import load_diffusion_lm  # noqa: E402
from specplug.models.loading import target_info  # noqa: E402
from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from specplug.types import DraftInput  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(0)


@pytest.fixture(scope="module")
def bidirectional_self(tmp_path_factory, target):
    """The target's weights run bidirectionally: a plausible but imperfect diffusion drafter."""
    return dream_from_llama(str(tmp_path_factory.mktemp("bi")), target, is_causal=False)


def _specdiff(path, model, tok, **options):
    return build_drafter(DrafterSpec("specdiff", path, options), target_info(model, tok))


@pytest.mark.parametrize("options", [
    {"unmask_order": "entropy"},
    {"unmask_order": "origin", "approx_kv_cache": True, "denoise_steps": 3},
    {"unmask_order": "p2", "num_candidates": 3, "denoise_steps": 2},
    {"unmask_order": "left_to_right", "approx_kv_cache": "true", "num_candidates": 2},
], ids=["entropy", "origin-approx", "p2-tree", "l2r-approx-tree"])
def test_greedy_identical_to_target(target, tok, bidirectional_self, options):
    drafter = _specdiff(bidirectional_self, target, tok, **options)
    reqs = mixed_prompts(20, max_new_tokens=20)
    base, _ = generate(target, tok, None, reqs)
    for batch in (1, 4):
        out, stats = generate(target, tok, drafter, reqs, batch_size=batch, gamma=4)
        assert [o.output_token_ids for o in out] == [b.output_token_ids for b in base]
        assert stats.num_accepted_tokens > 0


@pytest.mark.parametrize("approx", [False, True])
def test_causal_self_drafter_reaches_gamma_plus_one(tmp_path, target, tok, approx):
    """is_causal + shifted logits + left_to_right with one token per step is the target's own
    greedy decoding, so every draft is accepted.  The context cache is exact when causal."""
    path = dream_from_llama(str(tmp_path / "self"), target, is_causal=True)
    drafter = _specdiff(path, target, None, unmask_order="left_to_right", denoise_steps=5,
                        approx_kv_cache=approx)
    reqs = mixed_prompts(20, max_new_tokens=1 + 6 * 3)
    base, _ = generate(target, None, None, reqs)  # no tokenizer, no EOS: every step is whole
    for batch in (1, 4):
        out, stats = generate(target, None, drafter, reqs, batch_size=batch, gamma=5)
        assert [o.output_token_ids for o in out] == [b.output_token_ids for b in base]
        assert stats.mean_accept_length == 6.0


def test_candidate_tree_beats_single_chain(target, tok, bidirectional_self):
    reqs = mixed_prompts(20, max_new_tokens=20)
    taus = {}
    for c in (1, 3):
        drafter = _specdiff(bidirectional_self, target, tok, num_candidates=c)
        _, stats = generate(target, tok, drafter, reqs, batch_size=4, gamma=4)
        taus[c] = stats.mean_accept_length
    assert taus[3] > taus[1]


def test_lora_adapter_is_merged(tmp_path, target, tok):
    """Base = target weights minus a low-rank delta; the adapter adds it back, so the merged
    causal drafter reproduces the target exactly."""
    base = dream_from_llama(str(tmp_path / "base"), target, is_causal=True)
    state = load_state_dict(base)
    g = torch.Generator().manual_seed(0)
    r, alpha, deltas = 4, 8.0, {}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        w = state[module + ".weight"]
        a = torch.randn(r, w.shape[1], generator=g, dtype=torch.float64)
        b = torch.randn(w.shape[0], r, generator=g, dtype=torch.float64) * 0.1
        state[module + ".weight"] = w - (alpha / r) * b @ a
        deltas[module] = (a, b)
    write_checkpoint(base, read_config(base), state)
    adapter = write_lora_adapter(str(tmp_path / "lora"), base, deltas, r, alpha)
    merged, _ = load_diffusion_lm(adapter, torch.float64)
    torch.testing.assert_close(merged.layers[0].self_attn.q_proj.weight,
                               target.model.layers[0].self_attn.q_proj.weight)
    unmerged, _ = load_diffusion_lm(base, torch.float64)
    assert not torch.allclose(unmerged.lm_head.weight[:256], target.lm_head.weight)
    drafter = _specdiff(adapter, target, None, unmask_order="left_to_right", denoise_steps=4)
    reqs = mixed_prompts(8, max_new_tokens=1 + 5 * 3)
    base_out, _ = generate(target, None, None, reqs)
    out, stats = generate(target, None, drafter, reqs, batch_size=4, gamma=4)
    assert [o.output_token_ids for o in out] == [b.output_token_ids for b in base_out]
    assert stats.mean_accept_length == 5.0


def test_other_tokenizer_end_to_end(tmp_path, tok):
    """A diffusion LM with its own 300-entry BPE drafts 'e' repeatedly; the bridge turns the text
    into target ids, and the repeat target (which continues 'e' forever) accepts them."""
    draft_tok = build_tiny_tokenizer(300)
    assert draft_tok.get_vocab() != tok.get_vocab()
    e_id = draft_tok.convert_tokens_to_ids("e")
    path = constant_dream(str(tmp_path / "c"), 299, e_id)  # + mask row = 300 ids
    draft_tok.save_pretrained(path)
    model = repeat_target()
    drafter = _specdiff(path, model, tok, denoise_steps=2)
    assert drafter.bridge is not None
    prompt = tok.encode("the cat sat on the")
    inp = DraftInput(row_ids=[0], token_ids=[torch.tensor(prompt)], num_draft_tokens=5)
    # 5 draft 'e's -> 5 target 'e's, the last dropped as it may be cut mid-word
    assert drafter.propose(inp).tokens[0].tolist() == tok.encode("eeee")
    reqs = mixed_prompts(20, max_new_tokens=16, last_token=tok.encode("e")[0])
    base, _ = generate(model, tok, None, reqs)
    for batch in (1, 4):
        out, stats = generate(model, tok, drafter, reqs, batch_size=batch, gamma=5)
        assert [o.output_token_ids for o in out] == [b.output_token_ids for b in base]
        assert stats.mean_accept_length > 4.0


@pytest.mark.parametrize("options", [
    {"unmask_order": "left_to_right"},
    {"unmask_order": "p2", "num_candidates": 2, "denoise_steps": 2, "approx_kv_cache": True},
], ids=["chain", "p2-tree"])
def test_sampled_output_is_lossless(tmp_path, options):
    model = repeat_target()
    path = dream_from_llama(str(tmp_path / "self"), model, is_causal=options["unmask_order"] != "p2")
    drafter = _specdiff(path, model, None, **options)
    assert_lossless_on_markov_target(model, drafter)


# -- loading errors ---------------------------------------------------------------------------------
_rewrite = rewrite_checkpoint


@pytest.mark.parametrize("case, edit_state, edit_config, message", [
    ("missing", lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"), None,
     "missing key model.layers.1.self_attn.k_proj.bias"),
    ("unexpected", lambda s: s.update({"model.rotary.inv_freq": torch.zeros(8)}), None,
     "unexpected key model.rotary.inv_freq"),
    ("shape", lambda s: s.update({"lm_head.weight": torch.zeros(100, 64, dtype=torch.float64)}), None,
     "key lm_head.weight has shape (100, 64), expected (257, 64)"),
    ("arch", None, lambda c: c.update({"architectures": ["LLaDAModelLM"]}),
     "architecture 'LLaDAModelLM' is not a diffusion LM"),
    ("no_mask", None, lambda c: c.pop("mask_token_id"), "no mask_token_id"),
])
def test_loading_errors_name_file_and_key(tmp_path, target, tok, case, edit_state, edit_config, message):
    good = random_dream(str(tmp_path / "good"), 256)
    bad = _rewrite(good, str(tmp_path / case), edit_state, edit_config)
    with pytest.raises(CheckpointError) as err:
        _specdiff(bad, target, tok)
    assert message in str(err.value)
    assert os.path.join(bad, "model.safetensors") in str(err.value) or \
        os.path.join(bad, "config.json") in str(err.value)


def test_adapter_errors(tmp_path, target, tok):
    base = random_dream(str(tmp_path / "base"), 256)
    a, b = torch.zeros(2, 64), torch.zeros(64, 2)
    bad = write_lora_adapter(str(tmp_path / "bad"), base, {"model.layers.0.nope": (a, b)}, 2, 2)
    with pytest.raises(CheckpointError, match="targets layers.0.nope, not a linear layer"):
        _specdiff(bad, target, tok)
    lost = write_lora_adapter(str(tmp_path / "lost"), str(tmp_path / "gone"),
                              {"model.layers.0.self_attn.q_proj": (a, b)}, 2, 2)
    with pytest.raises(CheckpointError, match="base model .* not found locally"):
        _specdiff(lost, target, tok)
    # the base can be named explicitly instead
    assert _specdiff(lost, target, tok, base=base).model.vocab == 257


def test_bad_options_are_refused(target, tok, bidirectional_self):
    with pytest.raises(ValueError, match="unmask_order 'random'"):
        _specdiff(bidirectional_self, target, tok, unmask_order="random")
