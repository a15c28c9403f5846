"""The RASFT loop with rollout rounds against the session's real vLLM (CPU) server.

The trainer starts from the served tiny model (converted to Megatron), exports its weights every
round, refreshes the server in place (and checks the probe log-probs against its own forward pass),
samples, verifies with math-verify, weighs, and trains on the expert demonstrations plus correct
rollouts. Every test puts the server's original weights back.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from megatron_rasft.train.state import LoopState, next_window_ids

from megatron_rasft.demo.task import make_problems, write_jsonl
from helpers.runs import loop_config, run_train, run_trains, step_losses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("rounds")
    hf_to_mcore(vllm_server.model_dir, root / "mcore", quiet=True)
    problems = write_jsonl(make_problems(16, seed=3, min_digits=1, max_digits=2), root / "problems.jsonl")
    config = loop_config(root / "run.toml", server_url=vllm_server.url, problems=problems,
                         tokenizer=vllm_server.model_dir, load=root / "mcore",
                         overrides={"checkpoint": {"save_interval": 1}})
    return root, config


def _train(config, run_dir, *sets, nproc=1):
    return run_train(config, run_dir, *sets, nproc=nproc)


def test_two_rounds_single_process_then_resume_without_redoing(setup):
    root, config = setup
    run = root / "run1"
    rc, out = _train(config, run)
    assert rc == 0, out
    for r in (0, 1):
        for sub in ("rollouts", "verdicts", "train_seqs", "rounds"):
            path = run / sub / (f"round_{r:03d}.jsonl" if sub != "rounds" else f"round_{r:03d}.json")
            assert path.is_file(), path
        lines = (run / "rollouts" / f"round_{r:03d}.jsonl").read_text().splitlines()
        assert len(lines) == 4 * 2  # 4 problems per window × K = 2
    assert "server serves the step's weights (inplace" in out
    # Round 1's refresh: every server tensor checked against the trainer's step (rollout/refresh_check.py).
    assert "; 17 server tensors checked (sample); probe" in out, out
    marker = json.loads((run / "rounds" / "round_000.json").read_text())
    assert sum(it["key"].startswith("e/") for it in marker["items"]) == 4 and marker["summary"]["problems"] == 4
    assert not (run / "weights").exists()  # the round result is the one record of the round's weights
    assert len(step_losses(run)) == 2

    # Resume into a longer run: rounds 0-1 are not redone (their files stay as they were).
    before = {p: p.stat().st_mtime_ns for p in run.glob("*/round_00[01].json*")}
    rc, out = _train(config, run, "train.schedule.train_iters=3", "checkpoint.resume=true")
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

    from helpers.runs import start_train

    root, config = setup
    sets = ["train.schedule.train_iters=3"]
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
    # Side by side: the SFT run has no rounds, so it does not touch the server.
    runs = run_trains({"sft": (config, root / "sft", ["loss.method=sft", "rollout.batches_per_round=0"]),
                       "degenerate": (config, root / "degenerate", [
                           "weighting.scheme=constant", "weighting.add_rollouts=false", "loss.ratio=none",
                           "loss.token_factor=none"])})
    for name in ("sft", "degenerate"):
        rc, out = runs[name].result()
        assert rc == 0, (name, out)
    assert "[round 1]" in out  # the rounds really ran
    assert step_losses(root / "degenerate") == step_losses(root / "sft")


def test_rounds_with_tensor_parallel_and_released_selection(setup, vllm_server):
    """TP=2 in 2 gloo processes, with the released code's NLL-band selection of what to roll out."""
    root, config = setup
    # Seed 11: the first window holds in-band problems and hard ones, none within 0.1 of a threshold.
    rc, out = _train(config, root / "tp2", "parallel.tensor_model_parallel_size=2", "rollout.selection.rule=released",
                     "train.seed=11", nproc=2)
    assert rc == 0, out
    assert (root / "tp2" / "rounds" / "round_001.json").is_file()
    # Round 0 (step 0, the policy is still the served model) recomputed independently: each expert
    # demonstration's mean response NLL in float64 with transformers, the band as numpy quantiles
    # (selection.py's docstring), and the rule "35 % of the window's in-band problems are rolled out,
    # the ones above the band and within the ceiling join the hard pool".
    nll = _expert_nll(root / "problems.jsonl", vllm_server.model_dir)
    vals = list(nll.values())
    band = json.loads((root / "tp2" / "rounds" / "nll_band.json").read_text())
    for name, q in (("easy_floor", 0.1), ("start_low", 0.2), ("start_high", 0.45), ("hard_ceiling", 0.95)):
        assert band[name] == pytest.approx(float(np.quantile(vals, q)), abs=1e-4), name
    low, high, ceiling = (float(np.quantile(vals, q)) for q in (0.2, 0.45, 0.95))
    window = next_window_ids(LoopState(), sorted(nll), 4, seed=11)
    in_band = {i for i in window if low <= nll[i] <= high}
    marker = json.loads((root / "tp2" / "rounds" / "round_000.json").read_text())
    rolled = {json.loads(line)["problem_id"] for line in (root / "tp2" / "rollouts" / "round_000.jsonl").open()}
    assert rolled <= in_band and len(rolled) == math.ceil(0.35 * len(in_band)) == marker["summary"]["rolled_out"]
    assert set(marker["hard_pool"]) == {i for i in window if high < nll[i] <= ceiling}
    assert len(in_band) == 2 and marker["hard_pool"]  # the case this seed was chosen for
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
                                      "--tokenizer", vllm_server.model_dir,
                                      "--problem-ids", str(ids), "--no-progress"])
    assert rollout_main(args) == 0, capsys.readouterr().out
    by_command = list(read_records(cli.rollouts(1), Rollout))

    def key(r):
        return (r.problem_id, r.sample_index)

    def sample(r):
        return (r.text, r.token_ids, r.seed, r.finish_reason)

    assert sorted(map(key, by_command)) == sorted(map(key, by_trainer))
    assert {key(r): sample(r) for r in by_command} == {key(r): sample(r) for r in by_trainer}
def _expert_nll(problems_path, model_dir) -> dict:
    """problem id -> mean NLL of `response` + EOS after `BOS prompt`, float64 transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = {}
    for line in Path(problems_path).read_text().splitlines():
        p = json.loads(line)
        prompt = [tok.bos_token_id] + tok(p["prompt"], add_special_tokens=False).input_ids
        resp = tok(p["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        tok_logp = logp.gather(1, ids[0, 1:, None])[:, 0][len(prompt) - 1:]
        out[p["id"]] = -tok_logp.mean().item()
    return out


def test_round_builds_from_verdicts_in_problem_order_not_completion_order(tmp_path):
    """The verdict file lists problems in the order their generations finished, which changes with
    the server's batching; the trainer must read them in the round's problem order, or two runs of
    one seed train the same rollouts in different orders (and differ in the last bits)."""
    from megatron_rasft.records import ProblemVerdicts, write_records
    from megatron_rasft.rounds.stages import verdicts_in_order
    from megatron_rasft.rundir import RunDir

    run = RunDir(tmp_path)
    run.verdicts(0).parent.mkdir(parents=True, exist_ok=True)
    problem_ids = ["p3", "p0", "p2", "p1"]
    finished = ["p1", "p3", "p2", "p0", "other"]  # completion order, and a problem of another window
    write_records(run.verdicts(0), [ProblemVerdicts(pid, 0, "e", [{"sample_index": 0, "text": "t", "correct": True,
                                                                   "reason": "", "extracted": "1"}])
                                    for pid in finished])
    got = verdicts_in_order(run, 0, problem_ids)
    assert [pv.problem_id for pv in got] == problem_ids
