#!/usr/bin/env python
"""Write real training and held-out problems from reasoning-gym (offline generators), with exact
programmatic expert demonstrations that end in \\boxed{answer}.

  python tools/make_dataset.py --out data/rg --train chain_sum:400,leg_counting:400 \\
      --test chain_sum:100,leg_counting:100 [--seed 0] [--test-seed 1000000]

Writes OUT/train.jsonl (prompt, response, answer, source), OUT/test.jsonl (question, answer,
solution, source; read by `eval --set eval.benchmarks=NAME=OUT/test.jsonl`) and OUT/meta.json (generator,
version, seeds, task settings). Tasks: see megatron_rasft/demo/real_model/problems.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from megatron_rasft.demo.real_model.model import MissingPackages, require
    from megatron_rasft.demo.real_model.problems import build, parse_mix

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", required=True, help="NAME:COUNT,... training problems per task")
    p.add_argument("--test", default="", help="NAME:COUNT,... held-out problems per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-seed", type=int, default=1_000_000)
    args = p.parse_args(argv)
    try:
        require({"reasoning-gym": "0.1.25"})
        meta = build(args.out, parse_mix(args.train), parse_mix(args.test) if args.test else {},
                     seed=args.seed, test_seed=args.test_seed)
    except (MissingPackages, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[dataset] {sum(meta['train'].values())} training, {sum(meta['test'].values()) - meta['test_dropped_as_duplicates']} "
          f"held-out problems ({meta['test_dropped_as_duplicates']} held-out duplicates of training questions dropped) "
          f"→ {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
