"""The RASFT training loop on Megatron-Core, top to bottom.

    set up (groups, data, policy + frozen reference, DDP, optimizer) → resume if asked →
    for each step: [new window → rollout round → reference pass] → global batch → forward/backward
    through Megatron's schedule → optimizer step → log → checkpoint.

Runs the same under `torchrun` on GPUs (NCCL) and in one or several CPU processes (gloo).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rasft.config import RunConfig
from megatron_rasft.train import checkpoint
from megatron_rasft.train.data import load_dataset
from megatron_rasft.train.log import Logger, flops_per_token, peak_flops
from megatron_rasft.train.refpass import RefCache, score
from megatron_rasft.train.rounds import RoundFailed
from megatron_rasft.train.state import LoopState, next_window_ids, window_groups


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg: RunConfig) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_rasft.data.batching import make_rows, stack_microbatches
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.train.model import build_policy_and_reference
    from megatron_rasft.train.optim import build_optimizer
    from megatron_rasft.train.step import forward_backward, global_metrics, make_forward_step

    tc, run = cfg.train, Path(cfg.train.run_dir)
    pgs = init_distributed(cfg.parallel, seed=tc.seed)
    rank0 = dist.get_rank() == 0
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if tc.global_batch_size % (tc.micro_batch_size * dp_size):
        raise ValueError(f"train.global_batch_size ({tc.global_batch_size}) must be a multiple of "
                         f"micro_batch_size × data-parallel size ({tc.micro_batch_size} × {dp_size})")

    # -- model, data, optimizer ----------------------------------------------------------------
    models = build_policy_and_reference(cfg, pgs)
    cfg.model = models.model_config  # architecture from the checkpoint when one is loaded
    if rank0:
        run.mkdir(parents=True, exist_ok=True)
        cfg.save(run / "config.json")
        print(cfg.pretty(), flush=True)
    data = load_dataset(tc, cfg.model)
    if rank0 and (data.counts.truncated or data.counts.dropped_overlong or data.counts.dropped_prompt_too_long):
        print(f"[data] over-long samples: {data.counts.summary()}; e.g. {data.counts.examples}", flush=True)
    optimizer, scheduler = build_optimizer(models.policy, tc, cfg.parallel, total_steps=tc.train_iters)
    state = LoopState()
    if cfg.checkpoint.resume and (last := checkpoint.latest(run / "ckpt")) is not None:
        state = LoopState.from_json(checkpoint.load(last, models.policy, optimizer, scheduler))
        if rank0:
            print(f"[resume] from {last} at step {state.step}", flush=True)

    # Reference log-probs: every sequence is scored once, when its window (or round) arrives, and
    # cached in the run directory.
    ref_cache = RefCache(run / "ref_logp")
    ref_logp: dict = ref_cache.load_all() if cfg.loss.needs_ref_logp else {}
    rounds = None
    if tc.refresh_interval > 0 and cfg.loss.method == "rasft":
        from megatron_rasft.train.rounds import Rounds

        rounds = Rounds(cfg, run, data, models, pgs)
    pool = {} if rounds is None else rounds.restore(state)  # rollout sequences still queued

    # -- the loop ------------------------------------------------------------------------------
    loss_func = _nan_tolerant(make_loss_func(cfg.loss, tp_group=pgs.tp))
    forward_step = make_forward_step(loss_func, ref_model=models.kl_reference, vocab_size=cfg.model.vocab_size)
    logger = Logger(run, rank0, tensorboard=tc.tensorboard, wandb_project=tc.wandb_project, config=cfg.to_dict())
    window_size = tc.window_problems or tc.global_batch_size
    if tc.refresh_interval:
        window_size = tc.refresh_interval * tc.global_batch_size
    fpt = flops_per_token(models.num_params, cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_length)
    peak, world = peak_flops(), dist.get_world_size()
    problem_ids = sorted(data.prompt_ids)
    t_loop, steps_done, last_saved = time.time(), 0, None
    times = {"rollout": 0.0, "refresh": 0.0, "reference": 0.0, "train": 0.0}
    while state.step < tc.train_iters:
        # New window (and rollout round) when the queue cannot fill the next global batch.
        while len(state.queue) < tc.global_batch_size:
            stream_pos = (state.epoch, state.cursor)
            ids = next_window_ids(state, problem_ids, window_size, tc.seed)
            expert_w, rollout_items, new = {}, [], {}
            if rounds is not None:
                try:
                    expert_w, rollout_items, new = rounds.run(state.window, ids, state, times)
                except RoundFailed as e:
                    # The state as before this window, so that --resume starts it (and its round) again.
                    state.epoch, state.cursor = stream_pos
                    _stop_after_failed_round(e, run, state, models, optimizer, scheduler, cfg, rounds, logger)
                pool.update(new)
            if cfg.loss.needs_ref_logp:
                todo = [data.experts[f"e/{i}"] for i in ids if f"e/{i}" not in ref_logp]
                todo += [data.experts[k] for k, _ in rollout_items if k.startswith("e/") and k not in ref_logp]
                todo += [s for k, s in new.items() if k not in ref_logp]
                if todo:
                    t0 = time.time()
                    scores = _score(models.reference, list({s.key: s for s in todo}.values()), cfg, data, pgs)
                    ref_cache.save(f"window_{state.window:05d}", scores)
                    ref_logp.update(scores)
                    times["reference"] += time.time() - t0
            state.queue += window_groups(state.window, ids, expert_w, rollout_items, tc.seed)
            state.window += 1

        t0 = time.time()
        groups, state.queue = state.queue[:tc.global_batch_size], state.queue[tc.global_batch_size:]
        items = [it for g in groups for it in g]
        seqs = [_seq(key, w, data, pool, ref_logp) for key, w in items[dp_rank::dp_size]]
        rows = make_rows(seqs, cfg.model.seq_length, data.pad_id, pack=tc.pack)
        batches = stack_microbatches(rows, tc.micro_batch_size, cfg.model.seq_length, data.pad_id)
        for chunk in models.policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(models.policy, forward_step, batches, seq_length=cfg.model.seq_length)
        m = global_metrics(reports)
        if not math.isfinite(m.get("loss", float("nan"))):
            raise NonFiniteLoss(f"non-finite loss ({m.get('loss')}) at step {state.step}; the run stopped "
                                f"before updating the weights. Last checkpoint: {last_saved or 'none'}")
        lr = scheduler.get_lr(optimizer.param_groups[0])
        _, grad_norm, _ = optimizer.step()
        scheduler.step(1)
        for key, _ in items:
            pool.pop(key, None)
        state.step += 1
        steps_done += 1
        dt = time.time() - t0
        times["train"] += dt
        tokens = int(m.pop("tokens", 0))
        state.tokens_trained += tokens
        m.update(kind="train", step=state.step, lr=lr,
                 grad_norm=float(grad_norm or 0.0), tokens=tokens, tokens_per_s=tokens / dt,
                 tokens_per_s_per_gpu=tokens / dt / world, window=state.window,
                 mfu=(fpt * tokens / dt / world / peak) if peak else None,
                 mem_peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                 **{f"time_{k}": v for k, v in times.items()})
        logger.write(m)
        if state.step % tc.log_interval == 0 or state.step == tc.train_iters:
            eta = (time.time() - t_loop) / steps_done * (tc.train_iters - state.step)
            logger.step_line(m, tc.train_iters, eta)
        if state.step == tc.train_iters or (cfg.checkpoint.save_interval and state.step % cfg.checkpoint.save_interval == 0):
            if rounds is not None:
                state.rounds = rounds.summaries
            last_saved = checkpoint.save(run / "ckpt", state.step, models.policy, optimizer, scheduler,
                                         state.to_json(), model_config=cfg.model, hf_config=models.hf_config,
                                         keep_last=cfg.checkpoint.keep_last)
    if rounds is not None:
        rounds.close()
    logger.close()
    return {"step": state.step, "tokens": state.tokens_trained, "checkpoint": str(last_saved), "times": times}


def _stop_after_failed_round(error, run, state, models, optimizer, scheduler, cfg, rounds, logger):
    """Save a checkpoint of the state before the failed round (unless the latest one is already
    of this step, or no step was trained: the run's start is then its own checkpoint) and raise
    `RoundFailed` naming it. Collective."""
    last = checkpoint.latest(run / "ckpt")
    if state.step > 0 and (last is None or last.name != f"iter_{state.step:07d}"):
        state.rounds = rounds.summaries
        last = checkpoint.save(run / "ckpt", state.step, models.policy, optimizer, scheduler, state.to_json(),
                               model_config=cfg.model, hf_config=models.hf_config,
                               keep_last=cfg.checkpoint.keep_last)
    where = (f"checkpoint {last}" if state.step > 0 else
             f"no step was trained, so the run restarts from {cfg.checkpoint.load or 'its initial weights'}")
    rounds.close()
    logger.close()
    raise RoundFailed(f"{error}. The run stopped before step {state.step + 1}; {where}. Bring the server back "
                      f"and rerun with --resume: the round continues from the rollouts already written in "
                      f"{run / 'rollouts'}") from error


def _seq(key, weight, data, pool, ref_logp):
    from dataclasses import replace

    base = data.experts.get(key) or pool[key]
    return replace(base, weight=weight, ref_logp=ref_logp.get(key))


def _score(ref_chunks, seqs, cfg, data, pgs) -> dict:
    from megatron.core import parallel_state as ps

    return score(ref_chunks, seqs, micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.model.seq_length,
                 pad_id=data.pad_id, tp_group=pgs.tp, dp_group=ps.get_data_parallel_group(),
                 vocab_size=cfg.model.vocab_size)


def _nan_tolerant(loss_func):
    """The loss refuses non-finite logits; in training, turn that into a NaN loss instead, so every
    pipeline stage and DP replica finishes the step and the loop stops them all together."""

    def guarded(labels, loss_mask, seq_id, seq_weight, ref_logp, ref_logits, logits):
        try:
            return loss_func(labels, loss_mask, seq_id, seq_weight, ref_logp, ref_logits, logits)
        except ValueError as e:
            if "NaN or Inf" not in str(e):
                raise
            nan = logits.float().sum() * float("nan")
            count = loss_mask.sum()
            return nan, count.round().to(torch.int), {"loss": torch.stack([nan.detach().clone(), count.float()])}

    return guarded
