"""Step times and per-round time splits of a finished training run, from the files it wrote
(RUN/metrics.jsonl and RUN/rounds/round_R.json): what the real-model benchmark and the real-model
run's report print."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from megatron_rasft.records import RoundResult, read_records
from megatron_rasft.rundir import RunDir

SPLIT_KEYS = ("export", "refresh", "rollout", "verify", "reference", "train")


def train_records(run_dir: str | Path) -> list:
    """The run's `kind == "train"` metrics lines, in step order."""
    lines = RunDir(run_dir).metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def step_stats(run_dir: str | Path) -> dict:
    """Medians over the run's optimizer steps: seconds per step (forward, backward, optimizer; the
    rounds and reference passes are not in it), loss tokens per step and per second."""
    recs = train_records(run_dir)
    return {"steps": len(recs),
            "step_s_median": statistics.median(r["tokens"] / r["tokens_per_s"] for r in recs),
            "tokens_per_step_median": statistics.median(r["tokens"] for r in recs),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in recs)}


def round_splits(run_dir: str | Path) -> list:
    """Seconds per stage of each round, in round order: the round's own stage times (export,
    refresh, rollout, verify), plus the reference pass and training time of the window it feeds
    (differences of the cumulative `time_reference` / `time_train` logged at the window's last step)."""
    results = [r for p in RunDir(run_dir).all_round_results() for r in read_records(p, RoundResult)]
    splits = [dict(r.stage_times) for r in results]
    last_of_window = {}
    for r in train_records(run_dir):
        last_of_window[r["window"]] = r
    prev = {"time_reference": 0.0, "time_train": 0.0}
    for split, (_, r) in zip(splits, sorted(last_of_window.items())):
        for key in ("reference", "train"):
            split[key] = r[f"time_{key}"] - prev[f"time_{key}"]
        prev = r
    return [{key: s.get(key, 0.0) for key in SPLIT_KEYS} for s in splits]


def median_split(splits: list) -> dict:
    """Per-stage medians over `splits` (each a `round_splits` entry)."""
    return {key: statistics.median(s[key] for s in splits) for key in SPLIT_KEYS} if splits else {}
