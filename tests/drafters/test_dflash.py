"""DFlash: z-lab checkpoints load, greedy output equals the target's, sampling is lossless, the
context cache matches a from-scratch recomputation, and stops inside a block are honoured."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from diffusion_fixtures import (assert_lossless_on_markov_target, copy_dflash,  # noqa: E402
                                generate, mixed_prompts, random_dflash, repeat_target,
                                rewrite_checkpoint)

from specplug.checkpoint_io import CheckpointError  # noqa: E402
from specplug.drafters.base import Drafter, DrafterSpec, build_drafter  # noqa: E402
from specplug.engine.rows import Request  # noqa: E402
from specplug.models.loading import target_info  # noqa: E402
from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(0)


def _dflash(path, model, tok, **options):
    return build_drafter(DrafterSpec("dflash", path, options), target_info(model, tok))


@pytest.mark.parametrize("nested", [True, False], ids=["dflash_config", "top_level"])
def test_greedy_identical_to_target(tmp_path, target, tok, nested):
    path = random_dflash(str(tmp_path / "d"), target, target_layer_ids=(0, 1), nested=nested)
    drafter = _dflash(path, target, tok)
    assert drafter.needs.hidden_layers == (1, 2)  # z-lab reads hidden_states[id + 1]
    reqs = mixed_prompts(20)
    base, _ = generate(target, tok, None, reqs)
    for batch in (1, 4):
        out, stats = generate(target, tok, drafter, reqs, batch_size=batch, gamma=7)
        assert [o.output_token_ids for o in out] == [b.output_token_ids for b in base]
        assert stats.num_draft_tokens > 0


class _Recorder(Drafter):
    def __init__(self, inner):
        self.inner, self.needs, self.log = inner, inner.needs, []

    def propose(self, inp):
        prop = self.inner.propose(inp)
        self.log.append(([t.clone() for t in inp.token_ids], prop.tokens.clone()))
        return prop

    def release(self, row_ids):
        self.inner.release(row_ids)


def test_cached_context_matches_full_recompute(tmp_path, target, tok):
    """Every draft the engine got equals one computed from scratch: the target's hidden states
    hidden_states[id + 1] over all committed tokens but the last, then one block pass."""
    path = random_dflash(str(tmp_path / "d"), target, target_layer_ids=(0, 1), block_size=5, scale=3.0)
    drafter = _dflash(path, target, tok)
    rec = _Recorder(drafter)
    generate(target, tok, rec, mixed_prompts(6, seed=3, max_new_tokens=16), batch_size=3, gamma=4)
    head, cfg = drafter.head, drafter.cfg
    checked = 0
    for contexts, drafts in rec.log[::3]:
        for r, ctx in enumerate(contexts):
            with torch.no_grad():
                hs = target(input_ids=ctx[None, :-1], output_hidden_states=True).hidden_states
            feats = torch.cat([hs[i + 1] for i in cfg.target_layer_ids], dim=-1)
            n = ctx.shape[0] - 1
            kv = head.context_kv(feats, torch.arange(n)[None])
            ids = torch.tensor([[int(ctx[-1])] + [cfg.mask_token_id] * 4])
            hidden = head.block(target.model.embed_tokens(ids), n + torch.arange(5)[None], kv,
                                torch.ones(1, n, dtype=torch.bool))
            expect = target.lm_head(hidden[:, 1:]).argmax(-1)[0]
            assert drafts[r].tolist() == expect.tolist()
            checked += 1
    assert checked >= 6


def test_row_handed_no_features_drafts_from_its_cache(tmp_path, target, tok):
    """A row with no new features this call (hidden_states entry None, as the embedded engine
    hands a row with none pending) keeps the context entries it has and drafts as before."""
    from specplug.types import DraftInput
    path = random_dflash(str(tmp_path / "d"), target, target_layer_ids=(0, 1), block_size=5)
    drafter = _dflash(path, target, tok)
    ctx = torch.tensor([5, 9, 17, 3, 40, 8])
    with torch.no_grad():
        hs = target(input_ids=ctx[None, :-1], output_hidden_states=True).hidden_states
    feats = torch.cat([hs[i + 1] for i in drafter.cfg.target_layer_ids], dim=-1)[0]
    first = drafter.propose(DraftInput([7], [ctx], 4, hidden_states=[feats], hidden_start=[0]))
    again = drafter.propose(DraftInput([7], [ctx], 4, num_new_committed=[0],
                                       hidden_states=[None], hidden_start=[0]))
    assert again.tokens.tolist() == first.tokens.tolist()


def test_copy_head_reaches_gamma_plus_one(tmp_path, tok):
    """A head built to reproduce repeat_target drafts every block right: tau = block size."""
    model = repeat_target()
    drafter = _dflash(copy_dflash(str(tmp_path / "c"), model, block_size=8), model, tok)
    reqs = mixed_prompts(20, max_new_tokens=1 + 8 * 4)
    base, _ = generate(model, tok, None, reqs)
    for batch in (1, 4):
        out, stats = generate(model, tok, drafter, reqs, batch_size=batch, gamma=7)
        assert [o.output_token_ids for o in out] == [b.output_token_ids for b in base]
        assert stats.mean_accept_length == 8.0


def test_stop_inside_an_accepted_block(tmp_path, tok):
    """The whole block is accepted but a stop string completes at its second token: the row
    ends there, exactly as the target alone ends."""
    model = repeat_target()
    drafter = _dflash(copy_dflash(str(tmp_path / "c"), model), model, tok)
    prompt = tok.encode("the cat sat on the")  # ends in "e": the target repeats it
    reqs = [Request(prompt, max_new_tokens=30, stop=("eee",))]
    base, _ = generate(model, tok, None, reqs)
    out, _ = generate(model, tok, drafter, reqs, gamma=7)
    assert out[0].output_token_ids == base[0].output_token_ids == tok.encode("eee")
    assert out[0].finish_reason == "stop" and out[0].accept_lengths == [2]


def test_eos_inside_a_block_matches_target(tmp_path, target, tok):
    path = random_dflash(str(tmp_path / "d"), target)
    reqs = mixed_prompts(8, seed=5, max_new_tokens=20)
    plain, _ = generate(target, tok, None, reqs)
    eos = plain[0].output_token_ids[6]
    model = build_tiny_llama(0)
    model.generation_config.eos_token_id = eos
    drafter = _dflash(path, model, tok)
    base, _ = generate(model, tok, None, reqs)
    out, _ = generate(model, tok, drafter, reqs, batch_size=4, gamma=7)
    assert [o.output_token_ids for o in out] == [b.output_token_ids for b in base]
    assert base[0].finish_reason == "eos" and base[0].output_token_ids[-1] == eos


def test_sampled_output_is_lossless(tmp_path, tok):
    model = repeat_target()
    drafter = _dflash(copy_dflash(str(tmp_path / "c"), model), model, tok)
    assert_lossless_on_markov_target(model, drafter)


# -- loading errors ---------------------------------------------------------------------------------
_rewrite = rewrite_checkpoint


@pytest.mark.parametrize("case, edit_state, edit_config, message", [
    ("missing", lambda s: s.pop("layers.0.mlp.up_proj.weight"), None,
     "missing key layers.0.mlp.up_proj.weight"),
    ("unexpected", lambda s: s.update({"layers.0.extra.weight": torch.zeros(2)}), None,
     "unexpected key layers.0.extra.weight"),
    ("shape", lambda s: s.update({"fc.weight": torch.zeros(64, 64, dtype=torch.float64)}), None,
     "key fc.weight has shape (64, 64), expected (64, 128)"),
    ("arch", None, lambda c: c.update({"architectures": ["LlamaForCausalLM"]}),
     "architecture 'LlamaForCausalLM' is not DFlash"),
    ("no_layers", None, lambda c: c["dflash_config"].pop("target_layer_ids"),
     "needs target_layer_ids"),
    ("bad_layer", None, lambda c: c["dflash_config"].update({"target_layer_ids": [0, 9]}),
     "target_layer_ids [9]"),
    ("bad_mask", None, lambda c: c["dflash_config"].update({"mask_token_id": 999}),
     "mask_token_id 999 is outside"),
])
def test_loading_errors_name_file_and_key(tmp_path, target, tok, case, edit_state, edit_config, message):
    good = random_dflash(str(tmp_path / "good"), target)
    bad = _rewrite(good, str(tmp_path / case), edit_state, edit_config)
    with pytest.raises(CheckpointError) as err:
        _dflash(bad, target, tok)
    assert message in str(err.value)
    assert os.path.join(bad, "model.safetensors") in str(err.value) or \
        os.path.join(bad, "config.json") in str(err.value)


def test_embedding_keys_in_checkpoint_are_dropped(tmp_path, target, tok):
    good = random_dflash(str(tmp_path / "good"), target)
    extra = _rewrite(good, str(tmp_path / "emb"),
                     lambda s: s.update({"embed_tokens.weight": torch.zeros(256, 64)}))
    assert _dflash(extra, target, tok).needs.hidden_layers == (1, 2)
