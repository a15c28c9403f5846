"""Solvability spread of a model on real problems, per task: K samples per problem through a vLLM
server with the chat template, graded by the math verifier; prints the histogram of k (correct
samples out of K) per task and the share of problems with 0 < k < K (what RASFT adapts to).

  python benchmarks/real_solvability.py --model HF_DIR --problems train.jsonl [--per-task 24] [--k 4]
  python benchmarks/real_solvability.py --smoke      # prepares SmolLM2 and 3 problems per task

Used to choose the task mix of the real-model run (docs/results.md, "Real model").
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(model_dir, problems: list, k: int, max_tokens: int, seed: int = 1234) -> dict:
    """{task: {"hist": [count of problems with k correct for k in 0..K], "mean_p", "mid"}}"""
    from transformers import AutoTokenizer

    from megatron_rasft.config import SamplingConfig, ServerConfig
    from megatron_rasft.data.tokenize import encode_prompt, render_prompt
    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.server import RolloutServer
    from megatron_rasft.verify.mathv import grade_math

    tok = AutoTokenizer.from_pretrained(model_dir)
    rc = ServerConfig(max_model_len=1024, kv_cache_gib=1.0, concurrency=32)
    prompts = [encode_prompt(tok, render_prompt(tok, p["prompt"], "chat")) for p in problems]
    server = RolloutServer(model_dir, rc).start()
    try:
        t0 = time.time()
        sampling = SamplingConfig(n=k, max_tokens=max_tokens, seed=seed, stop_token_ids=[tok.eos_token_id])
        outs = RolloutClient(server, rc, progress=False).generate(prompts, sampling)
        seconds = time.time() - t0
    finally:
        server.stop()
    by_task = collections.defaultdict(list)
    for p, comps in zip(problems, outs):
        by_task[p["source"]["task"]].append(sum(grade_math(c.text, p["answer"])["correct"] for c in comps))
    result = {}
    for task, ks in by_task.items():
        hist = [ks.count(j) for j in range(k + 1)]
        result[task] = {"hist": hist, "mean_p": sum(ks) / (k * len(ks)), "mid": sum(0 < x < k for x in ks) / len(ks)}
    result["_seconds"] = seconds
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--problems")
    ap.add_argument("--per-task", type=int, default=24)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        from megatron_rasft.demo.real_model.model import prepare
        from megatron_rasft.demo.real_model.problems import TASKS, build

        tmp = Path(tempfile.mkdtemp(prefix="solvability_"))
        args.model = args.model or str(prepare("smollm2", tmp / "hf", quiet=True))
        build(tmp / "data", {t: 3 for t in TASKS}, {})
        args.problems, args.per_task, args.k, args.max_tokens = str(tmp / "data" / "train.jsonl"), 3, 2, 64
    if not (args.model and args.problems):
        ap.error("--model and --problems are required (or --smoke)")
    rows = [json.loads(line) for line in open(args.problems)]
    taken = collections.Counter()
    chosen = []
    for r in rows:
        if taken[r["source"]["task"]] < args.per_task:
            taken[r["source"]["task"]] += 1
            chosen.append(r)
    res = measure(args.model, chosen, args.k, args.max_tokens)
    print(f"model {args.model}, K = {args.k}, max_tokens {args.max_tokens}, {len(chosen)} problems, "
          f"{res.pop('_seconds'):.0f}s of sampling")
    print(f"{'task':<18} {'problems':>8}  hist k=0..K{'':<8} mean p   0<k<K")
    for task, r in sorted(res.items()):
        print(f"{task:<18} {sum(r['hist']):>8}  {str(r['hist']):<22} {r['mean_p']:.3f}   {r['mid']:.2f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
