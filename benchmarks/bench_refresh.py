"""Weight refresh of a running vLLM server: `weight_sync = "disk"` against `"transfer"`, per component,
in one process on one box (rollout/refresh.py, rollout/transfer.py; docs/rollout.md).

One trainer process (Megatron, TP=1, the model loaded from the converted checkpoint, no optimizer)
and one vLLM server started on the model's HF folder with the weight-transfer engine (gloo on CPU,
nccl on GPU). Each round, both paths, in turn:
- disk: the export (`convert.export.export_to_hf`: gather + serialize + write of the safetensors in
  one pass, timed as one), then the in-place reload (`refresh.reload_in_place`: pause, vLLM reads +
  loads, prefix-cache reset, resume); "read" is the same files read again into memory by this process
  (from the page cache, as the server read them), "load" the reload minus it;
- transfer: `WeightSender.begin` (pause, update session), `stream_policy` (gather + pack on the
  trainer; send = the group broadcast with the worker's concurrent `load_weights`), `end` (the
  worker's finish = layerwise post-processing, prefix-cache reset, resume).
The trainer is blocked for the whole refresh in both (it runs at the window boundary), so "blocked"
is each path's total; the probe check that follows either path is timed once and reported apart.
Before each round the weights get a small perturbation so every refresh moves them; after the last
round of each path the server's log-probs are checked against the trainer's weights via the probe.

  python benchmarks/bench_refresh.py --model smollm2           # SmolLM2-135M (prepared from its GGUF)
  python benchmarks/bench_refresh.py --model random-1b         # ~1B-shaped random Llama (fp32, ~4.4 GB)
  python benchmarks/bench_refresh.py --model PATH --rounds 3 --bucket-mib 256
  python benchmarks/bench_refresh.py --smoke                   # tiny random model, one round
  python benchmarks/bench_refresh.py --smoke --server-url URL --model HF_DIR   # attached (the test suite)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_llama(out: Path, tokenizer_dir: Path, **shape) -> Path:
    """A random Llama of `shape` (HF config keys), fp32, saved with the tokenizer."""
    from megatron_rasft.demo.toy import make_tiny_model

    return make_tiny_model(out, tokenizer_dir, seed=0, initializer_range=0.02, **shape)


def model_dir(name: str, work: Path) -> Path:
    if name == "smollm2":
        from megatron_rasft.demo.real_model.model import prepare

        return prepare("smollm2", work / "smollm2", quiet=True)
    if name in ("tiny", "random-1b"):
        from megatron_rasft.demo.toy import train_tokenizer

        tok = train_tokenizer(work / "tokenizer")
        if name == "tiny":
            return random_llama(work / "tiny", tok, tie_word_embeddings=True)
        # Llama-3.2-1B's layer shapes (hidden 2048, 16 layers, GQA 32/8, ffn 8192) with this
        # tokenizer's small vocabulary: ~0.97B parameters in the layers.
        return random_llama(work / "random-1b", tok, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                            max_position_embeddings=2048)
    return Path(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | random-1b | tiny | an HF folder")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket-mib", type=float, default=256.0)
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--server-url", default=None,
                    help="attach to this running server (started with the weight-transfer engine) serving --model")
    ap.add_argument("--smoke", action="store_true", help="tiny random model (or --model with --server-url), one round")
    args = ap.parse_args()
    if args.smoke:
        args.rounds = 1
        if args.server_url is None:
            args.model = "tiny"
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_rasft.parallel.net import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_refresh_"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        results, server = run(args, work)
    finally:
        if server is not None and server.managed:
            server.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def run(args, work: Path):
    from megatron_rasft.config import ParallelConfig, ServerConfig
    from megatron_rasft.convert.export import export_to_hf
    from megatron_rasft.convert.mcore_io import load_mcore_into_model, read_model_config
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel import cpu
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.refresh import hf_prompt_logprobs, reload_in_place
    from megatron_rasft.rollout.server import RolloutServer
    from megatron_rasft.rollout.transfer import WeightSender, stream_policy

    cpu.enable()
    t0 = time.perf_counter()
    hf = model_dir(args.model, work)
    hf_to_mcore(hf, work / "mcore", quiet=True)
    pcfg = ParallelConfig()
    groups = init_distributed(pcfg)
    mcfg, meta = read_model_config(work / "mcore")
    mcfg.transformer_impl = "local"
    model = build_model(mcfg, pcfg).eval()
    load_mcore_into_model([model], work / "mcore")
    shutil.rmtree(work / "mcore")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"[bench] {args.model}: {nbytes / 2**30:.2f} GiB of parameters, prepared in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    cfg = ServerConfig(weight_sync="transfer", kv_cache_gib=0.5, max_model_len=512, transfer_timeout_s=1800,
                       startup_timeout_s=1800)
    export = work / "policy"
    export_to_hf([model], export, mcfg, groups, hf_config=meta["hf_config"], tokenizer_dir=hf)
    if args.server_url:  # its owner stops it (and puts its weights back)
        server = RolloutServer.attach(args.server_url, dataclasses.replace(cfg, url=args.server_url))
    else:
        server = RolloutServer(export, cfg, log_file=work / "server.log").start()
    client = RolloutClient(server, cfg, progress=False)
    sender = WeightSender(server, cfg.transfer_timeout_s)
    probe = client.prompt_logprobs("Q:12+34;A:46")[0]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for r in range(args.rounds):
        row = {"round": r}
        for path in ("disk", "transfer"):
            with torch.no_grad():  # every refresh moves the weights
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3)
            t = time.perf_counter()
            if path == "disk":
                export_to_hf([model], export, mcfg, groups, hf_config=meta["hf_config"], tokenizer_dir=hf)
                row["disk_export_s"] = time.perf_counter() - t
                t = time.perf_counter()
                reload_in_place(server, export)
                row["disk_reload_s"] = time.perf_counter() - t
                row["disk_blocked_s"] = row["disk_export_s"] + row["disk_reload_s"]
                t = time.perf_counter()  # the read alone, as the server's reload did it (page cache)
                for f in sorted(export.glob("*.safetensors")):
                    f.read_bytes()
                row["disk_read_s"] = time.perf_counter() - t
                row["disk_load_s"] = max(row["disk_reload_s"] - row["disk_read_s"], 0.0)
            else:
                sender.begin()
                row["transfer_begin_s"] = time.perf_counter() - t
                st = stream_policy([model], mcfg, groups, args.bucket_mib, sink=sender.send)
                stats = sender.end()
                row["transfer_blocked_s"] = time.perf_counter() - t
                row.update(transfer_gather_s=st["gather_s"], transfer_send_load_s=st["sink_s"],
                           transfer_finish_s=stats["finish_s"], transfer_init_s=stats["init_s"],
                           transfer_buckets=stats["buckets"])
        row["blocked_ratio_transfer_over_disk"] = row["transfer_blocked_s"] / row["disk_blocked_s"]
        rows.append(row)
        print(f"[bench] round {r}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row.items() if k != "round"), flush=True)
    # The last refresh was a transfer: the server must serve the trainer's weights.
    t = time.perf_counter()
    export_to_hf([model], work / "check", mcfg, groups, hf_config=meta["hf_config"], tokenizer_dir=hf)
    got = client.prompt_logprobs(probe)[1]
    probe_s = time.perf_counter() - t
    diff = max(abs(a - b) for a, b in zip(got, hf_prompt_logprobs(work / "check", probe)))
    if diff > 1e-2:
        raise SystemExit(f"the server does not serve the transferred weights: probe |Δ| {diff:.3g}")
    keys = [k for k in rows[0] if k != "round"]
    best = {k: min(r[k] for r in rows) for k in keys}
    return {"model": args.model, "param_bytes": nbytes, "bucket_mib": args.bucket_mib, "rounds": rows,
            "best": best, "probe_check_s": probe_s, "probe_max_abs_diff": diff,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, server


if __name__ == "__main__":
    sys.exit(main())
