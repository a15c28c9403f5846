"""A synthetic, verifiable reasoning task: multi-digit addition with a worked, digit-by-digit
solution ending in `\\boxed{sum}`. Difficulty grows with the number of digits, so a partly trained
model solves some problems reliably, some sometimes and some never: solvability varies."""
from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_rasft.demo.toy import addition_solution


def make_problems(n: int, seed: int, min_digits: int = 2, max_digits: int = 6, prefix: str = "") -> list[dict]:
    """`n` problems {id, prompt, response, answer, digits}, digits drawn uniformly per problem."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = rng.randint(min_digits, max_digits)
        a = rng.randint(10 ** (d - 1), 10 ** d - 1)
        b = rng.randint(10 ** (rng.randint(1, d) - 1), 10 ** d - 1)
        out.append({"id": f"{prefix}{i}", "prompt": f"Q:{a}+{b};A:", "response": addition_solution(a, b),
                    "answer": str(a + b), "digits": d})
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
