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

The `released` scheme is checked the same way (two steps) on a task of its own: worked solutions in
words, long enough to pass the released rollout filters, with the released rule (de-dup, filters,
group-normalised tanh rewards, rollout scale and clip) written out in the test.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from megatron_rasft.demo.task import make_problems, write_jsonl
from helpers.runs import loop_config, run_train, run_trains, step_records
from helpers.tiny import teach_tiny as _teach

SEQ_LENGTH = 64
K = 4
A_MAX, A_MIN, BETA = 1.0, 0.2, 0.5  # RASFT.md's `linear` defaults
R_MIN, R_MAX = 0.4, 1.2


@pytest.fixture(scope="module")
def mech(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("mechanism")
    problems = make_problems(8, seed=3, min_digits=1, max_digits=2)
    write_jsonl(problems, root / "problems.jsonl")
    start = _teach(Path(vllm_server.model_dir), root / "hf_start", problems)
    hf_to_mcore(start, root / "mcore", quiet=True)
    config = loop_config(root / "run.toml", server_url=vllm_server.url, problems=root / "problems.jsonl",
                         tokenizer=start, load=root / "mcore", overrides={
                             "model": {"seq_length": SEQ_LENGTH},
                             "rollout": {"sampling": {"n": K, "max_tokens": 30}},
                             "train": {"optim": {"lr": 1e-2, "lr_warmup_iters": 0}},
                             "checkpoint": {"save_interval": 1}})
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


def _round_samples(run: Path, r: int, problems: dict, tok, seq_length: int):
    """Round r's window rebuilt from the problems and the rollout records, one problem at a time in
    id order: (problem id, problem, prompt ids, expert sequence, K samples by sample index)."""
    rollouts = [json.loads(line) for line in (run / "rollouts" / f"round_{r:03d}.jsonl").read_text().splitlines()]
    window = sorted({ro["problem_id"] for ro in rollouts})
    assert len(window) == 4, window  # rollout selection `all`: the whole window
    for pid in window:
        p = problems[pid]
        prompt = tok(p["prompt"])["input_ids"]
        expert = prompt + tok(p["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        samples = sorted((ro for ro in rollouts if ro["problem_id"] == pid), key=lambda ro: ro["sample_index"])
        assert len(samples) == K
        yield pid, p, prompt, expert[:seq_length + 1], samples


def _rollout_seq(ro: dict, prompt: list[int], tok, seq_length: int) -> list[int]:
    """Prompt + the rollout's tokens, as trained: a stop on EOS keeps EOS in the response."""
    ids = list(ro["token_ids"])
    if ro["finish_reason"] == "stop" and ids[-1:] != [tok.eos_token_id]:
        ids.append(tok.eos_token_id)
    return (prompt + ids)[:seq_length + 1]


def _window(run: Path, r: int, problems: dict, tok) -> tuple[list, dict]:
    """The sequences step r+1 trains, rebuilt from the problems and the round's rollout records:
    [(key, tokens, prompt_len, A_s)] with the `linear` weights, and {problem id: A_E}."""
    seqs, a_expert = [], {}
    for pid, p, prompt, expert, samples in _round_samples(run, r, problems, tok, SEQ_LENGTH):
        correct = [ro for ro in samples if _verdict(ro["text"], p["answer"])]
        k = len(correct)
        p_solve = k / K
        a_expert[pid] = A_MAX - (A_MAX - A_MIN) * p_solve
        seqs.append((f"e/{pid}", expert, len(prompt), a_expert[pid]))
        for ro in correct:
            seqs.append((f"r{r}/{pid}/{ro['sample_index']}", _rollout_seq(ro, prompt, tok, SEQ_LENGTH), len(prompt),
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



# ---- the tests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def linear_run(mech):
    """One step, then resumed to two: the same trajectory as one uninterrupted run (resume is exact,
    tests/test_rounds.py), and the resume's use of the reference cache is checked below."""
    run = mech["root"] / "linear"
    rc, out = run_train(mech["config"], run, "train.schedule.train_iters=1")
    assert rc == 0, out
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "ref_logp").glob("*.pt")}
    rc, out2 = run_train(mech["config"], run, "checkpoint.resume=true")
    assert rc == 0, out2
    assert "[resume] from" in out2
    return run, first


def _check_rasft_steps(mech, run: Path) -> dict:
    """Both steps' logged loss and token count equal the float64 recomputation; returns the metrics."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mech["start"])
    metrics = step_records(run)
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
    for f in sorted((run / "ref_logp").glob("*.pt")):
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
    assert metrics[1]["loss"] == pytest.approx(step_records(linear_run[0])[1]["loss"], rel=1e-6)
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
    files = sorted((run / "ref_logp").glob("*.pt"))
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


KL_METHODS = ("sft_kl", "asft")  # checked at step 2, where the policy has moved off the reference
PROFIT_TAU = 0.99  # the starting model puts its demonstration tokens at q ≈ 0.95-0.9996: some on each side

BASELINES = {  # per-token loss of RASFT.md's baselines table, with λ = 0.1 and τ = PROFIT_TAU
    "sft": lambda lp, kl: -lp,
    "dft": lambda lp, kl: lp.exp() * -lp,
    "sft_kl": lambda lp, kl: -lp + 0.1 * kl,
    "asft": lambda lp, kl: lp.exp() * -lp + 0.1 * kl,
    "profit": lambda lp, kl: (lp.exp() > PROFIT_TAU) * -lp,
}


@pytest.fixture(scope="module")
def baseline_runs(mech):
    """One run per baseline (two steps for the KL methods), two at a time: they have no rounds.
    -> {method: Future of (exit code, output)}."""
    jobs = {}
    for method in BASELINES:
        kl = method in KL_METHODS
        jobs[method] = (mech["config"], mech["root"] / f"base_{method}",
                        [f"loss.method={method}", "rollout.batches_per_round=0",
                         "train.logging.log_batch_keys=true", f"train.schedule.train_iters={2 if kl else 1}",
                         f"loss.profit_threshold={PROFIT_TAU}"])
    return run_trains(jobs)


@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_step_in_the_loop_recomputed_in_float64(mech, baseline_runs, method):
    """One step of each baseline through the real loop equals Σ_t loss_t / N recomputed in float64
    from the keys the step trained. The KL methods are checked at step 2, where the policy (the
    step-1 checkpoint converted to HF) differs from the reference (the starting model), so the KL
    term is not zero."""
    from transformers import AutoTokenizer

    from megatron_rasft.convert.pipeline import mcore_to_hf

    kl = method in KL_METHODS
    run = mech["root"] / f"base_{method}"
    rc, out = baseline_runs[method].result()
    assert rc == 0, out
    step = 2 if kl else 1
    policy = mech["start"]
    if kl:
        policy = mech["root"] / f"hf_{method}_step1"
        mcore_to_hf(run / "ckpt" / "iter_0000001" / "model", policy, hf_config_from=mech["start"], quiet=True)
    record = step_records(run)[step]
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


# ---- the `released` scheme, on natural-language worked solutions ------------------------------
#
# The released filters drop terse outputs such as the toy task's `1+7+0=8;...;\boxed{N}` (too short,
# a shortcut box, symbols), so this set-up has its own task, tokenizer, model and vLLM server:
# two-digit additions with a worked solution in words (> 180 characters, the reasoning marker `=`
# and "therefore"/"hence", distinct sentences), whose phrasing varies between problems so that
# a partly taught model's samples differ from one another (word-3-gram Jaccard below the de-dup
# threshold) and some of them are correct.

PLACES = ("ones", "tens", "hundreds")
OPENINGS = ("We add {a} and {b} digit by digit, starting from the ones place.",
            "Let us add {a} and {b} one column at a time, from the right.",
            "To find {a} + {b}, we add the digits column by column.")
COLUMNS = ("In the {place} place we have {x} + {y} + {c} = {s}, so we write {d} and carry {c2}.",
           "The {place} column gives {x} + {y} + {c} = {s}; we write down {d} and carry {c2}.")
CLOSINGS = ("Therefore the sum of {a} and {b} is {n}, and the final answer is \\boxed{{{n}}}.",
            "Hence {a} + {b} = {n}, so the answer is \\boxed{{{n}}}.")
WORDY_SEQ_LENGTH = 192  # prompt + the longest worked solution + EOS is ~100 tokens: nothing truncated


def _worked_solution(a: int, b: int, rng) -> str:
    """`a + b` worked column by column in words, ending in `\\boxed{a+b}`; phrasing drawn from `rng`."""
    da, db = str(a)[::-1], str(b)[::-1]
    out, carry = [rng.choice(OPENINGS).format(a=a, b=b)], 0
    for i in range(max(len(da), len(db))):
        x, y = (int(d[i]) if i < len(d) else 0 for d in (da, db))
        s = x + y + carry
        out.append(rng.choice(COLUMNS).format(place=PLACES[i], x=x, y=y, c=carry, s=s, d=s % 10, c2=s // 10))
        carry = s // 10
    out.append(rng.choice(CLOSINGS).format(a=a, b=b, n=a + b))
    return " ".join(out)


def _wordy_problems(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"id": f"w{i}", "prompt": f"Question: what is {a} + {b}? Answer: ",
                    "response": _worked_solution(a, b, rng), "answer": str(a + b)})
    return out


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
    """Two `rasft` steps, each after a real round, with `weighting.scheme = "released"` on the wordy
    task (8 problems, two windows of one global batch), against a vLLM server of its own (started on
    the untaught model while the model is taught: the trainer pushes its starting weights before
    round 0). Returns (run dir, problems, start model)."""
    import random
    import threading

    from megatron_rasft.config import ServerConfig
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.rollout.server import RolloutServer
    from helpers.tiny import make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("released")
    rng = random.Random(1)
    corpus = [f"Question: what is {a} + {b}? Answer: " + _worked_solution(a, b, rng)
              for a, b in ((rng.randint(0, 999), rng.randint(0, 999)) for _ in range(500))]
    model_dir = make_tiny_model(root / "model", train_tokenizer(root / "tokenizer", corpus, vocab_size=256))
    problems = _wordy_problems(8, seed=5)
    write_jsonl(problems, root / "problems.jsonl")
    # Taught in a thread while the server starts in this one (the server dies with the thread that
    # started it: PR_SET_PDEATHSIG).
    taught = {}

    def teach():
        try:
            taught["dir"] = _teach(model_dir, root / "hf_start", problems, steps=20)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
            taught["error"] = e

    thread = threading.Thread(target=teach, daemon=True)
    thread.start()
    server = RolloutServer(model_dir, ServerConfig(kv_cache_gib=0.25, max_model_len=512, concurrency=4),
                           log_file=root / "vllm_server.log")
    try:
        server.start()
    finally:
        thread.join()
    try:
        if "error" in taught:
            raise taught["error"]
        start = taught["dir"]
        hf_to_mcore(start, root / "mcore", quiet=True)
        config = loop_config(root / "run.toml", server_url=server.url, problems=root / "problems.jsonl",
                             tokenizer=start, load=root / "mcore", overrides={
                                 "model": {"seq_length": WORDY_SEQ_LENGTH},
                                 "weighting": {"scheme": "released"},
                                 "rollout": {"sampling": {"n": K, "max_tokens": 128}},
                                 "train": {"optim": {"lr": 1e-2, "lr_warmup_iters": 0}}})
        run = root / "run"
        rc, out = run_train(config, run)
        assert rc == 0, out
        yield run, {p["id"]: p for p in problems}, start
    finally:
        server.stop()


def _last_box(text: str):
    """The content of the last `\\boxed{`, braces counted from there; None when there is none or
    it is unclosed (the released `last_boxed_braced`)."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed")
    for j in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + len("\\boxed{"):j]
    return None


def _filtered(text: str) -> bool:
    """The released filters (docs/verify_and_weighting.md, "Weighting schemes", `released` step 3),
    written out here: too short, gibberish/collapsed, shortcut, format."""
    from collections import Counter

    stripped, low = text.strip(), text.lower()
    norm = " ".join(low.split())
    words = norm.split()
    sentences = Counter(s.strip() for s in re.split(r"[.\n]", norm) if len(s.strip()) >= 12)
    windows = Counter(tuple(words[i:i + 8]) for i in range(len(words) - 7))
    markers = ("let me correct", "correcting the calculation", "i need to correct", "rechecking",
               "let's correct", "wait,", "however, this is incorrect", "the previous reasoning was wrong")
    gibberish = (len(stripped) < 20 or (sentences and max(sentences.values()) >= 3)
                 or (len(words) >= 30 and max(windows.values()) >= 3)
                 or sum(m in norm for m in markers) >= 2
                 or sum(not c.isalnum() and not c.isspace() for c in norm) / len(norm) > 0.42)
    phrases = (r"according to the problem[, ]+the correct answer is",
               r"based on the given information[, ]+we know that the correct answer is",
               r"the correct answer is\s*[:：]?\s*\\boxed", r"therefore[, ]+the correct answer is",
               r"thus[, ]+the correct answer is")
    box = _last_box(text)
    shortcut = (any(re.search(p, low) for p in phrases)
                or (box is not None and len(stripped) < 180
                    and re.fullmatch(r"[A-Da-d①-⑨0-9,， ]{1,12}", box.strip()))
                or (box is not None and len(stripped) < 120))
    reasoning = ("=", "therefore", "thus", "hence", "so ", "let ", "we have", "we get", "substitute", "solve")
    bad_format = len(stripped) < 80 or box is None or not any(m in low for m in reasoning)
    return bool(gibberish or shortcut or bad_format)


def _released_weights64(samples: list[tuple[str, bool]]) -> tuple[float, list[float]]:
    """The released rule on [(text, correct)] in sampling order (docs/verify_and_weighting.md):
    de-dup at word-3-gram Jaccard ≥ 0.82 (K_tot = kept), filters, negatives = up to 3 wrong
    survivors below 0.88 similarity to a positive ranked by |sim − 0.45|, group rewards
    [1 + 2(1 − k/K_tot)] + [1]·k + [0]·negatives, s = tanh(0.4 z), A_E = s_0/(1+k), each positive
    0.25·clip(s_j/(1+k), 0.02, 0.15); A_E = 1 and nothing trained when the group is degenerate.
    Returns (A_E, [A_j per sample])."""
    def grams(t):
        w = t.lower().split()
        return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}

    def jac(a, b):
        return 1.0 if not a and not b else (len(a & b) / len(a | b) if a and b else 0.0)

    g = [grams(t) for t, _ in samples]
    kept = []
    for j in range(len(samples)):
        if all(jac(g[j], g[i]) < 0.82 for i in kept):
            kept.append(j)
    survivors = [j for j in kept if not _filtered(samples[j][0])]
    pos = [j for j in survivors if samples[j][1]]
    k, k_tot = len(pos), len(kept)
    if not pos:
        return 1.0, [0.0] * len(samples)
    negs = sorted(((abs(max(jac(g[j], g[i]) for i in pos) - 0.45), j) for j in survivors
                   if not samples[j][1] and max(jac(g[j], g[i]) for i in pos) < 0.88), key=lambda x: x[0])[:3]
    r = [1 + 2 * (1 - k / k_tot)] + [1.0] * k + [0.0] * len(negs)
    if all(abs(x - r[0]) <= 1e-8 + 1e-5 * abs(r[0]) for x in r):
        return 1.0, [0.0] * len(samples)
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / len(r))
    s = [math.tanh(0.4 * (x - mean) / (std + 1e-6)) for x in r]
    a_rollouts = [0.0] * len(samples)
    for j, s_j in zip(pos, s[1:]):
        a_rollouts[j] = 0.25 * min(max(s_j / (1 + k), 0.02), 0.15)
    return s[0] / (1 + k), a_rollouts


def _released_window(run: Path, r: int, problems: dict, tok) -> tuple[list, dict]:
    """The sequences step r+1 trains under the `released` scheme, rebuilt from the problems and the
    round's rollout records with verdicts and weights computed here: [(key, tokens, prompt_len, A_s)]
    and {(problem id, sample index or None for the expert): A}."""
    seqs, weights = [], {}
    for pid, p, prompt, expert, samples in _round_samples(run, r, problems, tok, WORDY_SEQ_LENGTH):
        a_expert, a_rollouts = _released_weights64([(ro["text"], _verdict(ro["text"], p["answer"]))
                                                    for ro in samples])
        weights[(pid, None)] = a_expert
        seqs.append((f"e/{pid}", expert, len(prompt), a_expert))
        for ro, a in zip(samples, a_rollouts):
            if a > 0:
                weights[(pid, ro["sample_index"])] = a
                seqs.append((f"r{r}/{pid}/{ro['sample_index']}", _rollout_seq(ro, prompt, tok, WORDY_SEQ_LENGTH),
                             len(prompt), a))
    return seqs, weights


def test_released_step_losses_recomputed_in_float64(released_run):
    """Two `rasft` steps under the `released` scheme, each equal to Σ_s Σ_t A_s r_s q_t ℓ_t / N
    recomputed in float64 from the rollout texts, with verdicts and the released weights computed
    here and the reference log-probs from the starting model (step 1: r_s = 1; step 2: the policy is
    the step-1 weights, so r_s ≠ 1). Some rollouts pass the filters and are trained on, some A_E ≠ 1,
    and the run's weight records agree with the rule written here."""
    from transformers import AutoTokenizer

    from megatron_rasft.rundir import parse_key

    run, problems, start = released_run
    tok = AutoTokenizer.from_pretrained(start)
    metrics = step_records(run)
    assert sorted(metrics) == [1, 2]
    trained, expert_weights = 0, []
    for r, policy in ((0, start), (1, run / "hf" / "policy")):
        seqs, weights = _released_window(run, r, problems, tok)
        trained += len(seqs) - 4
        expert_weights += [a for (_, index), a in weights.items() if index is None]
        summary = json.loads((run / "rounds" / f"round_{r:03d}.json").read_text())["summary"]
        assert summary["rollouts_added"] == len(seqs) - 4
        # The round's one record of its weights: its queue items (RUN/rounds/round_R.json).
        items = json.loads((run / "rounds" / f"round_{r:03d}.json").read_text())["items"]
        logged = {(parse_key(it["key"]).problem_id, parse_key(it["key"]).sample_index): it["weight"] for it in items}
        assert logged.keys() == weights.keys()
        for key, a in weights.items():
            assert logged[key] == pytest.approx(a, rel=1e-9, abs=1e-12), (r, key)
        ref_lp = _logprobs64(start, [s[1] for s in seqs])
        policy_lp = ref_lp if r == 0 else _logprobs64(policy, [s[1] for s in seqs])
        if r == 1:  # the policy has moved: the ratio matters
            ratios = [math.exp(float((q[s[2] - 1:] - p[s[2] - 1:]).mean())) for s, p, q in zip(seqs, policy_lp, ref_lp)]
            assert max(abs(x - 1) for x in ratios) > 1e-3, ratios
        loss, n_tokens = _loss64(seqs, policy_lp, ref_lp)
        assert metrics[r + 1]["tokens"] == n_tokens, r
        assert metrics[r + 1]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6), r
    assert trained > 0, "no rollout passed the released filters as a correct survivor"
    assert any(abs(a - 1) > 1e-6 for a in expert_weights), expert_weights
