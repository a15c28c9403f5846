"""The rollout server, client, refresh and stage against a real vLLM (CPU) server on a tiny model.

All tests share the session's `vllm_server` (tests/conftest.py); those that kill it or change its
weights put it back before they end.
"""
import dataclasses
import json
import os
import signal
import socket
import time

import pytest

from megatron_rasft.config import ServerConfig
from megatron_rasft.records import Problem, Rollout, read_records, write_records
from megatron_rasft.config import SamplingConfig
from megatron_rasft.rollout.client import RolloutClient
from megatron_rasft.rollout.refresh import hf_prompt_logprobs, refresh_weights
from megatron_rasft.rollout.server import RolloutServer, ServerError
from megatron_rasft.rundir import RunDir
from helpers.tiny import arithmetic_corpus, reseed_weights

PROMPTS = ["Q:12+34;A:", "Q:7+5;A:", "Q:305+98;A:", "Q:4821+397;A:"]


def _client(server, **overrides):
    return RolloutClient(server, dataclasses.replace(server.cfg, **overrides), progress=False)


def _texts(results):
    return [[c.text for c in comps] for comps in results]


def test_seeds_reproduce_and_decorrelate(vllm_server):
    client = _client(vllm_server)
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=16, seed=7)
    # The same prompt twice under different keys, plus other prompts.
    prompts = [PROMPTS[0], PROMPTS[0], *PROMPTS[1:]]
    keys = ["a", "b", "c", "d", "e"]
    first = client.generate(prompts, sampling, keys=keys)
    assert [len(c) for c in first] == [3] * len(prompts)
    # Same seeds -> same samples, whatever else is in the batch or its order.
    again = client.generate(prompts[::-1], sampling, keys=keys[::-1])[::-1]
    assert _texts(again) == _texts(first)
    assert [c.token_ids for c in again[2]] == [c.token_ids for c in first[2]]
    alone = client.generate([prompts[3]], sampling, keys=["d"])
    assert _texts(alone) == _texts(first[3:4])
    # Different keys on the same prompt, and the n samples of one request, are not copies.
    assert _texts(first)[0] != _texts(first)[1]
    assert len(set(_texts(first)[0])) == 3
    # Another base seed changes every prompt's samples.
    other = client.generate(prompts, SamplingConfig(n=3, temperature=1.0, max_tokens=16, seed=8), keys=keys)
    assert all(a != b for a, b in zip(_texts(other), _texts(first)))


def test_token_ids_and_logprobs_match_transformers(vllm_server):
    from transformers import AutoTokenizer

    client = _client(vllm_server)
    tok = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    # Temperature 1, no top-p/top-k: the sampling distribution is the model's own.
    sampling = SamplingConfig(n=2, temperature=1.0, top_p=1.0, max_tokens=24, seed=3)
    results = client.generate(PROMPTS[:3], sampling)
    for prompt, comps in zip(PROMPTS[:3], results):
        prompt_ids = tok(prompt).input_ids
        assert client.prompt_logprobs(prompt)[0] == prompt_ids  # vLLM tokenises like transformers
        for c in comps:
            assert len(c.token_ids) == len(c.logprobs) > 0 and c.finish_reason in ("length", "stop")
            ref = hf_prompt_logprobs(vllm_server.model_dir, prompt_ids + c.token_ids)[len(prompt_ids) - 1:]
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) <= 1e-2
            assert tok.decode(c.token_ids, skip_special_tokens=True).startswith(c.text)
    # Token-id prompts are sent as they are.
    by_ids = client.generate([tok(PROMPTS[0]).input_ids], sampling)
    assert _texts(by_ids) == _texts(results[:1])


def test_logprobs_are_those_of_the_tempered_nucleus_that_sampled(vllm_server):
    """At temperature 0.7 and top-p 0.95 each sampled token's log-prob is log softmax(logits / T)
    renormalised over the top-p nucleus (the server runs with `--logprobs-mode
    processed_logprobs`), recomputed from `transformers` with its own top-p warper; vLLM's default
    raw log-probs (the model's, at T = 1) are far from it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TopPLogitsWarper

    T, top_p = 0.7, 0.95
    client = _client(vllm_server)
    tok = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_server.model_dir, dtype=torch.float32).eval()
    results = client.generate(PROMPTS[:2], SamplingConfig(n=2, temperature=T, top_p=top_p, max_tokens=24, seed=3))
    worst_raw = 0.0
    for prompt, comps in zip(PROMPTS[:2], results):
        n = len(tok(prompt).input_ids)
        for c in comps:
            ids = torch.tensor([tok(prompt).input_ids + c.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, n - 1:-1].double()
            nucleus = TopPLogitsWarper(top_p)(ids, logits / T)  # -inf outside the nucleus
            want = torch.log_softmax(nucleus, -1).gather(-1, ids[0, n:, None])[:, 0]
            raw = torch.log_softmax(logits, -1).gather(-1, ids[0, n:, None])[:, 0]
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            assert (got - want).abs().max() <= 1e-2, (got, want)
            worst_raw = max(worst_raw, (got - raw).abs().max().item())
    assert worst_raw > 0.1  # the raw mode would fail the comparison above


def test_inplace_refresh_serves_new_weights(vllm_server, tmp_path):
    old_dir = vllm_server.model_dir
    new_dir = reseed_weights(old_dir, tmp_path / "new", seed=123)
    client = _client(vllm_server)
    probe = PROMPTS[3]
    ids = client.prompt_logprobs(probe)[0]
    expected_old = hf_prompt_logprobs(old_dir, ids)
    expected_new = hf_prompt_logprobs(new_dir, ids)
    assert max(abs(a - b) for a, b in zip(expected_old, expected_new)) > 0.1
    # Warm the prefix cache with the old weights: a stale cache would leak into the probe.
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=12, seed=1)
    client.generate([probe], sampling)
    try:
        result = refresh_weights(vllm_server, new_dir, client, probe=probe, expected=expected_new)
        assert result.method == "inplace", result.fallback_reason
        assert result.max_abs_diff_expected <= 1e-2 and result.max_abs_diff_before > 0.1
        # Sampled tokens' log-probs come from the new weights too.
        comp = client.generate([probe], sampling)[0][0]
        ref = hf_prompt_logprobs(new_dir, ids + comp.token_ids)[len(ids) - 1:]
        assert max(abs(a - b) for a, b in zip(comp.logprobs, ref)) <= 1e-2
    finally:
        back = refresh_weights(vllm_server, old_dir, client, probe=probe, expected=expected_old)
    assert back.method == "inplace" and vllm_server.model_dir == str(old_dir)


def test_killed_server_is_restarted_without_losing_rollouts(vllm_server):
    client = _client(vllm_server, concurrency=2)
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=48, seed=5)
    prompts = arithmetic_corpus(10, seed=3)
    prompts = [p[:p.index(";A:") + 3] for p in prompts]
    expected = client.generate(prompts, sampling)
    seen = []

    def kill_after_first(i, comps):
        seen.append(i)
        if len(seen) == 2:  # mid-batch: other requests are in flight or queued
            os.killpg(vllm_server.proc.pid, signal.SIGKILL)

    results = client.generate(prompts, sampling, on_result=kill_after_first)
    assert client.stats["restarts"] == 1 and vllm_server.alive()
    assert sorted(seen) == list(range(len(prompts)))  # every prompt reported exactly once
    assert [len(c) for c in results] == [2] * len(prompts)
    assert _texts(results) == _texts(expected)  # resubmitted prompts: same seeds, same samples


def test_port_in_use_is_refused_before_starting(vllm_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        server = RolloutServer(vllm_server.model_dir, ServerConfig(port=port))
        with pytest.raises(ServerError, match=f"port {port} .* already in use"):
            server.start()
        assert server.proc is None
        from megatron_rasft.cli import main
        assert main(["serve", "--model", vllm_server.model_dir, "--set", f"rollout.server.port={port}"]) == 2
    with pytest.raises(ServerError, match="has no config.json"):
        RolloutServer(vllm_server.model_dir + "/missing", ServerConfig()).start()


def test_failed_start_shows_the_log_tail(vllm_server, tmp_path):
    # A context longer than the model's max_position_embeddings (512): vLLM refuses at start-up.
    server = RolloutServer(vllm_server.model_dir, ServerConfig(max_model_len=4096), log_file=tmp_path / "log")
    with pytest.raises(ServerError, match=r"(?s)exited with code .*max_model_len"):
        server.start()
    assert server.proc is None


def test_attach_to_external_server(vllm_server):
    attached = RolloutServer.attach(vllm_server.url)
    assert not attached.managed and attached.model_name() == vllm_server.model_name()
    with pytest.raises(ServerError, match="no healthy vLLM server"):
        RolloutServer.attach("http://127.0.0.1:9", timeout_s=1.0)


def _run_stage(capsys, run_dir, url, model_dir):
    """`python -m megatron_rasft rollout ...`, in this process (saves the imports of a new one)."""
    from megatron_rasft.cli import main

    rc = main(["rollout", "--run-dir", str(run_dir), "--round", "1", "--set", f"rollout.server.url={url}",
               "--tokenizer", str(model_dir), "--set", "rollout.sampling.n=2", "--set", "rollout.sampling.max_tokens=12",
               "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_rollout_stage_resumes_without_regenerating(vllm_server, tmp_path, capsys):
    texts = arithmetic_corpus(5, seed=11)
    problems = [Problem(id=f"p{i}", prompt=t[:t.index(";A:") + 3], response=t[t.index(";A:") + 3:])
                for i, t in enumerate(texts)]
    write_records(tmp_path / "problems.jsonl", problems)
    rc, stdout = _run_stage(capsys, tmp_path, vllm_server.url, vllm_server.model_dir)
    assert rc == 0, stdout
    out = RunDir(tmp_path).rollouts(1)
    full = list(read_records(out, Rollout))
    assert len(full) == 10 and {r.problem_id for r in full} == {p.id for p in problems}

    # Simulate a kill: keep p0 and p1 (p1's text marked, to prove it is not regenerated), then
    # one sample of p2 and a torn half line of p2's second sample.
    lines = out.read_text().splitlines(keepends=True)
    by_pid = {}
    for line in lines:
        by_pid.setdefault(json.loads(line)["problem_id"], []).append(line)
    marked = [l.replace('"text": "', '"text": "KEPT') for l in by_pid["p1"]]
    out.write_text("".join(by_pid["p0"] + marked + by_pid["p2"][:1]) + by_pid["p2"][1][:20])
    with pytest.warns(UserWarning, match="partially written|incompletely written"):
        rc, stdout = _run_stage(capsys, tmp_path, vllm_server.url, vllm_server.model_dir)
    assert rc == 0, stdout
    assert "3 problems (2 already done)" in stdout
    resumed = list(read_records(out, Rollout))
    assert len(resumed) == 10
    key = lambda r: (r.problem_id, r.sample_index)  # noqa: E731
    got = {key(r): r for r in resumed}
    for r in full:
        if r.problem_id == "p1":
            assert got[key(r)].text == "KEPT" + r.text
        else:  # regenerated problems reproduce the same samples (seeded by round and problem id)
            assert got[key(r)].token_ids == r.token_ids and got[key(r)].text == r.text

    # Malformed input: the error names the file and line.
    with open(tmp_path / "problems.jsonl", "a") as f:
        f.write("{not json\n")
    rc, stdout = _run_stage(capsys, tmp_path, vllm_server.url, vllm_server.model_dir)
    assert rc == 2 and "problems.jsonl:6" in stdout, stdout


@pytest.mark.slow
def test_refresh_falls_back_to_restart_when_shapes_change(vllm_server, tmp_path):
    """In-place reload cannot change shapes: the refresh restarts the server on the new checkpoint
    (and back). Two restarts, so `slow`."""
    from helpers.tiny import make_tiny_model

    old_dir = vllm_server.model_dir
    wide = make_tiny_model(tmp_path / "wide", old_dir, seed=5, intermediate_size=384)
    client = _client(vllm_server)
    ids = client.prompt_logprobs(PROMPTS[0])[0]
    try:
        result = refresh_weights(vllm_server, wide, client, probe=PROMPTS[0],
                                 expected=hf_prompt_logprobs(wide, ids))
        assert result.method == "restart" and result.max_abs_diff_expected <= 1e-2
    finally:
        back = refresh_weights(vllm_server, old_dir, client, probe=PROMPTS[0],
                               expected=hf_prompt_logprobs(old_dir, ids))
    assert back.max_abs_diff_expected <= 1e-2


def test_a_server_started_from_a_thread_that_ends_keeps_running():
    """The kernel ends a server (SIGTERM, PR_SET_PDEATHSIG) when the *thread* that forked it ends:
    a server restarted from an overlapped round's thread died with that thread. `spawn` forks from
    one long-lived thread. A `sleep` stands in for the server (the property is the fork's)."""
    import threading

    from megatron_rasft.rollout.server import spawn

    procs = []
    t = threading.Thread(target=lambda: procs.append(spawn(["sleep", "30"])))
    t.start()
    t.join()
    try:
        time.sleep(0.5)  # the signal would be delivered at once
        assert procs[0].poll() is None, f"the child died with its starting thread (code {procs[0].returncode})"
    finally:
        procs[0].kill()
        procs[0].wait()
