"""Shared test configuration. Markers: `slow` (left out of CI), `gpu` (needs CUDA; skipped without).

Hygiene: every test that used the session's vLLM server is followed by a check that the server is
healthy and serves its original weights (a broken server is restarted and the test fails), and the
session ends by checking that no trainer, torchrun, spawned rank or vLLM process it started is left.
"""
import os
import sys

import pytest
import torch

# The repository root, for devtools/ (shared with the benchmarks, not shipped) under a bare `pytest`
# too (`python -m pytest` puts the working directory on sys.path; the `pytest` script does not).
# tests/ itself is on sys.path through this file (pytest's rootdir-relative import): `helpers.*`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inherited by every process the tests start: how the end-of-session check finds leftovers.
from helpers.procs import SESSION_ENV, kill_all, tagged_processes  # noqa: E402

os.environ[SESSION_ENV] = str(os.getpid())
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
    """ONE real vLLM (CPU) server per test session on a tiny random Llama (devtools/tiny_server.py).

    Yields the started `RolloutServer`: `.url`, `.model_dir` (HF checkpoint with tokenizer),
    `.cfg`, `.log_file`. Tests that change its weights or kill it must put it back (refresh to
    `.model_dir` / let the client restart it). Stopped (whole process group) at session end.
    """
    from helpers.tiny import start_tiny_server

    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.refresh import hf_prompt_logprobs

    server = start_tiny_server(tmp_path_factory.mktemp("vllm_server"))
    try:
        from megatron_rasft.rollout.refresh_check import remember_served

        # Trainer subprocesses refresh this server too: what it serves at start is recorded on both
        # sides, so this process's tensor check skips (not fails) tensors another process changed.
        remember_served(server, server.model_dir, server.cfg.refresh_check, server.cfg.refresh_check_tensors)
        client = RolloutClient(server, server.cfg, progress=False)
        ids = client.prompt_logprobs(_PROBE)[0]
        server.original = (server.model_dir, ids, hf_prompt_logprobs(server.model_dir, ids))
        yield server
    finally:
        server.stop()


_PROBE = "Q:4821+397;A:"


def server_problems(server) -> list:
    """What is wrong with the session server now (empty: healthy, original checkpoint, and a probe's
    log-probs equal to transformers' on the original weights within 1e-2)."""
    from megatron_rasft.rollout.client import RolloutClient

    model_dir, ids, expected = server.original
    if not server.alive():
        return ["the server is not running or /health does not answer 200"]
    problems = [] if str(server.model_dir) == str(model_dir) else [f"it serves {server.model_dir}"]
    got = RolloutClient(server, server.cfg, progress=False).prompt_logprobs(ids)[1]
    diff = max(abs(a - b) for a, b in zip(got, expected))
    if diff > 1e-2:
        problems.append(f"its weights are not the original ones (probe |Δlogp| {diff:.3f})")
    return problems


@pytest.fixture(autouse=True)
def _session_server_restored(request):
    """After each test that used the session server: its original weights are reloaded, then it
    must be healthy and serve them. Otherwise it is put back (restart on the original checkpoint),
    so later tests do not inherit the damage, and the test fails."""
    yield
    if "vllm_server" not in request.fixturenames:
        return
    server = request.getfixturevalue("vllm_server")
    if server.alive():
        # Runs refresh the session server to their own exports; module-scoped set-ups keep using it
        # across tests, so the original weights go back after every test, then the check below
        # proves the server healthy and serving them.
        from megatron_rasft.rollout.refresh import refresh_weights

        try:
            refresh_weights(server, server.original[0])
        except Exception as e:  # noqa: BLE001 - reported (and repaired) by the check below
            print(f"[conftest] putting the session server's weights back failed: {e}")
    problems = server_problems(server)
    if problems:
        server.restart(server.original[0])
        pytest.fail(f"{request.node.nodeid} left the session vLLM server broken: {'; '.join(problems)} "
                    "(restarted on its original checkpoint)")


def pytest_sessionfinish(session, exitstatus):
    """No trainer, torchrun, spawned rank or vLLM process started by this session may outlive it."""
    import time

    deadline = time.monotonic() + 20  # a stopped server's engine workers may take a moment to exit
    left = tagged_processes(os.environ[SESSION_ENV])
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = tagged_processes(os.environ[SESSION_ENV])
    if left:
        kill_all(left)
        lines = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in left)
        session.config.get_terminal_writer().line(f"\nprocesses started by the tests were still running "
                                                  f"(now killed):\n{lines}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
