"""The verify stage: rollouts of a round → one ProblemVerdicts record per problem.

`verify_problems` works in memory (the trainer calls it between rounds); `verify_round` is the
resumable file stage behind `python -m megatron_rasft verify`: it skips problems already in the
output, appends a batch of problems at a time (flushed + fsync'ed), and survives a kill.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence

from megatron_rasft.config import released_preset
from megatron_rasft.records import (Problem, ProblemVerdicts, RecordError, RecordWriter, Rollout,
                                    finished_problem_ids, read_records)

from megatron_rasft.rundir import RunDir

VERIFIERS = ("math", "math-verify", "released", "code")


def group_rollouts(rollouts: Sequence[Rollout], problems: dict, where: str) -> dict:
    """problem_id -> its rollouts in sample order; rejects unknown problems and repeated samples."""
    by_problem = defaultdict(list)
    for r in rollouts:
        if r.problem_id not in problems:
            raise RecordError(f"{where}: rollout for unknown problem id {r.problem_id!r}")
        by_problem[r.problem_id].append(r)
    for pid, rs in by_problem.items():
        rs.sort(key=lambda r: r.sample_index)
        idx = [r.sample_index for r in rs]
        if len(set(idx)) != len(idx):
            raise RecordError(f"{where}: problem {pid!r} has repeated sample_index values {idx}")
    return dict(by_problem)


def verify_problems(problems: Sequence[Problem], rollouts: dict, round_: int, verifier: str = "math",
                    workers: int = 2, timeout_s: float = 10.0, math_verifier=None,
                    on_rollout: Optional[Callable[[int], None]] = None) -> list:
    """problems + {problem_id: [Rollout]} -> [ProblemVerdicts] (same order as `problems`).
    Pass a live `math_verifier` (MathVerifier) to reuse its worker pool across calls."""
    verifier = released_preset("verifier", verifier)  # "reference", the old name of "released": refused with a hint
    if verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    # Unverifiable problems (a placeholder answer) keep no rollouts: A_E = 1 in every scheme.
    unverifiable = {p.id for p in problems if p.meta.get("unverifiable")}
    rollouts = {pid: ([] if pid in unverifiable else rs) for pid, rs in rollouts.items()}
    flat = [(p, r) for p in problems for r in rollouts.get(p.id, [])]
    if verifier == "code":
        from megatron_rasft.verify.sandbox import SandboxConfig, run_many
        for p, _ in flat:
            if p.tests is None:
                raise ValueError(f"problem {p.id!r} has no tests (needed by the code verifier)")
        # The program starts with the problem's code prefix (HumanEval's stub), never its prompt:
        # RUN/problems.jsonl holds the prompt as rendered for the model.
        verdicts = run_many([(p.tests, p.tests.get("code_prefix", ""), r.text) for p, r in flat],
                            SandboxConfig(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s))),
                            workers=workers, on_result=on_rollout)
        for v in verdicts:
            v["extracted"] = None
    else:
        from megatron_rasft.verify.mathv import MathVerifier, gold_answer
        mode = verifier
        own = math_verifier is None
        mv = math_verifier or MathVerifier(workers, timeout_s, mode=mode)
        golds = {}
        for p in problems:
            # `released`: the released code's ground truth (extracted from the expert response);
            # otherwise our records' explicit answer first.
            golds[p.id] = gold_answer(p.answer, p.response, mode=mode)
        try:
            verdicts = mv.grade([(r.text, golds[p.id]) for p, r in flat], on_result=on_rollout)
        finally:
            if own:
                mv.close()
    out, i = [], 0
    for p in problems:
        entries = []
        for r in rollouts.get(p.id, []):
            v = verdicts[i]
            i += 1
            entries.append({"sample_index": r.sample_index, "text": r.text, "correct": bool(v["correct"]),
                            "reason": v["reason"], "extracted": v.get("extracted")})
        out.append(ProblemVerdicts(p.id, round_, p.response, entries))
    return out


def verify_round(run_dir, round_: int, verifier: str = "math", workers: int = 2,
                 timeout_s: float = 10.0, batch_problems: int = 16, progress: bool = True) -> dict:
    """RUN/problems.jsonl + RUN/rollouts/round_NNN.jsonl -> RUN/verdicts/round_NNN.jsonl."""
    run = RunDir(run_dir)
    problems = {p.id: p for p in read_records(run.problems, Problem)}
    src = run.rollouts(round_)
    rolls = list(read_records(src, Rollout))
    for n, r in enumerate(rolls):
        if r.round != round_:
            raise RecordError(f"{src}: rollout #{n + 1} has round {r.round}, expected {round_}")
    grouped = group_rollouts(rolls, problems, str(src))
    dst = run.verdicts(round_)
    done = finished_problem_ids(dst, ProblemVerdicts)
    todo = [problems[pid] for pid in grouped if pid not in done]
    n_roll = sum(len(grouped[p.id]) for p in todo)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_roll, desc=f"verify round {round_}", unit="rollout")
    counts = defaultdict(int)
    mv = None
    if verifier != "code":
        from megatron_rasft.verify.mathv import MathVerifier
        mv = MathVerifier(workers, timeout_s, mode=verifier)
    try:
        with RecordWriter(dst) as w:
            for s in range(0, len(todo), batch_problems):
                batch = todo[s:s + batch_problems]
                recs = verify_problems(batch, grouped, round_, verifier, workers, timeout_s, math_verifier=mv,
                                       on_rollout=(lambda _i: bar.update(1)) if bar else None)
                w.write_batch(recs)
                for rec in recs:
                    for e in rec.rollouts:
                        counts[e["reason"]] += 1
    finally:
        if mv is not None:
            mv.close()
        if bar is not None:
            bar.close()
    return {"problems": len(todo), "skipped": len(done & set(grouped)), "rollouts": n_roll,
            "reasons": dict(counts), "path": str(dst)}
