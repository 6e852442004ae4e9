"""Malformed inputs: each is a one-line error naming the problem, a non-zero exit from the CLI
entry, and DST untouched (not created, or left exactly as it was)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_fixtures as F
from specplug.converters.cli import main


def _edit_weights(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    st = load_file(path)
    fn(st)
    save_file(st, path)


def _edit_config(folder, fn):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    fn(cfg)
    json.dump(cfg, open(path, "w"))


def _truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _corrupt(folder):
    path = os.path.join(folder, "model.safetensors")
    open(path, "wb").write(b"\xff" * 8 + b"not a safetensors header at all")


def _missing_shard(folder):
    os.remove(os.path.join(folder, "model-00002-of-00003.safetensors"))


def _mismatched_verifier(tmp):
    return ["--verifier", F.verifier(os.path.join(tmp, "ver"), hidden=48)]


# (name, build source, mutate, --from, --to, extra argv, expected text in the error)
CASES = [
    ("missing key", F.eagle1, lambda d: _edit_weights(d, lambda s: s.pop("layers.0.mlp.up_proj.weight")),
     "eagle", "specplug", [], "missing key layers.0.mlp.up_proj.weight"),
    ("extra key", F.eagle1, lambda d: _edit_weights(d, lambda s: s.__setitem__("layers.0.surprise.weight", torch.ones(2))),
     "eagle", "specplug", [], "unexpected key layers.0.surprise.weight"),
    ("wrong shape", F.eagle1, lambda d: _edit_weights(d, lambda s: s.__setitem__("fc.weight", torch.ones(F.H, F.H))),
     "eagle", "sglang", [], "key fc.weight has shape (32, 32), expected (32, 64)"),
    ("wrong dtype", F.eagle1, lambda d: _edit_weights(d, lambda s: s.__setitem__("fc.weight", torch.ones(F.H, 2 * F.H, dtype=torch.int32))),
     "eagle", "specplug", [], "key fc.weight has dtype int32"),
    ("float d2t", F.eagle3, lambda d: _edit_weights(d, lambda s: s.__setitem__("d2t", s["d2t"].float())),
     "eagle3", "speculators", [], "key d2t has dtype float32"),
    ("truncated safetensors", F.eagle1, _truncate, "eagle", "specplug", [], "model.safetensors: cannot read weights"),
    ("corrupt safetensors", F.dflash, _corrupt, "dflash", "sglang", [], "model.safetensors: cannot read weights"),
    ("NaN weights", F.dflash, lambda d: _edit_weights(d, lambda s: s["layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan"))),
     "dflash", "speculators", [], "key layers.1.mlp.down_proj.weight contains NaN"),
    ("unknown architecture", F.eagle1, lambda d: _edit_config(d, lambda c: c.__setitem__("architectures", ["MambaForCausalLM"])),
     "eagle", "specplug", [], "unknown architecture MambaForCausalLM"),
    ("undetectable layout", F.eagle1, lambda d: _edit_config(d, lambda c: c.__setitem__("architectures", ["MambaForCausalLM"])),
     "auto", "specplug", [], "cannot detect the source layout"),
    ("missing d2t", F.eagle3, lambda d: _edit_weights(d, lambda s: (s.pop("d2t"), s.pop("t2d"))),
     "eagle3", "speculators", [], "missing d2t"),
    ("d2t out of vocabulary", F.eagle3, lambda d: _edit_weights(d, lambda s: s["d2t"].__setitem__(-1, 1000)),
     "eagle3", "sglang", [], "outside the target vocabulary"),
    ("mismatched verifier hidden size", F.eagle3, lambda d: None, "eagle3", "speculators", "VERIFIER",
     "mismatched verifier hidden size"),
    ("missing shard", lambda d: F.eagle1(d, shards=3), _missing_shard, "eagle", "sglang", [],
     "shard model-00002-of-00003.safetensors is missing"),
    ("no config", F.eagle1, lambda d: os.remove(os.path.join(d, "config.json")), "eagle", "specplug", [], "no config.json"),
    ("DFlash without target_layer_ids", F.dflash, lambda d: _edit_config(d, lambda c: c["dflash_config"].pop("target_layer_ids")),
     "dflash", "sglang", [], "no dflash_config.target_layer_ids"),
    ("missing source folder", lambda d: d, lambda d: None, "eagle", "specplug", [], "not found"),
    ("norm_before_residual into SGLang", F.eagle3, lambda d: _edit_config(d, lambda c: c.__setitem__("norm_before_residual", True)),
     "eagle3", "sglang", [], "norm_before_residual"),
    ("specforge_het other algorithm", F.specforge_het, lambda d: _edit_config(d, lambda c: c.__setitem__("speculative_decoding_algorithm", "Experimental")),
     "specforge-het", "specplug", [], "'Experimental' has no engine layout"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_fails_cleanly(tmp_path, capsys, case):
    name, build, mutate, src_fmt, dst_fmt, extra, expected = case
    src = str(tmp_path / "src")
    build(src)
    mutate(src)
    if extra == "VERIFIER":
        extra = _mismatched_verifier(str(tmp_path))
    capsys.readouterr()  # drop what building the fixtures printed
    dst = str(tmp_path / "dst")
    rc = main([src, dst, "--from", src_fmt, "--to", dst_fmt, *extra])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("specplug convert: error:"), err
    assert expected in err, err
    assert "Traceback" not in err
    assert not os.path.exists(dst)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".dst")]  # no staging debris


def test_dst_exists_without_force_is_untouched(tmp_path, capsys):
    src = F.eagle1(str(tmp_path / "src"))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc = main([src, str(dst), "--to", "specplug"])
    err = capsys.readouterr().err
    assert rc != 0 and "already exists (pass --force" in err and err.count("\n") == 1
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert main([src, str(dst), "--to", "specplug", "--force"]) == 0
    assert "keep.txt" not in os.listdir(dst) and "config.json" in os.listdir(dst)


def test_failure_with_force_keeps_old_dst(tmp_path, capsys):
    src = F.eagle1(str(tmp_path / "src"))
    _edit_weights(src, lambda s: s.pop("fc.weight"))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([src, str(dst), "--to", "specplug", "--force"]) != 0
    assert os.listdir(dst) == ["keep.txt"]


def test_bad_arguments_exit_nonzero(capsys):
    assert main(["a", "b", "--to", "tensorrt"]) != 0
    assert main(["only-src"]) != 0
