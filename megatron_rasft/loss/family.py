"""The RASFT loss family (docs/loss.md) as one pure function returning sums.

Legend: B = micro-batch rows, S = sequence length, v = local vocab shard (V = v · tp_size global),
N = B·S tokens, G = sequence buckets (B·S packed-sequence slots plus one for padding).

Every method is Σ_t mask_t · w_t · ℓ_t (+ λ · Σ_t mask_t · A_t · KL_t) with a detached per-token
coefficient w_t; gradients flow only through ℓ_t = −log π_θ(label) and KL_t. `compute_loss` is
three steps: validation (loss/validate.py), the method's factors of w_t from the table of
loss/coefficients.py, and the aggregation here. The coefficient is built by multiplying the mask
(times A) by each factor in turn, so a factor that is exactly 1.0 leaves the result bit-identical
to plain SFT. With `grpo.loss_aggregation = "seq_mean"` every token's coefficient is also divided
by the length of its sequence and the normaliser is the number of sequences instead of tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_rasft.config import KL_METHODS, GRPOConfig, LossConfig
from megatron_rasft.loss.batch import LossBatch
from megatron_rasft.loss.buckets import Buckets
from megatron_rasft.loss.coefficients import Tokens, coefficient_for
from megatron_rasft.loss.grpo import k3_kl
from megatron_rasft.loss.kernels import tp_size, vocab_parallel_kl, vocab_parallel_logprob
from megatron_rasft.loss.validate import check_inputs, check_values


def compute_loss(batch: LossBatch, logits: torch.Tensor, *, cfg: LossConfig, grpo: Optional[GRPOConfig] = None,
                 tp_group: Optional[dist.ProcessGroup] = None, temperature: float = 1.0):
    """Loss numerator, its normaliser and metric sums for one micro-batch.

    batch: the micro-batch's per-token inputs (`LossBatch`, all `[B, S]`; `ref_logits_BSv` like
    logits); logits `[B, S, v]` (local vocab shard of rank r: ids [r·v, (r+1)·v)). `cfg.method`
    picks the coefficient function (`loss.coefficients.COEFFICIENTS`); `grpo` is GRPO's config (None
    = GRPOConfig() defaults); `tp_group` the tensor-parallel group (None or size 1: no collective).
    `temperature` (`grpo` only): T of the sampling policy; π_θ is then softmax(logits / T) on every
    shard before the vocab-parallel log-softmax, and old_logp and ref_logp must be of the same
    tempered policies (`RunConfig.policy_temperature`; docs/loss.md, "Sampling temperature").

    Returns `(loss_sum, normaliser, metrics)`: loss_sum a 0-d fp32 tensor with grad; normaliser =
    Σ loss_mask (0-d fp32), or the number of sequences with `grpo.loss_aggregation = "seq_mean"`;
    metrics a dict of detached 0-d sums, each with its own storage (docs/loss.md defines each).
    Raises ValueError naming the bad argument (`NonFiniteLogits` for NaN/Inf logits).
    """
    grpo = GRPOConfig() if grpo is None else grpo
    check_inputs(batch, logits, cfg, grpo, temperature)
    coefficient = coefficient_for(cfg.method)
    B, S, v = logits.shape
    N = B * S
    logp_N, ent_N = vocab_parallel_logprob(logits.reshape(N, v), batch.labels_BS.reshape(N), tp_group,
                                           return_entropy=True, temperature=float(temperature))
    uses_kl = cfg.method in KL_METHODS
    kl_N = vocab_parallel_kl(logits.reshape(N, v), batch.ref_logits_BSv.reshape(N, v), tp_group) if uses_kl else None
    mask_N = batch.loss_mask_BS.reshape(N).to(torch.float32)
    check_values(batch, cfg, grpo, v * tp_size(tp_group), mask_N, logp_N, ent_N, kl_N)

    on_N = mask_N > 0
    lp_N = logp_N.detach()
    buckets = Buckets(batch.seq_id_BS, mask_N, B, S)
    metrics = {
        "num_tokens": mask_N.sum(),
        "num_seqs": _num_seqs(buckets, N),
        "nll_sum": -(mask_N * lp_N).sum(),
        "entropy_sum": (mask_N * ent_N).sum(),
    }
    factors, method_metrics = coefficient(Tokens(lp_N, mask_N, on_N, metrics["num_tokens"], metrics["num_seqs"],
                                                 buckets, batch, cfg, grpo))
    metrics.update(method_metrics)

    w_N = mask_N
    if batch.seq_weight_BS is not None:
        # where(): a NaN weight on a masked-out token must not leak into the sum.
        sw_N = batch.seq_weight_BS.reshape(N).detach().float()
        w_N = w_N * torch.where(on_N, sw_N, torch.zeros_like(sw_N))
    a_N = w_N  # mask · A: the coefficient of the KL term
    for f_N in factors:
        w_N = w_N * f_N
    metrics["weight_sum"] = w_N.sum()
    seq_mean = _seq_mean(cfg, grpo)
    if seq_mean:  # 1/|s| on every token of s: Σ_s mean_{t∈s}(·), normalised by the sequence count
        inv_len_N = 1.0 / buckets.count_G.clamp(min=1)[buckets.seg_N]
        w_N = w_N * inv_len_N
        a_N = a_N * inv_len_N
    loss_sum = (w_N * -logp_N).sum()
    if uses_kl:
        loss_sum = loss_sum + cfg.kl_coef * (a_N * kl_N).sum()
        metrics["kl_sum"] = (mask_N * kl_N.detach()).sum()
    if cfg.method == "grpo" and grpo.needs_ref_logp:
        ref_N = batch.ref_logp_BS.reshape(N).detach().float()
        k3_N = k3_kl(logp_N, ref_N, on_N, cfg.ratio_log_clamp, grpo.k3_max)
        loss_sum = loss_sum + grpo.kl_coef * (a_N * k3_N).sum()
        metrics["kl_sum"] = (mask_N * k3_N.detach()).sum()
    # Own storage per entry: callers all-reduce metrics in place, and some keys share a tensor.
    metrics = {k: t.detach().clone() for k, t in metrics.items()}
    return loss_sum, metrics["num_seqs" if seq_mean else "num_tokens"].clone(), metrics


def _seq_mean(cfg: LossConfig, grpo: GRPOConfig) -> bool:
    return cfg.method == "grpo" and grpo.loss_aggregation == "seq_mean"


def _num_seqs(buckets: Buckets, N: int) -> torch.Tensor:
    """Sequences with at least one loss token (0-d fp32): the `seq_mean` normaliser."""
    return (buckets.count_G[:N] > 0).sum().float()


def loss_normaliser(batch: LossBatch, cfg: LossConfig, grpo: Optional[GRPOConfig] = None) -> torch.Tensor:
    """The normaliser `compute_loss` returns for this micro-batch, from the batch alone (no logits):
    Σ loss_mask, or the number of sequences with a loss token under `grpo.loss_aggregation =
    "seq_mean"` (0-d fp32). The training step needs the step's total before its first backward pass
    (the MoE aux-loss coefficient, engine/moe_routing.py). Raises ValueError for a bad `cfg`/`grpo`."""
    grpo = GRPOConfig() if grpo is None else grpo
    if not isinstance(cfg, LossConfig) or not isinstance(grpo, GRPOConfig):
        raise ValueError(f"cfg must be a LossConfig and grpo a GRPOConfig, got {type(cfg).__name__}, "
                         f"{type(grpo).__name__}")
    B, S = batch.loss_mask_BS.shape
    mask_N = batch.loss_mask_BS.reshape(B * S).to(torch.float32)
    if _seq_mean(cfg, grpo):
        return _num_seqs(Buckets(batch.seq_id_BS, mask_N, B, S), B * S)
    return mask_N.sum()
