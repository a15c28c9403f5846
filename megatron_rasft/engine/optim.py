"""Megatron optimizer (Adam, optionally the distributed optimizer) and the LR schedule."""
from __future__ import annotations

from megatron_rasft.config import OptimConfig, ParallelConfig


def build_optimizer(model_chunks: list, ocfg: OptimConfig, pcfg: ParallelConfig, *, total_steps: int):
    """AdamW over all chunks, grad clipping, linear warm-up then cosine decay to `min_lr` over
    `total_steps` optimizer steps. Returns `(optimizer, scheduler)`."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    mcfg = OptimizerConfig(
        optimizer="adam",
        lr=ocfg.lr,
        min_lr=ocfg.min_lr,
        weight_decay=ocfg.weight_decay,
        adam_beta1=ocfg.adam_beta1,
        adam_beta2=ocfg.adam_beta2,
        adam_eps=ocfg.adam_eps,
        clip_grad=ocfg.clip_grad,
        bf16=model_chunks[0].config.params_dtype == torch.bfloat16,  # from model.params_dtype
        params_dtype=model_chunks[0].config.params_dtype,
        use_distributed_optimizer=pcfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(mcfg, model_chunks)
    warmup = min(ocfg.lr_warmup_iters, max(total_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else ocfg.lr,
        max_lr=ocfg.lr,
        min_lr=ocfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, 1),
        lr_decay_style="cosine",
        start_wd=ocfg.weight_decay,
        end_wd=ocfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler
