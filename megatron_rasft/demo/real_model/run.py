"""The real-model run (`make demo-real`): SmolLM2-135M-Instruct on reasoning-gym problems, on CPU.

  prepare the model (GGUF → HF) → problems (train / held-out) → HF → Megatron → SFT warm-up →
  two arms from the warm-up checkpoint, the same number of optimizer steps: plain SFT, and RASFT
  with rollout rounds (trainer-started vLLM server, chat template, stop at <|im_end|>) → export
  every arm to HF → evaluate the base model, the warm-up and both arms on the held-out problems and
  a GSM8K subset (chat template, avg@n) → RUN/report.md.

Every stage is a command a user would run (`tools/prepare_model.py`, `tools/make_dataset.py`,
`convert_checkpoint.py`, `python -m megatron_rasft train`, `... eval`), as subprocesses; a stage
whose output exists is skipped, so an interrupted run continues where it stopped.

  python -m megatron_rasft.demo.real_model [--out runs/demo_real] [--warmup-steps 20] [--arm-steps 6]

The defaults are the run in docs/results.md ("Real model"): ~40 min on the shared 2-core box; peak memory ~7 GiB for the
trainer plus ~3.4 GiB for the vLLM server it starts for the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_rasft.demo.real_model.progress import Progress, plan
from megatron_rasft.demo.real_model.report import report
from megatron_rasft.demo.real_model.resources import run_sampled

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "examples" / "smollm2_cpu.toml"
TASKS = "chain_sum:{n},leg_counting:{n}"


def _run(args: list, log: Path, stage: str, progress: Progress) -> None:
    """Run a stage (stdout+stderr to `log`, its progress lines to the console); a failure shows
    the log's tail.

    The stage's peak memory (its own processes, and the vLLM server's: `resources.run_sampled`) and
    wall time are added to OUT/logs/resources.json under the log's name.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    progress.start(stage)
    with log.open("w") as f:
        def on_line(line: str) -> None:
            f.write(line)
            f.flush()
            progress.line(stage, line)

        rc, usage = run_sampled([sys.executable] + [str(a) for a in args], cwd=ROOT, env=env, on_line=on_line)
    resources = log.parent / "resources.json"
    table = json.loads(resources.read_text()) if resources.is_file() else {}
    table[log.stem] = dict(usage, exit=rc)
    resources.write_text(json.dumps(table, indent=1) + "\n")
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"stage failed (exit {rc}); log {log}:\n{tail}")
    progress.finish(stage)


def _train(out: Path, name: str, sets: list, progress: Progress) -> Path:
    """A training run in OUT/NAME; returns its final checkpoint's model folder."""
    from megatron_rasft.rundir import RunDir
    from megatron_rasft.engine.checkpoint import latest

    run = out / name
    done = latest(RunDir(run).ckpt)
    if done is None:
        args = ["-m", "megatron_rasft", "train", "--config", CONFIG, "--set", f"train.run_dir={run}"]
        for s in sets:
            args += ["--set", s]
        _run(args, out / "logs" / f"{name}.log", name, progress)
        done = latest(RunDir(run).ckpt)
    else:
        progress.finish(name, skipped=True)
    return done / "model"


def _export(mcore: Path, hf_out: Path, base_hf: Path, out: Path, progress: Progress) -> Path:
    stage = f"export {hf_out.name}"
    if not (hf_out / "config.json").is_file():
        _run([ROOT / "tools" / "convert_checkpoint.py", "mcore-to-hf", "--mcore-dir", mcore, "--out", hf_out,
              "--hf-config-from", base_hf, "--quiet"], out / "logs" / f"export_{hf_out.name}.log", stage, progress)
    else:
        progress.finish(stage, skipped=True)
    return hf_out


def _eval(model: Path, name: str, out: Path, args, progress: Progress) -> dict:
    dest, stage = out / "eval" / name, f"eval {name}"
    if not (dest / "results.json").is_file():
        benches = f"heldout={out / 'data' / 'test.jsonl'}"
        if args.gsm8k:
            benches += f",gsm8k={args.gsm8k}"
        _run(["-m", "megatron_rasft", "eval", "--model", model, "--set", f"eval.benchmarks={benches}",
              "--limit", args.eval_limit, "--set", f"eval.sampling.n={args.eval_n}", "--set", "eval.sampling.temperature=1.0",
              "--set", f"eval.sampling.max_tokens={args.max_tokens}", "--set", "eval.prompt_template=chat",
              "--max-model-len", "1024", "--kv-cache-gib", "1", "--out", dest, "--no-progress"],
             out / "logs" / f"eval_{name}.log", stage, progress)
    else:
        progress.finish(stage, skipped=True)
    return json.loads((dest / "results.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_rasft.demo.real_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo_real")
    p.add_argument("--train-per-task", type=int, default=200)
    p.add_argument("--test-per-task", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--arm-steps", type=int, default=6)
    p.add_argument("--batches-per-round", type=int, default=2, help="rollout.batches_per_round of the RASFT arm")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-n", type=int, default=2)
    p.add_argument("--eval-limit", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "benchmarks" / "gsm8k.jsonl"),
                   help="GSM8K test file (evaluation only; '' to skip)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.gsm8k and not Path(args.gsm8k).is_file():
        raise SystemExit(f"--gsm8k {args.gsm8k}: no such file (pass --gsm8k '' to skip it)")
    progress = Progress(plan(args.warmup_steps, args.arm_steps, args.eval_limit, args.eval_n, bool(args.gsm8k)))
    hf = out / "models" / "smollm2-135m-instruct"
    if not (hf / "prepared.json").is_file():
        _run([ROOT / "tools" / "prepare_model.py", "smollm2", "--out", hf], out / "logs" / "prepare.log", "prepare",
             progress)
    else:
        progress.finish("prepare", skipped=True)
    if not (out / "data" / "meta.json").is_file():
        _run([ROOT / "tools" / "make_dataset.py", "--out", out / "data",
              "--train", TASKS.format(n=args.train_per_task), "--test", TASKS.format(n=args.test_per_task)],
             out / "logs" / "dataset.log", "dataset", progress)
    else:
        progress.finish("dataset", skipped=True)
    mcore = out / "models" / "smollm2-135m-instruct-mcore"
    if not (mcore / "model_config.json").is_file():
        _run([ROOT / "tools" / "convert_checkpoint.py", "hf-to-mcore", "--hf-dir", hf, "--out", mcore, "--quiet",
              "--force"], out / "logs" / "convert.log", "convert", progress)
    else:
        progress.finish("convert", skipped=True)
    common = [f"train.data.path={out / 'data' / 'train.jsonl'}", f"train.data.tokenizer={hf}",
              f"train.schedule.global_batch_size={args.global_batch}", f"train.optim.lr={args.lr}",
              f"rollout.sampling.n={args.k}", f"rollout.sampling.max_tokens={args.max_tokens}"]
    warm = _train(out, "warmup", common + [f"checkpoint.load={mcore}", "loss.method=sft",
                                           "rollout.batches_per_round=0",
                                           f"train.schedule.train_iters={args.warmup_steps}"], progress)
    arms = {}
    for name, method in (("sft", "sft"), ("rasft", "rasft")):
        rounds = args.batches_per_round if method == "rasft" else 0  # sft has no rounds
        sets = common + [f"checkpoint.load={warm}", f"loss.method={method}",
                         f"train.schedule.train_iters={args.arm_steps}",
                         f"rollout.batches_per_round={rounds}", "train.seed=1"]
        arms[name] = _train(out, name, sets, progress)
    _eval(hf, "base", out, args, progress)
    for name, mc in (("warm-up", warm), ("sft", arms["sft"]), ("rasft", arms["rasft"])):
        _eval(_export(mc, out / "hf" / name, hf, out, progress), name, out, args, progress)
    text = report(out, args)
    (out / "report.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
