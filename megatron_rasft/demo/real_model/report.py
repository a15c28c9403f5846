"""RUN/report.md of the real-model run (`megatron_rasft.demo.real_model`), from the files the run
wrote: the evaluations' graded samples, the RASFT arm's verdicts and rounds, every training run's
metrics, and the stages' peak memory (logs/resources.json). Nothing is typed in by hand."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from megatron_rasft.demo.real_model.timings import SPLIT_KEYS, median_split, round_splits, step_stats
from megatron_rasft.records import EvalSample, ProblemVerdicts, RoundResult, read_records
from megatron_rasft.rundir import RunDir


def per_problem_accuracy(eval_dir: Path, benchmark: str) -> dict:
    """problem id -> fraction of its samples graded correct, from EVAL/samples/<benchmark>.jsonl."""
    hits = defaultdict(list)
    for s in read_records(Path(eval_dir) / "samples" / f"{benchmark}.jsonl", EvalSample):
        hits[s.id].append(s.correct)
    return {pid: sum(c) / len(c) for pid, c in hits.items()}


def mean_se(values: list) -> tuple:
    """Mean and its standard error (sample standard deviation / sqrt(count)); SE 0 for one value."""
    m = sum(values) / len(values)
    var = sum((x - m) ** 2 for x in values) / max(len(values) - 1, 1)
    return m, math.sqrt(var / len(values))


def round_histogram(run_dir: Path, round_: int, k: int) -> dict:
    """task -> [number of problems with c correct of their rollouts, c = 0..k] in round `round_`; the
    task is the problem id's first `/`-separated part (reasoning-gym ids are `task/split/index`)."""
    hist = defaultdict(lambda: [0] * (k + 1))
    for pv in read_records(RunDir(run_dir).verdicts(round_), ProblemVerdicts):
        hist[pv.problem_id.split("/")[0]][min(sum(bool(r["correct"]) for r in pv.rollouts), k)] += 1
    return dict(hist)


def _eval_lines(out: Path, models: list) -> list:
    benches = sorted(json.loads((out / "eval" / models[0] / "results.json").read_text()))
    acc = {m: {b: per_problem_accuracy(out / "eval" / m, b) for b in benches} for m in models}
    lines = ["| model | " + " | ".join(f"{b} (avg@n, %)" for b in benches) + " |", "|---|" + "---|" * len(benches)]
    for m in models:
        cells = []
        for b in benches:
            mean, se = mean_se(list(acc[m][b].values()))
            cells.append(f"{100 * mean:.1f} ± {100 * se:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if {"sft", "rasft"} <= set(models):
        diffs = []
        for b in benches:
            common = sorted(set(acc["rasft"][b]) & set(acc["sft"][b]))
            mean, se = mean_se([acc["rasft"][b][p] - acc["sft"][b][p] for p in common])
            diffs.append(f"{b}: {100 * mean:+.1f} ± {100 * se:.1f} points over {len(common)} problems")
        lines += ["", "RASFT − SFT, paired over the same problems and sampling seeds: " + "; ".join(diffs) + "."]
    return lines


def _perf_lines(out: Path) -> list:
    lines = ["| run | steps | s / step (median) | loss tokens / step | loss tokens / s |", "|---|---|---|---|---|"]
    for name in ("warmup", "sft", "rasft"):
        st = step_stats(out / name)
        lines.append(f"| {name} | {st['steps']} | {st['step_s_median']:.1f} | {st['tokens_per_step_median']:.0f} | "
                     f"{st['tokens_per_s_median']:.1f} |")
    splits = round_splits(out / "rasft")
    lines += ["", "RASFT rounds, seconds per stage (reference pass and training: of the window the round feeds):", "",
              "| round | " + " | ".join(SPLIT_KEYS) + " |", "|---|" + "---|" * len(SPLIT_KEYS)]
    for i, s in enumerate(splits):
        lines.append(f"| {i} | " + " | ".join(f"{s[k]:.1f}" for k in SPLIT_KEYS) + " |")
    med = median_split(splits)
    lines.append(f"| median of {len(splits)} | " + " | ".join(f"{med[k]:.1f}" for k in SPLIT_KEYS) + " |")
    resources = out / "logs" / "resources.json"
    if resources.is_file():
        lines += ["", "Stages: wall time and peak memory. PSS: the stage's processes' proportional set sizes summed "
                  "(sampled every 0.5 s; shared pages counted once); RSS: the largest single process's peak "
                  "resident set (VmHWM). vLLM: the server's api server, engine core and worker.", "",
                  "| stage | wall (s) | PSS (GiB) | largest RSS (GiB) | vLLM PSS (GiB) | vLLM largest RSS (GiB) | "
                  "load average (mean, max) |", "|---|---|---|---|---|---|---|"]
        for stage, r in json.loads(resources.read_text()).items():
            cells = [f"{r[k]:.2f}" if k in r else "–" for k in ("peak_pss_main_gib", "peak_hwm_main_gib",
                                                                 "peak_pss_vllm_gib", "peak_hwm_vllm_gib")]
            load = f"{r['load1_mean']:.1f}, {r['load1_max']:.1f}" if "load1_mean" in r else "–"
            lines.append(f"| {stage} | {r['wall_s']:.0f} | " + " | ".join(cells) + f" | {load} |")
    return lines


def report(out: Path, args) -> str:
    """The report's markdown. `args` are the run's command-line settings; the total time is the sum
    of the stages' wall times in logs/resources.json (so a continued run counts each stage once)."""
    resources = out / "logs" / "resources.json"
    stages = json.loads(resources.read_text()) if resources.is_file() else {}
    minutes = sum(r["wall_s"] for r in stages.values()) / 60
    models = [m for m in ("base", "warm-up", "sft", "rasft") if (out / "eval" / m / "results.json").is_file()]
    lines = ["# Real-model run: SmolLM2-135M-Instruct, reasoning-gym", "",
             f"Warm-up {args.warmup_steps} SFT steps (batch {args.global_batch}, lr {args.lr:g}), then "
             f"{args.arm_steps} steps per arm from it; K = {args.k}, a round per {args.batches_per_round} global batches of problems, "
             f"{args.max_tokens} new tokens; evaluation avg@{args.eval_n} at temperature 1.0 on the first "
             f"{args.eval_limit} problems of each benchmark, chat template. Total {minutes:.0f} min (the stages' wall times summed).", "",
             "± is the standard error over problems (each problem's accuracy is the mean of its samples).", ""]
    lines += _eval_lines(out, models)
    summaries = [r.summary for p in RunDir(out / "rasft").all_round_results() for r in read_records(p, RoundResult)]
    lines += ["", "RASFT rounds: problems by number of correct rollouts out of K (k = 0..K), per task:", "",
              "| round | task | problems | " + " | ".join(f"k = {c}" for c in range(args.k + 1)) + " | 0 < k < K |",
              "|---|---|---|" + "---|" * (args.k + 2)]
    for r in summaries:
        for task, h in round_histogram(out / "rasft", r["round"], args.k).items():
            lines.append(f"| {r['round']} | {task} | {sum(h)} | " + " | ".join(map(str, h)) +
                         f" | {sum(h[1:-1]) / sum(h):.0%} |")
    lines += [""] + [f"Round {r['round']}: {r['rollouts_added']} correct rollouts added to training, "
                     f"k=0 {r['frac_k0']:.0%}, k=K {r['frac_kK']:.0%}." for r in summaries]
    lines += ["", "## Time and memory", ""] + _perf_lines(out)
    return "\n".join(lines) + "\n"

