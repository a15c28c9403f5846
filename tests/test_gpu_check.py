"""benchmarks/gpu_check.sh --cpu-dry-run: every section of the one-GPU check runs on tiny shapes with
gloo, so the script that will run on a GPU host cannot rot (it is only ever run there by hand)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIME_LIMIT="400")
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--out", str(out)], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=450)
    assert p.returncode == 0, p.stdout[-4000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["status"] == {s: "ok" for s in ("loss", "kl_memory", "loss_time", "train", "resume", "convert")}
    # Every method of the loss family was compared with the float64 reference, value and gradient.
    from megatron_rasft.config import LOSS_METHODS

    for m in (m for m in LOSS_METHODS if m != "grpo"):  # grpo's reference: tests/test_loss_grpo.py
        r = res["loss"][m]
        assert r["ok"] and r["abs_err"] <= 1e-4 * abs(r["loss_ref"]) + 1e-6 and r["grad_rel_err"] <= 1e-2, (m, r)
    assert res["resume"]["exact"] and res["resume"]["full"]["3"] == res["resume"]["resumed"]["3"]
    assert res["convert"]["round_trip_exact"] and res["convert"]["export_equals_conversion"]
    assert res["convert"]["tensors"] > 0
    t = res["train"]
    assert t["sft"]["tokens_per_s"] > 0 and t["rasft"]["tokens_per_s"] > 0 and t["rasft_over_sft_step_time"] > 0
    # What the GPU host cannot run is said, not skipped silently.
    assert "transformer_engine" in res["not_run"]
    log = (out / "gpu_check.log").read_text()
    assert "NOT AVAILABLE, not run: Transformer Engine spec and FP8" in log
    assert "all sections ok" in log
