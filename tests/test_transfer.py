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

import json
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
    per_rank = spawn(_transfer_job, 4, server.url, jobs, (2, 2, str(tmp_path / "big-mc"), 4.0), timeout_s=600)
    out = per_rank[0]
    before = _hf_logprobs(models[0], ids)
    for label, got, ref in zip(("tp1 (x dp4)", "tp2 pp2"), out["logprobs"], refs):
        diff = _max_diff(got, ref)
        assert diff <= 2e-4, f"{label}: server vs transformers max |Δ log-prob| = {diff:.3g}"
        assert _max_diff(ref, before) > 0.5  # the seeds are told apart by far more than the tolerance
    assert [s["method"] for s in out["stats"]] == ["transfer", "transfer"]
    assert out["stats"][0]["buckets"] > 5  # 0.05 MiB buckets: the tiny model travels in many
    mem = out["memory"]
    mib = 2**20
    print(f"peak extra RSS: stream {mem['stream'] / mib:.1f} MiB, whole-model gather {mem['whole'] / mib:.1f} MiB, "
          f"model {mem['bytes'] / mib:.1f} MiB, largest tensor {mem['largest'] / mib:.1f} MiB, bucket 4 MiB")
    assert mem["bytes"] > 90 * mib
    assert mem["whole"] > 0.9 * mem["bytes"]  # the measurement sees a model copy when there is one
    # One bucket (4 MiB) + the largest Megatron tensor (fc1, 6 MiB) twice on TP rank 0 (its TP parts and
    # their concatenation) + 8 MiB of allocator slack; a whole-model gather needs > 90 MiB.
    assert mem["stream"] < 4 * mib + 2 * 6 * mib + 8 * mib, mem
