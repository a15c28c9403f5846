"""Shared test configuration. Markers: `slow` (left out of CI), `gpu` (needs CUDA; skipped without)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; excluded from the default test command")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """ONE real vLLM (CPU) server per test session on a tiny random Llama (testing/tiny.py).

    Yields the started `RolloutServer`: `.url`, `.model_dir` (HF checkpoint with tokenizer),
    `.cfg`, `.log_file`. Tests that change its weights or kill it must put it back (refresh to
    `.model_dir` / let the client restart it). Stopped (whole process group) at session end.
    """
    from megatron_rasft.testing.tiny import start_tiny_server

    server = start_tiny_server(tmp_path_factory.mktemp("vllm_server"))
    try:
        yield server
    finally:
        server.stop()
