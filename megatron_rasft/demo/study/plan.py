"""Planned seconds of each unit of a study (the console's ETA; `Progress` rescales it by how fast the
finished units actually ran) and of the whole protocol (the budget check in docs/results.md).

The reference figures are measured on the 2-core box with SmolLM2-135M-Instruct, batch 8: an SFT
step ~12 s and an RASFT step ~45 s with K = 4 and a round every 2 steps (issue #29: 8 steps took 135 s
and 400 s, start-up included); a training run's start ~40 s; an evaluation's server start ~60 s and
~0.3 s per sample of ≤ 128 tokens at concurrency 32; an export ~20 s. RASFT's per-step cost is scaled
by the rollouts it samples per step (K × global batch / batches_per_round × batches_per_round = K ×
global batch, relative to 4 × 8) and by max_tokens / 128.
"""
from __future__ import annotations

TRAIN_START_S = 40.0
SFT_STEP_S = 12.0 / 8  # per sequence of the global batch
ROLLOUT_STEP_S = 33.0 / 32  # RASFT's extra per rollout of 128 tokens (45 − 12 s for 4 × 8 rollouts)
EVAL_START_S = 60.0
EVAL_SAMPLE_S = 0.3
EXPORT_S = 20.0
TOKEN_MATCHED_FACTOR = 1.9  # sft_tokens' steps / sft's until the seed's RASFT arm has run (pilot: 5,445 / 2,877 loss tokens)


def unit_seconds(p, arm: str) -> float:
    """Planned wall seconds of one unit (train + export + evaluate) of arm `arm` under protocol `p`."""
    a, e = p.arms, p.eval
    evaluate = EVAL_START_S + EVAL_SAMPLE_S * e.n * e.limit * e.max_tokens / 128
    if arm == "warmup":
        return evaluate
    steps = a.steps * (TOKEN_MATCHED_FACTOR if arm == "sft_tokens" else 1.0)
    per_step = SFT_STEP_S * a.global_batch
    if arm in ("rasft", "rasft_overlap", "grpo"):
        per_step += ROLLOUT_STEP_S * a.k * a.global_batch * a.max_tokens / 128
    return TRAIN_START_S + steps * per_step + EXPORT_S + evaluate


def shared_seconds(p) -> float:
    """Prepare, problems, convert (~70 s) and the warm-up."""
    return 70.0 + TRAIN_START_S + p.warmup.steps * SFT_STEP_S * p.arms.global_batch + EXPORT_S


def plan(p, units: list) -> dict:
    """{"shared": s, "seed_S/ARM": s, ...} in run order, for `real_model.progress.Progress`."""
    return {"shared": shared_seconds(p), **{f"seed_{s}/{arm}": unit_seconds(p, arm) for s, arm in units}}


def total_hours(p) -> float:
    """The protocol's planned box time, hours."""
    return (shared_seconds(p) + sum(unit_seconds(p, a) for _, a in p.study.units())) / 3600
