"""Vocab-parallel per-token pieces of the loss: log-prob of the label, full-vocab KL, entropy.

Legend: N = tokens (batch × sequence flattened), v = the LOCAL vocab shard (rank r of the
tensor-parallel group holds vocab ids [r·v, (r+1)·v)), V = v · tp_size the global vocab.

Nothing here ever materialises `[N, V]`: each rank reduces its shard to per-token statistics
(`[N]` vectors) and only those are all-reduced over `tp_group`. With `tp_group` None or of size 1
no collective is issued. Maths is fp32 whatever the logits dtype; gradients come back in the
logits dtype. The caller's logits are never modified in place (Megatron's
`vocab_parallel_cross_entropy` does that; it is not used here).

`vocab_parallel_logprob` takes a sampling temperature T: it is then the log-prob under
softmax(logits / T), each rank dividing its own shard before the vocab-parallel log-softmax (as the
rollout server samples; docs/loss.md, "Sampling temperature"). The division is folded into the
shard's statistics and into the backward's scale, so no scaled copy of the logits is kept.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


def tp_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if tp_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _exp_shifted(x_Nv: torch.Tensor, m_N: torch.Tensor, inv_t: float = 1.0) -> torch.Tensor:
    """exp((x − m)/T) on the local shard as one new `[N, v]` tensor (`inv_t` = 1/T)."""
    e_Nv = x_Nv - m_N[:, None]
    if inv_t != 1.0:  # T = 1 skips the pass (and stays bit-identical to the untempered kernel)
        e_Nv.mul_(inv_t)
    return e_Nv.exp_()


def _exp_shifted_sum(x_Nv: torch.Tensor, m_N: torch.Tensor, inv_t: float = 1.0) -> torch.Tensor:
    """Σ_v exp((x − m)/T) on the local shard, through one temporary that is freed on return."""
    return _exp_shifted(x_Nv, m_N, inv_t).sum(-1)


def _rowdot(a_Nv: torch.Tensor, b_Nv: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row without an `[N, v]` product temporary (batched matmul)."""
    return torch.bmm(a_Nv.unsqueeze(1), b_Nv.unsqueeze(2)).view(-1)


class _VocabParallelLogProb(torch.autograd.Function):
    """log π_T(label), π_T = softmax(x / T), from sharded logits x; optionally the
    (non-differentiable) entropy of π_T per token.

    Forward all-reduces the raw max m (MAX; the tempered max is m/T for T > 0), then
    [Σ exp((x − m)/T), target logit, Σ exp((x − m)/T)·x] in one SUM; lse_T = m/T + log Σ,
    log π_T = x_label/T − lse_T, H = lse_T − (Σ e·x / Σ e)/T. Backward recomputes the softmax from
    the saved input and `lse_N`: ∂log π_T/∂x = (onehot(label) − softmax(x/T)) / T.
    """

    @staticmethod
    def forward(ctx, logits_Nv, labels_N, group, with_entropy, temperature):
        inv_t = 1.0 / temperature
        x_Nv = logits_Nv.float()  # aliases the input when fp32: never written to
        v = x_Nv.shape[-1]
        local_N = labels_N.long() - tp_rank(group) * v
        in_shard_N = (local_N >= 0) & (local_N < v)
        # Labels of other shards (and masked-out ones, e.g. -100) read column 0, then get zeroed.
        local_N = torch.where(in_shard_N, local_N, torch.zeros_like(local_N))

        m_N = _all_reduce(x_Nv.amax(-1), dist.ReduceOp.MAX, group)
        target_N = x_Nv.gather(-1, local_N[:, None]).squeeze(-1)
        target_N = torch.where(in_shard_N, target_N, torch.zeros_like(target_N))
        if with_entropy:
            e_Nv = _exp_shifted(x_Nv, m_N, inv_t)
            stats = torch.stack([e_Nv.sum(-1), target_N, _rowdot(e_Nv, x_Nv)])
            del e_Nv
        else:
            stats = torch.stack([_exp_shifted_sum(x_Nv, m_N, inv_t), target_N])
        stats = _all_reduce(stats, dist.ReduceOp.SUM, group)
        # (× inv_t is exact for T = 1: the untempered results bit for bit.)
        lse_N = m_N * inv_t + stats[0].log()
        logp_N = stats[1] * inv_t - lse_N
        # H = lse − Σ p·x/T, with Σ p·x = Σ exp((x − m)/T)·x / Σ exp((x − m)/T).
        ent_N = lse_N - stats[2] / stats[0] * inv_t if with_entropy else logp_N.new_zeros(0)

        ctx.save_for_backward(logits_Nv, local_N, in_shard_N, lse_N)
        ctx.inv_t = inv_t
        ctx.mark_non_differentiable(ent_N)
        return logp_N, ent_N

    @staticmethod
    def backward(ctx, g_logp_N, _g_ent):
        logits_Nv, local_N, in_shard_N, lse_N = ctx.saved_tensors
        inv_t = ctx.inv_t
        x_Nv = logits_Nv.float()
        if inv_t != 1.0:  # x/T in a new buffer (in place when .float() already copied)
            x_Nv = x_Nv.mul_(inv_t) if x_Nv is not logits_Nv else x_Nv * inv_t
            grad_Nv = x_Nv.sub_(lse_N[:, None]).exp_()
        else:
            grad_Nv = (x_Nv - lse_N[:, None]).exp_()  # softmax, recomputed
        g_N = g_logp_N * inv_t  # the 1/T of ∂(x/T)/∂x
        grad_Nv.mul_(-g_N[:, None])
        rows = torch.arange(grad_Nv.shape[0], device=grad_Nv.device)
        grad_Nv.index_put_((rows, local_N), torch.where(in_shard_N, g_N, torch.zeros_like(g_N)),
                           accumulate=True)
        return grad_Nv.to(logits_Nv.dtype), None, None, None, None


class _VocabParallelKL(torch.autograd.Function):
    """KL(π_ref ‖ π_θ) per token over the full vocabulary, from sharded logits.

    KL = Σ_v p_ref·(y − x) + lse(x) − lse(y) (x = policy logits, y = reference logits). Forward
    all-reduces both maxima (one MAX) and [Σ exp x, Σ exp y, Σ exp(y − m_y)·(y − x)] (one SUM).
    Backward on the local shard: g·(softmax(x) − softmax(y)), both recomputed; no grad to `y`.
    """

    @staticmethod
    def forward(ctx, logits_Nv, ref_logits_Nv, group):
        x_Nv, y_Nv = logits_Nv.float(), ref_logits_Nv.float()
        m_2N = _all_reduce(torch.stack([x_Nv.amax(-1), y_Nv.amax(-1)]), dist.ReduceOp.MAX, group)
        sum_x_N = _exp_shifted_sum(x_Nv, m_2N[0])
        ey_Nv = (y_Nv - m_2N[1][:, None]).exp_()
        sum_y_N = ey_Nv.sum(-1)
        cross_N = _rowdot(ey_Nv, y_Nv - x_Nv)
        del ey_Nv
        stats = _all_reduce(torch.stack([sum_x_N, sum_y_N, cross_N]), dist.ReduceOp.SUM, group)
        lse_x_N = m_2N[0] + stats[0].log()
        lse_y_N = m_2N[1] + stats[1].log()
        kl_N = stats[2] / stats[1] + lse_x_N - lse_y_N
        ctx.save_for_backward(logits_Nv, ref_logits_Nv, lse_x_N, lse_y_N)
        return kl_N

    @staticmethod
    def backward(ctx, g_N):
        logits_Nv, ref_logits_Nv, lse_x_N, lse_y_N = ctx.saved_tensors
        grad_Nv = (logits_Nv.float() - lse_x_N[:, None]).exp_()
        p_ref_Nv = (ref_logits_Nv.float() - lse_y_N[:, None]).exp_()
        grad_Nv.sub_(p_ref_Nv)
        del p_ref_Nv
        grad_Nv.mul_(g_N[:, None])
        return grad_Nv.to(logits_Nv.dtype), None, None


def vocab_parallel_logprob(logits_Nv: torch.Tensor, labels_N: torch.Tensor,
                           tp_group: Optional[dist.ProcessGroup] = None,
                           return_entropy: bool = False, temperature: float = 1.0):
    """Per-token log π_θ(label) `[N]` (fp32, differentiable w.r.t. logits).

    logits_Nv: `[N, v]` local vocab shard; labels_N: `[N]` global vocab ids (any value for tokens
    the caller masks out: out-of-shard ids simply contribute nothing here). With
    `return_entropy=True` also returns the per-token entropy `[N]` (no grad) from the same pass.
    `temperature` T > 0: the log-prob (and entropy) of softmax(logits / T), the distribution a
    sampler at temperature T draws from (T = 1: the model's own, bit-identical to no scaling).
    Raises ValueError for T ≤ 0 or not finite.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    logp_N, ent_N = _VocabParallelLogProb.apply(logits_Nv, labels_N, tp_group, return_entropy, float(temperature))
    return (logp_N, ent_N) if return_entropy else logp_N


def vocab_parallel_entropy(logits_Nv: torch.Tensor,
                           tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token entropy H(π_θ) `[N]` (fp32, no grad), for logging."""
    with torch.no_grad():
        labels_N = torch.zeros(logits_Nv.shape[0], dtype=torch.long, device=logits_Nv.device)
        return _VocabParallelLogProb.apply(logits_Nv, labels_N, tp_group, True, 1.0)[1]


def vocab_parallel_kl(logits_Nv: torch.Tensor, ref_logits_Nv: torch.Tensor,
                      tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token KL(π_ref ‖ π_θ) `[N]` (fp32), differentiable w.r.t. `logits_Nv` only."""
    return _VocabParallelKL.apply(logits_Nv, ref_logits_Nv.detach(), tp_group)
