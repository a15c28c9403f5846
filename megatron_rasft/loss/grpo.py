"""GRPO's pieces for `compute_loss` (docs/loss.md, "grpo"): the clipped-surrogate coefficient, the k3
KL estimator and the per-sequence metrics.

Legend: N = tokens (batch × sequence flattened). Every input is `[N]` fp32; `on_N` marks loss tokens.

The clipped surrogate of PPO (Schulman et al. 2017, eq. 7) per token, as used by GRPO (Shao et al.
2024, eq. 3) and DAPO (Yu et al. 2025, eq. 8, with ε_low ≠ ε_high):

    L_t = −min(ρ_t·A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A_t),   ρ_t = π_θ(y_t) / π_old(y_t).

Its gradient is −A_t·ρ_t·∇log π_θ(y_t) where the unclipped term is the minimum and 0 where the clip
binds (A_t > 0 and ρ_t > 1 + ε_high, or A_t < 0 and ρ_t < 1 − ε_low). The family writes it the way
it writes every method, as a detached coefficient times ℓ_t = −log π_θ(y_t):

    c_t = sg(A_t·ρ_t) where the clip does not bind, 0 where it does,

which has exactly that gradient, and with ρ = 1 (the first step after a round) is the plain
policy-gradient loss −Σ A_t·log π_θ(y_t) in value and gradient. The surrogate's own value Σ L_t is
reported as a metric.
"""
from __future__ import annotations

import torch

from megatron_rasft.config import GRPOConfig
from megatron_rasft.loss.buckets import Buckets


def clipped_coefficient(logp_N: torch.Tensor, old_logp_N: torch.Tensor, adv_N: torch.Tensor,
                        on_N: torch.Tensor, gcfg: GRPOConfig, log_clamp: float):
    """`(c_N, metrics)`: the detached coefficient c_t of ℓ_t (0 off the loss tokens) and metric sums.

    logp_N: log π_θ(y_t) (detached); old_logp_N: log π_old(y_t); adv_N: A_t; `log_clamp` bounds
    |log ρ| before exp (fp32 overflow). Metrics (0-d sums over loss tokens): `ratio_sum` Σ ρ_t,
    `clip_low` #{A_t < 0, ρ_t < 1 − ε_low}, `clip_high` #{A_t > 0, ρ_t > 1 + ε_high} (trl's
    clip_ratio/low and /high), `surrogate_sum` Σ L_t.
    """
    zero_N = torch.zeros_like(logp_N)
    log_r_N = torch.where(on_N, logp_N - old_logp_N, zero_N).clamp(-log_clamp, log_clamp)
    rho_N = log_r_N.exp()
    adv_N = torch.where(on_N, adv_N, zero_N)
    low_N = on_N & (adv_N < 0) & (rho_N < 1 - gcfg.eps_low)
    high_N = on_N & (adv_N > 0) & (rho_N > 1 + gcfg.eps_high)
    c_N = torch.where(low_N | high_N, zero_N, adv_N * rho_N)
    surrogate_N = -torch.minimum(rho_N * adv_N, rho_N.clamp(1 - gcfg.eps_low, 1 + gcfg.eps_high) * adv_N)
    on_f = on_N.float()
    metrics = {
        "ratio_sum": (on_f * rho_N).sum(),
        "clip_low": low_N.sum().float(),
        "clip_high": high_N.sum().float(),
        "surrogate_sum": (on_f * surrogate_N).sum(),
    }
    return c_N, metrics


def k3_kl(logp_N: torch.Tensor, ref_logp_N: torch.Tensor, on_N: torch.Tensor, log_clamp: float,
          k3_max: float) -> torch.Tensor:
    """k3 estimate of KL(π_θ ‖ π_ref) per token (Schulman 2020, "Approximating KL divergence"):
    min(exp(d) − d − 1, k3_max) with d = clamp(log π_ref(y_t) − log π_θ(y_t), ±log_clamp); ≥ 0,
    unbiased for samples of π_θ before the cap. Differentiable through `logp_N`; 0 off the loss
    tokens. The clamp keeps exp() finite in fp32, but exp(20) − 21 = 4.85e8 would still let one
    token carry a whole step; the cap bounds each token's value at `k3_max` (verl's
    `kl_penalty(..., "low_var_kl")` clamps at 10 after the same ±20 clamp) and, being a clamp,
    gives 0 gradient where k3 > k3_max (full gradient at and below it)."""
    d_N = torch.where(on_N, ref_logp_N - logp_N, torch.zeros_like(logp_N)).clamp(-log_clamp, log_clamp)
    return (d_N.exp() - d_N - 1).clamp(max=k3_max)


def sequence_metrics(buckets: Buckets, on_N: torch.Tensor, advantage_BS: torch.Tensor, old_logp_BS: torch.Tensor,
                     rollout_logp_BS) -> dict:
    """`adv_sum` (Σ_s A_s over the micro-batch's sequences), `zero_adv_seqs` (#{s: A_s = 0}) and,
    given `rollout_logp_BS` (`[B, S]`, NaN = unknown), the train/rollout mismatch `mismatch_sum`
    Σ_t |log π_old − log π_rollout| over the `mismatch_count` loss tokens whose rollout log-prob is known."""
    N = on_N.numel()
    live_G = buckets.live_G
    adv_N = torch.where(on_N, advantage_BS.reshape(N).detach().float(), torch.zeros(N, device=on_N.device))
    adv_G = buckets.mean(adv_N)  # A is constant over a sequence: its token mean is A_s
    metrics = {"adv_sum": (adv_G * live_G).sum(), "zero_adv_seqs": (live_G & (adv_G == 0)).sum().float()}
    if rollout_logp_BS is not None:
        roll_N = rollout_logp_BS.reshape(N).detach().float()
        known_N = on_N & ~torch.isnan(roll_N)
        gap_N = (old_logp_BS.reshape(N).detach().float() - roll_N).abs()
        metrics["mismatch_sum"] = torch.where(known_N, gap_N, torch.zeros_like(gap_N)).sum()
        metrics["mismatch_count"] = known_N.sum().float()
    return metrics
