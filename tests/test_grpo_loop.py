"""GRPO in the training loop with real rounds against the session's real vLLM (CPU) server.

One configuration: windows of 4 problems, K = 2 rollouts each, 2 groups per step and
refresh_interval = 2, so a round feeds two optimizer steps (the second one off-policy, ρ ≠ 1) and
3 steps span two rounds. The reference run is one process; PP = 2 and DP = 2 must give its per-step
losses, a run killed with SIGKILL and resumed must give them exactly, and π_old (RUN/old_logp/)
must equal `transformers` in float64 on the policy the round exported.
"""
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from megatron_rasft.demo.task import make_problems, write_jsonl
from helpers.runs import loop_config, run_train, start_train, step_losses

STEPS = 3


@pytest.fixture(scope="module")
def setup(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("grpo_loop")
    hf_to_mcore(vllm_server.model_dir, root / "mcore", quiet=True)
    problems = write_jsonl(make_problems(16, seed=5, min_digits=1, max_digits=1), root / "problems.jsonl")
    # concurrency 1: one request at a time, so the server's batches, hence its fp32 sums, are the same every run.
    config = loop_config(root / "run.toml", server_url=vllm_server.url, problems=problems,
                         tokenizer=vllm_server.model_dir, load=root / "mcore", overrides={
                             "loss": {"method": "grpo"}, "grpo": {"eps_high": 0.28},
                             "rollout": {"server": {"concurrency": 1}, "sampling": {"max_tokens": 24}},
                             "train": {"schedule": {"train_iters": STEPS, "global_batch_size": 2,
                                                    "refresh_interval": 2}},
                             "checkpoint": {"save_interval": 1}})
    rc, out = run_train(config, root / "ref")
    assert rc == 0, out
    yield root, config, out


def _train_records(run: Path) -> list:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("kind") == "train"]


def test_grpo_round_trains_every_rollout_with_its_group_advantage(setup):
    """The round's training sequences are all K rollouts of each problem, correct or not, with
    A_j recomputed here from the verdicts; no demonstration is trained; the step logs the GRPO metrics."""
    from megatron_rasft.records import ProblemVerdicts, RoundResult, TrainSequence, read_records

    root, _, out = setup
    run = root / "ref"
    assert "[round 0]" in out and "[round 1]" in out and "zero-variance" in out
    for r in (0, 1):
        seqs = {ts.key: ts for ts in read_records(run / "train_seqs" / f"round_{r:03d}.jsonl", TrainSequence)}
        (result,) = read_records(run / "rounds" / f"round_{r:03d}.json", RoundResult)
        assert result.expert_weight == {} and all(not k.startswith("e/") for k, _ in result.rollout_items)
        assert sorted(k for k, _ in result.rollout_items) == sorted(seqs)
        assert len(seqs) == 4 * 2  # every rollout of the window's 4 problems (no filter by default)
        for pv in read_records(run / "verdicts" / f"round_{r:03d}.jsonl", ProblemVerdicts):
            rewards = [1.0 if x["correct"] else 0.0 for x in sorted(pv.rollouts, key=lambda x: x["sample_index"])]
            mean = sum(rewards) / len(rewards)
            std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (len(rewards) - 1))
            for j, rew in enumerate(rewards):
                want = 0.0 if std == 0 else (rew - mean) / (std + 1e-6)
                assert seqs[f"r{r}/{pv.problem_id}/{j}"].advantage == pytest.approx(want, abs=1e-12)
        assert "grpo_zero_variance_frac" in result.summary
    recs = _train_records(run)
    assert [m["step"] for m in recs] == [1, 2, 3]
    for m in recs:
        for k in ("clip_frac_low", "clip_frac_high", "advantage", "entropy", "zero_adv_frac", "logp_mismatch"):
            assert math.isfinite(m[k]), (k, m)
        # vLLM's sampled-token log-probs against the trainer's π_old of the same tokens (fp32 both)
        assert m["logp_mismatch"] < 1e-2, m
    assert "clip=" in out and "|Δlogp|=" in out


def test_pi_old_equals_transformers_on_the_exported_policy(setup):
    """RUN/old_logp/round_001.pt (scored by the trainer at round 1's boundary, after 2 steps)
    equals log π(y_t) of the policy round 1 exported (RUN/hf/policy/), recomputed in float64 with
    `transformers` from the exported files."""
    from transformers import AutoModelForCausalLM

    from megatron_rasft.records import TrainSequence, read_records

    root, _, _ = setup
    run = root / "ref"
    old = torch.load(run / "old_logp" / "round_001.pt", weights_only=False)
    seqs = list(read_records(run / "train_seqs" / "round_001.jsonl", TrainSequence))
    assert sorted(old) == sorted(ts.key for ts in seqs)
    model = AutoModelForCausalLM.from_pretrained(str(run / "hf" / "policy"), dtype=torch.float64).eval()
    worst = 0.0
    with torch.no_grad():
        for ts in seqs:
            ids_1S = torch.tensor([ts.tokens])
            logp_SV = torch.log_softmax(model(ids_1S).logits[0].double(), dim=-1)
            want_S = logp_SV[:-1].gather(-1, ids_1S[0, 1:, None])[:, 0]
            got_S = torch.tensor(old[ts.key], dtype=torch.float64)
            assert got_S.shape == want_S.shape
            worst = max(worst, (got_S - want_S).abs().max().item())
    assert worst < 1e-4, worst


@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_pipeline_and_data_parallel_equal_one_process(setup, layout):
    root, config, _ = setup
    # DP = 2 splits the 2 groups' sequences over the ranks: one sequence row per micro-batch each.
    sets = {"pp2": ["parallel.pipeline_model_parallel_size=2"], "dp2": ["train.schedule.micro_batch_size=1"]}[layout]
    rc, out = run_train(config, root / layout, *sets, nproc=2)
    assert rc == 0, out
    for r in (0, 1):  # same weights served → same samples; the losses compare the training
        assert (root / layout / "rollouts" / f"round_{r:03d}.jsonl").read_text() == \
            (root / "ref" / "rollouts" / f"round_{r:03d}.jsonl").read_text()
    got, want = step_losses(root / layout), step_losses(root / "ref")
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), (s, got, want)


def test_kill_mid_round_resumes_exactly(setup):
    """SIGKILL once the step-1 checkpoint exists (inside round 0's two steps, or in round 1's
    stages), then resume: every per-step loss equals the uninterrupted run's, bit for bit; π_old
    of round 0 is read back from RUN/old_logp/, not rescored by the moved policy."""
    root, config, _ = setup
    run = root / "killed"
    with open(root / "killed.console.log", "w") as console:
        proc = start_train(config, run, stdout=console)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (run / "ckpt" / "latest").is_file():
        time.sleep(0.05)
    assert proc.poll() is None, (root / "killed.console.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "old_logp" / "round_000.pt").is_file()
    rc, out = run_train(config, run, "checkpoint.resume=true")
    assert rc == 0, out
    assert "[resume] from" in out and "[round 0]" not in out
    assert step_losses(run) == step_losses(root / "ref")
