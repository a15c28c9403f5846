"""Evaluation throughput: grading (process pool vs serial) and generation overhead of the
evaluation path against raw requests to the same vLLM server.

1. Grading: MATH-500 answers (each problem's gold answer and another problem's answer, so half
   need math-verify) graded by `Grader` (pool of --workers) and serially in this process; HumanEval
   canonical solutions in the sandbox with 1 and --workers runs at a time. Reported: problems/s.
2. Generation: the same held-out problems, sampling and per-problem seeds, once through
   `evaluate` (render, tokenise, client, grading in the result callback, fsync'ed sample lines,
   reports) and once as bare `requests.post` calls from a thread pool of the same size.
   Reported: wall time of each (median of --repeats, alternating) and their ratio.

  python benchmarks/bench_eval.py                  # tiny model built on the spot (CPU)
  python benchmarks/bench_eval.py --model HF_DIR --problems 256 --max-tokens 1024
  python benchmarks/bench_eval.py --server-url URL --model HF_DIR  # a running server that serves HF_DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks"


def bench_grading(args) -> dict:
    from megatron_rasft.eval.benchmarks import load_benchmark
    from megatron_rasft.eval.grade import Grader
    from megatron_rasft.verify.mathv import grade_math

    _, probs = load_benchmark("math500", args.data_dir, limit=args.grade_items // 2)
    items = [(p, f"\\boxed{{{p.answer}}}") for p in probs]
    items += [(p, f"\\boxed{{{probs[(i + 1) % len(probs)].answer}}}") for i, p in enumerate(probs)]
    out = {"math_items": len(items)}
    with Grader(workers=args.workers) as grader:
        grader.grade(items[:4])  # start the pool outside the timing
        t0 = time.monotonic()
        pooled = grader.grade(items)
        out["math_pool_per_s"] = len(items) / (time.monotonic() - t0)
    t0 = time.monotonic()
    serial = [grade_math(c, p.answer, "math", 3) for p, c in items]
    out["math_serial_per_s"] = len(items) / (time.monotonic() - t0)
    out["math_agree"] = sum(a["correct"] == b["correct"] for a, b in zip(pooled, serial)) / len(items)
    _, he = load_benchmark("humaneval", limit=args.code_items)
    code = [(p, p.meta["canonical_solution"]) for p in he]
    for w in (1, args.workers):
        with Grader(workers=w) as grader:
            t0 = time.monotonic()
            ok = sum(v["correct"] for v in grader.grade(code))
            out[f"code_w{w}_per_s"] = len(code) / (time.monotonic() - t0)
    out["code_items"], out["code_passed"] = len(code), ok
    return out


from bench_rollout import raw_generate  # noqa: E402 (same folder: the raw-HTTP baseline)


def bench_generation(args, work: Path) -> dict:
    from megatron_rasft.config import ServerConfig
    from megatron_rasft.data.tokenize import encode_prompt
    from megatron_rasft.eval.benchmarks import problems_from_dicts
    from megatron_rasft.eval.prompts import render
    from megatron_rasft.eval.runner import evaluate
    from megatron_rasft.config import SamplingConfig
    from megatron_rasft.rollout.client import RolloutClient, prompt_seed
    from megatron_rasft.rollout.server import RolloutServer
    from megatron_rasft.demo.toy import arithmetic_corpus, make_tiny_model, train_tokenizer
    from transformers import AutoTokenizer

    model_dir = args.model or make_tiny_model(work / "model", train_tokenizer(work / "tok"), seed=0)
    cfg = ServerConfig(kv_cache_gib=args.kv_cache_gib, max_model_len=None if args.model else 512,
                        concurrency=args.concurrency)
    texts = arithmetic_corpus(args.problems, seed=5)
    problems = problems_from_dicts([{"prompt": t[:t.index(";A:") + 3], "answer": t.rsplit("{", 1)[1][:-1]}
                                    for t in texts], "heldout")
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=1)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if args.server_url:
        server = RolloutServer.attach(args.server_url, cfg)
    else:
        server = RolloutServer(model_dir, cfg, log_file=work / "server.log").start()
    try:
        client = RolloutClient(server, cfg, progress=False)
        payloads = [client.request_payload(encode_prompt(tok, render(p, "plain")), sampling,
                                           prompt_seed(sampling.seed, f"heldout:{p.id}")) for p in problems]
        raw_generate(server.url, payloads[:4], args.concurrency)  # warm-up
        t_eval, t_raw = [], []
        for r in range(args.repeats):
            t0 = time.monotonic()
            evaluate(server, {"heldout": problems}, sampling, work / f"eval_{r}", template="plain",
                     tokenizer=tok, server_cfg=cfg, workers=args.workers)
            t_eval.append(time.monotonic() - t0)
            t0 = time.monotonic()
            tokens = raw_generate(server.url, payloads, args.concurrency)
            t_raw.append(time.monotonic() - t0)
    finally:
        if not args.server_url:
            server.stop()
    # Where the difference goes: grading the same completions alone, and writing the reports.
    from megatron_rasft.eval import report
    from megatron_rasft.eval.grade import Grader
    from megatron_rasft.eval.runner import read_samples, sample_path

    rows = read_samples(sample_path(work / "eval_0", "heldout"))
    by_id = {p.id: p for p in problems}
    with Grader(workers=args.workers) as grader:
        grader.grade([(problems[0], "")])
        t0 = time.monotonic()
        for i in range(0, len(rows), args.n):  # one call per problem, as the runner does
            grader.grade([(by_id[r["id"]], r["completion"]) for r in rows[i:i + args.n]])
        grade_s = time.monotonic() - t0
    t0 = time.monotonic()
    report.write_all(work / "eval_0", json.loads((work / "eval_0" / "results.json").read_text()), {})
    report_s = time.monotonic() - t0
    e, w = statistics.median(t_eval), statistics.median(t_raw)
    return {"problems": len(problems), "n": args.n, "max_tokens": args.max_tokens, "tokens": tokens,
            "eval_s": e, "raw_s": w, "eval_over_raw": e / w, "eval_runs": t_eval, "raw_runs": t_raw,
            "grading_alone_s": grade_s, "reports_s": report_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint (default: a tiny random Llama built here)")
    ap.add_argument("--server-url", help="attach to a running vLLM server that serves --model instead of starting "
                                         "one (the test suite's shared server)")
    ap.add_argument("--data-dir", default=str(DATA), help="math benchmark files (math500.jsonl)")
    ap.add_argument("--grade-items", type=int, default=400)
    ap.add_argument("--code-items", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks in seconds that the script still runs (numbers meaningless)")
    args = ap.parse_args()
    if args.server_url and not args.model:
        ap.error("--server-url needs --model: the checkpoint that server serves")
    if args.smoke:
        vars(args).update(grade_items=8, code_items=2, problems=4, n=1, max_tokens=8, concurrency=2, repeats=1,
                          kv_cache_gib=0.25)
    out = {"grading": bench_grading(args)}
    print(json.dumps(out["grading"], indent=1), flush=True)
    if not args.skip_generation:
        out["generation"] = bench_generation(args, Path(tempfile.mkdtemp(prefix="bench_eval_")))
        print(json.dumps(out["generation"], indent=1), flush=True)


if __name__ == "__main__":
    main()
