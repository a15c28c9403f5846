"""The 135M real model under the real loop: training step time and tokens/s, a round's time split
(export, refresh, rollout, verify, reference pass, train), peak memory of the trainer and of the
trainer-started vLLM server: the largest process's peak RSS (VmHWM) and the group's summed PSS
sampled every 0.5 s (`megatron_rasft.demo.real_model.resources`).

  python benchmarks/bench_real_model.py --out runs/bench_real [--steps 6] [--batches-per-round 2]
  python benchmarks/bench_real_model.py --smoke        # 2 steps, 1 round, K = 2, 2 problems per task

One RASFT run of examples/smollm2_cpu.toml (prepared model, converted, reasoning-gym problems):
the medians are over its steps and rounds (>= 3 of each with the defaults).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_rasft.demo.real_model.resources import run_sampled  # noqa: E402
from megatron_rasft.demo.real_model.timings import median_split, round_splits, step_stats  # noqa: E402
from megatron_rasft.records import RoundResult, read_records  # noqa: E402
from megatron_rasft.rundir import RunDir  # noqa: E402


def run(out: Path, steps: int, refresh: int, k: int, per_task: int, max_tokens: int) -> dict:
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.demo.real_model.model import prepare
    from megatron_rasft.demo.real_model.problems import build

    hf = prepare("smollm2", out / "hf", quiet=True)
    if not (out / "mcore" / "model_config.json").is_file():
        hf_to_mcore(hf, out / "mcore", quiet=True, force=True)
    if not (out / "data" / "meta.json").is_file():
        build(out / "data", {"chain_sum": per_task, "leg_counting": per_task}, {})
    run_dir = out / f"run_{time.strftime('%H%M%S')}"
    sets = [f"train.run_dir={run_dir}", f"train.data.path={out / 'data' / 'train.jsonl'}",
            f"train.data.tokenizer={hf}", f"checkpoint.load={out / 'mcore'}", f"train.schedule.train_iters={steps}",
            f"rollout.batches_per_round={refresh}", f"rollout.sampling.n={k}",
            f"rollout.sampling.max_tokens={max_tokens}", "train.schedule.global_batch_size=4",
            "train.schedule.micro_batch_size=4"]
    cmd = [sys.executable, "-m", "megatron_rasft", "train", "--config", str(ROOT / "examples" / "smollm2_cpu.toml")]
    for s in sets:
        cmd += ["--set", s]
    with (out / "train.log").open("w") as log:
        rc, usage = run_sampled(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if rc != 0:
        raise SystemExit(f"training failed (exit {rc}); log {out / 'train.log'}")
    steps = step_stats(run_dir)
    splits = round_splits(run_dir)
    rounds = [r.summary for p in RunDir(run_dir).all_round_results() for r in read_records(p, RoundResult)]
    return {**steps, "rounds": len(rounds),
            "round_split_median_s": median_split(splits[1:] or splits),
            "first_round_split_s": splits[0] if splits else {},
            "peak_rss_trainer_gib": usage["peak_hwm_main_gib"], "peak_rss_vllm_gib": usage["peak_hwm_vllm_gib"],
            "peak_pss_trainer_gib": usage["peak_pss_main_gib"], "peak_pss_vllm_gib": usage["peak_pss_vllm_gib"],
            "wall_s": usage["wall_s"], "p_hist": [r["p_hist"] for r in rounds]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_real")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batches-per-round", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--per-task", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batches_per_round, args.k, args.per_task, args.max_tokens = 2, 2, 2, 2, 32
    res = run(Path(args.out).resolve(), args.steps, args.batches_per_round, args.k, args.per_task, args.max_tokens)
    print(json.dumps(res, indent=1))
    print(f"step {res['step_s_median']:.1f} s (median of {res['steps']}), {res['tokens_per_s_median']:.0f} loss tokens/s; "
          f"round split (median of rounds after the first, s): {res['round_split_median_s']}; "
          f"peak RSS of the largest process: trainer {res['peak_rss_trainer_gib']:.2f} GiB, vLLM {res['peak_rss_vllm_gib']:.2f} GiB; "
          f"peak PSS summed: trainer tree {res['peak_pss_trainer_gib']:.2f} GiB, vLLM server {res['peak_pss_vllm_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
