"""EAGLE-3 training on a tiny target: data recorded through the engine, a few steps lower the
loss, resume continues from the saved step, the export loads through the eagle3 loader and
drafts token-identically, the frequency vocabulary, the CLI, and rebuilds are deterministic."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.loading import target_info
from specplug.models.tiny import build_tiny_llama
from specplug.training.data import DataConfig, Sequence, generate_data, load_sequences
from tiny_training import LAYERS, random_prompts, record_data, save_tiny_target
from specplug.training.eagle3_train import (Eagle3TrainConfig, build_head, collate, frequency_vocab,
                                            head_config, train_eagle3, unrolled_loss)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_target(str(tmp_path_factory.mktemp("target")))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts()


@pytest.fixture(scope="module")
def data_dir(target_dir, prompts, tmp_path_factory):
    return record_data(target_dir, str(tmp_path_factory.mktemp("data")), prompts, per_chunk=4,
                       max_new_tokens=20)


def test_data_matches_the_target_and_its_features(target_dir, data_dir, prompts):
    seqs, meta = load_sequences(data_dir)
    assert len(meta["chunks"]) == 3 and len(seqs) == 12
    assert meta["hidden_layers"] == [2, 2, 1, 4]
    model = build_tiny_llama(seed=0, layers=LAYERS, sharpness=3.0).float()
    for s, p in zip(seqs, prompts):
        assert s.tokens[:len(p)].tolist() == p and s.prompt_len == len(p)
        assert s.hidden.shape == (len(s.tokens) - 1, 4 * 64)
        # the features are the target's hidden states over the sequence, position by position
        with torch.no_grad():
            hs = model(s.tokens[None], output_hidden_states=True).hidden_states
        want = torch.cat([hs[i][0, :-1] for i in (2, 2, 1, 4)], -1)
        assert torch.allclose(s.hidden, want, atol=1e-4)
        # the answer is the target's greedy continuation
        assert len(s.tokens) - len(p) >= 19


def test_data_resumes_at_the_first_missing_chunk(target_dir, prompts, tmp_path):
    out = str(tmp_path / "d")
    cfg = DataConfig(target_dir, out, prompts_per_chunk=4, batch_size=4, max_new_tokens=6,
                     dtype="float32", prompt_ids=prompts)
    generate_data(cfg, progress=False)
    first = load_file(os.path.join(out, "chunk_00001.safetensors"))
    os.remove(os.path.join(out, "chunk_00001.safetensors"))
    os.remove(os.path.join(out, "chunk_00002.safetensors"))
    meta = json.load(open(os.path.join(out, "meta.json")))
    meta["chunks"] = meta["chunks"][:1]
    json.dump(meta, open(os.path.join(out, "meta.json"), "w"))
    generate_data(cfg, progress=False)
    again = load_file(os.path.join(out, "chunk_00001.safetensors"))
    assert torch.equal(first["tokens"], again["tokens"])
    assert len(json.load(open(os.path.join(out, "meta.json")))["chunks"]) == 3


def test_frequency_vocab_keeps_the_most_frequent_and_eos():
    seqs = [Sequence(torch.tensor([5, 5, 5, 7, 7, 9, 3]), torch.zeros(6, 1), 1)]
    ids = frequency_vocab(seqs, 16, 3, always=(0,))
    assert ids.tolist() == [0, 5, 7]
    with pytest.raises(ValueError, match="--draft-vocab 17"):
        frequency_vocab(seqs, 16, 17)


def _train_cfg(target_dir, data_dir, out, steps, **kw):
    return Eagle3TrainConfig(target_dir, data_dir, out, draft_vocab=96, steps=steps, batch_size=4,
                             seq_len=32, ttt_steps=2, lr=3e-3, bf16_autocast=False, save_every=3,
                             progress=False, **kw)


def _batch_loss(target_dir, data_dir, folder=None):
    """Loss of the head in `folder`'s checkpoint (or a fresh head) on the first 8 sequences."""
    from specplug.models.loading import load_causal_lm
    from specplug.training.trainer import load_checkpoint_model
    seqs, _ = load_sequences(data_dir)
    target = load_causal_lm(target_dir, torch.float32)
    ids = frequency_vocab(seqs, 256, 96, (0,))
    head = build_head(head_config(target.config, 96, [2, 2, 1]), target, ids, 0)
    if folder:
        load_checkpoint_model(head, folder)
    batch = collate(seqs[:8], 32, 3 * 64)
    with torch.no_grad():
        return float(unrolled_loss(head, batch, target.lm_head.weight[ids].float(), 2)[0])


def test_training_lowers_loss_resumes_and_exports(target_dir, data_dir, tmp_path):
    out = str(tmp_path / "head")
    before = _batch_loss(target_dir, data_dir)
    train_eagle3(_train_cfg(target_dir, data_dir, out, steps=3))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 3
    train_eagle3(_train_cfg(target_dir, data_dir, out, steps=12))  # resumes at step 3
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 12
    log = [json.loads(line) for line in open(os.path.join(out, "loss.jsonl"))]
    assert [r["step"] for r in log] == [3, 5, 10, 12]  # logged every 5 and at each run's end
    after = _batch_loss(target_dir, data_dir, out)
    assert after < before - 0.1

    state = load_file(os.path.join(out, "model.safetensors"))
    assert state["lm_head.weight"].dtype == torch.bfloat16 and "embed_tokens.weight" not in state
    assert state["d2t"].shape == (96,) and int(state["t2d"].sum()) == 96
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["specplug_training"]["trained_steps"] == 12
    # the export loads through the family's own loader and drafts without changing the output
    model = build_tiny_llama(seed=0, layers=LAYERS, sharpness=3.0)
    drafter = build_drafter(DrafterSpec("eagle3", out), target_info(model))
    assert drafter.needs.hidden_layers == (2, 2, 1)
    reqs = [Request(p, 16) for p in ([3, 4, 5, 6], [9, 8, 7, 6, 5], [11, 12, 13])]
    plain, _ = EmbeddedEngine(model).generate(reqs)
    for batch in (1, 2):
        drafter = build_drafter(DrafterSpec("eagle3", out), target_info(model))
        spec, stats = EmbeddedEngine(model, None, drafter, 3).generate(reqs, batch_size=batch)
        assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain]
        assert stats.num_draft_tokens > 0


def test_resume_refuses_another_vocabulary(target_dir, data_dir, tmp_path):
    out = str(tmp_path / "head")
    train_eagle3(_train_cfg(target_dir, data_dir, out, steps=1))
    cfg = _train_cfg(target_dir, data_dir, out, steps=2)
    cfg.draft_vocab = 80
    with pytest.raises(ValueError, match="saved with another draft_ids"):
        train_eagle3(cfg)


def test_same_recipe_gives_the_same_weights(target_dir, data_dir, tmp_path):
    for name in ("a", "b"):
        train_eagle3(_train_cfg(target_dir, data_dir, str(tmp_path / name), steps=2))
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_and_reports_bad_data(target_dir, data_dir, tmp_path, capsys):
    from specplug.training.cli import main
    out = str(tmp_path / "cli")
    rc = main(["eagle3", "--target", target_dir, "--data", data_dir, "--output", out,
               "--draft-vocab", "64", "--steps", "2", "--seq-len", "24", "--no-bf16"])
    assert rc == 0 and os.path.isfile(os.path.join(out, "model.safetensors"))
    # installing into an assets folder drops machine-local paths and writes the README line
    from specplug.training.rebuild import install
    shipped = install("smollm2-eagle3", out, str(tmp_path / "assets"))
    cfg = json.load(open(os.path.join(shipped, "config.json")))
    assert "data" not in cfg["specplug_training"]["train_config"]
    assert "rebuild-all" in open(os.path.join(shipped, "README.md")).read()
    rc = main(["eagle3", "--target", target_dir, "--data", str(tmp_path / "nothing"),
               "--output", str(tmp_path / "x")])
    assert rc == 2
    assert "meta.json missing" in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path / "x" / "model.safetensors"))


def test_answer_windows_start_just_before_the_answer():
    s = Sequence(torch.arange(30), torch.arange(29).float()[:, None].expand(29, 6).clone(), 10)
    short = Sequence(torch.arange(8), torch.zeros(7, 6), 5)
    batch = collate([s, short], 12, 4, answer_context=4)
    assert batch["tokens"][0].tolist() == list(range(6, 18))
    assert batch["aux"][0, :, 0].tolist() == [float(i) for i in range(6, 17)]  # feature p at p
    assert batch["final"].shape == (2, 11, 2)
    assert batch["lengths"].tolist() == [12, 8]
    assert batch["tokens"][1, :8].tolist() == list(range(8))  # too short to shift
    # without answer_context the window starts at the prompt
    assert collate([s], 12, 4)["tokens"][0].tolist() == list(range(12))


def test_stop_at_keeps_the_long_schedule_and_resumes_identically(target_dir, data_dir, tmp_path):
    from specplug.training.trainer import LoopConfig, lr_at
    train_eagle3(_train_cfg(target_dir, data_dir, str(tmp_path / "cut"), steps=6, stop_at=3))
    log = [json.loads(line) for line in open(tmp_path / "cut" / "loss.jsonl")]
    assert log[-1]["step"] == 3
    assert log[-1]["lr"] == pytest.approx(lr_at(2, LoopConfig("", 6, 3e-3)))
    # stopping early then finishing equals one uninterrupted run
    train_eagle3(_train_cfg(target_dir, data_dir, str(tmp_path / "cut"), steps=6))
    train_eagle3(_train_cfg(target_dir, data_dir, str(tmp_path / "whole"), steps=6))
    a = load_file(str(tmp_path / "cut" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_runs_every_method_identically(target_dir, data_dir, tmp_path):
    from specplug.training.evaluate import evaluate
    head = str(tmp_path / "head")
    train_eagle3(_train_cfg(target_dir, data_dir, head, steps=2))
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat on the mat. the cat\nhello world, hello\ndef add(a, b):\n")
    out = str(tmp_path / "r.json")
    payload = evaluate(target_dir, head, out, num_prompts=3, max_new_tokens=12, gamma=3,
                       dtype="float64", suite=str(prompts))
    results = payload["results"]
    assert sorted(results) == ["eagle3", "hybrid", "hybrid-tree", "ngram", "plain"]
    for name, row in results.items():
        assert row["identical_to_plain"] == 1.0, name
        assert row["total_new_tokens"] == 36
    assert results["plain"]["mean_accept_length"] == 1.0
    assert results["hybrid"]["hybrid_steps"]["head"] > 0
    assert json.load(open(out))["results"]["eagle3"]["speedup_vs_plain"] > 0


def test_data_argument_can_pin_the_first_chunks(data_dir):
    from specplug.training.eagle3_train import load_all
    every, meta = load_all(data_dir)
    assert len(meta["chunks"]) >= 2
    first, _ = load_all(f"{data_dir}@1")
    assert 0 < len(first) < len(every)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(first, every))
    with pytest.raises(ValueError, match="asks for 99"):
        load_all(f"{data_dir}@99")
    with pytest.raises(ValueError, match="DIR@N"):
        load_all(f"{data_dir}@x")
