"""`rollout.server.weight_sync = "transfer"`: the policy streamed from Megatron ranks into a real
vLLM (CPU) server through vLLM's weight-transfer API and our gloo engine (rollout/transfer.py,
rollout/vllm_gloo.py).

One server for the module, on a tiny random Llama with TIED embeddings (the case where a reload
must also rebuild the LM head's packed copy), started with the weight-transfer engine. The checks:
- after a transfer from Megatron at TP=1 (×DP4) and at TP=2 × PP=2 (4 gloo ranks), the server's
  log-probs on held prompts equal `transformers`' (fp32) on the HF checkpoint the Megatron weights
  came from, within 2e-4 (both sides fp32; a stale layer or head moves them by > 1);
- peak extra RSS of trainer rank 0 during the stream of a ~100 MB model in 4 MiB buckets: about a
  bucket plus the largest gathered tensor, against > one model copy for a whole-model gather;
- a trainer killed mid-transfer: the server stays paused and says its weights are mixed; the next
  trainer re-initialises the group and its full transfer is served (no hang: every leg has a timeout);
- a RASFT run with `transfer` trains the same step losses as with `disk`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.distributed import spawn
from helpers.runs import loop_config, run_train, step_losses

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Q:12+34;A:46", "Q:7+8;A:15", "Q:4821+397;A:5218", "Q:99+1;A:100"]
TIMEOUT_S = 20.0  # every leg of a transfer in these tests


def _cfg(**kw):
    from megatron_rasft.config import ServerConfig

    return ServerConfig(**{"kv_cache_gib": 0.25, "max_model_len": 512, "concurrency": 4, "weight_sync": "transfer",
                           "transfer_timeout_s": TIMEOUT_S, **kw})


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(server, {seed: HF dir}, tokenizer ids of PROMPTS, work dir): a transfer-enabled server on seed 0."""
    from transformers import AutoTokenizer

    from megatron_rasft.demo.toy import make_tiny_model, train_tokenizer
    from megatron_rasft.rollout.server import RolloutServer

    root = tmp_path_factory.mktemp("transfer")
    tok = train_tokenizer(root / "tokenizer")
    models = {s: make_tiny_model(root / f"m{s}", tok, seed=s, tie_word_embeddings=True) for s in (0, 1, 2, 3)}
    tokenizer = AutoTokenizer.from_pretrained(str(models[0]))
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    server = RolloutServer(models[0], _cfg(), log_file=root / "server.log").start()
    try:
        yield server, models, ids, root
    finally:
        server.stop()


def _hf_logprobs(hf_dir, ids):
    from megatron_rasft.rollout.refresh import hf_prompt_logprobs

    return [hf_prompt_logprobs(hf_dir, x) for x in ids]


def _max_diff(a, b):
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _transfer_job(rank, world_size, url, jobs, memory_job):
    """Each (tp, pp, mcore_dir, ids, expected) of `jobs`: build + load the model at that layout and
    transfer it into the server at `url` through a `RolloutSession` (rank 0), proven with the first
    prompt against `expected`; rank 0 returns the server's log-probs of every prompt in `ids`.
    `memory_job` (tp, pp, mcore_dir, bucket_mib): rank 0's peak extra RSS of the stream and of a
    whole-model gather, with the model's bytes and the largest HF tensor's."""
    from megatron.core import parallel_state as ps

    from megatron_rasft.config import ParallelConfig
    from megatron_rasft.convert.mcore_io import load_mcore_into_model, read_model_config
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.rollout.session import RolloutSession
    from megatron_rasft.rollout.transfer import stream_policy, unpack

    def load(tp, pp, mcore_dir):
        ps.destroy_model_parallel()
        pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        groups = init_distributed(pcfg)
        mcfg, _ = read_model_config(mcore_dir)
        mcfg.transformer_impl = "local"
        model = build_model(mcfg, pcfg).eval()
        load_mcore_into_model([model], mcore_dir)
        return model, mcfg, groups

    out = {"logprobs": [], "stats": []}
    session = RolloutSession.open(url, _cfg(url=url), progress=False) if rank == 0 else None
    for tp, pp, mcore_dir, ids, expected in jobs:
        model, mcfg, groups = load(tp, pp, mcore_dir)
        sender = session.begin_transfer(ids[0]) if rank == 0 else None
        stats = stream_policy([model], mcfg, groups, 0.05, sink=sender.send if sender else None)
        if rank == 0:
            session.transfer_stream_stats = stats
            res = session.serve("(transferred)", ids[0], expected)
            out["stats"].append({**stats, "method": res.method, "probe_diff": res.max_abs_diff_expected})
            out["logprobs"].append([session.client.prompt_logprobs(x)[1] for x in ids])
    tp, pp, mcore_dir, bucket_mib = memory_job
    model, mcfg, groups = load(tp, pp, mcore_dir)
    peaks = {}
    for mode in ("stream", "whole"):
        kept, sizes = [], {"bytes": 0, "largest": 0}

        def sink(b, buf):
            parts = unpack(buf, b.dtypes, b.shapes)
            for t in parts:
                sizes["bytes"] += t.numel() * t.element_size()
                sizes["largest"] = max(sizes["largest"], t.numel() * t.element_size())
            if mode == "whole":  # what a whole-model gather holds at its end: every tensor at once
                kept.extend(t.clone() for t in parts)

        torch.distributed.barrier()
        if rank == 0:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
            base = _rss("VmRSS")
        stream_policy([model], mcfg, groups, bucket_mib, sink=sink)
        if rank == 0:
            peaks[mode] = _rss("VmHWM") - base
            peaks.update(sizes)
        del kept
    out["memory"] = peaks if rank == 0 else None
    return out


def test_transfer_tp1_and_tp2pp2_equal_transformers_and_memory_is_one_bucket(tied, tmp_path):
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.demo.toy import make_tiny_model

    server, models, ids, root = tied
    jobs, refs = [], []
    for seed, (tp, pp) in ((1, (1, 1)), (2, (2, 2))):
        mc = tmp_path / f"m{seed}-tp{tp}pp{pp}"
        hf_to_mcore(models[seed], mc, tp=tp, pp=pp, quiet=True)
        ref = _hf_logprobs(models[seed], ids)
        jobs.append((tp, pp, str(mc), ids, ref[0]))
        refs.append(ref)
    # ~100 MB (fp32), largest HF tensor 3 MiB, in 4 MiB buckets; no server (its shape differs).
    big = make_tiny_model(tmp_path / "big", root / "tokenizer", seed=5, hidden_size=512, intermediate_size=1536,
                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                          tie_word_embeddings=True)
    hf_to_mcore(big, tmp_path / "big-mc", tp=2, pp=2, quiet=True)
    # A fixed mmap threshold: every buffer >= 128 KiB is mapped and unmapped, so RSS follows what is
    # live (glibc's default threshold grows after the first frees and leaves freed buffers resident).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        per_rank = spawn(_transfer_job, 4, server.url, jobs, (2, 2, str(tmp_path / "big-mc"), 4.0), timeout_s=600)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    out = per_rank[0]
    before = _hf_logprobs(models[0], ids)
    for label, got, ref in zip(("tp1 (x dp4)", "tp2 pp2"), out["logprobs"], refs):
        diff = _max_diff(got, ref)
        assert diff <= 2e-4, f"{label}: server vs transformers max |Δ log-prob| = {diff:.3g}"
        assert _max_diff(ref, before) > 0.5  # the seeds are told apart by far more than the tolerance
    mem = out["memory"]
    mib = 2**20
    print(f"peak extra RSS: stream {mem['stream'] / mib:.1f} MiB, whole-model gather {mem['whole'] / mib:.1f} MiB, "
          f"model {mem['bytes'] / mib:.1f} MiB, largest tensor {mem['largest'] / mib:.1f} MiB, bucket 4 MiB")
    assert mem["bytes"] > 90 * mib
    assert mem["whole"] > 0.8 * mem["bytes"]  # the measurement sees a model copy when there is one
    # One bucket (4 MiB) + the largest Megatron tensor (fc1, 6 MiB) twice on TP rank 0 (its TP parts and
    # their concatenation) + 8 MiB of allocator slack; a whole-model gather needs > 90 MiB.
    assert mem["stream"] < 4 * mib + 2 * 6 * mib + 8 * mib, mem
    assert [s["method"] for s in out["stats"]] == ["transfer", "transfer"]
    assert out["stats"][0]["buckets"] > 5  # 0.05 MiB buckets: the tiny model travels in many


_KILLED_TRAINER = r'''
import sys, threading, time
from pathlib import Path
from safetensors.torch import load_file
from megatron_rasft.config import ServerConfig
from megatron_rasft.rollout.server import RolloutServer
from megatron_rasft.rollout.transfer import Bucket, WeightSender, pack

url, hf_dir, ready, timeout_s = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
sd = load_file(str(Path(hf_dir) / "model.safetensors"))
names = sorted(sd)
sender = WeightSender(RolloutServer.attach(url, ServerConfig(url=url)), timeout_s)
sender.begin()
first = names[: len(names) // 2]
b = Bucket(0, [], first, [sd[n].dtype for n in first], [list(sd[n].shape) for n in first],
           sum(sd[n].numel() * sd[n].element_size() for n in first))
sender.send(b, pack([sd[n] for n in first], b.nbytes, "cpu"))
assert sender.error is None, sender.error
rest = names[len(names) // 2:]
info = {"names": rest, "dtype_names": [str(sd[n].dtype).removeprefix("torch.") for n in rest],
        "shapes": [list(sd[n].shape) for n in rest]}
threading.Thread(target=sender._post, args=("/update_weights", {"update_info": info}), daemon=True).start()
time.sleep(1.0)  # the worker now waits inside /update_weights for the bucket's broadcast
ready.write_text("mid-transfer")
time.sleep(600)
'''


def test_trainer_killed_mid_transfer_leaves_server_paused_and_next_trainer_reinitialises(tied, tmp_path):
    from megatron_rasft.rollout.server import http_json
    from megatron_rasft.rollout.session import RolloutSession

    server, models, ids, _ = tied
    script, ready = tmp_path / "trainer.py", tmp_path / "ready"
    script.write_text(_KILLED_TRAINER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), server.url, str(models[3]), str(ready), str(TIMEOUT_S)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the trainer never reached the middle of its transfer"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    t0 = time.monotonic()
    # Mixed weights are not served: the engine stays paused (a request gets no answer) and the
    # worker reports the half-done transfer (once its broadcast failed or timed out: bounded).
    status, body = http_json(f"{server.url}/is_paused", timeout=10)
    assert status == 200 and body["is_paused"] is True, body
    with pytest.raises(OSError):
        http_json(f"{server.url}/v1/completions", {"model": server.model_name(), "prompt": "Q:1+1;A:",
                                                   "max_tokens": 2}, timeout=3)
    session = RolloutSession.open(server.url, _cfg(url=server.url), progress=False)
    assert session.server.managed is False
    from megatron_rasft.rollout.transfer import WeightSender

    probe = WeightSender(session.server, 3 * TIMEOUT_S).status()
    assert probe["complete"] is False and probe["active"] is False, probe
    assert time.monotonic() - t0 < 3 * TIMEOUT_S + 15  # no hang
    # The next trainer: a new group, a full transfer (seed 3, from its HF tensors), proven by the probe.
    from safetensors.torch import load_file

    from megatron_rasft.rollout.transfer import Bucket, pack

    expected = _hf_logprobs(models[3], ids)
    sender = session.begin_transfer(ids[0])
    assert sender.dirty and session._before is None  # a server with mixed weights is not probed or resumed
    sd = load_file(str(models[3] / "model.safetensors"))
    for chunk in (sorted(sd)[:7], sorted(sd)[7:]):
        b = Bucket(0, [], chunk, [sd[n].dtype for n in chunk], [list(sd[n].shape) for n in chunk],
                   sum(sd[n].numel() * sd[n].element_size() for n in chunk))
        sender.send(b, pack([sd[n] for n in chunk], b.nbytes, "cpu"))
    res = session.serve("(transferred)", ids[0], expected[0])
    assert res.method == "transfer"
    got = [session.client.prompt_logprobs(x)[1] for x in ids]
    assert _max_diff(got, expected) <= 2e-4
    assert WeightSender(session.server, TIMEOUT_S).status()["complete"] is True


def test_rasft_run_with_transfer_trains_the_same_losses_as_with_disk(tied, tmp_path):
    """Overlapped rounds: the first round is synchronous (`Rounds.run_round`), the next ones are
    started at the window boundary (`Rounds.begin`) and sampled while the step trains, so the
    transfer must complete from the boundary's weights for the losses to match."""
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.demo.task import make_problems, write_jsonl
    from megatron_rasft.rollout.server import http_json

    server, models, _, _ = tied
    hf_to_mcore(models[0], tmp_path / "mcore", quiet=True)
    problems = write_jsonl(make_problems(12, seed=3, min_digits=1, max_digits=2), tmp_path / "problems.jsonl")
    # 3 steps: round 2 starts at the boundary after step 1, from weights that moved.
    config = loop_config(tmp_path / "run.toml", server_url=server.url, problems=problems, tokenizer=models[0],
                         load=tmp_path / "mcore", overrides={"rollout": {"overlap": True},
                                                            "train": {"schedule": {"train_iters": 3}}})
    losses, outs = {}, {}
    for sync in ("disk", "transfer"):
        # Back to the run's initial weights first: the trainer attaches to this server by URL, and an
        # attached server gets vLLM's plain reload, which leaves a tied LM head as it was (rollout.md).
        status, body = http_json(f"{server.url}/collective_rpc", {"method": "reload_weights_tied",
                                                                "kwargs": {"weights_path": str(models[0])}},
                                 timeout=120, method="POST")
        assert status == 200, body
        rc, out = run_train(config, tmp_path / sync, f"rollout.server.weight_sync={sync}",
                            f"rollout.server.transfer_timeout_s={TIMEOUT_S}", timeout_s=600)
        assert rc == 0, out[-4000:]
        losses[sync], outs[sync] = step_losses(tmp_path / sync), out
    assert outs["transfer"].count("server serves the step's weights (transfer") == 3
    assert "server serves the step's weights (inplace" in outs["disk"]
    assert len(losses["disk"]) == 3
    assert losses["transfer"] == pytest.approx(losses["disk"], abs=1e-6), losses
    # With transfer the run leaves its final weights in RUN/hf/policy: the same tensors as an
    # independent conversion of its last checkpoint.
    from safetensors.torch import load_file

    from megatron_rasft.convert.pipeline import mcore_to_hf

    run = tmp_path / "transfer"
    assert f"[round] final policy exported to {run / 'hf' / 'policy'}" in outs["transfer"]
    mcore_to_hf(run / "ckpt" / "iter_0000003" / "model", tmp_path / "final_hf", hf_config_from=models[0], quiet=True)
    got, want = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
                 for d in (run / "hf" / "policy", tmp_path / "final_hf"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_buckets_are_bounded_per_stage_and_config_is_checked():
    from megatron_rasft.config import ServerConfig
    from megatron_rasft.rollout.transfer import pack, plan_buckets, unpack

    f32 = torch.float32
    stages = [(0, [("a", [("A", (4, 4))], f32), ("b", [("B1", (2, 4)), ("B2", (2, 4))], f32),
                   ("big", [("G", (64, 4))], f32)]),
              (2, [("c", [("C", (4,))], f32)])]
    buckets = plan_buckets(stages, bucket_bytes=128)
    assert [(b.owner, b.names) for b in buckets] == [(0, ["A", "B1", "B2"]), (0, ["G"]), (2, ["C"])]
    assert [b.nbytes for b in buckets] == [128, 1024, 16]  # an item larger than a bucket travels alone
    ts = [torch.randn(4, 4), torch.randn(2, 4), torch.randn(2, 4)]
    back = unpack(pack(ts, 128, "cpu"), [f32] * 3, [(4, 4), (2, 4), (2, 4)])
    assert all(torch.equal(a, b) for a, b in zip(ts, back))
    with pytest.raises(ValueError, match="rollout.server.weight_sync"):
        ServerConfig(weight_sync="nccl")
    with pytest.raises(ValueError, match="rollout.server.bucket_mib"):
        ServerConfig(bucket_mib=0)


def test_aborted_transfer_leaves_server_paused_and_the_next_one_restarts_it(tied):
    """A leg that fails (here the worker refuses a tensor name) aborts the transfer: `serve` raises,
    the server we started stays paused, and the next refresh restarts it before a full transfer."""
    from safetensors.torch import load_file

    from megatron_rasft.rollout.server import http_json
    from megatron_rasft.rollout.session import RolloutSession
    from megatron_rasft.rollout.transfer import Bucket, TransferError, pack

    server, models, ids, _ = tied
    session = RolloutSession.open(server, progress=False)  # the server object itself: one we started
    sd = load_file(str(models[1] / "model.safetensors"))
    names = sorted(sd)

    def bucket(ns, rename=None):
        b = Bucket(0, [], [rename or n for n in ns], [sd[n].dtype for n in ns], [list(sd[n].shape) for n in ns],
                   sum(sd[n].numel() * sd[n].element_size() for n in ns))
        return b, pack([sd[n] for n in ns], b.nbytes, "cpu")

    sender = session.begin_transfer(ids[0])
    sender.send(*bucket(names[:5]))
    sender.send(*bucket(names[5:6], rename="model.layers.0.no_such.weight"))
    assert sender.error is not None
    sender.send(*bucket(names[6:]))  # dropped: the stream goes on without the server
    with pytest.raises(TransferError, match="aborted"):
        session.serve("(transferred)", ids[0], _hf_logprobs(models[1], ids[:1])[0])
    assert http_json(f"{server.url}/is_paused", timeout=10)[1]["is_paused"] is True
    restarts = server.restarts
    sender = session.begin_transfer(ids[0])
    assert server.restarts == restarts + 1  # restarted on its start-up weights, group re-made
    for ns in (names[:10], names[10:]):
        sender.send(*bucket(ns))
    expected = _hf_logprobs(models[1], ids)
    assert session.serve("(transferred)", ids[0], expected[0]).method == "transfer"
    assert _max_diff([session.client.prompt_logprobs(x)[1] for x in ids], expected) <= 2e-4


def test_stale_or_partial_transfer_is_caught_by_the_tensor_check(tied, tmp_path):
    """`transfer` runs the refresh check too (`refresh_check.RefreshCheck`, the trainer's digests
    taken from the stream). Weights that moved far less than `refresh_atol` on the probe: a full
    transfer passes the check (every server tensor changed, as the trainer's did); one that leaves
    layer 1 unapplied (the trainer streamed it, the server never got it: a stage not sent) is
    caught and named, although the probe alone cannot tell the two apart."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from megatron_rasft.rollout.refresh import RefreshError
    from megatron_rasft.rollout.session import RolloutSession
    from megatron_rasft.rollout.transfer import Bucket, pack

    server, models, ids, _ = tied
    session = RolloutSession.open(server, progress=False)  # the server object itself: one we started
    base = load_file(str(models[2] / "model.safetensors"))
    names = sorted(base)
    gen = torch.Generator().manual_seed(0)

    def nudged(k: int) -> tuple:
        """models[2]'s weights moved by k × 1e-4 noise, saved as an HF folder -> (state dict, folder)."""
        sd = {n: t + k * 1e-4 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in base.items()}
        out = tmp_path / f"nudged{k}"
        shutil.copytree(models[2], out)
        save_file(sd, str(out / "model.safetensors"))
        return sd, out

    def transfer(sd, hf_dir, unapplied=()):
        sender = session.begin_transfer(ids[0])
        for n in names:
            b = Bucket(0, [], [n], [sd[n].dtype], [list(sd[n].shape)], sd[n].numel() * sd[n].element_size())
            buf = pack([sd[n]], b.nbytes, "cpu")
            if n in unapplied:
                sender.note(b, buf)  # streamed by the trainer, never applied by the server
            else:
                sender.send(b, buf)
        return session.serve("(transferred)", ids[0], _hf_logprobs(hf_dir, ids[:1])[0])

    transfer(base, models[2])  # the server's weights known from here on (a first check may skip)
    sd1, dir1 = nudged(1)
    res = transfer(sd1, dir1)
    assert res.check is not None and res.check.checked > 0 and res.check.skipped == 0, res.check
    sd2, dir2 = nudged(2)
    probe1, probe2 = _hf_logprobs(dir1, ids[:1])[0], _hf_logprobs(dir2, ids[:1])[0]
    assert _max_diff([probe1], [probe2]) < server.cfg.refresh_atol  # within what the probe accepts
    layer1 = [n for n in names if ".layers.1." in n]
    with pytest.raises(RefreshError, match=r"stale or partial: .*layers\.1\."):
        transfer(sd2, dir2, unapplied=layer1)
