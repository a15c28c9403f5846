"""Real problems with expert demonstrations from reasoning-gym's offline generators.

Every demonstration is exact and written by a program, never by a model: `gsm_symbolic` ships its
own worked solution (`metadata["answer_cot"]`, its `#### N` line turned into `\\boxed{N}`); for
`chain_sum`, `leg_counting` and `simple_equations` the steps are computed here from the
generator's metadata and checked against the generator's answer (a mismatch is an error). Tasks
without either are left out.

Training rows: `prompt` (the question followed by the evaluation's step-by-step/`\\boxed{}`
instruction, so training and `eval --prompt-template chat` show the model the same user turn),
`response`, `answer`, `source` (generator, version, task, seed, index). Held-out rows have
`question` instead of `prompt` (the `eval` command appends the instruction itself). The held-out
split comes from a disjoint seed range (reasoning-gym seeds item i with `seed + i`), and any
held-out question that also occurs in training is dropped. Held-out rows alternate between tasks.
"""
from __future__ import annotations

import importlib.metadata
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_rasft.eval.prompts import MATH_INSTRUCTION

GENERATOR = "reasoning-gym"


@dataclass(frozen=True)
class Task:
    name: str  # reasoning-gym dataset name
    config: dict  # generator difficulty settings
    demo: Callable[[dict], tuple]  # item -> (worked solution ending in \boxed{answer}, the answer)
    notes: str = ""


def _boxed(answer) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def _chain_sum_demo(item: dict) -> str:
    """Left to right, one operation per line: `4 - 1 = 3`, `3 - 7 = -4`."""
    parts = item["metadata"]["expression"].split()
    total, lines = int(parts[0]), []
    for op, term in zip(parts[1::2], parts[2::2]):
        new = total + int(term) if op == "+" else total - int(term)
        if op not in "+-":
            raise ValueError(f"chain_sum: unexpected operator {op!r} in {item['metadata']['expression']!r}")
        lines.append(f"{total} {op} {term} = {new}")
        total = new
    return "\n".join(lines + [_boxed(total)]), total


def _leg_counting_demo(item: dict) -> str:
    """One line per animal (count × legs, from the generator's own legs table), then the sum."""
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    lines, subtotals = [], []
    for animal, count in item["metadata"]["animals"].items():
        legs = ANIMALS[animal]
        lines.append(f"{animal}: {count} × {legs} legs = {count * legs}")
        subtotals.append(count * legs)
    total = sum(subtotals)
    lines.append(f"Total: {' + '.join(map(str, subtotals))} = {total}")
    return "\n".join(lines + [_boxed(total)]), total


def _simple_equations_demo(item: dict) -> str:
    """Collect the equation into a·x + b = c, move b, divide by a (sympy does the algebra)."""
    import sympy

    lhs_text, rhs_text = item["metadata"]["equation"].split("=")
    var = sympy.Symbol(item["metadata"]["variable"])
    lhs, rhs = sympy.sympify(lhs_text), sympy.sympify(rhs_text)
    poly = sympy.Poly(lhs - rhs, var)
    if poly.degree() != 1:
        raise ValueError(f"simple_equations: not linear: {item['metadata']['equation']!r}")
    a, b0 = poly.all_coeffs()  # (lhs - rhs) = a·x + b0
    moved = -b0
    x = moved / a
    v = var.name
    lines = [f"{lhs_text.strip()} = {rhs_text.strip()}",
             f"Collect the terms: {a}*{v} + ({b0}) = 0",
             f"So {a}*{v} = {moved}",
             f"{v} = {moved} / {a} = {x}"]
    return "\n".join(lines + [_boxed(x)]), x


def _gsm_symbolic_demo(item: dict) -> str:
    """The generator's own worked solution, its final `#### N` line written as \\boxed{N}."""
    cot = item["metadata"]["answer_cot"].rstrip()
    body, sep, final = cot.rpartition("####")
    if not sep:
        raise ValueError("gsm_symbolic: answer_cot has no '#### N' line")
    return body.rstrip() + "\n" + _boxed(final.strip()), final.strip()


TASKS = {
    "chain_sum": Task("chain_sum", dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2), _chain_sum_demo,
                      "sums/differences of 2-4 numbers of 1-2 digits"),
    "leg_counting": Task("leg_counting", dict(min_animals=2, max_animals=3, min_instances=1, max_instances=6),
                         _leg_counting_demo, "2-3 kinds of animals, 1-6 of each"),
    "simple_equations": Task("simple_equations", dict(min_terms=2, max_terms=2, min_value=1, max_value=20),
                             _simple_equations_demo, "a·x ± b = c with small numbers"),
    "gsm_symbolic": Task("gsm_symbolic", {}, _gsm_symbolic_demo, "GSM8K-style word problems"),
}


def generate(task: str, n: int, seed: int) -> list:
    """`n` rows of `task` from reasoning-gym with `seed`; each demonstration checked against the
    generator's answer (and its own checker, `score_answer`)."""
    import reasoning_gym

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)}")
    spec = TASKS[task]
    ds = reasoning_gym.create_dataset(spec.name, size=n, seed=seed, **spec.config)
    version = importlib.metadata.version("reasoning-gym")
    rows = []
    for i, item in enumerate(ds):
        demo, value = spec.demo(item)
        if ds.score_answer(str(value), item) != 1.0:
            raise ValueError(f"{task} seed {seed} item {i}: the worked solution ends in {value!r} but the "
                             f"generator's answer is {item['answer']!r}")
        rows.append({"id": f"{task}/{seed}/{i}", "question": item["question"], "response": demo,
                     "answer": str(item["answer"]),
                     "source": {"generator": GENERATOR, "version": version, "task": task, "seed": seed,
                                "index": i, "config": spec.config}})
    return rows


def parse_mix(text: str) -> dict:
    """`chain_sum:200,leg_counting:100` -> {task: count}; ValueError naming a bad item."""
    mix = {}
    for item in text.split(","):
        name, _, count = item.strip().partition(":")
        if name not in TASKS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad task item {item!r}: expected NAME:COUNT with NAME one of {sorted(TASKS)}")
        mix[name] = int(count)
    return mix


def build(out_dir: str | Path, mix: dict, test_mix: dict, *, seed: int = 0, test_seed: int = 1_000_000) -> dict:
    """Write OUT/train.jsonl, OUT/test.jsonl and OUT/meta.json; returns the meta dict.

    The train items of task t use seeds [seed, seed + n_t), the test items [test_seed, test_seed +
    m_t): the ranges must not overlap (ValueError). Held-out questions equal to a training question
    are dropped (counted in meta)."""
    for task, n in mix.items():
        m = test_mix.get(task, 0)
        if m and not (test_seed >= seed + n or test_seed + m <= seed):
            raise ValueError(f"{task}: test seeds [{test_seed}, {test_seed + m}) overlap train seeds "
                             f"[{seed}, {seed + n}); choose --test-seed >= {seed + n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [r for task, n in mix.items() for r in generate(task, n, seed)]
    seen = {r["question"] for r in train}
    per_task, dropped = [], 0
    for task, m in test_mix.items():
        rows = [r for r in generate(task, m, test_seed) if r["question"] not in seen]
        dropped += m - len(rows)
        per_task.append(rows)
    # Interleaved across tasks, so that `eval --limit N` takes every task.
    test = [r for group in itertools.zip_longest(*per_task) for r in group if r is not None]
    with (out / "train.jsonl").open("w") as f:
        for r in train:
            row = {"id": r["id"], "prompt": f"{r['question']}\n{MATH_INSTRUCTION}", **r}
            row.pop("question")
            f.write(json.dumps(row) + "\n")
    with (out / "test.jsonl").open("w") as f:
        for r in test:
            f.write(json.dumps({k: v for k, v in r.items() if k != "response"} | {"solution": r["response"]}) + "\n")
    meta = {"generator": GENERATOR, "version": importlib.metadata.version("reasoning-gym"), "seed": seed,
            "test_seed": test_seed, "train": mix, "test": test_mix, "test_dropped_as_duplicates": dropped,
            "tasks": {t: {"config": TASKS[t].config, "notes": TASKS[t].notes} for t in set(mix) | set(test_mix)},
            "instruction": MATH_INSTRUCTION}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
