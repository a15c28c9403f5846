"""The RASFT mechanism end to end, recomputed independently.

A tiny model is first trained here (plain PyTorch on the Hugging Face model) until it solves some of
the toy addition problems. The trainer then runs `rasft` with a real round before every step on a
window that is exactly one global batch, against the session's real vLLM server. From what the run
wrote (the problems, the rollout texts and token ids, the exported weights) the test recomputes
each step's loss in float64 with `transformers`:

- verdicts computed here (the last `\\boxed{}` compared with the answer as strings), not read from
  the run's verdict records;
- the `linear` weights of RASFT.md written here: A_E = a_max − (a_max − a_min)·p, each correct
  rollout β·p/k;
- the clipped sequence ratio r_s = clip(exp(mean_t(log π_ref − log π_θ)), 0.4, 1.2) and the DFT token
  factor q_t = π_θ(y_t);
- loss = Σ_s Σ_t A_s · r_s · q_t · ℓ_t / N over the step's loss tokens.

Step 1's policy is the starting model (r_s = 1); step 2's is the weights after step 1 (the round-1
export the server loaded), so r_s ≠ 1 and it is recomputed from the run's cached reference log-probs.
The reference pass's cache is compared with the initial model's log-probs, every sequence is scored
exactly once, and a resumed run reuses the cache.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_rasft.demo.task import make_problems, write_jsonl
from megatron_rasft.testing.runs import run_train

SEQ_LENGTH = 64
K = 4
A_MAX, A_MIN, BETA = 1.0, 0.2, 0.5  # RASFT.md's `linear` defaults
R_MIN, R_MAX = 0.4, 1.2


def _teach(model_dir: Path, out_dir: Path, problems: list[dict], steps: int = 8, lr: float = 3e-3) -> Path:
    """The served tiny model trained for a few full-batch Adam steps on the problems' demonstrations:
    enough that it solves some problems sometimes (not all, not always)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [(tok(p["prompt"])["input_ids"], tok(p["response"], add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id]) for p in problems]
    width = max(len(a) + len(b) for a, b in rows)
    ids_BS = torch.full((len(rows), width), tok.pad_token_id)
    labels_BS = torch.full((len(rows), width), -100)
    for i, (a, b) in enumerate(rows):
        ids_BS[i, :len(a) + len(b)] = torch.tensor(a + b)
        labels_BS[i, len(a):len(a) + len(b)] = torch.tensor(b)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        model(input_ids=ids_BS, labels=labels_BS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in Path(model_dir).iterdir():  # tokenizer and generation config
        if f.is_file() and not (out_dir / f.name).exists():
            shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="module")
def mech(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("mechanism")
    problems = make_problems(8, seed=3, min_digits=1, max_digits=2)
    write_jsonl(problems, root / "problems.jsonl")
    start = _teach(Path(vllm_server.model_dir), root / "hf_start", problems)
    hf_to_mcore(start, root / "mcore", quiet=True)
    config = root / "run.toml"
    config.write_text(f"""
[model]
seq_length = {SEQ_LENGTH}
[loss]
method = "rasft"
[rollout.server]
url = "{vllm_server.url}"
[rollout.sampling]
n = {K}
max_tokens = 30
temperature = 1.0
[train.data]
path = "{root / 'problems.jsonl'}"
tokenizer = "{start}"
prompt_template = "plain"
[train.optim]
lr = 1e-2
lr_warmup_iters = 0
[train.schedule]
train_iters = 2
global_batch_size = 4
micro_batch_size = 2
refresh_interval = 1
[checkpoint]
load = "{root / 'mcore'}"
save_interval = 1
""")
    yield {"root": root, "config": config, "start": start, "problems": {p["id"]: p for p in problems}}


# ---- the independent recomputation -------------------------------------------------------------

def _verdict(text: str, answer: str) -> bool:
    """The last `\\boxed{...}` (no nesting in the toy task) equals the answer."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return bool(found) and found[-1].strip() == answer


def _logprobs64(model_dir: Path, seqs: list[list[int]]) -> list[torch.Tensor]:
    """log π(tokens[t+1] | tokens[:t+1]) for t = 0..len−2 of each sequence, float64."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=torch.tensor([s])).logits[0, :-1].double()
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(s[1:])[:, None])[:, 0])
    return out


def _window(run: Path, r: int, problems: dict, tok) -> tuple[list, dict]:
    """The sequences step r+1 trains, rebuilt from the problems and the round's rollout records:
    [(key, tokens, prompt_len, A_s)] with the `linear` weights, and {problem id: A_E}."""
    rollouts = [json.loads(line) for line in (run / "rollouts" / f"round_{r:03d}.jsonl").read_text().splitlines()]
    window = sorted({ro["problem_id"] for ro in rollouts})
    assert len(window) == 4, window  # rollout selection `all`: the whole window
    seqs, a_expert = [], {}
    for pid in window:
        p = problems[pid]
        prompt = tok(p["prompt"])["input_ids"]
        samples = sorted((ro for ro in rollouts if ro["problem_id"] == pid), key=lambda ro: ro["sample_index"])
        assert len(samples) == K
        correct = [ro for ro in samples if _verdict(ro["text"], p["answer"])]
        k = len(correct)
        p_solve = k / K
        a_expert[pid] = A_MAX - (A_MAX - A_MIN) * p_solve
        expert = prompt + tok(p["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((f"e/{pid}", expert[:SEQ_LENGTH + 1], len(prompt), a_expert[pid]))
        for ro in correct:
            ids = list(ro["token_ids"])
            if ro["finish_reason"] == "stop" and ids[-1:] != [tok.eos_token_id]:
                ids.append(tok.eos_token_id)  # a stop on EOS: EOS is part of the trained response
            seqs.append((f"r{r}/{pid}/{ro['sample_index']}", (prompt + ids)[:SEQ_LENGTH + 1], len(prompt),
                         BETA * p_solve / k))
    return seqs, a_expert


def _loss64(seqs: list, policy_lp: list, ref_lp: list) -> tuple[float, int]:
    """(Σ_s Σ_t A_s r_s q_t ℓ_t / N, N): RASFT.md's loss with the sequence ratio and DFT factor."""
    num, n_tokens = 0.0, 0
    for (_, tokens, prompt_len, a), lp, ref in zip(seqs, policy_lp, ref_lp):
        lp_t, ref_t = lp[prompt_len - 1:], ref[prompt_len - 1:]  # labels tokens[prompt_len:]
        r = min(max(math.exp(max(min(float((ref_t - lp_t).mean()), 20.0), -20.0)), R_MIN), R_MAX)
        num += a * r * float((lp_t.exp() * -lp_t).sum())
        n_tokens += len(lp_t)
    return num / n_tokens, n_tokens


def _metrics(run: Path) -> dict:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec
    return out


# ---- the tests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def linear_run(mech):
    """One step, then resumed to two: the same trajectory as one uninterrupted run (resume is exact,
    tests/test_rounds.py), and the resume's use of the reference cache is checked below."""
    run = mech["root"] / "linear"
    rc, out = run_train(mech["config"], run, "train.schedule.train_iters=1")
    assert rc == 0, out
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "ref_logp").iterdir()}
    rc, out2 = run_train(mech["config"], run, "checkpoint.resume=true")
    assert rc == 0, out2
    assert "[resume] from" in out2
    return run, first


def _check_rasft_steps(mech, run: Path) -> dict:
    """Both steps' logged loss and token count equal the float64 recomputation; returns the metrics."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mech["start"])
    metrics = _metrics(run)
    assert sorted(metrics) == [1, 2]

    # Step 1: the policy is the starting model (= the reference), so r_s = 1 up to rounding.
    seqs, a_expert = _window(run, 0, mech["problems"], tok)
    init_lp = _logprobs64(mech["start"], [s[1] for s in seqs])
    loss, n_tokens = _loss64(seqs, init_lp, init_lp)
    summary = json.loads((run / "rounds" / "round_000.json").read_text())["summary"]
    assert summary["rollouts_added"] == len(seqs) - 4 > 0
    assert any(abs(a - 1.0) > 1e-6 for a in a_expert.values()), a_expert
    assert metrics[1]["tokens"] == n_tokens
    assert metrics[1]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)

    # Step 2: the policy after step 1 (round 1's export, which the server sampled from); r_s from
    # the run's cached reference log-probs.
    seqs, a_expert = _window(run, 1, mech["problems"], tok)
    cache = {}
    for f in sorted((run / "ref_logp").iterdir()):
        cache.update(torch.load(f))
    ref_lp = [torch.tensor(cache[key], dtype=torch.float64) for key, *_ in seqs]
    policy_lp = _logprobs64(run / "hf" / "policy", [s[1] for s in seqs])
    loss, n_tokens = _loss64(seqs, policy_lp, ref_lp)
    ratios = [math.exp(float((r[s[2] - 1:] - p[s[2] - 1:]).mean())) for s, p, r in zip(seqs, policy_lp, ref_lp)]
    assert max(abs(r - 1) for r in ratios) > 1e-3, ratios  # the policy has moved: the ratio matters
    assert metrics[2]["tokens"] == n_tokens
    assert metrics[2]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    return metrics


def test_linear_step_losses_recomputed_in_float64(mech, linear_run):
    run, _ = linear_run
    _check_rasft_steps(mech, run)


def test_data_parallel_rounds_equal_one_process_and_shard_the_batch(mech, linear_run):
    """DP = 2 (two gloo processes) with rounds: step 1's loss equals the one-process run's, both
    steps equal their float64 recomputation, and each DP rank trained its own, disjoint share of
    the global batch (the ranks' keys, logged with train.logging.log_batch_keys, together are the step's
    sequences)."""
    from transformers import AutoTokenizer

    run = mech["root"] / "dp2"
    rc, out = run_train(mech["config"], run, "train.logging.log_batch_keys=true", nproc=2)
    assert rc == 0, out
    metrics = _check_rasft_steps(mech, run)
    assert metrics[1]["loss"] == pytest.approx(_metrics(linear_run[0])[1]["loss"], rel=1e-6)
    tok = AutoTokenizer.from_pretrained(mech["start"])
    for step in (1, 2):
        by_rank = metrics[step]["dp_keys"]
        assert len(by_rank) == 2 and all(by_rank), by_rank
        assert not set(by_rank[0]) & set(by_rank[1]), by_rank
        window = {key for key, *_ in _window(run, step - 1, mech["problems"], tok)[0]}
        assert sorted(by_rank[0] + by_rank[1]) == sorted(window)


def test_reference_pass_scores_with_the_initial_model_once_and_resume_reuses_it(mech, linear_run):
    """The cached ref_logp of every sequence equals the initial model's float64 log-probs of the
    same tokens; each sequence is scored once (one window file each, no key in two files); the
    resumed run did not rescore window 0."""
    from transformers import AutoTokenizer

    run, first = linear_run
    tok = AutoTokenizer.from_pretrained(mech["start"])
    files = sorted((run / "ref_logp").iterdir())
    assert [f.name for f in files] == ["window_00000.pt", "window_00001.pt"]
    per_file = [torch.load(f) for f in files]
    keys = [k for d in per_file for k in d]
    assert len(keys) == len(set(keys))  # no sequence scored twice
    expected = []
    for r in (0, 1):
        seqs, _ = _window(run, r, mech["problems"], tok)
        expected.append({key for key, *_ in seqs})
    assert [set(d) for d in per_file] == expected  # every trained sequence scored, in its own window
    seqs = {key: tokens for r in (0, 1) for key, tokens, *_ in _window(run, r, mech["problems"], tok)[0]}
    init_lp = _logprobs64(mech["start"], [seqs[k] for k in keys])
    cached = {k: v for d in per_file for k, v in d.items()}
    for key, lp in zip(keys, init_lp):
        torch.testing.assert_close(torch.tensor(cached[key], dtype=torch.float64), lp, rtol=0, atol=2e-4,
                                   msg=lambda m: f"{key}: {m}")
    # Window 0's file was written by the first run and left alone by the resumed one.
    assert first.keys() == {"window_00000.pt"}
    assert (files[0].stat().st_mtime_ns, files[0].read_bytes()) == first["window_00000.pt"]


def _token_terms64(policy_dir: Path, ref_dir: Path, seqs: list[tuple[list[int], int]]) -> list[tuple]:
    """Per sequence, over its loss tokens (labels tokens[prompt_len:]): (log π_θ(y_t), KL_t) with
    KL_t = Σ_v π_ref(v) (log π_ref(v) − log π_θ(v)) over the full vocabulary, float64."""
    from transformers import LlamaForCausalLM

    policy = LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float64).eval()
    ref = LlamaForCausalLM.from_pretrained(ref_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for tokens, prompt_len in seqs:
            ids = torch.tensor([tokens])
            logp_TV = torch.log_softmax(policy(input_ids=ids).logits[0, prompt_len - 1:-1].double(), -1)
            ref_TV = torch.log_softmax(ref(input_ids=ids).logits[0, prompt_len - 1:-1].double(), -1)
            lp_T = logp_TV.gather(1, torch.tensor(tokens[prompt_len:])[:, None])[:, 0]
            out.append((lp_T, (ref_TV.exp() * (ref_TV - logp_TV)).sum(-1)))
    return out


PROFIT_TAU = 0.99  # the starting model puts its demonstration tokens at q ≈ 0.95-0.9996: some on each side

BASELINES = {  # per-token loss of RASFT.md's baselines table, with λ = 0.1 and τ = PROFIT_TAU
    "sft": lambda lp, kl: -lp,
    "dft": lambda lp, kl: lp.exp() * -lp,
    "sft_kl": lambda lp, kl: -lp + 0.1 * kl,
    "asft": lambda lp, kl: lp.exp() * -lp + 0.1 * kl,
    "profit": lambda lp, kl: (lp.exp() > PROFIT_TAU) * -lp,
}


@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_step_in_the_loop_recomputed_in_float64(mech, method):
    """One step of each baseline through the real loop equals Σ_t loss_t / N recomputed in float64
    from the keys the step trained. The KL methods are checked at step 2, where the policy (the
    step-1 checkpoint converted to HF) differs from the reference (the starting model), so the KL
    term is not zero."""
    from transformers import AutoTokenizer

    from megatron_rasft.convert.pipeline import mcore_to_hf

    kl = method in ("sft_kl", "asft")
    run = mech["root"] / f"base_{method}"
    rc, out = run_train(mech["config"], run, f"loss.method={method}", "train.schedule.refresh_interval=0",
                        "train.logging.log_batch_keys=true", f"train.schedule.train_iters={2 if kl else 1}",
                        f"loss.profit_threshold={PROFIT_TAU}")
    assert rc == 0, out
    step = 2 if kl else 1
    policy = mech["start"]
    if kl:
        policy = mech["root"] / f"hf_{method}_step1"
        mcore_to_hf(run / "ckpt" / "iter_0000001" / "model", policy, hf_config_from=mech["start"], quiet=True)
    record = _metrics(run)[step]
    tok = AutoTokenizer.from_pretrained(mech["start"])
    seqs = []
    for key in record["dp_keys"][0]:
        p = mech["problems"][key.removeprefix("e/")]
        prompt = tok(p["prompt"])["input_ids"]
        tokens = prompt + tok(p["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((tokens[:SEQ_LENGTH + 1], len(prompt)))
    assert len(seqs) == 4
    terms = _token_terms64(policy, mech["start"], seqs)
    if kl:
        assert min(float(k.sum()) for _, k in terms) > 1e-6  # the policy has moved off the reference
    if method == "profit":
        kept = [bool(b) for lp, _ in terms for b in lp.exp() > PROFIT_TAU]
        assert any(kept) and not all(kept), kept  # the threshold drops some tokens, not all
    n_tokens = sum(len(lp) for lp, _ in terms)
    loss = sum(float(BASELINES[method](lp, k).sum()) for lp, k in terms) / n_tokens
    assert record["tokens"] == n_tokens
    assert record["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
