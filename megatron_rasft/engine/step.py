"""One optimizer step through Megatron-Core's pipeline schedules.

Batch tensors, all `[b, s]` (b = micro-batch size, s = sequence length):
  tokens, position_ids, labels, loss_mask, and optionally seq_id (packing), seq_weight (A_s),
  ref_logp (reference log-prob of each label), attention_mask (`[b, 1, s, s]`, True = masked; packing),
  and for GRPO old_logp, advantage, rollout_logp. The forward step hands the loss its view of them,
  a `loss.LossBatch`, built in one place (`LossBatch.from_microbatch`).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional

import torch

from megatron_rasft.loss.batch import LossBatch

# Logit given to the padding rows of the vocabulary: exp() of it is exactly 0 in fp32 and bf16,
# and it stays finite, so the KL kernel's p_ref·(log p_ref − log p_θ) is 0·finite = 0.
PADDED_VOCAB_LOGIT = -1.0e4


def mask_padded_vocab(logits_BSv: torch.Tensor, vocab_size: Optional[int], tp_rank: int) -> torch.Tensor:
    """Take the vocabulary's padding rows (global id ≥ vocab_size; the embedding is padded so that
    every TP shard has the same size) out of the softmax, in place: the model's distribution is
    then the Hugging Face model's, whatever the padding (which depends on TP)."""
    v = logits_BSv.shape[-1]
    first_pad = (vocab_size - tp_rank * v) if vocab_size is not None else v
    if first_pad < v:
        logits_BSv[..., max(first_pad, 0):] = PADDED_VOCAB_LOGIT
    return logits_BSv


def _is_last_stage(model) -> bool:
    while not hasattr(model, "post_process") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "post_process", True)


def make_forward_step(loss_func: Callable, groups, ref_model: Optional[torch.nn.Module] = None,
                      vocab_size: Optional[int] = None):
    """`forward_step(data_iterator, model)` for `get_forward_backward_func`; `groups` is the run's
    `ParallelGroups` (the TP rank decides which padding rows of the vocabulary this shard holds).

    `loss_func(batch: LossBatch, logits)` returns `(loss_sum, num_tokens, report)`; the step returns
    `(logits, partial(loss_func, LossBatch.from_microbatch(micro_batch, ref_logits)))`. `ref_model`
    (frozen, same TP layout, PP=1) supplies `ref_logits` for the KL baselines in the same step.
    `vocab_size` (the unpadded vocabulary) masks the padding rows of the logits.
    """
    from megatron_rasft.parallel.placement import to_device

    tp_rank = groups.tp_rank

    def forward_step(data_iterator: Iterator, model: torch.nn.Module):
        batch = to_device(next(data_iterator))  # the one place a batch moves to the device
        logits = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        if _is_last_stage(model):
            logits = mask_padded_vocab(logits, vocab_size, tp_rank)
        ref_logits = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logits = ref_model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
                ref_logits = mask_padded_vocab(ref_logits, vocab_size, tp_rank)
        return logits, partial(loss_func, LossBatch.from_microbatch(batch, ref_logits))

    return forward_step


def wrap_ddp(model_chunks: list, *, use_distributed_optimizer: bool, overlap_grad_reduce: bool = False,
             overlap_param_gather: bool = False, bucket_size: Optional[int] = None, pg_collection=None):
    """Wrap each model chunk in Megatron DDP (fp32 grad buffers). Without overlap every gradient is
    reduced as one bucket after the backward pass; with `overlap_grad_reduce` each bucket of about
    `bucket_size` parameters (None: Megatron's default) is reduced as soon as its gradients are
    ready, during the backward pass; with `overlap_param_gather` (distributed optimizer) the updated
    parameters are all-gathered during the next forward pass (forward pre-hooks; `sync_params`).
    Chunks after the first (virtual pipeline stages) get one bucket each, as in Megatron-LM."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                            overlap_param_gather=overlap_param_gather, bucket_size=bucket_size,
                                            use_distributed_optimizer=use_distributed_optimizer)
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_cfg, module=chunk,
                                               disable_bucketing=i > 0, pg_collection=pg_collection))
    return wrapped


def attach_schedule_hooks(model_chunks: list) -> None:
    """Tell the schedule how to finalize grads (DP reduction, tied-embedding sync, 1/num_tokens) and
    how to hold back the DP reduction until the last micro-batch (`no_sync`). With
    `overlap_grad_reduce`, as Megatron-LM's training.py does (its default `align_grad_reduce`), the
    schedule also starts each chunk's reduction itself (`grad_sync_func`): the first pipeline stage
    during its last backward, the other stages after their last one. `finalize_model_grads` waits
    for the reductions (`finish_grad_sync`) before the optimizer reads a gradient."""
    from megatron.core.distributed import finalize_model_grads

    overlap = model_chunks[0].ddp_config.overlap_grad_reduce if hasattr(model_chunks[0], "ddp_config") else False
    for chunk in model_chunks:
        cfg = chunk.config
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = [c.no_sync for c in model_chunks] if len(model_chunks) > 1 else model_chunks[0].no_sync
        grad_sync = [c.start_grad_sync for c in model_chunks]
        cfg.grad_sync_func = (grad_sync if len(model_chunks) > 1 else grad_sync[0]) if overlap else None
        cfg.param_sync_func = None  # the parameter all-gather is issued by the forward pre-hooks


def _hooked(model_chunks: list) -> list:
    """The DDP chunks whose parameters are all-gathered by forward pre-hooks (overlap_param_gather)."""
    return [c for c in model_chunks if getattr(c, "use_forward_hook", False)]


def sync_params(model_chunks: list) -> None:
    """Finish the distributed optimizer's parameter all-gather now, so that every parameter of this
    rank's chunks holds the last optimizer step's value. With `overlap_param_gather` the all-gather
    after `optimizer.step()` is only issued by the next forward pass of the policy; whatever reads the
    weights otherwise (checkpoint save, the export to the rollout server) calls this first. A no-op
    without overlap, or when the all-gather has already completed (so it may be called freely).
    Collective over the data-parallel group (every DP rank calls it at the same point)."""
    for chunk in _hooked(model_chunks):
        for bucket_group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            if not bucket_group.param_gather_dispatched:
                bucket_group.start_param_sync(force_sync=True)  # synchronous all-gather
            elif bucket_group.param_gather_handle is not None:
                bucket_group.param_gather_handle.wait()
                bucket_group.param_gather_handle = None


def forward_backward(model_chunks: list, forward_step: Callable, batches: list[dict], *,
                     seq_length: int, forward_only: bool = False) -> list[dict]:
    """Run all micro-batches of one global step on this rank; returns the per-micro-batch reports
    (non-empty on the last pipeline stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    num_micro = len(batches)
    mbs = batches[0]["tokens"].shape[0]
    iters = [iter(batches) for _ in model_chunks] if len(model_chunks) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_micro,
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def global_metrics(reports: list[dict], groups) -> Optional[dict]:
    """Sum the per-micro-batch `[value_sum, count]` reports over micro-batches and DP ranks on the
    last pipeline stage, divide, and share the result with every rank of the pipeline (so every rank
    can stop on a NaN). `tokens` is the step's loss-token count. Collective over `groups.dp` and
    `groups.pp`."""
    import torch.distributed as dist

    out = None
    if reports:
        local: dict = {}
        for r in reports:
            for k, v in r.items():
                num, den = local.get(k, (0.0, 0.0))
                local[k] = (num + float(v[0]), den + float(v[1]))
        parts = [None] * groups.dp_size
        dist.all_gather_object(parts, local, group=groups.dp)
        tot: dict = {}
        for part in parts:  # key sets can differ (a NaN micro-batch reports only the loss)
            for k, (num, den) in part.items():
                a, b = tot.get(k, (0.0, 0.0))
                tot[k] = (a + num, b + den)
        out = {k: num / den if den > 0 else 0.0 for k, (num, den) in tot.items()}
        out["tokens"] = tot["loss"][1]
    if groups.pp_size > 1:
        box = [out]
        dist.broadcast_object_list(box, src=groups.pp_last_global_rank, group=groups.pp)
        out = box[0]
    return out
