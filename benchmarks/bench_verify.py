"""Verifier throughput: math answers/s (pool of 2 vs serial in-process) and sandbox runs/s.

  python benchmarks/bench_verify.py [--math500 PATH] [--mode math-verify] [--sandbox-runs 40]

Math: every gold answer of MATH-500 graded against `\\boxed{answer}` (the sympy path; the string
shortcut is off in mode math-verify). Code: a passing MBPP-style program, `workers` at a time.
"""
import argparse
import json
import os
import time

from megatron_rasft.verify.mathv import MathVerifier, grade_math
from megatron_rasft.verify.sandbox import isolation, run_many

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--math500", default=os.path.join(HERE, "..", "..", "shared", "benchmarks", "math500.jsonl"))
    ap.add_argument("--mode", default="math-verify", choices=("math", "math-verify", "reference"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sandbox-runs", type=int, default=40)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks in seconds that the script still runs (numbers meaningless)")
    args = ap.parse_args()
    if args.smoke:
        args.sandbox_runs = 4
    with open(args.math500) as f:
        answers = [json.loads(line)["answer"] for line in f]
    if args.smoke:
        answers = answers[:8]
    pairs = [("\\boxed{" + a + "}", a) for a in answers]

    grade_math(*pairs[0], mode=args.mode)  # warm imports
    t0 = time.perf_counter()
    serial = [grade_math(r, g, mode=args.mode) for r, g in pairs]
    t_serial = time.perf_counter() - t0

    with MathVerifier(args.workers, timeout_s=10, mode=args.mode) as v:
        v.grade(pairs[:4])  # start the workers
        t0 = time.perf_counter()
        pooled = v.grade(pairs)
        t_pool = time.perf_counter() - t0
    acc = sum(x["correct"] for x in pooled) / len(pairs)
    assert [x["correct"] for x in serial] == [x["correct"] for x in pooled]
    print(f"math ({args.mode}, {len(pairs)} answers, self-graded accuracy {acc:.3f}):")
    print(f"  serial in-process: {len(pairs) / t_serial:8.1f} answers/s")
    print(f"  pool of {args.workers}:         {len(pairs) / t_pool:8.1f} answers/s   ratio {t_serial / t_pool:.2f}x")

    info = isolation()
    tests = {"format": "mbpp", "asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    jobs = [(tests, "", "def add(a, b):\n    return a + b\n")] * args.sandbox_runs
    t0 = time.perf_counter()
    out = run_many(jobs, workers=args.workers)
    t = time.perf_counter() - t0
    assert all(v["reason"] == "passed" for v in out)
    print(f"sandbox ({info}): {args.sandbox_runs / t:.1f} executions/s with {args.workers} at a time "
          f"({1000 * t / args.sandbox_runs * args.workers:.0f} ms each)")


if __name__ == "__main__":
    main()
