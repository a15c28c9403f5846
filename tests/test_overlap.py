"""Overlapped rounds (`rollout.overlap = true`) against the session's real vLLM (CPU) server.

- Rounds that add nothing (constant weights, no rollouts added, ratio and token factor off): the
  overlapped run's per-step losses equal the synchronous run's and plain SFT's, exactly.
- Each round sampled the policy one window old: the server's log-probs of round 2's rollouts equal
  `transformers` (float64) on round 2's start export (after step 1), not the step-0 or step-2 weights.
- kill -9 while a round runs in the background (after a checkpoint), then --resume: the per-step
  losses and every sampled rollout equal an uninterrupted overlapped run's (so the rollouts still
  missing came from the same weights and seeds), the rollouts written before the kill are kept,
  and the finished round 0 is not redone. A proxy holds every generation request back so that the background round is still
  running when the checkpoint appears (the uninterrupted and the resumed runs talk to the server
directly).
"""
import json
import os
import signal
import time

import pytest
import torch

from megatron_rasft.demo.task import make_problems, write_jsonl
from helpers.proxy import DelayingProxy
from helpers.runs import loop_config, run_train, run_trains, start_train, step_losses

K = 2


@pytest.fixture(scope="module")
def setup(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("overlap")
    hf_to_mcore(vllm_server.model_dir, root / "mcore", quiet=True)
    problems = write_jsonl(make_problems(16, seed=3, min_digits=1, max_digits=2), root / "problems.jsonl")
    with DelayingProxy(vllm_server.url, delay_s=5.0) as proxy:
        config = loop_config(root / "run.toml", server_url=vllm_server.url, problems=problems,
                             tokenizer=vllm_server.model_dir, load=root / "mcore", overrides={
                                 "rollout": {"sampling": {"n": K}},
                                 "train": {"schedule": {"train_iters": 3}}, "checkpoint": {"save_interval": 1}})
        yield root, config, proxy


def test_overlap_equals_sync_and_sft_when_rounds_add_nothing(setup):
    root, config, _ = setup
    nothing = ["train.schedule.train_iters=2", "weighting.scheme=constant", "weighting.add_rollouts=false",
               "loss.ratio=none", "loss.token_factor=none"]
    # The SFT run has no rounds, so it runs beside the synchronous one (only one run at a time may
    # use the server: a round refreshes its weights).
    runs = run_trains({"sft": (config, root / "nothing_sft", ["loss.method=sft", "rollout.batches_per_round=0",
                                                         "train.schedule.train_iters=2"]),
                       "sync": (config, root / "nothing_sync", nothing)})
    results = {name: future.result() for name, future in runs.items()}
    results["overlap"] = run_train(config, root / "nothing_overlap", *nothing, "rollout.overlap=true")
    losses = {}
    for name, (rc, out) in results.items():
        assert rc == 0, out[-4000:]
        losses[name] = step_losses(root / f"nothing_{name}")
    # Round 1 really ran in the overlapped run, begun at the boundary before window 0.
    assert (root / "nothing_overlap" / "rounds" / "start_001.json").is_file()
    assert (root / "nothing_overlap" / "rounds" / "round_001.json").is_file()
    assert len(losses["sft"]) == 2
    assert losses["overlap"] == losses["sync"] == losses["sft"]


def _lines(path):
    return path.read_text().splitlines() if path.is_file() else []


OVERLAP = ["rollout.overlap=true", "rollout.server.concurrency=1"]


@pytest.fixture(scope="module")
def full_run(setup):
    """An uninterrupted overlapped run of 3 steps (one window each): round 0 synchronous, round 1
    begun right after it from the same weights, round 2 at the boundary after step 1."""
    root, config, _ = setup
    rc, out = run_train(config, root / "full", *OVERLAP)
    assert rc == 0, out[-4000:]
    assert "[round 1]" in out and "[round 2]" in out and "[round 3]" not in out
    return root / "full"


def _rollout_logp64(model_dir, run, r: int) -> dict:
    """(problem id, sample index) -> (vLLM's log-probs of round r's sampled tokens, the same
    recomputed in float64 with `transformers` on `model_dir`)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    prompts = {json.loads(s)["id"]: json.loads(s)["prompt"] for s in _lines(run / "problems.jsonl")}
    out = {}
    with torch.no_grad():
        for ro in map(json.loads, _lines(run / "rollouts" / f"round_{r:03d}.jsonl")):
            prompt = tok(prompts[ro["problem_id"]])["input_ids"]
            ids = prompt + ro["token_ids"]
            logp_SV = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1:-1], -1)
            want = logp_SV.gather(1, torch.tensor(ro["token_ids"])[:, None])[:, 0]
            out[(ro["problem_id"], ro["sample_index"])] = (torch.tensor(ro["logprobs"], dtype=torch.float64), want)
    return out


def test_overlapped_rounds_sample_the_policy_one_window_old(setup, full_run, vllm_server):
    """Round 2 trains in window 2 (step 3) but was sampled at the boundary after step 1: the log-probs
    the server returned with its rollouts equal `transformers` (float64) on round 2's start export
    (RUN/hf/policy, named by its start record), and differ from the step-0 weights (a server left on
    them) and from the step-2 weights (a synchronous round). Round 1 was sampled from the step-0
    weights."""
    from megatron_rasft.convert.pipeline import mcore_to_hf

    root, run = setup[0], full_run
    start = json.loads((run / "rounds" / "start_002.json").read_text())
    assert os.path.samefile(start["hf_dir"], run / "hf" / "policy"), start
    step2 = root / "hf_full_step2"
    mcore_to_hf(run / "ckpt" / "iter_0000002" / "model", step2, hf_config_from=vllm_server.model_dir, quiet=True)

    def gap(model_dir, r):
        pairs = _rollout_logp64(model_dir, run, r).values()
        assert pairs
        return max((got - want).abs().max().item() for got, want in pairs)

    step0 = vllm_server.original[0]
    assert gap(step0, 1) < 1e-4
    same, older, newer = gap(run / "hf" / "policy", 2), gap(step0, 2), gap(step2, 2)
    assert same < 1e-4 and older > 1e-2 and newer > 1e-2, (same, older, newer)


def test_overlap_kill_during_background_round_resumes_exactly(setup, full_run):
    root, config, proxy = setup
    sets = OVERLAP

    # Only the killed run goes through the delaying proxy (the samples do not depend on the URL).
    run, console = root / "killed", root / "killed.console.log"
    with open(console, "w") as f:
        proc = start_train(config, run, *sets, f"rollout.server.url={proxy.url}", stdout=f)
    try:
        # The first checkpoint (step 1) is written while round 1 runs in the background.
        deadline = time.time() + 600
        while not ((run / "ckpt" / "latest").is_file() and len(_lines(run / "rollouts" / "round_001.jsonl")) >= K):
            assert proc.poll() is None and time.time() < deadline, console.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (run / "rounds" / "round_001.json").exists(), "round 1 finished before the kill: nothing tested"
    assert (run / "ckpt" / "latest").read_text().strip() == "iter_0000001"
    before = _lines(run / "rollouts" / "round_001.jsonl")
    round0 = {p: p.stat().st_mtime_ns for p in run.glob("*/round_000.json*")}

    rc, out = run_train(config, run, *sets, "checkpoint.resume=true")
    assert rc == 0, out[-4000:]
    assert "[round 1] resuming in the background" in out and "[round 0]" not in out
    per_problem = {}
    for s in before:
        per_problem[json.loads(s)["problem_id"]] = per_problem.get(json.loads(s)["problem_id"], 0) + 1
    done = sum(n == K for n in per_problem.values())
    assert f"[round 1] rollouts of {4 - done} problems generated, {done} kept" in out, out[-4000:]
    assert _lines(run / "rollouts" / "round_001.jsonl")[:len(before)] == before
    assert {p: p.stat().st_mtime_ns for p in round0} == round0
    assert step_losses(run) == step_losses(root / "full")
    # The tiny random model gets every problem wrong, so no rollout is trained on: check the samples
    # themselves. Those generated after the resume come from the start record's export, as in the
    # uninterrupted run (samples from the step-1 weights differ: the identity test's sync run).
    for r in (1, 2):
        assert _samples(run, r) == _samples(root / "full", r), r


def _samples(run, r: int) -> dict:
    recs = [json.loads(s) for s in _lines(run / "rollouts" / f"round_{r:03d}.jsonl")]
    return {(d["problem_id"], d["sample_index"]): d["token_ids"] for d in recs}
