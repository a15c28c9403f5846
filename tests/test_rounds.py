"""The RASFT loop with rollout rounds against the session's real vLLM (CPU) server.

The trainer starts from the served tiny model (converted to Megatron), exports its weights every
round, refreshes the server in place (and checks the probe log-probs against its own forward pass),
samples, verifies with math-verify, weighs, and trains on the expert demonstrations plus correct
rollouts. Every test puts the server's original weights back.
"""
import json
from pathlib import Path

import pytest

from megatron_rasft.demo.task import make_problems, write_jsonl
from megatron_rasft.testing.runs import run_train, step_losses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("rounds")
    hf_to_mcore(vllm_server.model_dir, root / "mcore", quiet=True)
    problems = write_jsonl(make_problems(16, seed=3, min_digits=1, max_digits=2), root / "problems.jsonl")
    config = root / "run.toml"
    config.write_text(f"""
[model]
seq_length = 64
[loss]
method = "rasft"
[rollout]
server_url = "{vllm_server.url}"
[rollout.sampling]
n = 2
max_tokens = 40
temperature = 1.0
[train]
data_path = "{problems}"
tokenizer = "{vllm_server.model_dir}"
prompt_template = "plain"
train_iters = 2
global_batch_size = 4
micro_batch_size = 2
refresh_interval = 1
lr = 1e-3
[checkpoint]
load = "{root / 'mcore'}"
save_interval = 1
""")
    yield root, config
    from megatron_rasft.rollout.refresh import refresh_weights

    refresh_weights(vllm_server, vllm_server.model_dir)  # put the session server's weights back


def _train(config, run_dir, *sets, nproc=1):
    return run_train(config, run_dir, *sets, nproc=nproc)


def test_two_rounds_single_process_then_resume_without_redoing(setup):
    root, config = setup
    run = root / "run1"
    rc, out = _train(config, run)
    assert rc == 0, out
    for r in (0, 1):
        for sub in ("rollouts", "verdicts", "weights", "rounds"):
            path = run / sub / (f"round_{r:03d}.jsonl" if sub != "rounds" else f"round_{r:03d}.json")
            assert path.is_file(), path
        lines = (run / "rollouts" / f"round_{r:03d}.jsonl").read_text().splitlines()
        assert len(lines) == 4 * 2  # 4 problems per window × K = 2
    assert "server serves the step's weights (inplace" in out
    marker = json.loads((run / "rounds" / "round_000.json").read_text())
    assert set(marker["expert_weight"]) and marker["summary"]["problems"] == 4
    assert len(step_losses(run)) == 2

    # Resume into a longer run: rounds 0-1 are not redone (their files stay as they were).
    before = {p: p.stat().st_mtime_ns for p in run.glob("*/round_00[01].json*")}
    rc, out = _train(config, run, "train.train_iters=3", "checkpoint.resume=true")
    assert rc == 0, out
    assert "[resume] from" in out and "[round 0]" not in out and "[round 1]" not in out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (run / "rounds" / "round_002.json").is_file()
    assert sorted(step_losses(run)) == [1, 2, 3]


def test_kill_mid_run_with_rounds_resumes_exactly(setup):
    """kill -9 after the first checkpoint (mid-way through the rounds), resume: the per-step losses
    equal an uninterrupted run's, and the round that had finished is not redone."""
    import os
    import signal
    import time

    from megatron_rasft.testing.runs import start_train

    root, config = setup
    sets = ["train.train_iters=3"]
    rc, out = _train(config, root / "full3", *sets)
    assert rc == 0, out
    run = root / "killed3"
    with open(root / "killed3.console.log", "w") as console:
        proc = start_train(config, run, *sets, stdout=console)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (run / "ckpt" / "latest").is_file():
        time.sleep(0.1)
    assert proc.poll() is None, (root / "killed3.console.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "rounds" / "round_000.json").is_file()
    done_before = {p: p.stat().st_mtime_ns for p in run.glob("*/round_000.json*")}
    rc, out = _train(config, run, *sets, "checkpoint.resume=true")
    assert rc == 0, out
    assert "[resume] from" in out and "[round 0]" not in out
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    assert step_losses(run) == step_losses(root / "full3")


def test_degenerate_rasft_equals_sft_with_rounds(setup):
    """Rounds on, every weight forced to 1 (constant scheme, no rollouts added), ratio and token
    factor off: the per-step losses are exactly those of plain SFT on the same stream."""
    root, config = setup
    rc, out = _train(config, root / "sft", "loss.method=sft")
    assert rc == 0, out
    rc, out = _train(config, root / "degenerate", "weighting.scheme=constant", "weighting.add_rollouts=false",
                     "loss.ratio=none", "loss.token_factor=none")
    assert rc == 0, out
    assert "[round 1]" in out  # the rounds really ran
    assert step_losses(root / "degenerate") == step_losses(root / "sft")


def test_rounds_with_tensor_parallel_and_reference_selection(setup):
    """TP=2 in 2 gloo processes, with the released code's NLL-band selection of what to roll out."""
    root, config = setup
    rc, out = _train(config, root / "tp2", "parallel.tensor_model_parallel_size=2", "rollout.selection=released",
                     nproc=2)
    assert rc == 0, out
    assert (root / "tp2" / "rounds" / "round_001.json").is_file()
    band = json.loads((root / "tp2" / "rounds" / "nll_band.json").read_text())
    assert band["start_low"] <= band["start_high"] <= band["hard_ceiling"]
    for r in (0, 1):
        marker = json.loads((root / "tp2" / "rounds" / f"round_{r:03d}.json").read_text())
        assert marker["summary"]["rolled_out"] <= 4  # a subset of the window's 4 problems (+ probes)
    assert len(step_losses(root / "tp2")) == 2


def test_same_round_two_ways_gives_identical_rollouts(setup, vllm_server, tmp_path, capsys):
    """Round 1 sampled by the trainer, and again by `python -m megatron_rasft rollout --round 1` on
    the same weights (the server still serves round 1's export when the 2-step run ends), the same
    problems and the same config: identical samples (texts, token ids, seeds, finish reasons).
    The round's seed and stop-token rules live in the rollout stage, not in the trainer."""
    import shutil

    from megatron_rasft.cli import build_parser
    from megatron_rasft.commands.rollout import main as rollout_main
    from megatron_rasft.records import Rollout, read_records
    from megatron_rasft.rundir import RunDir

    root, config = setup
    trained = RunDir(root / "two_ways")
    rc, out = _train(config, trained.root)
    assert rc == 0, out
    by_trainer = list(read_records(trained.rollouts(1), Rollout))
    assert by_trainer and {r.round for r in by_trainer} == {1}

    cli = RunDir(tmp_path / "cli")
    cli.root.mkdir()
    shutil.copy(trained.problems, cli.problems)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(dict.fromkeys(r.problem_id for r in by_trainer)) + "\n")
    args = build_parser().parse_args(["rollout", "--run-dir", str(cli.root), "--round", "1", "--config", str(config),
                                      "--server-url", vllm_server.url, "--tokenizer", vllm_server.model_dir,
                                      "--problem-ids", str(ids), "--no-progress"])
    assert rollout_main(args) == 0, capsys.readouterr().out
    by_command = list(read_records(cli.rollouts(1), Rollout))

    def key(r):
        return (r.problem_id, r.sample_index)

    def sample(r):
        return (r.text, r.token_ids, r.seed, r.finish_reason)

    assert sorted(map(key, by_command)) == sorted(map(key, by_trainer))
    assert {key(r): sample(r) for r in by_command} == {key(r): sample(r) for r in by_trainer}
