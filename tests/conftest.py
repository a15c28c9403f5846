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
