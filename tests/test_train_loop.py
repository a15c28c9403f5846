"""The training entry end to end on CPU: exact resume after kill -9, a NaN stop, TP=2 and PP=2 runs."""
import os
import signal
import time
from pathlib import Path

import pytest

from helpers.runs import run_train, start_train, step_losses

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """A tiny Llama made with transformers and converted to Megatron: every run starts from the
    same weights whatever its layout (a random init would depend on the TP/PP split)."""
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from helpers.tiny import make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("init")
    tok = train_tokenizer(root / "tok")
    hf = make_tiny_model(root / "hf", tok, hidden_size=64, intermediate_size=128, initializer_range=0.02)
    hf_to_mcore(hf, root / "mcore", quiet=True)
    return f"checkpoint.load={root / 'mcore'}"


def _train(run_dir, *sets, nproc=1, wait=True):
    if not wait:  # watched and killed, not read: its console goes to a file beside the run
        with open(f"{run_dir}.console.log", "w") as console:
            return start_train(CONFIG, run_dir, *sets, nproc=nproc, stdout=console)
    return run_train(CONFIG, run_dir, *sets, nproc=nproc, timeout_s=600)


def _kill_after_steps(proc, run_dir, steps: int = 5) -> None:
    """kill -9 the run's whole group once it has logged `steps` steps (after a checkpoint)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = run_dir / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= steps:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_kill_is_exact(tmp_path, init_ckpt):
    from concurrent.futures import ThreadPoolExecutor

    sets = [init_ckpt, "train.schedule.train_iters=12", "checkpoint.save_interval=2", "loss.method=rasft"]
    killed = tmp_path / "killed"
    with ThreadPoolExecutor(max_workers=1) as pool:  # the uninterrupted run, beside the one killed
        full_job = pool.submit(_train, tmp_path / "full", *sets)
        proc = _train(killed, *sets, wait=False)
        try:
            _kill_after_steps(proc, killed)
        finally:
            rc, out = full_job.result()
    assert rc == 0, out
    full = step_losses(tmp_path / "full")
    assert sorted(full) == list(range(1, 13))

    partial = step_losses(killed)
    assert 5 <= len(partial) < 12, partial
    rc, out = _train(killed, *sets, "checkpoint.resume=true")
    assert rc == 0, out
    assert "[resume] from" in out
    resumed = step_losses(killed)
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == full  # bit-identical per-step losses


def test_nan_loss_stops_with_usable_checkpoint(tmp_path, init_ckpt):
    run = tmp_path / "nan"
    rc, out = _train(run, init_ckpt, "train.optim.lr=1e30", "train.optim.lr_warmup_iters=0", "checkpoint.save_interval=1",
                     "loss.method=sft")
    assert rc == 3, out
    assert "non-finite loss" in out and "Last checkpoint" in out
    latest = (run / "ckpt" / "latest").read_text().strip()
    assert (run / "ckpt" / latest / "state.json").is_file()
    # The checkpoint written before the NaN step loads and continues (here: into the NaN again,
    # which again stops cleanly, proving the resume path reads it).
    rc, out = _train(run, init_ckpt, "train.optim.lr=1e30", "train.optim.lr_warmup_iters=0", "loss.method=sft",
                     "checkpoint.resume=true")
    assert "[resume] from" in out and rc == 3, out


def test_tp2_and_pp2_runs_match_single_process(tmp_path, init_ckpt):
    sets = [init_ckpt, "train.schedule.train_iters=3", "loss.method=rasft", "train.optim.lr=1e-3"]
    rc, out = _train(tmp_path / "one", *sets)
    assert rc == 0, out
    ref = step_losses(tmp_path / "one")
    # dp2_memory: the memory and overlap settings together (docs/launch.md), through the whole loop:
    # the reference pass from host memory, the deferred all-gather finished before the windows and
    # the checkpoint, recomputation in every step.
    memory = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true", "parallel.bucket_size=5000",
              "model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1",
              "model.reference_placement=host"]
    for name, layout in {"tp2": ["parallel.tensor_model_parallel_size=2"],
                         "pp2": ["parallel.pipeline_model_parallel_size=2"], "dp2_memory": memory}.items():
        rc, out = _train(tmp_path / name, *sets, *layout, nproc=2)
        assert rc == 0, out
        got = step_losses(tmp_path / name)
        assert sorted(got) == [1, 2, 3]
        for step, loss in ref.items():
            assert abs(got[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (name, step, got[step], loss)
