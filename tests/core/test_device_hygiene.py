"""Every tensor a drafter or the engine makes lives on the target's device (issue #13, part 7).

The CPU stand-in for a GPU: the target and the drafter sit explicitly on `cpu` while the default
device is `meta`.  A tensor created without naming a device then becomes a meta tensor, and the
first time it meets a real one (an index, a cat, a model input) torch raises.  So a missing
`device=` fails here the way it would fail beside a CUDA target.

HF's own code inside a model's forward is not ours to check: each HF model's forward runs with
`cpu` as the default device.  Everything around it (the engine's masks, positions, caches and
verify; every drafter's propose) runs under `meta`.  Two things `meta` cannot catch are checked
directly: SDPA accepts a meta mask beside cpu inputs, and `torch.Generator()` is always a cpu
generator.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.types import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))
from test_engine_sampled_families import FAMILIES  # noqa: E402

GAMMA = 3


def _hf_forward_on_cpu(module: torch.nn.Module) -> None:
    """Run every HF model inside `module` (the module itself too) with cpu as default device."""
    from transformers import PreTrainedModel
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel) and "forward" not in vars(sub):
            inner = sub.forward

            def forward(*args, _inner=inner, **kwargs):
                with torch.device("cpu"):
                    return _inner(*args, **kwargs)
            sub.forward = forward


@pytest.fixture
def meta_default_device(monkeypatch):
    """Default device meta; and SDPA, which would take a meta mask beside cpu inputs without a
    word, made to insist that every tensor it gets is on one device."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def same_device_sdpa(*args, **kwargs):
        devices = {t.device for t in list(args) + list(kwargs.values()) if torch.is_tensor(t)}
        assert len(devices) == 1, f"attention inputs on several devices: {devices}"
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", same_device_sdpa)
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture
def generators_name_their_device(monkeypatch):
    """torch.Generator() is a cpu generator whatever the default device, and a cpu generator
    cannot draw on a CUDA target's probabilities: every generator must name its device."""
    real = torch.Generator

    class StrictGenerator(real):  # a class, so that `torch.Generator | None` still works
        def __new__(cls, device=None):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("specplug"):  # the tests' own fixtures may use cpu ones
                assert device is not None, f"{caller}: torch.Generator() made without device="
            return real(device=device or "cpu")
    monkeypatch.setattr(torch, "Generator", StrictGenerator)


@pytest.mark.usefixtures("generators_name_their_device")
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_engine_and_drafter_make_no_tensor_off_the_target_device(family, sampled, tmp_path,
                                                                 request):
    target, drafter, prompt = family(str(tmp_path))
    assert target.device.type == "cpu"
    for module in [target] + drafter.torch_modules():
        _hf_forward_on_cpu(module)
        for t in list(module.parameters()) + list(module.buffers()):
            assert t.device.type == "cpu", "the drafter's weights must sit where the target is"
    params = SamplingParams(temperature=1.0) if sampled else SamplingParams()
    engine = EmbeddedEngine(target, None, drafter, GAMMA, params)
    requests = [Request(list(prompt), max_new_tokens=8, seed=s) for s in range(3)]
    request.getfixturevalue("meta_default_device")
    outputs, stats = engine.generate(requests, batch_size=3)
    torch.set_default_device(None)
    assert all(o.num_new_tokens == 8 for o in outputs)
    assert stats.num_draft_tokens > 0, "the drafter never drafted: nothing was checked"


def test_a_tensor_without_a_device_is_caught(meta_default_device):
    """The check itself: a tensor made without device= cannot meet the cpu target's, in
    arithmetic or as an attention mask."""
    on_cpu = torch.zeros(1, 1, 2, 4, device="cpu")
    with pytest.raises((RuntimeError, NotImplementedError)):
        _ = on_cpu + torch.arange(4)
    with pytest.raises(AssertionError, match="several devices"):
        torch.nn.functional.scaled_dot_product_attention(
            on_cpu, on_cpu, on_cpu, attn_mask=torch.ones(2, 2, dtype=torch.bool))
