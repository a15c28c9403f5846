"""Megatron-Core `loss_func` for the loss family, for `calculate_per_token_loss=True`.

Contract (megatron-core 0.16.1, `pipeline_parallel/schedules.py::forward_step_calc_loss`): the
forward step returns `(logits, partial(loss_func, batch))` (`batch` a `LossBatch`); on the last stage
the schedule calls `loss_func(logits)` and, for a 3-tuple `(loss, num_tokens, report)`, backprops
`loss` as is (with `calculate_per_token_loss=True`; otherwise it divides it in place by
`num_tokens`), accumulates `num_tokens` (an int tensor) over micro-batches, and
`finalize_model_grads` all-reduces that count over data-parallel ranks and scales the gradients
by its inverse. `report` is appended to the returned list of per-micro-batch dicts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_rasft.config import GRPOConfig, LossConfig
from megatron_rasft.loss.batch import LossBatch
from megatron_rasft.loss.family import compute_loss

# report name → (numerator metric, denominator metric); only names whose numerator exists for
# the configured method are reported.
_REPORT = {
    "nll": ("nll_sum", "num_tokens"),
    "entropy": ("entropy_sum", "num_tokens"),
    "weight": ("weight_sum", "num_tokens"),
    "token_factor": ("token_factor_sum", "num_tokens"),
    "ratio": ("ratio_sum", "ratio_count"),
    "ratio_clip_frac": ("ratio_clipped", "ratio_count"),
    "kl": ("kl_sum", "num_tokens"),
    "profit_kept_frac": ("profit_kept", "num_tokens"),
    "clip_frac_low": ("clip_low", "num_tokens"),
    "clip_frac_high": ("clip_high", "num_tokens"),
    "surrogate": ("surrogate_sum", "num_tokens"),
    "advantage": ("adv_sum", "num_seqs"),
    "zero_adv_frac": ("zero_adv_seqs", "num_seqs"),
    "logp_mismatch": ("mismatch_sum", "mismatch_count"),
    "seqs_per_microbatch": ("num_seqs", None),
}


def make_loss_func(cfg: LossConfig, tp_group: Optional[dist.ProcessGroup] = None,
                   grpo: Optional[GRPOConfig] = None, temperature: float = 1.0):
    """Return `loss_func(batch: LossBatch, logits_BSv)` for `loss.method = cfg.method`.

    The forward step returns `(logits, functools.partial(loss_func, batch))` with the micro-batch's
    `LossBatch` (`engine.step.make_forward_step` builds it). The result is `(loss_sum, num_tokens,
    report)`: loss_sum a 0-d tensor with grad, num_tokens a torch.int 0-d tensor (the normaliser:
    sequences under `grpo.loss_aggregation = "seq_mean"`), report name → detached `[value_sum,
    count]` fp32 tensors; sum them over micro-batches and data-parallel ranks, then divide. `grpo`
    is the GRPO config (None = defaults; used by `loss.method = "grpo"` only); `temperature` the
    sampling temperature of `grpo`'s policy (`RunConfig.policy_temperature`; see `compute_loss`).
    Raises ValueError for a `cfg` that is not a LossConfig.
    """
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a LossConfig, got {type(cfg).__name__}")

    def loss_func(batch: LossBatch, logits_BSv: torch.Tensor):
        loss_sum, num_tokens, metrics = compute_loss(batch, logits_BSv, cfg=cfg, grpo=grpo, tp_group=tp_group,
                                                     temperature=temperature)
        one = torch.ones((), device=num_tokens.device)
        # New storage (stack) for every report entry: the schedule works on its tensors in place.
        report = {"loss": torch.stack([loss_sum.detach().clone(), num_tokens.float()])}
        for name, (num, den) in _REPORT.items():
            if num in metrics:
                report[name] = torch.stack([metrics[num].float(), metrics[den].float() if den else one])
        return loss_sum, num_tokens.round().to(torch.int), report

    return loss_func
