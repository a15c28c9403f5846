"""A rollout fleet: two vLLM replicas behind vllm-router, started by the trainer (rollout/fleet.py).

- One RASFT run with overlapped rounds on a trainer-started fleet of 2 tiny replicas
  (`round_robin`, so both serve), with replica 1 killed (-9) while it holds a request of round 1,
  which runs in the background thread (the kill is read from the replica's own /metrics: not a
  timer). The round completes; the replica is taken out, restarted (from that thread: it must
  outlive it and serve round 2), refreshed and verified, and put back; every (problem, sample) is
  written once; and the rollout records and step losses equal those of the same run on one server
  (the session's, attached). The equality relies on
  batch-invariant sampling, which holds for these fp32 tiny models on CPU: each problem's K samples
  are one request with its own seed, so neither the replica nor what else it batches changes them.
- The same run with `weight_sync = "transfer"` into a fleet of 2 (a group per replica): each
  replica proven at every round; records and step losses equal the one-server run's.
- A replica that comes back on weights older than the round's (the session server behind a real
  router, SIGKILLed, restarted on an older export) is refreshed and proven, tensor check in full,
  before the lost prompts are resubmitted: the samples are the round's weights', not the old ones'.
- An external router started by the SLURM script's router step in front of an external replica:
  generation through it, a router routing elsewhere refused, and a replica that does not come back
  ends generation with a server error naming `startup_timeout_s`.
- Bad input: replicas = 0, url with urls, an unreachable replica URL, a port clash, no router binary,
  router_url without urls, too few GPUs for the replicas.
"""
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from megatron_rasft.demo.task import make_problems, write_jsonl
from megatron_rasft.rollout.server import http_json
from megatron_rasft.rundir import RunDir
from helpers.runs import loop_config, run_train, start_train, step_losses, vllm_children

WINDOW, K = 4, 2


def _running(url: str) -> float:
    """Requests the replica at `url` is generating now (vLLM's own gauge)."""
    try:
        status, body = http_json(f"{url}/metrics", timeout=2.0)
    except OSError:
        return 0.0
    return sum(float(line.split()[-1]) for line in str(body).splitlines()
               if line.startswith("vllm:num_requests_running"))


def _records(run: Path, r: int) -> dict:
    path = run / "rollouts" / f"round_{r:03d}.jsonl"
    recs = [json.loads(s) for s in path.read_text().splitlines()]
    keys = [(d["problem_id"], d["sample_index"]) for d in recs]
    assert len(keys) == len(set(keys)) == WINDOW * K, keys  # each (problem, sample) once
    return {k: d for k, d in zip(keys, recs)}


@pytest.fixture(scope="module")
def setup(vllm_server, tmp_path_factory):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    root = tmp_path_factory.mktemp("fleet")
    hf_to_mcore(vllm_server.model_dir, root / "mcore", quiet=True)
    problems = write_jsonl(make_problems(16, seed=7, min_digits=1, max_digits=2), root / "problems.jsonl")
    config = loop_config(root / "run.toml", server_url=None, problems=problems,
                         tokenizer=vllm_server.model_dir, load=root / "mcore", overrides={
                             "rollout": {"server": {"concurrency": 2, "kv_cache_gib": 0.25, "max_model_len": 512},
                                         "sampling": {"n": K, "max_tokens": 120}, "overlap": True},
                             "train": {"schedule": {"train_iters": 3}}})
    yield root, config, vllm_server
    from megatron_rasft.rollout.refresh import refresh_weights

    refresh_weights(vllm_server, vllm_server.model_dir)  # the one-server run refreshed the session server


@pytest.fixture(scope="module")
def one_server(setup):
    """The run on one server (the session's, attached): what the fleet runs must equal."""
    root, config, server = setup
    one = root / "one"
    rc, out = run_train(config, one, f"rollout.server.url={server.url}")
    assert rc == 0, out[-4000:]
    return one


def _same_records(run: Path, one: Path) -> None:
    """Every round of `run` has the records of `one` (token ids and text), each (problem, sample) once."""
    rounds = sorted(p.name for p in (one / "rollouts").glob("round_*.jsonl"))
    assert rounds == sorted(p.name for p in (run / "rollouts").glob("round_*.jsonl")) and len(rounds) >= 3, rounds
    for r in range(len(rounds)):
        want, got = _records(one, r), _records(run, r)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key]["token_ids"] == want[key]["token_ids"], key
            assert got[key]["text"] == want[key]["text"], key


def test_fleet_round_with_a_replica_killed_equals_one_server(setup, one_server):
    root, config, server = setup
    one, rc_out = one_server, None

    run, console = root / "fleet", root / "fleet.console.log"
    with open(console, "w") as f:
        proc = start_train(config, run, "rollout.server.replicas=2", stdout=f)
    try:
        deadline = time.time() + 600
        while len(vllm_children(proc.pid)) < 2:
            assert proc.poll() is None and time.time() < deadline, console.read_text()[-3000:]
            time.sleep(0.2)
        pid1, port1 = vllm_children(proc.pid)[1]
        url1 = f"http://127.0.0.1:{port1}"
        rollouts = run / "rollouts" / "round_001.jsonl"
        # Replica 1 holds a request of round 1 (the probe's prompt-logprob requests take no
        # generation slot long enough to be seen here; the round's do).
        while not (rollouts.is_file() and _running(url1) > 0):
            assert proc.poll() is None and time.time() < deadline, console.read_text()[-3000:]
            time.sleep(0.01)
        os.killpg(pid1, signal.SIGKILL)
        rc_out = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = console.read_text()
    assert rc_out == 0, text[-4000:]
    assert "starting 2 vLLM replicas" in text
    assert f"replica 1 ({url1}) is being restarted" in text, text[-4000:]
    # Every refresh proves each replica: rounds 0, 1 and 2, and again after the restart.
    for i in (0, 1):
        assert text.count(f"[round] replica {i} serves the step's weights") == 4, text[-4000:]
    assert "[round 1] rollouts of" in text and "(1 server restarts so far)" in text
    # Both replicas served generation requests (their own access logs).
    log = RunDir(run).server_log
    served = [p.read_text().count("POST /v1/completions") for p in (log, log.with_name(f"{log.name}.1"))]
    assert all(n > 0 for n in served), served
    _same_records(run, one)
    assert step_losses(run) == step_losses(one) and sorted(step_losses(one)) == [1, 2, 3]


def test_fleet_refreshed_by_transfer_equals_one_server(setup, one_server):
    """`weight_sync = "transfer"` into a fleet of 2: every bucket goes to each replica over its own
    group, each replica is proven (tensor check and probe) at every round, and the records and step
    losses equal the disk-refreshed run on one server's (the same HF tensors, fp32)."""
    root, config, _ = setup
    run = root / "transfer"
    rc, out = run_train(config, run, "rollout.server.replicas=2", 'rollout.server.weight_sync="transfer"')
    assert rc == 0, out[-4000:]
    for i in (0, 1):
        lines = [s for s in out.splitlines() if s.startswith(f"[round] replica {i} serves the step's weights (transfer")]
        assert len(lines) >= 3 and all("server tensors checked" in s for s in lines[1:]), out[-4000:]
    _same_records(run, one_server)
    assert step_losses(run) == step_losses(one_server)


def test_fleet_settings_are_checked():
    from megatron_rasft.config import ConfigError, ServerConfig

    for kwargs, msg in [({"replicas": 0}, "rollout.server.replicas must be >= 1, got 0"),
                        ({"url": "http://a:1", "urls": ["http://b:1"]}, "set one of them"),
                        ({"replicas": 2, "url": "http://a:1"}, "leave it at 1"),
                        ({"urls": ["a:1"]}, "rollout.server.urls[0] must be an http:// or https:// URL"),
                        ({"replicas": 2, "router_policy": "fastest"}, "rollout.server.router_policy must be one of"),
                        ({"urls": ["http://b:1"], "weight_sync": "transfer"},
                         "external replicas (rollout.server.urls) are refreshed from the disk export"),
                        ({"router_url": "http://a:1"}, "list the replicas behind it in rollout.server.urls"),
                        ({"router_url": "a:1", "urls": ["http://b:1"]},
                         "rollout.server.router_url must be an http:// or https:// URL, got 'a:1'")]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            ServerConfig(**kwargs)


def test_cpu_binding_splits_the_cores():
    from megatron_rasft.rollout.fleet import cpu_binding

    assert [cpu_binding(i, 2, [0, 1, 2, 3, 4])["VLLM_CPU_OMP_THREADS_BIND"] for i in range(2)] == ["0,1,2", "3,4"]
    assert cpu_binding(1, 2, [6, 7]) == {"VLLM_CPU_OMP_THREADS_BIND": "7", "OMP_NUM_THREADS": "1"}
    with pytest.raises(ValueError, match="rollout.server.replicas = 3 but this process may use 2 CPU cores"):
        cpu_binding(0, 3, [0, 1])


def test_replicas_get_the_gpus_after_the_trainers():
    from megatron_rasft.rollout.fleet import replica_devices
    from megatron_rasft.rollout.server import ServerError

    # One node, 8 GPUs listed training first: 6 training ranks (LOCAL_WORLD_SIZE), 2 replicas.
    assert replica_devices(2, ["0", "1", "2", "3", "4", "5", "6", "7"], 6) == ["6", "7"]
    assert replica_devices(1, ["3", "1"], 1) == ["1"]
    with pytest.raises(ServerError, match=r"rollout.server.replicas = 2 needs one GPU per replica after the 4 this "
                                          r"node's training ranks use, but 5 are visible \(0,1,2,3,4\)"):
        replica_devices(2, ["0", "1", "2", "3", "4"], 4)


def test_fleet_bad_input_is_named(tmp_path, monkeypatch):
    import socket
    import sys

    from megatron_rasft.config import ServerConfig
    from megatron_rasft.rollout.fleet import Fleet, Router
    from megatron_rasft.rollout.server import ServerError

    with pytest.raises(ServerError, match=r"rollout.server.urls\[0\]: no healthy vLLM server at http://127.0.0.1:9"):
        Fleet.attach(["http://127.0.0.1:9"], ServerConfig(urls=["http://127.0.0.1:9"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerError, match=f"rollout.server.port {port} on 127.0.0.1 is already in use"):
            Router(["http://127.0.0.1:9"], ServerConfig(port=port, replicas=2)).start()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError, match="need the `vllm-router` binary, which is not installed"):
        Router(["http://127.0.0.1:9"], ServerConfig(replicas=2)).start()


def test_a_replica_back_on_older_weights_is_proven_before_it_serves(vllm_server, tmp_path, capsys):
    """A replica that dies and comes back on weights older than the round's (restarted from a base
    export) is refreshed to the round's weights and proven (its tensor check sees the old tensors
    move to the new ones, and its probe) before the lost prompts are resubmitted: the batch's
    samples equal those of the round's weights, never the old ones'.

    The fleet is the session's real server behind a real vllm-router; the death is a SIGKILL before
    the batch (deterministic: every request finds it dead), and the restart is a real one."""
    import dataclasses

    from megatron_rasft.config import SamplingConfig
    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.fleet import Fleet, Router
    from megatron_rasft.rollout.refresh import hf_prompt_logprobs
    from megatron_rasft.rollout.session import RolloutSession
    from helpers.tiny import reseed_weights

    old = vllm_server.model_dir
    new = reseed_weights(old, tmp_path / "new", seed=123)
    cfg = dataclasses.replace(vllm_server.cfg, port=0, replicas=2)  # the router's settings
    prompts = [f"Q:{a}+{b};A:" for a, b in ((12, 7), (5, 31), (40, 40), (3, 9))]
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=16, seed=11)
    texts = lambda results: [[c.text for c in comps] for comps in results]  # noqa: E731
    router = Router([vllm_server.url], cfg).start()
    try:
        fleet = Fleet([vllm_server], router, cfg, managed=True)
        session = RolloutSession(fleet, RolloutClient(fleet, cfg, progress=False), owns=False)
        on_old = texts(session.generate(prompts, sampling))
        ids = session.client.prompt_logprobs("Q:77+8;A:")[0]
        session.serve(new, ids, hf_prompt_logprobs(new, ids))
        on_new = texts(session.generate(prompts, sampling))
        assert on_new != on_old  # the two weight versions are told apart by their samples
        capsys.readouterr()

        vllm_server.model_dir = old  # its start-up folder: the older export
        os.killpg(vllm_server.proc.pid, signal.SIGKILL)
        vllm_server.proc.wait(timeout=30)
        got = texts(session.generate(prompts, sampling))
    finally:
        router.stop()
    out = capsys.readouterr().out
    assert f"replica 0 ({vllm_server.url}) is being restarted" in out, out
    assert fleet.restarts == 1 and session.client.stats["restarts"] == 1
    assert got == on_new  # not one sample from the older weights it came back on
    # The refresh after the restart checked the replica's tensors (it knew they were the old ones),
    # none skipped, and only then were the prompts resubmitted.
    line = next(s for s in out.splitlines() if s.startswith("[round] replica 0 serves the step's weights"))
    assert re.search(r"\(inplace, .*; [1-9]\d* server tensors checked \(\w+\); probe", line), line
    assert "unchecked" not in line, line


def test_an_external_router_in_front_of_external_replicas(vllm_server, tmp_path):
    """The SLURM layout's router step (`python -m megatron_rasft.rollout.fleet`, as
    examples/slurm_rasft.sbatch runs it on the first rollout node) in front of an external replica
    (the session server behind a proxy, so that it can vanish without being stopped), and the
    trainer's side attached to it with `rollout.server.router_url` + `urls`: generation goes through
    the router, control calls to the replica. A router that routes elsewhere, or none, is refused
    naming the field. When the replica goes away and does not come back within
    `startup_timeout_s`, generation raises a server error naming that setting: what the round turns
    into a failed round (a checkpoint, exit 4; tests/test_server_death.py runs that path)."""
    import subprocess
    import sys

    from megatron_rasft.config import SamplingConfig, ServerConfig
    from megatron_rasft.parallel.net import free_port
    from megatron_rasft.rollout.fleet import Fleet, Router
    from megatron_rasft.rollout.server import ServerError
    from megatron_rasft.rollout.session import RolloutSession, server_errors
    from helpers.proxy import DelayingProxy
    from helpers.runs import ROOT

    port = free_port()
    router_url = f"http://127.0.0.1:{port}"
    with DelayingProxy(vllm_server.url, 0.0) as proxy:
        log = open(tmp_path / "router.log", "wb")
        router = subprocess.Popen([sys.executable, "-m", "megatron_rasft.rollout.fleet", "--config",
                                   str(ROOT / "examples" / "tiny_cpu.toml"), "--host", "127.0.0.1", "--port", str(port),
                                   "--worker-urls", proxy.url, "--set", "rollout.server.router_health_interval_s=1"],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            cfg = ServerConfig(urls=[proxy.url], router_url=router_url, startup_timeout_s=3.0, request_timeout_s=60.0)
            deadline = time.time() + 60
            while True:
                try:
                    session = RolloutSession.open(router_url, cfg, progress=False)
                    break
                except ServerError as e:
                    assert "rollout.server.router_url: no vllm-router answers" in str(e), e
                    assert router.poll() is None and time.time() < deadline, (tmp_path / "router.log").read_text()
                    time.sleep(0.5)
            fleet = session.server
            assert isinstance(fleet, Fleet) and not fleet.managed and fleet.url == router_url
            assert [r.url for r in fleet.replicas] == [proxy.url]
            sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=3)
            assert [len(c) for c in session.generate(["Q:1+2;A:", "Q:3+4;A:"], sampling)] == [2, 2]
            assert proxy.delayed_requests == 2  # both went through the router to the replica
            with pytest.raises(ServerError, match=r"rollout.server.router_url: the router at .* routes to "
                                                  r"\['http://127.0.0.1:\d+'\], not to rollout.server.urls"):
                Router.attach(router_url, ["http://127.0.0.1:9"], cfg)
        except BaseException:
            router.terminate()
            raise
        # The proxy closes here: the replica is gone for good.
    try:
        with pytest.raises(server_errors()) as err:
            session.generate(["Q:5+6;A:"], sampling)
        assert re.search(rf"external rollout server {re.escape(router_url)} is down and did not come back within 3s "
                         r"\(rollout.server.startup_timeout_s\)", str(err.value)), err.value
    finally:
        router.terminate()
        router.wait(timeout=10)
        log.close()
    text = (tmp_path / "router.log").read_text()
    assert "--disable-retries" in text and "--policy round_robin" in text, text[:2000]
    with pytest.raises(ServerError, match=r"rollout.server.router_url: no vllm-router answers at http://127.0.0.1:9"):
        Router.attach("http://127.0.0.1:9", [vllm_server.url], cfg)
