"""The rollout fleet (`rollout/fleet.py`): what the router costs, how each policy spreads a round's
requests over 2 replicas, and 2 replicas against 1 — all on the same prompts and per-prompt seeds.

1. Router overhead: the batch sent straight to replica 0 vs through a vllm-router in front of
   replica 0 alone (median of --repeats, alternating; ratio).
2. Policies on all replicas: for each of --policies, a router over every replica; the share of the
   batch's requests each replica served (from its own /metrics) and the batch's time (median of
   --repeats; the policies take turns, in a rotating order, after every replica is warmed up). The prompts
   share a chat-template prefix, the case where `cache_aware` can pile work on one replica.
3. N replicas vs 1: the batch through a round_robin router over all replicas vs over replica 0
   (ratio). On a 2-core box expect about 1: two replicas split the same two cores.

  python benchmarks/bench_fleet.py                          # tiny model, 2 replicas started here
  python benchmarks/bench_fleet.py --model HF_DIR --prompts 64 --max-tokens 256
  python benchmarks/bench_fleet.py --server-url URL --model HF_DIR --smoke   # the suite's: one running
                                                            # server as the only replica (1. and 2. only)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PREFIX = ("<|im_start|>system\nYou are a careful assistant. Solve the problem step by step and put the "
          "final answer at the end.<|im_end|>\n<|im_start|>user\n")


def post_all(url: str, payloads: list, concurrency: int) -> int:
    """Send every payload to `url`/v1/completions from `concurrency` threads -> tokens generated."""
    from megatron_rasft.rollout.server import http_json

    def post(payload):
        status, body = http_json(f"{url}/v1/completions", payload, timeout=600)
        if status != 200:
            raise RuntimeError(f"{url}: {status} {body}")
        return sum(len(c["token_ids"]) for c in body["choices"])

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(post, payloads))


def served(url: str) -> float:
    """Requests the vLLM server at `url` has finished (its `vllm:request_success_total`)."""
    from megatron_rasft.rollout.server import http_json

    _, body = http_json(f"{url}/metrics", timeout=10)
    return sum(float(line.split()[-1]) for line in str(body).splitlines()
               if line.startswith("vllm:request_success_total"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint (default: a tiny random Llama built here)")
    ap.add_argument("--server-url", help="a running vLLM server serving --model, used as the only replica")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--policies", default="round_robin,cache_aware,power_of_two,random")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks in seconds that the "
                                                         "script still runs (numbers meaningless)")
    args = ap.parse_args()
    if args.server_url and not args.model:
        ap.error("--server-url needs --model: the checkpoint that server serves")
    if args.smoke:
        vars(args).update(prompts=4, n=1, max_tokens=8, concurrency=2, repeats=1, kv_cache_gib=0.25,
                          policies="round_robin")

    from megatron_rasft.config import SamplingConfig, ServerConfig
    from megatron_rasft.demo.toy import arithmetic_corpus, make_tiny_model, train_tokenizer
    from megatron_rasft.rollout.client import RolloutClient, prompt_seed
    from megatron_rasft.rollout.fleet import Fleet, Router
    from megatron_rasft.rollout.server import RolloutServer

    work = Path(tempfile.mkdtemp(prefix="bench_fleet_"))
    model_dir = args.model or make_tiny_model(work / "model", train_tokenizer(work / "tok"), seed=0)
    cfg = ServerConfig(kv_cache_gib=args.kv_cache_gib, max_model_len=None if args.model else 512,
                       concurrency=args.concurrency, replicas=1 if args.server_url else args.replicas)
    texts = arithmetic_corpus(args.prompts, seed=1)
    prompts = [PREFIX + t[:t.index(";A:") + 3] for t in texts]
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=1)

    t0 = time.monotonic()
    if args.server_url:
        replicas, fleet = [RolloutServer.attach(args.server_url, cfg)], None
    else:
        fleet = Fleet.create(model_dir, cfg, log_file=work / "vllm.log").start()
        replicas = fleet.replicas
    start_s = time.monotonic() - t0
    routers = []

    def router(urls, policy):
        r = Router(urls, dataclasses.replace(cfg, port=0, router_policy=policy), log_file=work / f"router-{policy}.log")
        routers.append(r.start())
        return r

    def timed(url: str) -> tuple:
        t = time.monotonic()
        tokens = post_all(url, payloads, args.concurrency)
        return time.monotonic() - t, tokens

    try:
        client = RolloutClient(replicas[0], cfg, progress=False)
        payloads = [client.request_payload(p, sampling, prompt_seed(sampling.seed, i)) for i, p in enumerate(prompts)]
        direct_url = replicas[0].url
        for r in replicas:  # warm every replica: a cold one would charge its first batch to whichever policy ran first
            post_all(r.url, payloads[: args.concurrency], args.concurrency)

        # 1. Router overhead on one replica.
        one = router([direct_url], "round_robin")
        times = {"direct": [], "router": []}
        for _ in range(args.repeats):
            for name, url in (("direct", direct_url), ("router", one.url)):
                seconds, tokens = timed(url)
                times[name].append(seconds)
        direct_s, router_s = statistics.median(times["direct"]), statistics.median(times["router"])

        # 2. Each policy over every replica: who served what, and how long the batch took. The
        # policies take turns within each repeat (the order rotates), so a slow spell on a shared
        # box lands on all of them; the time is the median over repeats, the share their sum.
        urls = [r.url for r in replicas]
        names = [p for p in args.policies.split(",") if p]
        policy_routers = {policy: router(urls, policy) for policy in names}
        seconds_by = {policy: [] for policy in names}
        counts_by = {policy: [0.0] * len(urls) for policy in names}
        for rep in range(args.repeats):
            for policy in names[rep % len(names):] + names[: rep % len(names)]:
                before = [served(u) for u in urls]
                seconds, _ = timed(policy_routers[policy].url)
                after = [served(u) for u in urls]
                seconds_by[policy].append(seconds)
                counts_by[policy] = [c + a - b for c, a, b in zip(counts_by[policy], after, before)]
        policies = {policy: {"seconds": round(statistics.median(seconds_by[policy]), 3),
                             "share": [round(c / max(sum(counts_by[policy]), 1), 3) for c in counts_by[policy]]}
                    for policy in names}

        # 3. All replicas vs one, both through a round_robin router.
        scaling = None
        if len(replicas) > 1:
            all_rt = router(urls, "round_robin")
            all_times, one_times = [], []
            each_times = [[] for _ in urls]  # the batch straight to each replica: are they equally fast?
            for _ in range(args.repeats):  # alternating, as in 1.
                all_times.append(timed(all_rt.url)[0])
                one_times.append(timed(one.url)[0])
                for i, u in enumerate(urls):
                    each_times[i].append(timed(u)[0])
            n_s, one_s = statistics.median(all_times), statistics.median(one_times)
            scaling = {"replicas": len(replicas), "all_s": round(n_s, 3), "one_s": round(one_s, 3),
                       "one_over_all": round(one_s / n_s, 3),
                       "direct_each_s": [round(statistics.median(t), 3) for t in each_times]}
    finally:
        for r in routers:
            r.stop()
        if fleet is not None:
            fleet.stop()

    res = {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
           "replicas": len(replicas), "tokens": tokens, "start_s": round(start_s, 2),
           "direct_s": round(direct_s, 3), "router_s": round(router_s, 3),
           "router_over_direct": round(router_s / direct_s, 3), "policies": policies, "scaling": scaling}
    print(f"router overhead: {router_s:.2f}s through the router vs {direct_s:.2f}s direct "
          f"-> ratio {router_s / direct_s:.3f} ({tokens} tokens)")
    for policy, p in policies.items():
        print(f"policy {policy:>14}: {p['seconds']:.2f}s, share per replica {p['share']}")
    if scaling:
        print(f"{scaling['replicas']} replicas vs 1: {scaling['all_s']:.2f}s vs {scaling['one_s']:.2f}s "
              f"-> speed-up {scaling['one_over_all']:.3f}; straight to each replica {scaling['direct_each_s']} s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
