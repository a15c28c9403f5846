"""GRPO in the training loop with real rounds against the session's real vLLM (CPU) server, on a
model taught first (plain PyTorch, `helpers.tiny.teach_tiny`) so that it solves some problems
sometimes and groups have mixed rewards: the losses compared below are not zero.

The reference run: windows of 4 problems, K = 4 rollouts each, 2 groups per step and
rollout.batches_per_round = 2, so round 0 feeds steps 1-2 and round 1 (sampled from the weights after step
2) feeds steps 3-4. From what the run wrote (the problems, the rollout records' token ids, the
exported and checkpointed weights, the keys each step trained) the test recomputes every step in
float64 with `transformers`, never calling the project's loss:

- verdicts here (the last `\\boxed{}` against the answer as strings), group advantages here
  ((R − mean) / (Bessel std + 1e-6), 0 for equal rewards, or R − mean unscaled);
- log π_θ from the weights before the step (the starting model, RUN/hf/policy, or a checkpoint
  converted to HF), log π_old from the weights that sampled the round;
- loss = Σ_t c_t·(−log π_θ(y_t)) / N with c_t = A·ρ_t unless the clip binds (A > 0, ρ > 1 + ε_high or
  A < 0, ρ < 1 − ε_low), ρ_t = π_θ/π_old (docs/loss.md, "grpo"); under `seq_mean` each sequence's terms
  are divided by its token count and the sum by the number of sequences; with `kl_coef` β the k3
  term β·min(exp(d) − d − 1, 10), d = log π_ref − log π_θ clamped to ±20, is added per token.

At the first step after a round π_θ = π_old, and the run's own mean ρ must be 1 (within 1e-6: the
step and the π_old pass see the same packing, so in practice exactly); at the second step the
recomputed ρ moves by more than 1e-3. PP = 2 and DP = 2 give the one-process losses; a run killed
with SIGKILL after the step-1 checkpoint and resumed gives them bit for bit.

A second configuration (`kl_coef > 0`, `seq_mean`, unscaled advantages, the zero-variance filter)
is recomputed the same way, with its KL value; the filter makes the stream draw extra windows (more
rounds than a run without it), and a run where no group can be trained (one token per rollout: no
answer, all rewards 0) stops with the "no group to train" error.
"""
import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from megatron_rasft.demo.task import make_problems, write_jsonl
from helpers.runs import loop_config, run_train, start_train, step_losses, step_records
from helpers.tiny import teach_tiny

STEPS = 4
K = 4
SEQ_LENGTH = 64
EPS_LOW, EPS_HIGH = 0.2, 0.28
KL_COEF = 0.05
K3_LOG_CLAMP, K3_MAX = 20.0, 10.0  # the documented bounds of the k3 term (grpo.k3_max default)


@pytest.fixture(scope="module")
def setup(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("grpo_loop")
    problems = make_problems(16, seed=3, min_digits=1, max_digits=2)
    write_jsonl(problems, root / "problems.jsonl")
    start = teach_tiny(vllm_server.model_dir, root / "hf_start", problems)
    hf_to_mcore(start, root / "mcore", quiet=True)
    # concurrency 1: one request at a time, so the server's batches, hence its fp32 sums, are the same every run.
    config = loop_config(root / "run.toml", server_url=vllm_server.url, problems=root / "problems.jsonl",
                         tokenizer=start, load=root / "mcore", overrides={
                             "model": {"seq_length": SEQ_LENGTH},
                             "loss": {"method": "grpo"}, "grpo": {"eps_low": EPS_LOW, "eps_high": EPS_HIGH},
                             "rollout": {"server": {"concurrency": 1}, "sampling": {"n": K, "max_tokens": 30},
                                         "batches_per_round": 2},
                             "train": {"optim": {"lr": 2e-3, "lr_warmup_iters": 0},
                                       "schedule": {"train_iters": STEPS, "global_batch_size": 2},
                                       "logging": {"log_batch_keys": True}},
                             "checkpoint": {"save_interval": 1, "keep_last": 10}})
    rc, out = run_train(config, root / "ref")
    assert rc == 0, out[-4000:]
    yield {"root": root, "config": config, "out": out, "start": start,
           "problems": {p["id"]: p for p in problems}}


# ---- the independent recomputation -------------------------------------------------------------

def _verdict(text: str, answer: str) -> bool:
    """The last `\\boxed{...}` (no nesting in the toy task) equals the answer."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return bool(found) and found[-1].strip() == answer


def _advantages(rewards: list, scale_by_std: bool) -> list:
    if all(r == rewards[0] for r in rewards):
        return [0.0] * len(rewards)
    mean = sum(rewards) / len(rewards)
    if not scale_by_std:
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / (std + 1e-6) for r in rewards]



def _rounds(run: Path, problems: dict, tok, scale_by_std: bool) -> dict:
    """Every round's rollouts rebuilt from the records: {key: (tokens, prompt_len, A, correct)},
    the advantages from verdicts computed here."""
    out = {}
    for path in sorted((run / "rollouts").glob("round_*.jsonl")):
        r = int(path.stem.split("_")[1])
        by_problem = {}
        for ro in map(json.loads, path.read_text().splitlines()):
            by_problem.setdefault(ro["problem_id"], []).append(ro)
        for pid, samples in by_problem.items():
            samples.sort(key=lambda ro: ro["sample_index"])
            assert [ro["sample_index"] for ro in samples] == list(range(K)), (r, pid)
            p = problems[pid]
            prompt = tok(p["prompt"])["input_ids"]
            correct = [_verdict(ro["text"], p["answer"]) for ro in samples]
            for ro, a, ok in zip(samples, _advantages([float(c) for c in correct], scale_by_std), correct):
                ids = list(ro["token_ids"])
                if ro["finish_reason"] == "stop" and ids[-1:] != [tok.eos_token_id]:
                    ids.append(tok.eos_token_id)
                out[f"r{r}/{pid}/{ro['sample_index']}"] = ((prompt + ids)[:SEQ_LENGTH + 1], len(prompt), a, ok)
    return out


_MODELS: dict = {}


def _logp64(model_dir: Path, tokens: list, prompt_len: int) -> torch.Tensor:
    """log π(y_t) of the loss tokens (tokens[prompt_len:]) in float64 with `transformers`."""
    from transformers import LlamaForCausalLM

    key = str(model_dir)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time: callers go policy by policy
        _MODELS[key] = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = _MODELS[key](input_ids=torch.tensor([tokens])).logits[0, prompt_len - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[prompt_len:])[:, None])[:, 0]


def _hf_after(run: Path, step: int, root: Path, start: Path) -> Path:
    """The policy after `step` optimizer steps: the starting model for 0, else the step's checkpoint
    converted to HF (once)."""
    from megatron_rasft.convert.pipeline import mcore_to_hf

    if step == 0:
        return start
    out = root / f"hf_{run.name}_step{step}"
    if not out.is_dir():
        mcore_to_hf(run / "ckpt" / f"iter_{step:07d}" / "model", out, hf_config_from=start, quiet=True)
    return out


def _recompute(setup, run: Path, step: int, round_step: dict, *, scale_by_std=True, seq_mean=False,
               kl_coef=0.0) -> dict:
    """Step `step` of `run` recomputed in float64 from its records: the logged loss, token count,
    mean ρ, mean advantage and (kl_coef > 0) KL; returns the per-token ρ and the step's keys.
    round_step: round -> the optimizer steps taken before it sampled (its π_old)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["start"])
    rec = step_records(run)[step]
    seqs = _rounds(run, setup["problems"], tok, scale_by_std)
    keys = [k for rank in rec["dp_keys"] for k in rank]
    policy = _hf_after(run, step - 1, setup["root"], setup["start"])
    terms = []  # (A, log π_θ, log π_old, log π_ref) per sequence
    lp = {k: _logp64(policy, *seqs[k][:2]) for k in keys}
    for r in sorted({int(k.split("/")[0][1:]) for k in keys}):
        old_dir = _hf_after(run, round_step[r], setup["root"], setup["start"])
        for k in keys:
            if k.startswith(f"r{r}/"):
                terms.append((k, seqs[k][2], lp[k], _logp64(old_dir, *seqs[k][:2])))
    if kl_coef:
        terms = [t + (_logp64(setup["start"], *seqs[t[0]][:2]),) for t in terms]
    loss = kl = rho_sum = adv_sum = 0.0
    n_tokens, rhos = 0, []
    for key, a, lp_T, old_T, *ref in terms:
        rho_T = (lp_T - old_T).exp()
        bind_T = (rho_T > 1 + EPS_HIGH) if a > 0 else (rho_T < 1 - EPS_LOW) if a < 0 else torch.zeros_like(rho_T, dtype=torch.bool)
        c_T = torch.where(bind_T, torch.zeros_like(rho_T), a * rho_T)
        term_T = c_T * -lp_T
        if kl_coef:
            # docs/loss.md: d clamped to ±20, then each token's k3 capped at grpo.k3_max (default 10).
            d_T = (ref[0] - lp_T).clamp(-K3_LOG_CLAMP, K3_LOG_CLAMP)
            k3_T = (d_T.exp() - d_T - 1).clamp(max=K3_MAX)
            term_T = term_T + kl_coef * k3_T
            kl += float(k3_T.sum())
        loss += float(term_T.sum()) / (len(lp_T) if seq_mean else 1)
        n_tokens += len(lp_T)
        rho_sum += float(rho_T.sum())
        adv_sum += a
        rhos.append(rho_T)
    loss /= len(terms) if seq_mean else n_tokens
    # The logged `tokens` is the step's normaliser: the sequence count under seq_mean.
    assert rec["tokens"] == (len(terms) if seq_mean else n_tokens), (step, rec["tokens"], n_tokens)
    assert rec["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, rec["loss"], loss)
    assert rec["ratio"] == pytest.approx(rho_sum / n_tokens, rel=1e-6, abs=1e-6), step
    assert rec["advantage"] == pytest.approx(adv_sum / len(terms), rel=1e-6, abs=1e-6), step
    if kl_coef:
        assert rec["kl"] == pytest.approx(kl / n_tokens, rel=1e-4, abs=1e-7), (step, rec["kl"], kl / n_tokens)
    return {"rho": torch.cat(rhos), "keys": keys, "seqs": seqs, "record": rec, "loss": loss}


# ---- the tests ---------------------------------------------------------------------------------

def test_grpo_step_losses_recomputed_in_float64(setup):
    """Every step's logged loss, token count, mean ρ and mean advantage equal the float64
    recomputation; the losses and grad norms are not zero (mixed groups in every step); ρ = 1 at
    the first step after each round and moves at the second; each step trains two whole groups of
    one round, correct and wrong rollouts alike; the round records agree with the verdicts here."""
    from megatron_rasft.records import TrainSequence, read_records

    run = setup["root"] / "ref"
    out = setup["out"]
    assert "[round 0]" in out and "[round 1]" in out and "[round 2]" not in out
    metrics = step_records(run)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        r = (step - 1) // 2
        got = _recompute(setup, run, step, {0: 0, 1: 2})
        rec, keys, seqs = got["record"], got["keys"], got["seqs"]
        groups = {k.rsplit("/", 1)[0] for k in keys}
        assert len(groups) == 2 and all(g.startswith(f"r{r}/") for g in groups), keys
        assert sorted(keys) == sorted(f"{g}/{j}" for g in groups for j in range(K)), keys
        assert abs(got["loss"]) > 1e-3 and rec["grad_norm"] > 0, (step, got["loss"], rec["grad_norm"])
        if step % 2 == 1:  # π_θ = π_old: the run's ρ is 1 (recomputed: exactly 1 by construction)
            assert abs(rec["ratio"] - 1) <= 1e-6 and rec["clip_frac_low"] == rec["clip_frac_high"] == 0, rec
        else:
            assert (got["rho"] - 1).abs().max() > 1e-3, (step, got["rho"])
        # The round's training records carry the advantages computed here, correct or not.
        train = {ts.key: ts for ts in read_records(run / "train_seqs" / f"round_{r:03d}.jsonl", TrainSequence)}
        for k in keys:
            assert train[k].tokens == seqs[k][0] and train[k].advantage == pytest.approx(seqs[k][2], abs=1e-9), k
    assert {ok for _, _, _, ok in seqs.values()} == {True, False}
    # Each round trains every rollout of its window (no filter), no demonstration, and logs its GRPO
    # statistics; every step logs the GRPO metrics, vLLM's log-probs agreeing with π_old.
    from megatron_rasft.records import RoundResult

    for r in (0, 1):
        (result,) = read_records(run / "rounds" / f"round_{r:03d}.json", RoundResult)
        assert len(result.items) == 4 * K and all(it.weight == 1.0 for it in result.items)
        assert not any(it.key.startswith("e/") for it in result.items)
        assert 0 <= result.summary["grpo_zero_variance_frac"] < 1, result.summary
    for rec in metrics.values():
        for k in ("clip_frac_low", "clip_frac_high", "entropy", "zero_adv_frac"):
            assert math.isfinite(rec[k]), (k, rec)
        assert rec["logp_mismatch"] < 1e-2, rec
    assert "clip=" in out and "|Δlogp|=" in out and "zero-variance" in out


def test_pi_old_equals_transformers_on_the_exported_policy(setup):
    """RUN/old_logp/round_001.pt (scored by the trainer at round 1's boundary, after 2 steps)
    equals log π(y_t) of the policy round 1 exported (RUN/hf/policy/) in float64."""
    from megatron_rasft.records import TrainSequence, read_records

    run = setup["root"] / "ref"
    old = torch.load(run / "old_logp" / "round_001.pt", weights_only=False)
    seqs = list(read_records(run / "train_seqs" / "round_001.jsonl", TrainSequence))
    assert sorted(old) == sorted(ts.key for ts in seqs)
    worst = 0.0
    for ts in seqs:
        want_S = _logp64(run / "hf" / "policy", ts.tokens, 1)
        got_S = torch.tensor(old[ts.key], dtype=torch.float64)
        assert got_S.shape == want_S.shape
        worst = max(worst, (got_S - want_S).abs().max().item())
    assert worst < 1e-4, worst


def _samples(run: Path, r: int) -> dict:
    """(problem id, sample index) -> (token ids, vLLM log-probs) of round r's rollouts."""
    recs = map(json.loads, (run / "rollouts" / f"round_{r:03d}.jsonl").read_text().splitlines())
    return {(d["problem_id"], d["sample_index"]): (d["token_ids"], d["logprobs"]) for d in recs}


@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_pipeline_and_data_parallel_equal_one_process(setup, layout):
    root, config = setup["root"], setup["config"]
    # DP = 2 splits the 2 groups' sequences over the ranks: one sequence row per micro-batch each.
    sets = {"pp2": ["parallel.pipeline_model_parallel_size=2"], "dp2": ["train.schedule.micro_batch_size=1"]}[layout]
    rc, out = run_train(config, root / layout, "checkpoint.save_interval=0", *sets, nproc=2)
    assert rc == 0, out[-4000:]
    # Same weights served → same samples (round 1's weights agree to fp32 rounding, its log-probs
    # to 1e-3); the losses then compare the training.
    for r in (0, 1):
        got, want = (_samples(root / name, r) for name in (layout, "ref"))
        assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}, r
        assert max(abs(a - b) for k in want for a, b in zip(got[k][1], want[k][1])) < 1e-3, r
    got, want = step_losses(root / layout), step_losses(root / "ref")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert min(abs(x) for x in want.values()) > 1e-3, want
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), (s, got, want)


def test_kill_mid_round_resumes_exactly(setup):
    """SIGKILL once the step-1 checkpoint exists (inside round 0's two steps, or in round 1's
    stages), then resume: every per-step loss equals the uninterrupted run's, bit for bit; π_old
    of round 0 is read back from RUN/old_logp/, not rescored by the moved policy."""
    root, config = setup["root"], setup["config"]
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
    assert rc == 0, out[-4000:]
    assert "[resume] from" in out and "[round 0]" not in out
    want = step_losses(root / "ref")
    assert min(abs(x) for x in want.values()) > 1e-3, want
    assert step_losses(run) == want
    # Resumed at another sampling temperature: π_old and π_ref on disk were scored at T = 1 (other
    # numbers than at T = 0.7), so the run is refused before any step rather than mixing them.
    rc, out = run_train(config, run, "checkpoint.resume=true", "rollout.sampling.temperature=0.7")
    assert rc == 2 and "log-probs scored at temperature 1, this run's policy temperature is 0.7" in out, out[-3000:]
    assert "[resume] from" not in out  # refused before the checkpoint's weights were loaded
    assert step_losses(run) == want


def test_kl_seq_mean_unscaled_filtered_run_recomputed_in_float64(setup):
    """`kl_coef > 0`, `seq_mean`, unscaled advantages (R − mean) and the zero-variance filter: both
    steps equal the float64 recomputation with the k3 term (the KL value included; not zero at step
    2, where the policy has left the reference); no zero-variance group is trained; the filter
    leaves windows short of a batch, so the stream runs extra rounds (more than the 1 a round per
    2 steps of the unfiltered run)."""
    root, config = setup["root"], setup["config"]
    run = root / "kl"
    rc, out = run_train(config, run, f"grpo.kl_coef={KL_COEF}", "grpo.loss_aggregation=seq_mean",
                        "grpo.scale_by_std=false", "grpo.filter_zero_variance=true", "train.schedule.train_iters=2")
    assert rc == 0, out[-4000:]
    rounds = sorted(int(p.stem.split("_")[1]) for p in (run / "rounds").glob("round_*.json"))
    assert len(rounds) >= 2, rounds
    # Every round up to the one that filled step 1 ran before any step; the others after step 1.
    first = {k.split("/")[0] for rank in step_records(run)[1]["dp_keys"] for k in rank}
    last_before = max(int(r[1:]) for r in first)
    round_step = {r: 0 if r <= last_before else 1 for r in rounds}
    kls = []
    for step in (1, 2):
        got = _recompute(setup, run, step, round_step, scale_by_std=False, seq_mean=True, kl_coef=KL_COEF)
        seqs = got["seqs"]
        for k in got["keys"]:  # only mixed groups are trained
            group = [v[3] for key, v in seqs.items() if key.rsplit("/", 1)[0] == k.rsplit("/", 1)[0]]
            assert len(set(group)) == 2, k
        assert abs(got["loss"]) > 1e-4 and got["record"]["grad_norm"] > 0
        kls.append(got["record"]["kl"])
    assert kls[0] == pytest.approx(0, abs=1e-6) and kls[1] > 1e-5, kls
    summaries = [json.loads((run / "rounds" / f"round_{r:03d}.json").read_text())["summary"] for r in rounds]
    assert any(s["grpo_zero_variance_frac"] > 0 for s in summaries), summaries


def test_no_group_to_train_stops_the_run(setup):
    """With the filter on and one token per rollout (no answer: every reward 0, every group of zero
    variance), every problem is rolled out once without a group to train, and the run stops naming why."""
    root, config = setup["root"], setup["config"]
    rc, out = run_train(config, root / "nothing", "grpo.filter_zero_variance=true", "rollout.sampling.max_tokens=1",
                        "train.schedule.train_iters=1")
    assert rc != 0
    assert "gave no group to train" in out and "grpo.filter_zero_variance is on" in out, out[-4000:]
    assert len(list((root / "nothing" / "rounds").glob("round_*.json"))) == 4  # 16 problems, windows of 4
