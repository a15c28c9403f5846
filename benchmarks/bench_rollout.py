"""Rollout client overhead and weight-refresh time against a real vLLM server.

1. Client vs raw requests: the same prompts, sampling and per-prompt seeds, sent once through
   `RolloutClient.generate` and once as bare `requests.post` calls from a thread pool of the same
   size. Reported: wall time of each (median of --repeats, alternating) and their ratio.
2. Refresh vs restart: in-place `refresh_weights` to a checkpoint with new random weights
   (median of --repeats) against `RolloutServer.restart` on it (once).

  python benchmarks/bench_rollout.py                      # tiny model built on the spot (CPU)
  python benchmarks/bench_rollout.py --model HF_DIR --prompts 256 --max-tokens 256   # a real one
  python benchmarks/bench_rollout.py --server-url URL --model HF_DIR   # a running server that serves HF_DIR
                                                                        # (no restart measured)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def raw_generate(url: str, payloads: list[dict], concurrency: int) -> int:
    import requests

    def post(payload):
        r = requests.post(f"{url}/v1/completions", json=payload, timeout=600)
        r.raise_for_status()
        return sum(len(c["token_ids"]) for c in r.json()["choices"])

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(post, payloads))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint (default: a tiny random Llama built here)")
    ap.add_argument("--server-url", help="attach to a running vLLM server that serves --model instead of starting "
                                         "one (the test suite's shared server); the restart is then not measured")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks in seconds that the script still runs (numbers meaningless)")
    args = ap.parse_args()
    if args.server_url and not args.model:
        ap.error("--server-url needs --model: the checkpoint that server serves")
    if args.smoke:
        vars(args).update(prompts=4, n=1, max_tokens=8, concurrency=2, repeats=1, kv_cache_gib=0.25)

    from megatron_rasft.config import ServerConfig
    from megatron_rasft.config import SamplingConfig
    from megatron_rasft.rollout.client import RolloutClient, prompt_seed
    from megatron_rasft.rollout.refresh import refresh_weights
    from megatron_rasft.rollout.server import RolloutServer
    from megatron_rasft.demo.toy import arithmetic_corpus, make_tiny_model, reseed_weights, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model_dir = args.model or make_tiny_model(work / "model", train_tokenizer(work / "tok"), seed=0)
    cfg = ServerConfig(kv_cache_gib=args.kv_cache_gib, max_model_len=None if args.model else 512,
                        concurrency=args.concurrency)
    texts = arithmetic_corpus(args.prompts, seed=1)
    prompts = [t[:t.index(";A:") + 3] for t in texts]
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=1)
    t0 = time.monotonic()
    if args.server_url:
        server = RolloutServer.attach(args.server_url, cfg)
    else:
        server = RolloutServer(model_dir, cfg, log_file=work / "server.log").start()
    start_s = time.monotonic() - t0
    try:
        client = RolloutClient(server, cfg, progress=False)
        payloads = [client.request_payload(p, sampling, prompt_seed(sampling.seed, i)) for i, p in enumerate(prompts)]
        client.generate(prompts[: args.concurrency], sampling)  # warm-up
        times = {"client": [], "raw": []}
        tokens = 0
        for _ in range(args.repeats):
            t = time.monotonic()
            tokens = sum(len(c.token_ids) for cs in client.generate(prompts, sampling) for c in cs)
            times["client"].append(time.monotonic() - t)
            t = time.monotonic()
            raw_tokens = raw_generate(server.url, payloads, args.concurrency)
            times["raw"].append(time.monotonic() - t)
            assert raw_tokens == tokens, (raw_tokens, tokens)  # same seeds -> same samples
        client_s, raw_s = statistics.median(times["client"]), statistics.median(times["raw"])

        # New random weights need the tiny model's builder; a given checkpoint is refreshed onto itself.
        new_dir = reseed_weights(model_dir, work / "new", seed=1) if not args.model else None
        refresh = []
        if new_dir is not None:
            for i in range(args.repeats):
                r = refresh_weights(server, new_dir if i % 2 == 0 else model_dir, client)
                assert r.method == "inplace", r.fallback_reason
                refresh.append(r.seconds)
            t = time.monotonic()
            server.restart(new_dir)
            restart_s = time.monotonic() - t
        else:  # refresh a real model onto itself (same shapes; measures the reload path)
            for _ in range(args.repeats):
                refresh.append(refresh_weights(server, model_dir, client).seconds)
            restart_s = None
            if not args.server_url:  # an attached server is not ours to restart
                t = time.monotonic()
                server.restart()
                restart_s = time.monotonic() - t
    finally:
        if not args.server_url:  # an attached server keeps serving --model (it was refreshed onto itself)
            server.stop()

    res = {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
           "tokens": tokens, "client_s": round(client_s, 3), "raw_s": round(raw_s, 3),
           "client_over_raw": round(client_s / raw_s, 3), "client_tok_s": round(tokens / client_s, 1),
           "refresh_s": round(statistics.median(refresh), 3),
           "restart_s": None if restart_s is None else round(restart_s, 2),
           "first_start_s": round(start_s, 2), "times": {k: [round(x, 3) for x in v] for k, v in times.items()}}
    print(f"client {client_s:.2f}s vs raw {raw_s:.2f}s for {tokens} tokens -> ratio {client_s / raw_s:.3f}; "
          f"{tokens / client_s:.0f} tok/s")
    restart = "not measured (attached server)" if restart_s is None else f"{restart_s:.1f}s"
    print(f"in-place refresh {res['refresh_s']:.2f}s (median of {len(refresh)}) vs restart {restart}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
