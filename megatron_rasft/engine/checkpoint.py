"""Training checkpoints: `RUN/ckpt/iter_NNNNNNN/{model/, optim/, rng_rank*.pt, state.json}`.

- `model/` is a plain converter-compatible dist checkpoint (+ model_config.json): `mcore-to-hf`
  exports it directly and the trainer reloads it at any TP/PP.
- `optim/` holds the optimizer state (`dp_reshardable`, the sharding that resumes on CPU/gloo too)
  and the LR scheduler.
- `rng_rank*.pt` every rank's CPU/CUDA/Megatron-tracker RNG states; `state.json` the loop state
  (step, data position, round state) written by rank 0; `buckets.json` the gradient-bucket layout the
  optimizer state was saved with (a resume with another layout is refused: `check_bucket_layout`).
A checkpoint is written to `iter_N.tmp` and renamed when complete; `latest` is updated last, so a
kill at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_rasft.config import ModelConfig
from megatron_rasft.model.provider import unwrap
from megatron_rasft.parallel.groups import barrier, rank
from megatron_rasft.records import replace_dir, write_atomic

_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def _model_sharded_sd(chunks: list) -> dict:
    from megatron_rasft.convert.mcore_io import sharded_state_dict

    return sharded_state_dict(unwrap(chunks))


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(s: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


def _materialize_optimizer_state(optimizer) -> None:
    """Create Adam's state (exp_avg, exp_avg_sq and `step`) so that the sharded optimizer state has
    somewhere to load into: one step of the inner torch optimizer with zero gradients."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"] if p.numel()]
        if all(len(inner.state[p]) for p in params):
            continue
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad()


def bucket_layout(chunks: list) -> list:
    """This rank's gradient-bucket layout: per DDP chunk, per buffer, the number of parameters of each
    bucket (`parallel.bucket_size` and `parallel.overlap_grad_reduce` decide it)."""
    return [[[len(b.params) for b in buf.buckets] for buf in c.buffers + c.expert_parallel_buffers]
            for c in chunks if hasattr(c, "buffers")]


def check_bucket_layout(path: Path, chunks: list) -> None:
    """Refuse to load the optimizer state of checkpoint `path` into chunks bucketed differently: the
    distributed optimizer's state is saved per gradient bucket. Checkpoints written before the file
    existed, and resumes at another world size (another layout of ranks), are not checked. Raises
    ValueError naming the settings."""
    import torch.distributed as dist

    f = Path(path) / "buckets.json"
    if not f.is_file():
        return
    by_rank = json.loads(f.read_text())
    if len(by_rank) != (dist.get_world_size() if dist.is_initialized() else 1):
        return
    saved = by_rank.get(str(rank()))
    now = bucket_layout(chunks)
    if saved is not None and saved != now:
        raise ValueError(f"{path}: the optimizer state was saved with another gradient-bucket layout "
                         f"(parameters per bucket {saved}, now {now}): resume with that run's "
                         f"parallel.overlap_grad_reduce and parallel.bucket_size")


def latest(ckpt_root: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    pointer = Path(ckpt_root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise RuntimeError(f"{pointer} names {path.name}, which is incomplete; remove `latest` to start over")
    return path


def completed(ckpt_root: Path) -> list[tuple[int, Path]]:
    """`(step, checkpoint dir)` of every complete checkpoint under `ckpt_root`, by step."""
    return sorted((int(p.name.split("_")[1]), p) for p in Path(ckpt_root).glob("iter_*")
                  if p.is_dir() and not p.name.endswith(".tmp"))


def save(ckpt_root: Path, step: int, chunks: list, optimizer, scheduler, loop_state: dict, groups, *,
         model_config: ModelConfig, hf_config: Optional[dict], keep_last: int) -> Path:
    """Write `ckpt_root/iter_<step>` and point `latest` at it; returns its path. `groups`: the run's
    `ParallelGroups`. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    from megatron_rasft.convert.mcore_io import save_model_as_mcore

    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"iter_{step:07d}"
    tmp = ckpt_root / f"iter_{step:07d}.tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "optim").mkdir(parents=True)
    barrier()
    from megatron_rasft.engine.step import sync_params

    sync_params(chunks)  # overlap_param_gather: the last step's all-gather may still be pending
    save_model_as_mcore(unwrap(chunks), tmp / "model", model_config, groups, hf_config=hf_config)
    model_sd = _model_sharded_sd(chunks)
    optim_sd = {"optimizer": optimizer.sharded_state_dict(model_sd, metadata=_OPT_META)}
    dist_checkpointing.save(optim_sd, str(tmp / "optim"))
    torch.save(_rng_state(), tmp / f"rng_rank{rank()}.pt")
    layouts = _gather_objects(bucket_layout(chunks))
    barrier()
    if rank() == 0:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(loop_state, indent=1))
        (tmp / "buckets.json").write_text(json.dumps({str(r): lay for r, lay in enumerate(layouts)}))
        replace_dir(tmp, final)
        write_atomic(ckpt_root / "latest", final.name)
        old = sorted(p for p in ckpt_root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def _gather_objects(obj) -> list:
    """`obj` of every rank, by rank (collective; `[obj]` without torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _say_if_schedule_differs(sched_sd: dict, scheduler, path: Path) -> None:
    """Megatron's `OptimizerParamScheduler.load_state_dict` keeps the checkpoint's schedule length:
    a run resumed with a larger `train.schedule.train_iters` would train its extra steps at `min_lr`
    without a word. Say so (rank 0) when the lengths differ."""
    saved = sched_sd.get("lr_decay_steps", sched_sd.get("decay_steps", sched_sd.get("end_iter")))
    if rank() == 0 and saved is not None and saved != scheduler.lr_decay_steps:
        print(f"[resume] the learning-rate schedule is the checkpoint's: cosine decay over {saved} steps, not "
              f"the {scheduler.lr_decay_steps} of train.schedule.train_iters; steps after {saved} train at "
              f"train.optim.min_lr ({scheduler.min_lr:g}). For a new schedule, start a new run from these "
              f"weights (checkpoint.load = {path / 'model'}) instead of --resume", flush=True)


def load(path: Path, chunks: list, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG from `path`; returns the loop state. Collective."""
    from megatron.core import dist_checkpointing

    from megatron_rasft.convert.mcore_io import load_mcore_into_model

    path = Path(path)
    check_bucket_layout(path, chunks)
    _materialize_optimizer_state(optimizer)  # before the weights load: it takes a (zero-grad) step
    load_mcore_into_model(unwrap(chunks), path / "model")
    model_sd = _model_sharded_sd(chunks)
    with torch.no_grad():
        optim_sd = {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPT_META)}
        state = dist_checkpointing.load(optim_sd, str(path / "optim"))
        optimizer.load_state_dict(state["optimizer"])
    loop_state = json.loads((path / "state.json").read_text())
    # Megatron restores Adam's `step` from the param groups of the state dict built at load time
    # (torch Adam keeps it per parameter); every optimizer step of the loop is an Adam step.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.tensor(float(loop_state["step"]), dtype=st["step"].dtype,
                                              device=st["step"].device)
    sched_sd = torch.load(path / "scheduler.pt", weights_only=False)
    _say_if_schedule_differs(sched_sd, scheduler, path)
    scheduler.load_state_dict(sched_sd)
    rng_file = path / f"rng_rank{rank()}.pt"
    if rng_file.is_file():  # absent when resuming at a different world size: keep the fresh seeds
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return loop_state
