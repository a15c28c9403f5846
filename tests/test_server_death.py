"""The rollout server killed (-9) during a round's generation inside the training loop.

- Trainer-started server: it is restarted, only the prompts it lost are resubmitted, the round
  completes with the rollouts written before the kill kept as they were, and training continues.
- External server that does not come back within `rollout.server.startup_timeout_s`: the run stops with
  a clear error (exit code 4) and a checkpoint; once the server is back, `--resume` finishes the
  round without regenerating the rollouts already written.
Generation runs one prompt at a time (`rollout.server.concurrency = 1`), each prompt's samples run to 160
tokens, and the kill follows the first complete problem, so that it lands mid-round even on a fast machine
(with 40 tokens a fast box finished the remaining prompts between the trigger and the kill).
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from megatron_rasft.demo.task import make_problems, write_jsonl
from helpers.runs import loop_config, run_train, start_train, step_losses, vllm_children

WINDOW, K = 8, 2  # problems per round (rollout.batches_per_round 1 × global batch 8), samples per problem


@pytest.fixture(scope="module")
def setup(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("server_death")
    hf_to_mcore(vllm_server.model_dir, root / "mcore", quiet=True)
    problems = write_jsonl(make_problems(32, seed=5, min_digits=1, max_digits=2), root / "problems.jsonl")
    config = loop_config(root / "run.toml", server_url=None, problems=problems,
                         tokenizer=vllm_server.model_dir, load=root / "mcore", overrides={
                             "rollout": {"server": {"concurrency": 1, "kv_cache_gib": 0.25, "max_model_len": 512},
                                         "sampling": {"n": K, "max_tokens": 160}},
                             "train": {"schedule": {"train_iters": 1, "global_batch_size": 8}}})
    yield root, config, vllm_server
    from megatron_rasft.rollout.refresh import refresh_weights

    if not vllm_server.alive():
        vllm_server.restart()
    refresh_weights(vllm_server, vllm_server.model_dir)  # put the session server's weights back


def _rollout_lines(run: Path, r: int = 0) -> list:
    path = run / "rollouts" / f"round_{r:03d}.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def _complete_problems(lines: list) -> int:
    per = {}
    for line in lines:
        d = json.loads(line)
        per.setdefault(d["problem_id"], set()).add(d["sample_index"])
    return sum(len(s) == K for s in per.values())


def _kill_when_rollouts_started(proc, run: Path, r: int, server_pgid, console: Path) -> list:
    """Wait until the first problem of round `r` is written, kill the server's process group
    (`server_pgid()`: its id, or None while the server is not up yet) with SIGKILL, and return the
    rollout file's lines as they stand once the kill has taken effect. The group is looked up
    before the trigger: scanning /proc took 2.6 s on a busy CI box, time enough for the round to
    finish before the kill."""
    deadline = time.time() + 600
    pgid, looked = None, 0.0
    while len(_rollout_lines(run, r)) < K or pgid is None:
        assert proc.poll() is None and time.time() < deadline, console.read_text()[-3000:]
        if pgid is None and time.monotonic() - looked > 0.5:  # a /proc scan is slow: not every tick
            pgid, looked = server_pgid(), time.monotonic()
        time.sleep(0.02)
    seen = time.monotonic()
    os.killpg(pgid, signal.SIGKILL)  # the server and its engine processes
    killed_after_s = time.monotonic() - seen
    time.sleep(1.0)  # a result that arrived just before the kill is written by now
    lines = _rollout_lines(run, r)
    assert _complete_problems(lines) < WINDOW, (
        f"the round finished before the kill ({killed_after_s:.3f}s after the trigger): nothing tested")
    return lines


def _check_round_kept(run: Path, r: int, before: list) -> None:
    after = _rollout_lines(run, r)
    assert after[:len(before)] == before  # the rollouts written before the kill are kept, unchanged
    keys = [(json.loads(s)["problem_id"], json.loads(s)["sample_index"]) for s in after]
    assert len(keys) == WINDOW * K and len(set(keys)) == len(keys)  # nothing generated twice
    assert (run / "rounds" / f"round_{r:03d}.json").is_file()


def test_trainer_started_server_killed_mid_round_is_restarted(setup):
    root, config, _ = setup
    run, console = root / "managed", root / "managed.console.log"
    with open(console, "w") as f:
        proc = start_train(config, run, stdout=f)
    try:
        def server_pgid():
            children = vllm_children(proc.pid)  # the server leads its own process group
            assert len(children) <= 1, children
            return children[0][0] if children else None

        before = _kill_when_rollouts_started(proc, run, 0, server_pgid, console)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = console.read_text()
    assert rc == 0, out[-4000:]
    done = _complete_problems(before)
    # Only the prompts the dead server lost were resubmitted, to a server serving the round's weights.
    assert f"restarting it and resubmitting {WINDOW - done} prompts" in out, out[-4000:]
    assert out.count("server serves the step's weights") == 2  # at the round's start, after the restart
    assert f"[round 0] rollouts of {WINDOW} problems generated, 0 kept" in out
    _check_round_kept(run, 0, before)
    assert sorted(step_losses(run)) == [1]  # training continued


def test_external_server_that_does_not_come_back_stops_with_a_checkpoint(setup):
    """Killed during round 1 (after one trained step), so the stop has a step to checkpoint."""
    root, config, server = setup
    run, console = root / "external", root / "external.console.log"
    sets = [f"rollout.server.url={server.url}", "train.schedule.train_iters=2"]
    with open(console, "w") as f:
        proc = start_train(config, run, *sets, "rollout.server.startup_timeout_s=5", stdout=f)
    try:
        before = _kill_when_rollouts_started(proc, run, 1, lambda: server.proc.pid, console)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = console.read_text()
    assert rc == 4, out[-4000:]
    assert f"external rollout server {server.url} is down and did not come back within 5s" in out
    assert "The run stopped before step 2; checkpoint " in out and "rerun with --resume" in out
    assert (run / "ckpt" / "latest").read_text().strip() == "iter_0000001"  # the state before round 1
    assert not (run / "rounds" / "round_001.json").exists()
    assert _rollout_lines(run, 1) == before  # nothing was lost or rewritten on the way out

    server.restart()  # the server is back (on its original weights: the trainer refreshes them)
    rc, out = run_train(config, run, *sets, "checkpoint.resume=true")
    assert rc == 0, out[-4000:]
    done = _complete_problems(before)
    assert "[resume] from" in out and "[round 0]" not in out
    assert f"[round 1] rollouts of {WINDOW - done} problems generated, {done} kept from an earlier attempt" in out
    _check_round_kept(run, 1, before)
    assert sorted(step_losses(run)) == [1, 2]
