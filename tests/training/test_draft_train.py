"""Draft-model distillation on a tiny target: the loss falls, an interrupted run resumes to the
same weights as an uninterrupted one, the export loads through the `draft` family and drafts
without changing greedy output, the PCA init keeps the target's output space, and bad input
gives a one-line error."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.loading import target_info
from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_model
from tiny_training import random_prompts, record_data, save_tiny_target, tiny_target
from specplug.training.draft_train import (Config, build_draft, distill_loss, draft_config,
                                           principal_directions, teacher_sequences, train, windows)
from specplug.training.eagle3_train import load_for_target

LAYERS = 4


def _target():
    return tiny_target(LAYERS, sharpness=None)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_target(str(tmp_path_factory.mktemp("target")), LAYERS, sharpness=None)


@pytest.fixture(scope="module")
def data_dir(target_dir, tmp_path_factory):
    return record_data(target_dir, str(tmp_path_factory.mktemp("data")), random_prompts(),
                       per_chunk=6)


def _cfg(target_dir, data_dir, out, steps, **kw):
    settings = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    steps=steps, batch_size=4, seq_len=32, answer_context=8, lr=1e-2,
                    bf16_autocast=False, save_every=4, progress=False)
    settings.update(kw)
    return Config(target_dir, data_dir, out, **settings)


def _eval_loss(target_dir, data_dir, cfg, folder=None):
    """KL(teacher || draft) on 8 fixed windows of a fresh draft, or of folder's checkpoint."""
    from specplug.models.loading import load_causal_lm
    from specplug.training.trainer import load_checkpoint_model
    target = load_causal_lm(target_dir, torch.float32)
    seqs, _ = load_for_target(data_dir, target.config)
    weight = target.lm_head.weight.float()
    model = build_draft(draft_config(target.config, cfg), weight, cfg.embed_init, cfg.seed)
    if folder:
        load_checkpoint_model(model, folder)
    teacher = teacher_sequences(seqs[:8], weight, 32, 64, bf16=False)
    with torch.no_grad():
        loss, metrics = distill_loss(model, windows(teacher, 32, 8), 0.0)
    return float(metrics["kl"])


def test_training_lowers_loss_logs_and_exports(target_dir, data_dir, tmp_path):
    out = str(tmp_path / "draft")
    cfg = _cfg(target_dir, data_dir, out, steps=40)
    before = _eval_loss(target_dir, data_dir, cfg)
    assert train(cfg) == out
    after = _eval_loss(target_dir, data_dir, cfg, out)
    assert after < 0.7 * before
    log = [json.loads(line) for line in open(os.path.join(out, "loss.jsonl"))]
    assert [r["step"] for r in log] == list(range(5, 41, 5))
    assert {"loss", "kl", "acc", "lr"} <= set(log[0])
    assert log[-1]["kl"] < log[0]["kl"]

    state = load_file(os.path.join(out, "model.safetensors"))
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert state["model.embed_tokens.weight"].shape == (256, 32)
    assert "lm_head.weight" not in state  # tied
    cfg_json = json.load(open(os.path.join(out, "config.json")))
    assert cfg_json["architectures"] == ["LlamaForCausalLM"] and cfg_json["tie_word_embeddings"]
    assert cfg_json["vocab_size"] == 256 and cfg_json["specplug_training"]["trained_steps"] == 40
    # the target's tokenizer travels with the draft, byte for byte
    assert open(os.path.join(out, "tokenizer.json")).read() == \
        open(os.path.join(target_dir, "tokenizer.json")).read()

    # loads through specplug's draft family and leaves greedy output unchanged
    model, tok = _target(), build_tiny_tokenizer()
    reqs = [Request(p, 16) for p in ([3, 4, 5, 6], [9, 8, 7, 6, 5], [11, 12, 13])]
    plain, _ = EmbeddedEngine(model, tok).generate(reqs)
    for batch in (1, 3):
        drafter = build_drafter(DrafterSpec("draft", out), target_info(model, tok))
        assert drafter.bridge is None  # same tokenizer: ids map one to one
        spec, stats = EmbeddedEngine(model, tok, drafter, 4).generate(reqs, batch_size=batch)
        assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain]
        assert stats.num_draft_tokens > 0


def test_interrupted_run_resumes_to_the_same_weights(target_dir, data_dir, tmp_path):
    train(_cfg(target_dir, data_dir, str(tmp_path / "cut"), steps=6, stop_at=3))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 3
    train(_cfg(target_dir, data_dir, str(tmp_path / "cut"), steps=6))
    train(_cfg(target_dir, data_dir, str(tmp_path / "whole"), steps=6))
    a = load_file(str(tmp_path / "cut" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # another architecture in the same folder is refused, not silently mixed
    with pytest.raises(ValueError, match="saved with another config"):
        train(_cfg(target_dir, data_dir, str(tmp_path / "cut"), steps=8, hidden_size=16))


def test_pca_init_spans_the_targets_output_space():
    """E_draft = W @ P with P the top principal directions; at full width nothing is lost."""
    w = _target().lm_head.weight.float()
    p = principal_directions(w, 64)
    assert torch.allclose(p.T @ p, torch.eye(64), atol=1e-4)
    assert torch.allclose(w @ p @ p.T, w, atol=1e-3)
    p8 = principal_directions(w, 8)
    kept = (w @ p8).norm() ** 2 / w.norm() ** 2
    rand = torch.linalg.qr(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))[0]
    assert kept > (w @ rand).norm() ** 2 / w.norm() ** 2  # more than any random 8-d projection


def test_loss_matches_a_dense_reference(target_dir, data_dir):
    """With k = vocab the top-k loss is soft CE to softmax(final @ W^T), written densely here;
    ce_weight mixes in CE on the data's next tokens."""
    from specplug.models.loading import load_causal_lm
    target = load_causal_lm(target_dir, torch.float32)
    seqs, _ = load_for_target(data_dir, target.config)
    weight = target.lm_head.weight.float()
    model = build_draft(draft_config(target.config, _cfg("", "", "", 1)), weight, "pca", 0)
    batch = windows(teacher_sequences(seqs[:4], weight, 256, 64, bf16=False), 32, 8)
    with torch.no_grad():
        soft, hard, half = (float(distill_loss(model, batch, w)[0]) for w in (0.0, 1.0, 0.5))
        logp = torch.log_softmax(model(input_ids=batch["tokens"][:, :-1]).logits, -1)
    soft_want = hard_want = 0.0
    weight = weight.detach()
    for r in range(4):
        s = seqs[r]
        start = min(max(0, s.prompt_len - 8), max(0, len(s.tokens) - 32))  # the window's start
        for p in range(int(batch["lengths"][r]) - 1):
            # with k = vocab the teacher is the full softmax of the saved final hidden state
            teacher = torch.softmax(s.hidden[start + p, -64:].float() @ weight.T, -1)
            soft_want -= float((teacher * logp[r, p]).sum())
            hard_want -= float(logp[r, p, batch["tokens"][r, p + 1]])
    count = int((batch["lengths"] - 1).sum())
    assert soft == pytest.approx(soft_want / count, rel=1e-4)
    assert hard == pytest.approx(hard_want / count, rel=1e-4)
    assert half == pytest.approx((soft + hard) / 2, rel=1e-4)


def _run_cli(argv):
    """What `specplug train draft ...` does: its own options on top of --target/--data/--output."""
    import argparse
    from specplug.training import draft_train
    parser = argparse.ArgumentParser()
    for name in ("--target", "--data", "--output"):
        parser.add_argument(name, required=True)
    draft_train.add_arguments(parser)
    args = parser.parse_args(argv)
    return draft_train.train(draft_train.config_from_args(args, args.target))


def _one_line_error(argv, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        _run_cli(argv)
    assert len(str(e.value).splitlines()) == 1


def test_bad_input_gives_one_line_errors(target_dir, data_dir, tmp_path):
    out = str(tmp_path / "x")
    _one_line_error(["--target", target_dir, "--data", str(tmp_path / "nothing"), "--output", out],
                    "meta.json missing")
    # data made for another target (wider hidden state)
    other = save_model(build_tiny_llama(seed=1, layers=LAYERS, hidden=96, heads=4, kv_heads=2),
                       build_tiny_tokenizer(), str(tmp_path / "other"))
    _one_line_error(["--target", other, "--data", data_dir, "--output", out],
                    "made for another target")
    _one_line_error(["--target", target_dir, "--data", data_dir, "--output", out,
                     "--hidden-size", "30", "--num-heads", "4"], "heads must divide evenly")
    _one_line_error(["--target", target_dir, "--data", data_dir, "--output", out,
                     "--ce-weight", "1.5"], "--ce-weight 1.5")
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    # the same options train and export
    assert _run_cli(["--target", target_dir, "--data", data_dir, "--output", out,
                     "--hidden-size", "32", "--num-heads", "2", "--intermediate-size", "64",
                     "--num-layers", "1", "--steps", "2", "--seq-len", "24", "--no-bf16",
                     "--answer-context", "-1"]) == out
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
