"""Benchmarks cannot rot: every script in benchmarks/ runs in its `--smoke` mode (tiny shapes, one
repeat), and `make bench` (benchmarks/run_all.py) runs every one of them. The scripts are found by
listing the folder, so a new script without `--smoke`, or missing from run_all.py, fails here."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.iterdir()
                 if p.suffix in (".py", ".sh") and not p.name.startswith("_") and p.name != "run_all.py")


def test_run_all_covers_every_script():
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCH))
    listed = {r[0] for r in run_all.RUNS} | set(run_all.COVERED_BY)
    assert listed == set(SCRIPTS), f"benchmarks/run_all.py RUNS must name every script: {set(SCRIPTS) ^ listed}"
    assert all(v in listed for v in run_all.COVERED_BY.values())


# The real-model benchmarks prepare SmolLM2-135M and start a vLLM server on it: their smoke modes take
# several minutes each on the 2-core box (the end-to-end test in test_real_model.py covers the same path).
# gpu_check's smoke mode is its --cpu-dry-run, which tests/test_gpu_check.py runs and checks.
SLOW = {"bench_real_model.py", "real_solvability.py", "gpu_check.sh", "gpu_check.py"}
# These talk to a vLLM server: in the suite they attach to the session's server (tests/conftest.py,
# the same tiny model they would build) instead of starting their own, which saves a server start
# (20-40 s on this box) each. Starting one is what `make bench` does; the attach path is what the
# test checks here, and conftest puts the server's original weights back afterwards.
ATTACH = {"bench_rollout.py", "bench_eval.py", "bench_overlap.py", "bench_fleet.py", "bench_refresh.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in SCRIPTS])
def test_benchmark_smoke(script, tmp_path, request):
    cmd = (["bash"] if script.endswith(".sh") else [sys.executable]) + [str(BENCH / script), "--smoke"]
    if script in ATTACH:
        server = request.getfixturevalue("vllm_server")
        cmd += ["--server-url", server.url, "--model", str(server.model_dir)]
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, cwd=BENCH.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)  # a hang guard: minutes on a loaded 2-core box
    except subprocess.TimeoutExpired:
        from helpers.runs import kill_group

        kill_group(proc)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{script} --smoke timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{out[-3000:]}"
    assert out.strip(), f"{script} --smoke printed nothing"
