"""The RASFT training loop on Megatron-Core, top to bottom.

    set up (groups, data, policy + frozen reference, DDP, optimizer, stream) → resume if asked →
    for each step: fill the queue (new window → rollout round → reference pass: `stream.py`) →
    global batch → forward/backward through Megatron's schedule → optimizer step → log → checkpoint.

Runs the same under `torchrun` on GPUs (NCCL) and in one or several CPU processes (gloo).
"""
from __future__ import annotations

import json
import math
import time

import torch

from megatron_rasft.config import RunConfig
from megatron_rasft.rundir import RunDir
from megatron_rasft.engine import checkpoint
from megatron_rasft.train.data import load_dataset
from megatron_rasft.train.log import Logger, flops_per_token, peak_flops
from megatron_rasft.rounds.coordination import RoundFailed
from megatron_rasft.train.state import LoopState


class NonFiniteLoss(RuntimeError):
    """The step's loss is NaN or Inf; raised before the optimizer updates the weights."""


def train(cfg: RunConfig) -> dict:
    """Train as `cfg` says; returns {step, tokens, checkpoint (the last one saved), times (seconds
    per stage)}. Raises NonFiniteLoss when a step's loss is not finite. Collective over all ranks."""
    from megatron_rasft.data.batching import make_rows, stack_microbatches
    from megatron_rasft.parallel.groups import init_distributed, rank0
    from megatron_rasft.engine.model import build_policy_and_reference
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.refpass import RefCache
    from megatron_rasft.engine.step import forward_backward, global_metrics, make_forward_step
    from megatron_rasft.train.stream import TrainingStream

    # -- set up --------------------------------------------------------------------------------
    sched, log_cfg, run = cfg.train.schedule, cfg.train.logging, RunDir(cfg.train.run_dir)
    groups = init_distributed(cfg.parallel, seed=cfg.train.seed)
    _check_batch(sched, groups.dp_size)
    # A resumed run's files of another format or temperature are refused before any weights load
    # (minutes for a large model), every rank at once.
    last = checkpoint.latest(run.ckpt) if cfg.checkpoint.resume else None
    resumed = LoopState.from_json(json.loads((last / "state.json").read_text()), where=last / "state.json") \
        if last is not None else None
    ref_cache, old_cache = (RefCache(root, temperature=cfg.policy_temperature) for root in (run.ref_logp, run.old_logp))
    models = build_policy_and_reference(cfg.model, cfg.parallel, cfg.checkpoint.load, groups,
                                        reference=cfg.needs_ref_logp, kl_reference=cfg.loss.needs_ref_logits)
    cfg = _with_model(cfg, models.model_config)  # the architecture trained; the caller's cfg is left as it is
    if rank0():
        run.root.mkdir(parents=True, exist_ok=True)
        cfg.save(run.config)
        print(cfg.pretty(), flush=True)
    data = load_dataset(cfg.train.data, cfg.model, seed=cfg.train.seed)
    if rank0() and (data.counts.truncated or data.counts.dropped_overlong or data.counts.dropped_prompt_too_long):
        print(f"[data] over-long samples: {data.counts.summary()}; e.g. {data.counts.examples}", flush=True)
    unverifiable = [p for p in data.problems.values() if p.meta.get("unverifiable")]
    if rank0() and unverifiable:
        print(f"[data] {len(unverifiable)} unverifiable problems (no rollouts, A_E = 1; meta.unverifiable in "
              f"RUN/problems.jsonl), e.g. {unverifiable[0].id}: {unverifiable[0].meta['unverifiable']}", flush=True)
    optimizer, scheduler = build_optimizer(models.policy, cfg.train.optim, cfg.parallel, total_steps=sched.train_iters)
    loss_func = build_loss_func(cfg, groups)
    forward_step = make_forward_step(loss_func, groups, ref_model=models.kl_reference, vocab_size=cfg.model.vocab_size)
    routing = build_moe_routing(cfg, models.policy, groups)  # None for a dense model
    logger = Logger(run, rank0(), tensorboard=log_cfg.tensorboard,
                    wandb_project=log_cfg.wandb_project, config=cfg.to_dict())
    fpt = flops_per_token(models.num_params, cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_length)
    peak = peak_flops()

    # -- resume --------------------------------------------------------------------------------
    state = LoopState()
    if resumed is not None:
        checkpoint.load(last, models.policy, optimizer, scheduler)
        state = resumed
        if rank0():
            print(f"[resume] from {last} at step {state.step}", flush=True)
    stream = TrainingStream(cfg, run, data, models, groups, state, ref_cache=ref_cache, old_cache=old_cache)

    # -- the loop ------------------------------------------------------------------------------
    t_loop, steps_done, last_saved = time.time(), 0, None
    while state.step < sched.train_iters:
        try:
            stream.fill(state)  # new windows (rounds, reference pass) when the queue runs short
        except RoundFailed as e:
            _stop_after_failed_round(e, run, state, models, optimizer, scheduler, cfg, groups, stream, logger)
        t0 = time.time()
        items, seqs = stream.take(state)
        rows = make_rows(seqs, cfg.model.seq_length, data.pad_id, pack=cfg.train.data.pack)
        batches = stack_microbatches(rows, sched.micro_batch_size, cfg.model.seq_length, data.pad_id)
        for chunk in models.policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        if routing is not None:
            routing.begin_step(batches)  # the aux loss's coefficient for this step's normaliser
        m = global_metrics(forward_backward(models.policy, forward_step, batches, seq_length=cfg.model.seq_length),
                           groups)
        if routing is not None:
            m.update(routing.metrics())
        if not math.isfinite(m.get("loss", float("nan"))):
            raise NonFiniteLoss(f"non-finite loss ({m.get('loss')}) at step {state.step}; the run stopped "
                                f"before updating the weights. Last checkpoint: {last_saved or 'none'}")
        lr = scheduler.get_lr(optimizer.param_groups[0])
        _, grad_norm, _ = optimizer.step()
        scheduler.step(1)
        state.step += 1
        steps_done += 1
        dt = time.time() - t0
        stream.times["train"] += dt
        m = _step_metrics(m, state, lr, grad_norm, dt, groups, fpt, peak, stream.times)
        if log_cfg.log_batch_keys:
            m["dp_keys"] = _dp_keys(seqs, groups)
        logger.write(m)
        final = state.step == sched.train_iters
        if state.step % log_cfg.log_interval == 0 or final:
            logger.step_line(m, sched.train_iters, (time.time() - t_loop) / steps_done * (sched.train_iters - state.step))
        if final or (cfg.checkpoint.save_interval and state.step % cfg.checkpoint.save_interval == 0):
            if stream.rounds is not None:
                state.rounds = stream.round_summaries
            last_saved = checkpoint.save(run.ckpt, state.step, models.policy, optimizer, scheduler,
                                         state.to_json(), groups, model_config=cfg.model,
                                         hf_config=models.hf_config, keep_last=cfg.checkpoint.keep_last)
    stream.close()
    if stream.rounds is not None:
        stream.rounds.export_final()
    logger.close()
    return {"step": state.step, "tokens": state.tokens_trained, "checkpoint": str(last_saved), "times": stream.times}


def _with_model(cfg: RunConfig, model) -> RunConfig:
    """`cfg` with `model` (the architecture actually built: the checkpoint's when one is loaded) as
    its `[model]`: a new RunConfig (`RunConfig.replaced`), so that the caller's stays as loaded."""
    return cfg if model == cfg.model else cfg.replaced(model=model)


def _check_batch(sched, dp_size: int) -> None:
    # Needs the data-parallel size, known only once the process groups exist: not a config rule.
    if sched.global_batch_size % (sched.micro_batch_size * dp_size):
        raise ValueError(f"train.schedule.global_batch_size ({sched.global_batch_size}) must be a multiple of "
                         f"micro_batch_size × data-parallel size ({sched.micro_batch_size} × {dp_size})")


def _stop_after_failed_round(error, run, state, models, optimizer, scheduler, cfg, groups, stream, logger):
    """Save a checkpoint of the state before the failed round (the stream has rewound `state` to
    it; unless the latest checkpoint is already of this step, or no step was trained: the run's
    start is then its own checkpoint) and raise `RoundFailed` naming it. Collective."""
    last = checkpoint.latest(run.ckpt)
    if state.step > 0 and (last is None or last.name != f"iter_{state.step:07d}"):
        state.rounds = stream.round_summaries
        last = checkpoint.save(run.ckpt, state.step, models.policy, optimizer, scheduler, state.to_json(),
                               groups, model_config=cfg.model, hf_config=models.hf_config,
                               keep_last=cfg.checkpoint.keep_last)
    where = (f"checkpoint {last}" if state.step > 0 else
             f"no step was trained, so the run restarts from {cfg.checkpoint.load or 'its initial weights'}")
    stream.close()
    logger.close()
    raise RoundFailed(f"{error}. The run stopped before step {state.step + 1}; {where}. Bring the server back "
                      f"and rerun with --resume: the round continues from the rollouts already written in "
                      f"{run.root / 'rollouts'}") from error


def _step_metrics(m: dict, state: LoopState, lr: float, grad_norm, dt: float, groups, fpt: float, peak,
                  times: dict) -> dict:
    """The step's metrics line; also counts the step's tokens into `state.tokens_trained`."""
    import torch.distributed as dist

    world = dist.get_world_size()
    tokens = int(m.pop("tokens", 0))
    state.tokens_trained += tokens
    m.update(kind="train", step=state.step, lr=lr,
             grad_norm=float(grad_norm or 0.0), tokens=tokens, tokens_per_s=tokens / dt,
             tokens_per_s_per_gpu=tokens / dt / world, window=state.window,
             mfu=(fpt * tokens / dt / world / peak) if peak else None,
             mem_peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
             **{f"time_{k}": v for k, v in times.items()})
    return m


def _dp_keys(seqs: list, groups) -> list:
    """The keys of the sequences each data-parallel rank trained this step, by DP rank: what shows
    that the ranks' shards are disjoint and together the global batch. Collective over `groups.dp`."""
    import torch.distributed as dist

    parts = [None] * groups.dp_size
    dist.all_gather_object(parts, [s.key for s in seqs], group=groups.dp)
    return parts


def build_loss_func(cfg: RunConfig, groups):
    """The training step's Megatron `loss_func` (`loss.make_loss_func`) for `cfg`: its method, the
    GRPO settings, the temperature of the policy it trains (`cfg.policy_temperature`: the rollouts'
    sampling temperature under grpo, 1 otherwise) and the tensor-parallel group of `groups`; a
    non-finite logit gives a NaN loss instead of an exception (`_nan_tolerant`)."""
    from megatron_rasft.loss import make_loss_func

    return _nan_tolerant(make_loss_func(cfg.loss, tp_group=groups.tp, grpo=cfg.grpo,
                                        temperature=cfg.policy_temperature))


def build_moe_routing(cfg: RunConfig, policy: list, groups):
    """The step's MoE routing hooks and aux-loss coefficient (`engine.moe_routing.MoERouting`, docs/moe.md)
    for an MoE `cfg.model`, with the loss normaliser of `cfg.loss` / `cfg.grpo`; None for a dense model."""
    if not cfg.model.is_moe:
        return None
    from megatron_rasft.engine.moe_routing import MoERouting
    from megatron_rasft.loss import LossBatch, loss_normaliser

    def normaliser(micro_batch: dict):
        return loss_normaliser(LossBatch.from_microbatch(micro_batch), cfg.loss, cfg.grpo)

    return MoERouting(policy, cfg.model.moe_aux_loss_coeff, normaliser, groups)


def _nan_tolerant(loss_func):
    """`loss_func(batch, logits)` (a `loss.LossBatch`) that, where the loss refuses non-finite logits,
    returns a NaN loss over the batch's loss tokens instead, so every pipeline stage and DP replica
    finishes the step and the loop stops them all together."""
    from megatron_rasft.loss import NonFiniteLogits

    def guarded(batch, logits):
        try:
            return loss_func(batch, logits)
        except NonFiniteLogits:
            nan = logits.float().sum() * float("nan")
            count = batch.loss_mask_BS.sum()
            return nan, count.round().to(torch.int), {"loss": torch.stack([nan.detach().clone(), count.float()])}

    return guarded
