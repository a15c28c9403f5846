"""One unit's evaluation summary (RESULTS/seed_S/ARM.json), built from the files its run wrote: the
evaluation's graded samples, the training run's metrics and rounds, and the stages' measured usage.
Everything the report needs is in it, so the report runs from the committed summaries alone.

  {"study", "seed", "arm", "method", "steps", "lr", "commit", "date",
   "accuracy": mean over problems of the per-problem fraction correct,
   "problems": {problem id: [correct samples, samples]},
   "loss_tokens": loss tokens trained (metrics.jsonl),
   "rounds": [{"round", "hist": {task: [problems with c correct of K, c = 0..K]}, "rollouts_added"}],
   "time": {"train_wall_s", "train_cpu_s_main", "train_cpu_s_vllm", "export_wall_s", "eval_wall_s",
            "load1_mean", "invocations", "stages": {"export", "refresh", "rollout", "verify", "reference",
            "train", "round_wait"}: seconds, the run's cumulative time_* of its last step}}
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

STAGE_KEYS = ("export", "refresh", "rollout", "verify", "reference", "train", "round_wait")


def per_problem_counts(eval_dir: Path, test_file: Path, benchmark: str = "heldout") -> dict:
    """problem id -> [correct samples, samples] from EVAL/samples/<benchmark>.jsonl. The evaluation
    names a problem by its 0-based line in the benchmark file; the summary uses that line's own `id`
    (`task/seed/index`), so that the task is readable and files of different studies do not mix."""
    from megatron_rasft.records import EvalSample, read_records

    ids = [json.loads(line)["id"] for line in Path(test_file).read_text().splitlines() if line.strip()]
    counts = defaultdict(lambda: [0, 0])
    for s in read_records(Path(eval_dir) / "samples" / f"{benchmark}.jsonl", EvalSample):
        if not s.id.isdigit() or int(s.id) >= len(ids):
            raise ValueError(f"{eval_dir}: sample id {s.id!r} is not a line of {test_file} ({len(ids)} lines)")
        counts[ids[int(s.id)]][0] += int(bool(s.correct))
        counts[ids[int(s.id)]][1] += 1
    return dict(counts)


def accuracy(problems: dict) -> float:
    """Mean over problems of correct / samples."""
    return sum(c / n for c, n in problems.values()) / len(problems)


def _train_records(run_dir: Path) -> list:
    """The last metrics line of every step (a resumed run may repeat a step's line), by step."""
    path = Path(run_dir) / "metrics.jsonl"
    by_step = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if r.get("kind") == "train":
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def _rounds(run_dir: Path, k: int) -> list:
    from megatron_rasft.demo.real_model.report import round_histogram
    from megatron_rasft.records import RoundResult, read_records
    from megatron_rasft.rundir import RunDir

    out = []
    for path in RunDir(run_dir).all_round_results():
        for r in read_records(path, RoundResult):
            out.append({"round": r.round, "hist": round_histogram(run_dir, r.round, k),
                        "rollouts_added": r.summary.get("rollouts_added"), "stage_times": r.stage_times})
    return out


def build_summary(p, seed: int, arm: str, steps: int, run_dir: Path | None, eval_dir: Path, invocations: list,
                  export: dict, evaluation: dict, *, commit: str, test_file: Path) -> dict:
    """The summary dict of one unit (see the module docstring). `invocations`: `run_stage` usages of
    the training stage (one per call; several after a resume); `export`, `evaluation`: theirs ({} when
    the stage's output already existed); `test_file`: the held-out problems evaluated."""
    problems = per_problem_counts(eval_dir, test_file)
    records = _train_records(run_dir) if run_dir is not None else []
    last = records[-1] if records else {}
    from megatron_rasft.demo.study.protocol import METHOD

    return {"study": p.study.name, "seed": seed, "arm": arm, "method": METHOD[arm], "steps": steps,
            "lr": p.arms.lr, "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "accuracy": accuracy(problems), "problems": problems,
            "loss_tokens": sum(int(r["tokens"]) for r in records),
            "rounds": _rounds(run_dir, p.arms.k) if run_dir is not None else [],
            "time": {"train_wall_s": round(sum(u["wall_s"] for u in invocations), 1),
                     "train_cpu_s_main": round(sum(u["cpu_s_main"] for u in invocations), 1),
                     "train_cpu_s_vllm": round(sum(u["cpu_s_vllm"] for u in invocations), 1),
                     "export_wall_s": export.get("wall_s"), "eval_wall_s": evaluation.get("wall_s"),
                     "load1_mean": round(sum(u["load1_mean"] for u in invocations) / len(invocations), 2)
                     if invocations else None,
                     "invocations": len(invocations),
                     "stages": {k: round(float(last.get(f"time_{k}", 0.0)), 1) for k in STAGE_KEYS}}}


def read_summary(path: Path) -> dict:
    """A summary file; FileNotFoundError naming what must run first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the unit that writes it must finish first)")
    return json.loads(path.read_text())


def token_matched_steps(sft: dict, rasft: dict, steps: int) -> int:
    """Steps of plain SFT that train on as many loss tokens as the RASFT arm: steps × tokens(RASFT) /
    tokens(SFT), at least `steps` (as the toy demo's token-matched arm, demo/run.py)."""
    if sft["loss_tokens"] <= 0:
        raise ValueError(f"seed {sft['seed']}: the SFT arm's summary records no loss tokens")
    return max(steps, round(steps * rasft["loss_tokens"] / sft["loss_tokens"]))
