"""Process hygiene of the test helpers: a timed-out training run leaves no process behind, and the
end-of-session check finds processes by the session's tag only."""
import os
import subprocess
import sys
import time

import pytest

from helpers.procs import SESSION_ENV, processes_matching, tagged_processes
from helpers.runs import ROOT, run_train


def test_timed_out_run_is_killed_with_its_whole_group(tmp_path):
    """torchrun with 2 ranks, stopped by the timeout while it runs: torchrun and both ranks go."""
    run = tmp_path / "timeout_run"
    with pytest.raises(TimeoutError, match="process group was killed"):
        run_train(ROOT / "examples" / "tiny_cpu.toml", run, "train.schedule.train_iters=100000", nproc=2, timeout_s=12)
    deadline = time.monotonic() + 5
    while processes_matching(str(run)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_matching(str(run)) == []


def test_session_tag_finds_only_this_sessions_processes():
    code = "import time; time.sleep(60)  # torchrun"
    mine = subprocess.Popen([sys.executable, "-c", code])
    other = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, SESSION_ENV: "another-session"})
    try:
        found = [pid for pid, _ in tagged_processes(os.environ[SESSION_ENV])]
        assert mine.pid in found and other.pid not in found
        assert other.pid in [pid for pid, _ in tagged_processes("another-session")]
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()
    assert mine.pid not in [pid for pid, _ in tagged_processes(os.environ[SESSION_ENV])]
