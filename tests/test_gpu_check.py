"""benchmarks/gpu_check.sh --cpu-dry-run: every section of the one-GPU check runs on tiny shapes with
gloo, so the script that will run on a GPU host cannot rot (it is only ever run there by hand)."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_dry_run(tmp_path):
    """Results land in the environment's $OUT (as the device tool sets it, no --out): one JSON, the
    console log and one tar of the runs' logs, nothing else."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIME_LIMIT="540", OUT=str(out), TMPDIR=str(tmp_path))
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=560)
    assert p.returncode == 0, p.stdout[-4000:]
    assert sorted(f.name for f in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check_logs.tar.gz"]
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"train_sft_mb2.log", "train_rasft_mb2.log", "resume_full.log", "resume_resumed.log", "export.log"} <= names
    res = json.loads((out / "gpu_check.json").read_text())
    env_ = res["env"]
    assert env_["torch"] and env_["megatron_core"] and env_["python"] and "transformers" in env_ and "cudnn" in env_
    assert res["plan"]["sections"]["train"]["runs"]["rasft"]["memory_inputs"]["attention"] == "sdpa"
    assert res["status"] == {s: "ok" for s in ("loss", "kl_memory", "loss_time", "train", "resume", "convert")}
    # Every method of the loss family was compared with the float64 reference, value and gradient.
    from megatron_rasft.config import LOSS_METHODS

    for m in (m for m in LOSS_METHODS if m != "grpo"):  # grpo's reference: tests/test_loss_grpo.py
        r = res["loss"][m]
        assert r["ok"] and r["abs_err"] <= 1e-4 * abs(r["loss_ref"]) + 1e-6 and r["grad_rel_err"] <= 1e-2, (m, r)
    assert res["resume"]["exact"] and res["resume"]["full"]["3"] == res["resume"]["resumed"]["3"]
    assert res["resume"]["deterministic_algorithms"]
    assert res["convert"]["round_trip_exact"] and res["convert"]["export_equals_conversion"]
    assert res["convert"]["tensors"] > 0
    t = res["train"]
    assert t["sft"]["tokens_per_s"] > 0 and t["rasft"]["tokens_per_s"] > 0 and t["rasft_over_sft_step_time"] > 0
    # What the GPU host cannot run is said, not skipped silently.
    assert "transformer_engine" in res["not_run"]
    log = (out / "gpu_check.log").read_text()
    assert "NOT AVAILABLE, not run: Transformer Engine spec and FP8" in log
    assert "all sections ok" in log


def test_gpu_check_plan_fits_an_h100(tmp_path):
    """`gpu_check.sh --plan` runs nothing, needs no GPU, and plans the default check within an H100's
    78 GiB and the default time limit less its margin, printing each estimate's inputs and the wheels
    to carry; the SDPA attention is what makes the ~1.24B run fit (Megatron's local one would not).
    The estimator itself is checked against measured bytes by
    tests/test_attention.py::test_activation_estimate_matches_measured."""
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--plan", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-4000:]
    plan = json.loads((tmp_path / "gpu_check_plan.json").read_text())
    assert plan["fits_memory"] and plan["peak_memory_gib"] <= 78.0
    assert plan["fits_time"] and plan["total_seconds"] <= plan["time_limit_s"] - plan["margin_s"]
    assert set(plan["sections"]) == {"loss", "kl_memory", "loss_time", "train", "resume", "convert"}
    train = plan["sections"]["train"]
    assert train["memory_gib_with_attention_local"] > 78.0 > train["memory_gib"]
    for line in ("memory inputs:", "memory terms (GiB):", "time inputs:", "-> fits; peak est.", "carry: benchmarks/wheels"):
        assert line in p.stdout, line
    # A limit too short for the plan is refused (`--plan` exits 1), and said.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    short = gpu_check.plan(limit_s=120)
    assert not short["fits_time"] and short["fits_memory"]
    assert gpu_check.main(["--plan", "--time-limit", "120"]) == 1
