"""Overlapped vs synchronous rounds: the same RASFT run with `rollout.overlap` false and true.

An external vLLM server on a tiny model (built here) pinned to CPU core 0, the trainer (one
process) pinned to core 1 (`sched_setaffinity`, inherited by the children, as `taskset` would).
Both runs train the same problems from the same converted checkpoint; the sync and overlap runs
alternate (--repeats pairs). Window 0's round is synchronous in both modes, so the figures cover
windows 1 .. W-1, read from RUN/metrics.jsonl between the last step of window 0 and the last step:

  wall per window       loop seconds per window (rounds, reference pass and training)
  round (sync)          rank 0's part of a round (refresh, generation, verification, weighting),
                        = the sync run's `time_round_wait` per window
  train                 `time_train` per window (forward/backward + optimizer)
  exposed (overlap)     the overlap run's `time_round_wait` per window: what was not hidden
  hidden                from the overlap run alone: (bg - waited) / min(bg, busy), with bg = the
                        background part of its rounds (generation + verification) per window,
                        waited = its `time_round_wait` less the refresh at the boundary
                        (`time_refresh`; export and refresh are not overlapped), and busy = its
                        wall time per window less `time_round_wait` (what the trainer did
                        beside the round: training, the reference pass, checkpoints, logging,
                        and the boundary's export and probe, which cannot overlap: so the
                        bound is a little generous).
                        The share of what overlap could hide that it did hide (1.0 = perfect).
                        The bound min(bg, busy) is printed in seconds: when it is small next to
                        the run-to-run spread, so is the fraction's meaning
  hidden by wall time   (wall_sync - wall_overlap) / min(round_sync, train): the same share from
                        two runs' wall clocks, so it carries their spread (it can exceed 1)

  python benchmarks/bench_overlap.py --smoke       # one short pair (checks the path; ~3 min)
  python benchmarks/bench_overlap.py               # the numbers in docs/performance.md
  python benchmarks/bench_overlap.py --smoke --server-url URL --model HF_DIR
        # a running server that serves HF_DIR instead of one started here (no pinning: a path check)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, run_dir: Path, overlap: bool, trainer_cpus: set) -> dict:
    """One training run pinned to `trainer_cpus`; -> its per-window figures (windows >= 1)."""
    args = [sys.executable, "-m", "megatron_rasft", "train", "--config", str(config),
            "--set", f"train.run_dir={run_dir}", "--set", f"rollout.overlap={'true' if overlap else 'false'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.monotonic()
    p = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       preexec_fn=lambda: os.sched_setaffinity(0, trainer_cpus))
    wall = time.monotonic() - t0
    if p.returncode:
        raise SystemExit(f"training run failed ({run_dir}):\n{p.stdout[-4000:]}")
    from megatron_rasft.rundir import RunDir

    recs = [json.loads(s) for s in RunDir(run_dir).metrics.read_text().splitlines()]
    recs = [r for r in recs if r.get("kind") == "train"]
    cfg = json.loads(RunDir(run_dir).config.read_text())
    per_window = cfg["rollout"]["batches_per_round"]  # steps per window (rasft, `all` selection)
    first, last = recs[per_window - 1], recs[-1]  # the last step of window 0, the last step
    windows = (last["step"] - first["step"]) / per_window

    def d(key):
        return (last[key] - first[key]) / windows

    return {"wall_per_window": d("time"), "round_wait": d("time_round_wait"), "train": d("time_train"),
            "background": d("time_rollout") + d("time_verify"), "refresh": d("time_refresh"),
            "rollout": d("time_rollout"), "reference": d("time_reference"), "process_wall": wall,
            "windows": windows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="one short pair of runs")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--batches-per-round", type=int, default=2, help="steps per window")
    ap.add_argument("--global-batch", type=int, default=8, help="problems per step")
    ap.add_argument("--samples", type=int, default=4, help="K rollouts per problem")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="sync/overlap pairs")
    ap.add_argument("--out", help="write the JSON result here")
    ap.add_argument("--server-url", help="attach to a running vLLM server that serves --model (the test suite's "
                                         "shared server) instead of starting one pinned to core 0")
    ap.add_argument("--model", help="with --server-url: the HF checkpoint that server serves")
    args = ap.parse_args()
    if bool(args.server_url) != bool(args.model):
        ap.error("--server-url and --model go together")
    if args.smoke:
        args.windows, args.batches_per_round, args.global_batch, args.samples, args.repeats = 3, 1, 4, 2, 1

    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.demo.task import make_problems, write_jsonl
    from megatron_rasft.rollout.server import RolloutServer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ (not shipped) at the repository root
    from devtools.tiny_server import start_tiny_server

    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, trainer_cpus = ({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else (set(cpus), set(cpus))
    work = Path(tempfile.mkdtemp(prefix="bench_overlap_"))
    if args.server_url:  # not ours: not pinned, not stopped
        server, model_dir, server_cpus = RolloutServer.attach(args.server_url), args.model, set(cpus)
    else:
        os.sched_setaffinity(0, server_cpus)  # the server (and its engine processes) inherit core 0
        server = start_tiny_server(work / "server", startup_timeout_s=900)  # one core on a shared box: slow start
        os.sched_setaffinity(0, set(cpus))
        model_dir = server.model_dir
    try:
        hf_to_mcore(model_dir, work / "mcore", quiet=True)
        n_problems = args.windows * args.batches_per_round * args.global_batch
        problems = write_jsonl(make_problems(n_problems, seed=7, min_digits=1, max_digits=2), work / "problems.jsonl")
        config = work / "run.toml"
        config.write_text(f"""
[model]
seq_length = 96
[loss]
method = "rasft"
[rollout]
batches_per_round = {args.batches_per_round}
[rollout.server]
url = "{server.url}"
concurrency = 4
[rollout.sampling]
n = {args.samples}
max_tokens = {args.max_tokens}
temperature = 1.0
[train.data]
path = "{problems}"
tokenizer = "{model_dir}"
prompt_template = "plain"
[train.optim]
lr = 1e-3
[train.schedule]
train_iters = {args.windows * args.batches_per_round}
global_batch_size = {args.global_batch}
micro_batch_size = 2
[checkpoint]
load = "{work / 'mcore'}"
""")
        results = {"sync": [], "overlap": []}
        for i in range(args.repeats):
            for mode in ("sync", "overlap"):
                r = run(config, work / f"{mode}_{i}", mode == "overlap", trainer_cpus)
                results[mode].append(r)
                print(f"[{mode} {i}] " + " ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    finally:
        if not args.server_url:
            server.stop()

    def med(mode, key):
        return statistics.median(r[key] for r in results[mode])

    wall_s, wall_o = med("sync", "wall_per_window"), med("overlap", "wall_per_window")
    round_s, train_s = med("sync", "round_wait"), med("sync", "train")
    bg_o = med("overlap", "background")  # the part of a round that runs beside training
    waited_o = max(0.0, med("overlap", "round_wait") - med("overlap", "refresh"))  # for the background part
    busy_o = wall_o - med("overlap", "round_wait")  # the trainer's own work per window
    bound_o = min(bg_o, busy_o)  # at most this much of a window can be hidden
    summary = {
        "server_cpus": sorted(server_cpus), "trainer_cpus": sorted(trainer_cpus), "args": vars(args),
        "wall_per_window_sync": wall_s, "wall_per_window_overlap": wall_o, "speedup": wall_s / wall_o,
        "round_sync": round_s, "train_sync": train_s, "train_overlap": med("overlap", "train"),
        "exposed_overlap": med("overlap", "round_wait"), "rollout_sync": med("sync", "rollout"),
        "background_overlap": bg_o, "waited_overlap": waited_o, "busy_overlap": busy_o, "hideable_overlap": bound_o,
        "hidden_fraction": (bg_o - waited_o) / bound_o if bound_o > 0 else float("nan"),
        "hidden_fraction_by_wall": (wall_s - wall_o) / min(round_s, train_s),
        "runs": results,
    }
    print(f"per window (windows 1..{args.windows - 1}, median of {args.repeats}): wall sync {wall_s:.2f}s, "
          f"overlap {wall_o:.2f}s ({summary['speedup']:.2f}x); round (sync) {round_s:.2f}s, train {train_s:.2f}s; "
          f"exposed with overlap {summary['exposed_overlap']:.2f}s, of it {waited_o:.2f}s waiting for the "
          f"{bg_o:.2f}s background part; hidden "
          f"{summary['hidden_fraction']:.0%} of the {bound_o:.2f}s that could be (overlap run), "
          f"{summary['hidden_fraction_by_wall']:.0%} by wall time against the sync run")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
