"""SpecDiff training on a tiny float64 target: the trained forward and sampler are the drafter's,
loss falls, a stopped-and-resumed run equals an uninterrupted one, stored top-k teacher logits
covering the vocabulary train to the recomputed-teacher weights, the export loads through the
specdiff family and drafts without changing greedy output, and bad input fails in one line."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.specdiff import SpecDiffDrafter
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.loading import load_causal_lm, target_info
from specplug.models.tiny import build_tiny_llama
from tiny_training import random_prompts, record_data, save_tiny_target
from specplug.training.data import load_sequences
from specplug.training.diffusion_train import (Config, block_logits, build_model, diffusion_loss,
                                               dream_config, make_batch_at, sampler_states, train)
from specplug.types import DraftInput

LAYERS = 4


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_target(str(tmp_path_factory.mktemp("target")), LAYERS)


@pytest.fixture(scope="module")
def data_dir(target_dir, tmp_path_factory):
    return record_data(target_dir, str(tmp_path_factory.mktemp("data")), random_prompts(),
                       per_chunk=4)


def _cfg(target_dir, data_dir, out, steps, **kw):
    base = dict(hidden=32, layers=2, heads=2, intermediate=64, gamma=4, max_context=24,
                batch_size=8, lr=1e-2, alpha=0.5, collect_every_n_steps=2, bf16_autocast=False,
                save_every=3, progress=False)
    return Config(target_dir, data_dir, out, steps=steps, **{**base, **kw})


def _fresh(target_dir, cfg):
    target = load_causal_lm(target_dir, torch.float32)
    dcfg = dream_config(cfg, target.config)
    return build_model(dcfg, target.get_input_embeddings().weight.detach(), cfg.seed), target, dcfg


def test_trained_forward_and_sampler_are_the_drafters(target_dir, data_dir, tmp_path):
    cfg = _cfg(target_dir, data_dir, str(tmp_path), 1)
    model, _, dcfg = _fresh(target_dir, cfg)
    assert model.lm_head.weight is model.embed_tokens.weight and dcfg["mask_token_id"] == 256
    contexts = [[5, 6, 7, 8, 9], [3, 4], list(range(10, 30))]
    block = torch.tensor([[256] * 4, [11, 256, 256, 12], [256, 40, 256, 256]])
    drafter = SpecDiffDrafter(model, 256)
    with torch.no_grad():
        want = drafter._block_logits(contexts, [0, 1, 2], block.clone(), 0)[..., :256]
        got = block_logits(model, contexts, block)[..., :256]
    assert torch.allclose(got, want, atol=1e-5)
    causal, _, _ = _fresh(target_dir, _cfg(target_dir, data_dir, str(tmp_path), 1, causal=True))
    with torch.no_grad():
        want = SpecDiffDrafter(causal, 256)._block_logits(contexts, [0, 1, 2], block.clone(), 0)
        assert torch.allclose(block_logits(causal, contexts, block)[..., :256], want[..., :256],
                              atol=1e-5)
    # the sampler's states: all mask first, then ceil(gamma * s / k) filled, ending in the chain
    # the drafter proposes
    blocks, filled = sampler_states(model, contexts, 4, 2, "entropy", 256)
    assert blocks.shape == (2, 3, 4) and not filled[0].any() and (blocks[0] == 256).all()
    assert filled[1].sum(1).tolist() == [2, 2, 2]
    assert torch.equal(blocks[1] != 256, filled[1])
    proposal = SpecDiffDrafter(model, 256, denoise_steps=2).propose(
        DraftInput([0, 1, 2], [torch.tensor(c) for c in contexts], 4))
    assert torch.equal(blocks[1][filled[1]], proposal.tokens[filled[1]])


def test_loss_falls_and_resume_equals_an_uninterrupted_run(target_dir, data_dir, tmp_path):
    cfg = _cfg(target_dir, data_dir, str(tmp_path / "cut"), 24, stop_at=9)
    seqs, _ = load_sequences(data_dir)
    model, target, _ = _fresh(target_dir, cfg)
    lm_head = target.lm_head.weight.detach().float()
    fixed = make_batch_at(seqs, _cfg(target_dir, data_dir, "", 1, batch_size=12,
                                     collect_every_n_steps=0), 256, 64, None)(0)
    with torch.no_grad():
        before = float(diffusion_loss(model, fixed, lm_head, cfg)[0])
    train(cfg)
    log = [json.loads(line) for line in open(tmp_path / "cut" / "loss.jsonl")]
    assert log[-1]["step"] == 9 and {"ce", "kl", "acc", "acc_first"} <= set(log[-1])
    cfg.stop_at = None
    train(cfg)  # resumes at step 9, through steps that run the sampler
    train(_cfg(target_dir, data_dir, str(tmp_path / "whole"), 24))
    a = load_file(str(tmp_path / "cut" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    from specplug.training.trainer import load_checkpoint_model
    assert load_checkpoint_model(model, str(tmp_path / "whole")) == 24
    with torch.no_grad():
        after = float(diffusion_loss(model, fixed, lm_head, cfg)[0])
    assert after < before - 0.3, (before, after)


def test_stored_topk_covering_the_vocab_trains_to_the_same_weights(target_dir, data_dir, tmp_path):
    train(_cfg(target_dir, data_dir, str(tmp_path / "live"), 4))
    train(_cfg(target_dir, data_dir, str(tmp_path / "stored"), 4, teacher_topk=256))
    stored = load_file(str(tmp_path / "stored" / "teacher_top256.safetensors"))
    assert stored["ids"].shape == stored["logits"].shape and stored["ids"].shape[1] == 256
    a = torch.load(tmp_path / "live" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "stored" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    # a smaller top-k is another teacher: the weights move apart
    train(_cfg(target_dir, data_dir, str(tmp_path / "top4"), 4, teacher_topk=4, alpha=1.0))
    c = torch.load(tmp_path / "top4" / "checkpoint.pt", weights_only=False)["model"]
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


def test_export_loads_as_specdiff_and_keeps_greedy_output(target_dir, data_dir, tmp_path):
    out = str(tmp_path / "d")
    train(_cfg(target_dir, data_dir, out, 6))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["DreamModel"] and cfg["vocab_size"] == 257
    assert cfg["specplug_training"]["trained_steps"] == 6
    state = load_file(os.path.join(out, "model.safetensors"))
    assert "lm_head.weight" not in state and state["model.embed_tokens.weight"].dtype == torch.bfloat16
    model = build_tiny_llama(seed=0, layers=LAYERS, sharpness=3.0)
    reqs = [Request(p, 14) for p in ([3, 4, 5, 6], [9, 8, 7, 6, 5], [11, 12, 13])]
    plain, _ = EmbeddedEngine(model).generate(reqs)
    for batch, opts in ((1, {}), (2, {"denoise_steps": "2", "approx_kv_cache": "true"})):
        drafter = build_drafter(DrafterSpec("specdiff", out, opts), target_info(model))
        spec, stats = EmbeddedEngine(model, None, drafter, 4).generate(reqs, batch_size=batch)
        assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain]
        assert stats.num_draft_tokens > 0


def test_bad_input_fails_in_one_line(target_dir, data_dir, tmp_path, capsys):
    from specplug.training.cli import main
    common = ["--target", target_dir, "--data", data_dir, "--steps", "1", "--hidden", "32",
              "--heads", "2", "--layers", "1", "--no-bf16"]
    cases = [(["--alpha", "1.5"], "--alpha 1.5 must be in [0, 1]"),
             (["--hidden", "30", "--heads", "4"], "--hidden 30 must split"),
             (["--teacher-topk", "999"], "--teacher-topk 999 exceeds the vocabulary (256)")]
    for extra, message in cases:
        out = str(tmp_path / "x")
        assert main(["diffusion", *common, "--output", out, *extra]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0]
        assert not os.path.exists(os.path.join(out, "model.safetensors"))
    rc = main(["diffusion", "--target", target_dir, "--data", str(tmp_path / "none"),
               "--output", str(tmp_path / "y")])
    assert rc == 2 and "meta.json missing" in capsys.readouterr().err
    # the CLI trains and exports
    assert main(["diffusion", *common, "--output", str(tmp_path / "ok")]) == 0
    assert os.path.isfile(tmp_path / "ok" / "model.safetensors")
