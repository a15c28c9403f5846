"""The optimizer as the loop drives it, read back from a real run: the logged learning rate follows
linear warm-up then cosine decay to `min_lr`, and `clip_grad` bounds the update when it binds."""
import json
import math
from pathlib import Path

import pytest
import torch

from helpers.runs import run_trains, step_losses

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """(HF folder, `--set` loading its Megatron conversion): every run starts from these weights."""
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from helpers.tiny import make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("sched")
    hf = make_tiny_model(root / "hf", train_tokenizer(root / "tok"), hidden_size=64, intermediate_size=128,
                         initializer_range=0.02)
    hf_to_mcore(hf, root / "mcore", quiet=True)
    return hf, f"checkpoint.load={root / 'mcore'}"


def _metrics(run) -> dict:
    recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r.get("kind") == "train"}


def expected_lr(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Megatron's OptimizerParamScheduler (linear warm-up from 0, then cosine to min_lr over the rest),
    evaluated before the step's update: step s (1-based) uses the schedule at n = s - 1 steps done.
        n <= W: lr · n / W
        n >  W: min_lr + (lr - min_lr) · (1 + cos(π (n - W) / (T - W))) / 2"""
    n = step - 1
    if warmup and n <= warmup:
        return lr * n / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (n - warmup) / (total - warmup)))


CLIP = 1e-3  # below the first step's gradient norm (~7e-3 for these weights and data): it binds
# Adam's first step is lr · g / (|g| + eps); with eps = lr = 1e4 (and no weight decay) it is the
# (clipped) gradient itself to 1e-4, so the weight change read from the step-1 checkpoint measures
# the gradient that was applied.
CLIP_SETS = ["train.schedule.train_iters=1", "train.optim.lr=1e4", "train.optim.adam_eps=1e4",
             "train.optim.weight_decay=0.0", "train.optim.lr_warmup_iters=0", "checkpoint.save_interval=1"]


@pytest.fixture(scope="module")
def runs(init, tmp_path_factory):
    """The three runs these tests read, two at a time (they share nothing): {name: run dir}."""
    root = tmp_path_factory.mktemp("sched_runs")
    load = init[1]
    jobs = {"lr": (CONFIG, root / "lr", [load, "train.schedule.train_iters=8", "train.optim.lr=1e-3",
                                         "train.optim.min_lr=1e-4", "train.optim.lr_warmup_iters=3"]),
            "free": (CONFIG, root / "free", [load, *CLIP_SETS, "train.optim.clip_grad=1e9"]),
            "clipped": (CONFIG, root / "clipped", [load, *CLIP_SETS, f"train.optim.clip_grad={CLIP!r}"])}
    for name, future in run_trains(jobs, timeout_s=600).items():
        rc, out = future.result()
        assert rc == 0, (name, out[-3000:])
    return {name: root / name for name in jobs}


def test_logged_lr_is_warmup_then_cosine_to_min_lr(runs):
    got = {s: m["lr"] for s, m in _metrics(runs["lr"]).items()}
    want = {s: expected_lr(s, 1e-3, 1e-4, 3, 8) for s in range(1, 9)}
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert got[4] == pytest.approx(1e-3) and got[8] > 1e-4  # the peak after warm-up; min_lr not reached yet


def _weights_after_step1(run, tmp_path) -> dict:
    from safetensors.torch import load_file

    from megatron_rasft.convert.pipeline import mcore_to_hf

    out = tmp_path / f"{Path(run).name}_hf"
    mcore_to_hf(Path(run) / "ckpt" / "iter_0000001" / "model", out, quiet=True)
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_clip_grad_bounds_the_update_when_it_binds(tmp_path, init, runs):
    """Unclipped, the step's weight change (the applied gradient, see CLIP_SETS) has the norm of
    the logged grad norm (computed before clipping); with clip_grad below that norm it has norm
    exactly clip_grad, in the same direction."""
    from safetensors.torch import load_file

    hf_dir, _ = init
    start = {k: v for f in sorted(Path(hf_dir).glob("*.safetensors")) for k, v in load_file(f).items()}
    deltas, norms = {}, {}
    for name in ("free", "clipped"):
        after = _weights_after_step1(runs[name], tmp_path)
        assert after.keys() == start.keys()
        deltas[name] = torch.cat([(after[k].double() - start[k].double()).flatten() for k in sorted(start)])
        norms[name] = _metrics(runs[name])[1]["grad_norm"]
    assert norms["free"] > 2 * CLIP, norms  # the clip binds
    assert norms["clipped"] == pytest.approx(norms["free"], rel=1e-6)  # same gradient, logged before clipping
    assert deltas["free"].norm().item() == pytest.approx(norms["free"], rel=1e-3)
    assert deltas["clipped"].norm().item() == pytest.approx(CLIP, rel=1e-3)
    cos = torch.nn.functional.cosine_similarity(deltas["free"], deltas["clipped"], dim=0).item()
    assert cos > 1 - 1e-6
    assert len(step_losses(runs["clipped"])) == 1
