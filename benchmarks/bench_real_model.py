"""The 135M real model under the real loop: training step time and tokens/s, a round's time split
(export, refresh, rollout, verify, reference pass, train), peak RSS of the trainer and of the
trainer-started vLLM server (its whole process tree), sampled every 0.5 s.

  python benchmarks/bench_real_model.py --out runs/bench_real [--steps 6] [--refresh-interval 2]
  python benchmarks/bench_real_model.py --smoke        # 2 steps, 1 round, K = 2, 2 problems per task

One RASFT run of examples/smollm2_cpu.toml (prepared model, converted, reasoning-gym problems):
the medians are over its steps and rounds (>= 3 of each with the defaults).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_rasft.records import RoundResult, read_records  # noqa: E402
from megatron_rasft.rundir import RunDir  # noqa: E402


def _tree_rss(proc) -> tuple[int, int]:
    """(RSS of the trainer's own processes, RSS of the vLLM server's processes), bytes."""
    import psutil

    trainer = server = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            rss = p.memory_info().rss
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "vllm" in cmd or "VLLM" in p.name() or "EngineCore" in p.name():
            server += rss
        elif "verify" not in cmd:
            trainer += rss
    return trainer, server


def run(out: Path, steps: int, refresh: int, k: int, per_task: int, max_tokens: int) -> dict:
    import psutil

    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.packaged.model import prepare
    from megatron_rasft.packaged.problems import build

    hf = prepare("smollm2", out / "hf", quiet=True)
    if not (out / "mcore" / "model_config.json").is_file():
        hf_to_mcore(hf, out / "mcore", quiet=True, force=True)
    if not (out / "data" / "meta.json").is_file():
        build(out / "data", {"chain_sum": per_task, "leg_counting": per_task}, {})
    run_dir = out / f"run_{time.strftime('%H%M%S')}"
    sets = [f"train.run_dir={run_dir}", f"train.data.path={out / 'data' / 'train.jsonl'}",
            f"train.data.tokenizer={hf}", f"checkpoint.load={out / 'mcore'}", f"train.schedule.train_iters={steps}",
            f"train.schedule.refresh_interval={refresh}", f"rollout.sampling.n={k}",
            f"rollout.sampling.max_tokens={max_tokens}", "train.schedule.global_batch_size=4",
            "train.schedule.micro_batch_size=4"]
    cmd = [sys.executable, "-m", "megatron_rasft", "train", "--config", str(ROOT / "examples" / "smollm2_cpu.toml")]
    for s in sets:
        cmd += ["--set", s]
    log = (out / "train.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak_trainer = peak_server = 0
    while proc.poll() is None:
        tr, sv = _tree_rss(ps)
        peak_trainer, peak_server = max(peak_trainer, tr), max(peak_server, sv)
        time.sleep(0.5)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}); log {out / 'train.log'}")
    recs = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    recs = [r for r in recs if r.get("kind") == "train"]
    step_s = [r["tokens"] / r["tokens_per_s"] for r in recs]
    results = [r for p in RunDir(run_dir).all_round_results() for r in read_records(p, RoundResult)]
    rounds = [r.summary for r in results]
    # Per-round split: each round's own stage times, plus the reference pass and training time of its
    # window (differences of the cumulative loop times logged at the window's last step).
    splits = [dict(r.stage_times) for r in results]
    last_of_window = {}
    for r in recs:
        last_of_window[r["window"]] = r
    prev = {"time_reference": 0.0, "time_train": 0.0}
    for split, (_, r) in zip(splits, sorted(last_of_window.items())):
        for key in ("reference", "train"):
            split[key] = r[f"time_{key}"] - prev[f"time_{key}"]
        prev = r
    keys = ("export", "refresh", "rollout", "verify", "reference", "train")
    return {"steps": len(recs), "step_s_median": statistics.median(step_s),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in recs),
            "tokens_per_step_median": statistics.median(r["tokens"] for r in recs),
            "rounds": len(rounds),
            "round_split_median_s": {key: statistics.median(s.get(key, 0.0) for s in splits[1:] or splits) for key in keys},
            "first_round_split_s": {key: splits[0].get(key, 0.0) for key in keys} if splits else {},
            "peak_rss_trainer_gib": peak_trainer / 2**30, "peak_rss_vllm_gib": peak_server / 2**30,
            "wall_s": wall, "p_hist": [r["p_hist"] for r in rounds]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_real")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--refresh-interval", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--per-task", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.refresh_interval, args.k, args.per_task, args.max_tokens = 2, 2, 2, 2, 32
    res = run(Path(args.out).resolve(), args.steps, args.refresh_interval, args.k, args.per_task, args.max_tokens)
    print(json.dumps(res, indent=1))
    print(f"step {res['step_s_median']:.1f} s (median of {res['steps']}), {res['tokens_per_s_median']:.0f} loss tokens/s; "
          f"round split (median of rounds after the first, s): {res['round_split_median_s']}; "
          f"peak RSS trainer {res['peak_rss_trainer_gib']:.2f} GiB, vLLM server {res['peak_rss_vllm_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
