"""The RASFT loss family (docs/loss.md) as one pure function returning sums.

Legend: B = micro-batch rows, S = sequence length, v = local vocab shard (V = v · tp_size global),
G = sequence buckets (B·S packed-sequence slots plus one for padding).

Every method is Σ_t mask_t · w_t · ℓ_t (+ λ · Σ_t mask_t · A_t · KL_t) with a detached per-token
coefficient w_t; gradients flow only through ℓ_t = −log π_θ(label) and KL_t. The coefficient is
built by multiplying the mask by each active factor in turn, so a factor that is exactly 1.0
leaves the result bit-identical to plain SFT. `grpo`'s factor is the clipped-surrogate coefficient
(loss/grpo.py); with `grpo.loss_aggregation = "seq_mean"` every factor is also divided by the
length of its sequence and the normaliser is the number of sequences instead of tokens.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rasft.config import KL_METHODS, GRPOConfig, LossConfig
from megatron_rasft.loss.grpo import clipped_coefficient, k3_kl
from megatron_rasft.loss.kernels import tp_size, vocab_parallel_kl, vocab_parallel_logprob


def _check_shapes(logits, labels, loss_mask, seq_id, seq_weight, ref_logp, ref_logits, cfg, grpo, per_token):
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    if not isinstance(grpo, GRPOConfig):
        raise ValueError(f"grpo must be a GRPOConfig, got {type(grpo).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab_shard], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    BS = tuple(logits.shape[:2])
    named = dict(labels=labels, loss_mask=loss_mask, seq_id=seq_id, seq_weight=seq_weight, ref_logp=ref_logp,
                 **per_token)
    for name, t in named.items():
        if t is not None and tuple(t.shape) != BS:
            raise ValueError(f"{name} must have shape {BS} (logits' [batch, seq]), got {tuple(t.shape)}")
    for name in ("labels", "seq_id"):
        t = named[name]
        if t is not None and (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    if cfg.needs_ref_logp and ref_logp is None:
        raise ValueError(f"ref_logp is required for loss.method={cfg.method!r} with "
                         f"loss.ratio={cfg.ratio!r} (set loss.ratio='none' to train without it)")
    if cfg.needs_ref_logits and ref_logits is None:
        raise ValueError(f"ref_logits is required for loss.method={cfg.method!r} (full-vocab KL)")
    if cfg.method == "grpo":
        for name in ("old_logp", "advantage"):
            if per_token[name] is None:
                raise ValueError(f"{name} is required for loss.method='grpo'")
        if grpo.needs_ref_logp and ref_logp is None:
            raise ValueError(f"ref_logp is required for loss.method='grpo' with grpo.kl_coef={grpo.kl_coef} "
                             f"(the k3 KL to the reference; set grpo.kl_coef=0 to train without it)")


class NonFiniteLogits(ValueError):
    """The policy's (or the reference's) logits contain NaN or Inf: the model diverged."""


def _check_values(checks: list) -> None:
    """Raise for the first failed (ok, message) pair; one host sync for all of them. Every input
    checked is identical on all tensor-parallel ranks (logits only via all-reduced statistics), so
    either every rank raises or none does: no rank is left waiting in a collective. A check may
    name its exception class as a third element (default ValueError)."""
    flags = torch.stack([c[0] for c in checks]).tolist()
    for flag, check in zip(flags, checks):
        if not flag:
            raise (check[2] if len(check) > 2 else ValueError)(check[1])


def _segments(seq_id_BS: Optional[torch.Tensor], B: int, S: int, device) -> torch.Tensor:
    """Flat bucket index `[B·S]` of each token's sequence: row·S + seq_id, padding → B·S."""
    row_BS = torch.arange(B, device=device)[:, None] * S
    if seq_id_BS is None:
        return row_BS.expand(B, S).reshape(-1)
    seg_BS = torch.where(seq_id_BS >= 0, row_BS + seq_id_BS.long(), torch.full_like(row_BS, B * S))
    return seg_BS.reshape(-1)


def _bucket_sum(x_N: torch.Tensor, seq_id_BS: Optional[torch.Tensor], B: int, S: int) -> torch.Tensor:
    """Σ of the detached `x_N` over each bucket of `_segments` (`[B·S + 1]`, fp32), in a fixed order.
    `index_add_` would do this in one call, but on CUDA it adds with float atomics in an order that
    changes from run to run, so a resumed run could not reproduce an uninterrupted one bit for bit.
    Here each row's bucket sums are one float64 matmul of the row with the one-hot of its sequence
    ids (`[B, S, K]`, K = the largest id + 1: one host sync; float64 also keeps TF32 out of it)."""
    x_BS = x_N.detach().reshape(B, S).double()
    out_G = torch.zeros(B * S + 1, dtype=torch.float64, device=x_N.device)
    rows_BS = out_G[:-1].view(B, S)
    if seq_id_BS is None:
        rows_BS[:, 0] = x_BS.sum(-1)
        return out_G.float()
    sid_BS = seq_id_BS.long()
    K = int(sid_BS.max().item()) + 1
    if K > 0:
        onehot_BSK = (sid_BS[..., None] == torch.arange(K, device=x_N.device)).double()
        rows_BS[:, :K] = torch.bmm(x_BS[:, None, :], onehot_BSK)[:, 0]
    out_G[-1] = torch.where(sid_BS < 0, x_BS, torch.zeros_like(x_BS)).sum()
    return out_G.float()


def _clipped_ratio(log_r: torch.Tensor, cfg: LossConfig):
    """clip(exp(clamp(log_r, −C, C)), r_min, r_max) and whether the clip engaged."""
    raw = log_r.clamp(-cfg.ratio_log_clamp, cfg.ratio_log_clamp).exp()
    return raw.clamp(cfg.ratio_min, cfg.ratio_max), (raw < cfg.ratio_min) | (raw > cfg.ratio_max)


def compute_loss(logits, labels, loss_mask, *, cfg: LossConfig, seq_id=None, seq_weight=None,
                 ref_logp=None, ref_logits=None, old_logp=None, advantage=None, rollout_logp=None,
                 grpo: Optional[GRPOConfig] = None, tp_group: Optional[dist.ProcessGroup] = None,
                 temperature: float = 1.0):
    """Loss numerator, its normaliser and metric sums for one micro-batch.

    logits `[B, S, v]` (local vocab shard of rank r: ids [r·v, (r+1)·v)); labels, loss_mask,
    seq_id (packed-sequence number within the row, −1 = padding; None = one sequence per row),
    seq_weight (A_s per token), ref_logp (reference log-prob of the label) all `[B, S]`;
    ref_logits like logits (KL methods only). `grpo` only: old_logp (log π_old of the label),
    advantage (the sequence's advantage on each of its tokens), rollout_logp (the rollout server's
    log-prob of the label, NaN where unknown; for the mismatch metric only) all `[B, S]`, and
    `grpo` its config (None = GRPOConfig() defaults). Returns `(loss_sum, normaliser, metrics)`:
    loss_sum a 0-d fp32 tensor with grad; normaliser = Σ loss_mask (0-d fp32), or the number of
    sequences with `grpo.loss_aggregation = "seq_mean"`; metrics a dict of detached 0-d sums
    (docs/loss.md defines each). `temperature` (`grpo` only): T of the sampling policy; π_θ is then
    softmax(logits / T) on every shard before the vocab-parallel log-softmax, and old_logp and
    ref_logp must be of the same tempered policies (`RunConfig.policy_temperature`; docs/loss.md,
    "Sampling temperature"). Raises ValueError naming the bad argument.
    """
    grpo = GRPOConfig() if grpo is None else grpo
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature != 1 and cfg.method != "grpo":
        # The SFT family fits the model itself (docs/loss.md, "Sampling temperature").
        raise ValueError(f"temperature={temperature} applies to loss.method='grpo' only; "
                         f"loss.method={cfg.method!r} trains the untempered policy (temperature=1)")
    per_token = dict(old_logp=old_logp, advantage=advantage, rollout_logp=rollout_logp)
    _check_shapes(logits, labels, loss_mask, seq_id, seq_weight, ref_logp, ref_logits, cfg, grpo, per_token)
    is_grpo = cfg.method == "grpo"
    B, S, v = logits.shape
    N = B * S
    logp_N, ent_N = vocab_parallel_logprob(logits.reshape(N, v), labels.reshape(N), tp_group,
                                           return_entropy=True, temperature=float(temperature))
    uses_kl = cfg.method in KL_METHODS
    kl_N = vocab_parallel_kl(logits.reshape(N, v), ref_logits.reshape(N, v), tp_group) if uses_kl else None

    mask_N = loss_mask.reshape(N).to(torch.float32)
    on_N = mask_N > 0
    V = v * tp_size(tp_group)
    lab_N = labels.reshape(N)
    checks = [
        ((((lab_N >= 0) & (lab_N < V)) | ~on_N).all(),
         f"labels must lie in [0, {V}) (the global vocab) where loss_mask is set"),
        (((mask_N == 0) | (mask_N == 1)).all(), "loss_mask must contain only 0 and 1"),
        (torch.isfinite(logp_N).all() & torch.isfinite(ent_N).all(), "logits contain NaN or Inf",
         NonFiniteLogits),
    ]
    if seq_id is not None:
        sid_N = seq_id.reshape(N)
        checks.append((((sid_N >= -1) & (sid_N < S)).all() & ((sid_N >= 0) | ~on_N).all(),
                       f"seq_id must be in [0, {S}) for tokens with loss_mask set, or -1 for padding"))
    if seq_weight is not None:
        checks.append(((torch.isfinite(seq_weight.reshape(N)) | ~on_N).all(),
                       "seq_weight must be finite where loss_mask is set"))
    if ref_logp is not None and cfg.needs_ref_logp:
        checks.append(((torch.isfinite(ref_logp.reshape(N)) | ~on_N).all(),
                       "ref_logp must be finite where loss_mask is set"))
    if uses_kl:
        checks.append((torch.isfinite(kl_N).all(), "ref_logits contain NaN or Inf", NonFiniteLogits))
    if is_grpo:
        for name in ("old_logp", "advantage") + (("ref_logp",) if grpo.needs_ref_logp else ()):
            t = dict(per_token, ref_logp=ref_logp)[name].reshape(N)
            checks.append(((torch.isfinite(t) | ~on_N).all(), f"{name} must be finite where loss_mask is set"))
        if rollout_logp is not None:
            checks.append(((~torch.isinf(rollout_logp.reshape(N)) | ~on_N).all(),
                           "rollout_logp must be finite (or NaN: unknown) where loss_mask is set"))
    _check_values(checks)

    lp_N = logp_N.detach()
    seg_N = _segments(seq_id, B, S, logits.device)
    count_G = _bucket_sum(mask_N, seq_id, B, S)
    metrics = {
        "num_tokens": mask_N.sum(),
        "num_seqs": (count_G[:N] > 0).sum().float(),
        "nll_sum": -(mask_N * lp_N).sum(),
        "entropy_sum": (mask_N * ent_N).sum(),
    }

    w_N = mask_N
    if seq_weight is not None:
        # where(): a NaN weight on a masked-out token must not leak into the sum.
        sw_N = seq_weight.reshape(N).detach().float()
        w_N = w_N * torch.where(on_N, sw_N, torch.zeros_like(sw_N))
    a_N = w_N  # mask · A: the coefficient of the KL term
    phi_N = None
    if cfg.method in ("dft", "asft") or (cfg.method == "rasft" and cfg.token_factor == "dft"):
        phi_N = lp_N.exp()  # sg(q_t)
        w_N = w_N * phi_N
    elif cfg.method == "profit":
        keep_N = on_N & (lp_N.exp() > cfg.profit_threshold)
        any_kept = keep_N.any()
        # No qualifying token in the micro-batch: fall back to plain SFT on every loss token.
        phi_N = torch.where(any_kept, keep_N, on_N).float()
        w_N = w_N * phi_N
        metrics["profit_kept"] = keep_N.sum().float()
        metrics["profit_fallback"] = (~any_kept).float()
    if cfg.method == "rasft":
        metrics["token_factor_sum"] = mask_N.sum() if phi_N is None else (mask_N * phi_N).sum()
    elif phi_N is not None:
        metrics["token_factor_sum"] = (mask_N * phi_N).sum()
    if is_grpo:
        c_N, grpo_metrics = clipped_coefficient(lp_N, old_logp.reshape(N).detach().float(),
                                                advantage.reshape(N).detach().float(), on_N, grpo,
                                                cfg.ratio_log_clamp)
        w_N = w_N * c_N
        metrics.update(grpo_metrics)
        metrics["ratio_count"] = metrics["num_tokens"]
        _grpo_sequence_metrics(metrics, advantage, rollout_logp, old_logp, on_N, seq_id, count_G, B, S)
    if cfg.needs_ref_logp:
        diff_N = torch.where(on_N, ref_logp.reshape(N).detach().float() - lp_N, torch.zeros_like(lp_N))
        if cfg.ratio == "sequence":
            # Mean over the masked tokens of each sequence of log π_ref − log π_θ.
            diff_G = _bucket_sum(diff_N, seq_id, B, S)
            r_G, clip_G = _clipped_ratio(diff_G / count_G.clamp(min=1), cfg)
            live_G = count_G > 0
            live_G[N] = False
            r_N = r_G[seg_N]
            metrics["ratio_sum"] = (r_G * live_G).sum()
            metrics["ratio_count"] = metrics["num_seqs"]
            metrics["ratio_clipped"] = (clip_G & live_G).sum().float()
        else:
            r_N, clip_N = _clipped_ratio(diff_N, cfg)
            metrics["ratio_sum"] = (mask_N * r_N).sum()
            metrics["ratio_count"] = metrics["num_tokens"]
            metrics["ratio_clipped"] = (clip_N & on_N).sum().float()
        w_N = w_N * r_N

    metrics["weight_sum"] = w_N.sum()
    seq_mean = is_grpo and grpo.loss_aggregation == "seq_mean"
    if seq_mean:  # 1/|s| on every token of s: Σ_s mean_{t∈s}(·), normalised by the sequence count
        inv_len_N = 1.0 / count_G.clamp(min=1)[seg_N]
        w_N = w_N * inv_len_N
        a_N = a_N * inv_len_N
    loss_sum = (w_N * -logp_N).sum()
    if uses_kl:
        kl_term = (a_N * kl_N).sum()
        loss_sum = loss_sum + cfg.kl_coef * kl_term
        metrics["kl_sum"] = (mask_N * kl_N.detach()).sum()
    if is_grpo and grpo.needs_ref_logp:
        k3_N = k3_kl(logp_N, ref_logp.reshape(N).detach().float(), on_N, cfg.ratio_log_clamp, grpo.k3_max)
        loss_sum = loss_sum + grpo.kl_coef * (a_N * k3_N).sum()
        metrics["kl_sum"] = (mask_N * k3_N.detach()).sum()
    # Own storage per entry: callers all-reduce metrics in place, and some keys share a tensor.
    metrics = {k: t.detach().clone() for k, t in metrics.items()}
    return loss_sum, metrics["num_seqs" if seq_mean else "num_tokens"].clone(), metrics


def _grpo_sequence_metrics(metrics, advantage, rollout_logp, old_logp, on_N, seq_id, count_G, B, S) -> None:
    """Add `adv_sum` (Σ_s A_s), `zero_adv_seqs` (#{s: A_s = 0}) and, given rollout_logp, the
    train/rollout mismatch `mismatch_sum` Σ_t |log π_old − log π_rollout| over `mismatch_count`
    loss tokens whose rollout log-prob is known."""
    N = B * S
    live_G = count_G > 0
    live_G[N] = False
    adv_N = torch.where(on_N, advantage.reshape(N).detach().float(), torch.zeros(N, device=on_N.device))
    # A is constant over a sequence: its token mean is A_s.
    adv_G = _bucket_sum(adv_N, seq_id, B, S) / count_G.clamp(min=1)
    metrics["adv_sum"] = (adv_G * live_G).sum()
    metrics["zero_adv_seqs"] = (live_G & (adv_G == 0)).sum().float()
    if rollout_logp is not None:
        roll_N = rollout_logp.reshape(N).detach().float()
        known_N = on_N & ~torch.isnan(roll_N)
        gap_N = (old_logp.reshape(N).detach().float() - roll_N).abs()
        metrics["mismatch_sum"] = torch.where(known_N, gap_N, torch.zeros_like(gap_N)).sum()
        metrics["mismatch_count"] = known_N.sum().float()
