"""Tiny float64 models saved once per session, so bench runs load them the way real ones load."""
import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, perturbed_copy, save_model
    root = tmp_path_factory.mktemp("bench_models")
    tok = build_tiny_tokenizer()
    target = build_tiny_llama(0)
    return {"target": save_model(target, tok, str(root / "target")),
            "draft": save_model(perturbed_copy(target, 0.3), tok, str(root / "draft")),
            "self": save_model(target, tok, str(root / "self"))}
