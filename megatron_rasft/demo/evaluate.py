"""Held-out evaluation of the demo's checkpoints: export to HF, refresh the server in place, sample
n answers per problem (the same per-problem seeds for every checkpoint, so arms are compared on the
same draws) through `megatron_rasft.eval`, report avg@n with a standard error over problems."""
from __future__ import annotations

import json
import math
from pathlib import Path


def report_tag(arm: str) -> str:
    """File-name form of an arm's name: "SFT (tokens)" -> "sft_tokens"."""
    return "_".join(arm.lower().replace("(", "").replace(")", "").split())


def _checkpoints(run_dir: Path) -> list:
    """(step, the checkpoint's model/ dir) of every checkpoint of a training run."""
    from megatron_rasft.rundir import RunDir
    from megatron_rasft.engine import checkpoint

    return [(step, path / "model") for step, path in checkpoint.completed(RunDir(run_dir).ckpt)]


def avg_at_n(correct_by_problem: list) -> tuple:
    """(avg@n, standard error over problems) from per-problem lists of 0/1 verdicts."""
    per = [sum(c) / len(c) for c in correct_by_problem]
    m = sum(per) / len(per)
    var = sum((x - m) ** 2 for x in per) / max(len(per) - 1, 1)
    return m, math.sqrt(var / len(per))


def evaluate_model(server, problems: list, dc, tag: str, out_dir: Path, tokenizer_dir) -> dict:
    """Through the project's evaluation path (`megatron_rasft.eval`): prompts as token ids like the
    trainer's, n samples per problem with per-problem seeds, math-verify grading, samples + reports
    in `out_dir/tag/`."""
    from megatron_rasft.eval.runner import evaluate, read_samples, sample_path
    from megatron_rasft.config import SamplingConfig

    sampling = SamplingConfig(n=dc.eval_n, temperature=dc.eval_temperature, top_p=1.0, top_k=0,
                              max_tokens=dc.max_tokens, seed=dc.seed + 424242)
    evaluate(server, {"addition": problems}, sampling, out_dir / tag, template="plain", tokenizer=tokenizer_dir)
    flags: dict = {}
    for row in read_samples(sample_path(out_dir / tag, "addition")):
        flags.setdefault(row["id"], []).append(int(row["correct"]))
    by_problem = [flags[p["id"]] for p in problems]
    acc, se = avg_at_n(by_problem)
    by_digits: dict = {}
    for p, f in zip(problems, by_problem):
        by_digits.setdefault(p["digits"], []).append(sum(f) / len(f))
    return {"avg_at_n": acc, "stderr": se, "n": dc.eval_n, "problems": len(problems),
            "by_digits": {d: sum(v) / len(v) for d, v in sorted(by_digits.items())},
            "per_problem": [sum(f) / len(f) for f in by_problem]}


def evaluate_arms(server, out: Path, arms: dict, hf_warm: Path, hf0: Path, test: list, dc, tokenizer_dir) -> dict:
    """{arm: [{step, avg_at_n, stderr, ...}]}, step 0 being the shared warm-up checkpoint."""
    from megatron_rasft.convert.pipeline import mcore_to_hf
    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.refresh import refresh_weights

    client = RolloutClient(server, server.cfg, progress=False)
    refresh_weights(server, hf_warm, client)
    start = {"step": 0, **evaluate_model(server, test, dc, "warmup", out / "eval", tokenizer_dir)}
    print(f"   step 0 (warm-up): avg@{dc.eval_n} = {start['avg_at_n']:.3f} ± {start['stderr']:.3f}", flush=True)
    curves = {}
    for arm, run_dir in arms.items():
        curves[arm] = [start]
        for step, mcore in _checkpoints(run_dir):
            tag = f"{report_tag(arm)}_{step:05d}"
            hf = out / "hf" / tag
            if not (hf / "config.json").is_file():
                mcore_to_hf(mcore, hf, hf_config_from=hf0, quiet=True, force=True)
            refresh_weights(server, hf, client)
            res = {"step": step, **evaluate_model(server, test, dc, tag, out / "eval", tokenizer_dir)}
            curves[arm].append(res)
            print(f"   {arm:>5} step {step}: avg@{dc.eval_n} = {res['avg_at_n']:.3f} ± {res['stderr']:.3f}", flush=True)
    (out / "eval" / "curves.json").write_text(json.dumps(curves, indent=1))
    return curves
