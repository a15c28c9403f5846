"""The per-method part of the loss family: one small function per `loss.method`, held in a table.

Every method is Σ_t m_t · A_t · Π_k f_k,t · ℓ_t (docs/loss.md, "Methods"): the mask m, the
sequence weight A, and the method's detached per-token factors f_k (no gradient), multiplied in
turn; ℓ_t = −log π_θ(label). A coefficient function computes only its factors and its metric sums
from a `Tokens` view of the micro-batch; `compute_loss` (loss/family.py) does everything else (the
sums, `seq_mean`, the KL terms). A new method is one function here and one entry in `COEFFICIENTS`
(`config.LOSS_METHODS` names the methods a run configuration may choose).

Legend: N = B·S tokens, G = sequence buckets (loss/buckets.py). Factors are `[N]` fp32 tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from megatron_rasft.config import GRPOConfig, LossConfig
from megatron_rasft.loss.batch import LossBatch
from megatron_rasft.loss.buckets import Buckets
from megatron_rasft.loss.grpo import clipped_coefficient, sequence_metrics


@dataclass(frozen=True)
class Tokens:
    """What a coefficient function reads. `logp_N`: detached log π_θ(label) (fp32; of the tempered
    policy under `grpo`); `mask_N`: the loss mask as fp32 0/1, `on_N` = mask_N > 0; `num_tokens`,
    `num_seqs`: 0-d fp32 counts of the micro-batch; `buckets`: its sequences; `batch`: the inputs;
    `cfg` / `grpo`: the `LossConfig` and `GRPOConfig` (the method's parameters)."""

    logp_N: torch.Tensor
    mask_N: torch.Tensor
    on_N: torch.Tensor
    num_tokens: torch.Tensor
    num_seqs: torch.Tensor
    buckets: Buckets
    batch: LossBatch
    cfg: LossConfig
    grpo: GRPOConfig

    def per_token(self, t_BS: torch.Tensor) -> torch.Tensor:
        """A `[B, S]` input of the batch as a detached fp32 `[N]` vector."""
        return t_BS.reshape(self.mask_N.numel()).detach().float()


class Coefficient(NamedTuple):
    """The method's detached factors, applied to m·A in this order (each exactly 1.0 where it does
    not act keeps the sum bit-identical to SFT), and its metric sums (0-d tensors, docs/loss.md)."""

    factors: tuple
    metrics: dict


def sft(tok: Tokens) -> Coefficient:
    """SFT (and `sft_kl`, whose KL term is added by `compute_loss`): no factor."""
    return Coefficient((), {})


def dft(tok: Tokens) -> Coefficient:
    """DFT (Wu et al. 2025, eq. 9; and `asft`, plus its KL term): the factor sg(q_t), q_t = π_θ(label)."""
    q_N = tok.logp_N.exp()
    return Coefficient((q_N,), {"token_factor_sum": (tok.mask_N * q_N).sum()})


def profit(tok: Tokens) -> Coefficient:
    """ProFit: keep the tokens with q_t > `loss.profit_threshold`; a micro-batch with none kept
    falls back to plain SFT on every loss token (`profit_fallback` = 1)."""
    keep_N = tok.on_N & (tok.logp_N.exp() > tok.cfg.profit_threshold)
    any_kept = keep_N.any()
    phi_N = torch.where(any_kept, keep_N, tok.on_N).float()
    return Coefficient((phi_N,), {"token_factor_sum": (tok.mask_N * phi_N).sum(),
                                  "profit_kept": keep_N.sum().float(), "profit_fallback": (~any_kept).float()})


def rasft(tok: Tokens) -> Coefficient:
    """RASFT (RASFT.md): the token factor φ_t (sg(q_t) with `loss.token_factor = "dft"`, else 1),
    then the clipped ratio r = clip(exp(clamp(log π_ref − log π_θ, ±C)), r_min, r_max), per token
    or (`loss.ratio = "sequence"`) of the mean log-ratio over each sequence's loss tokens."""
    cfg = tok.cfg
    factors, metrics = (), {}
    if cfg.token_factor == "dft":
        factors, metrics = dft(tok)
    else:
        metrics["token_factor_sum"] = tok.mask_N.sum()
    if cfg.ratio == "none":
        return Coefficient(factors, metrics)
    ref_N = tok.per_token(tok.batch.ref_logp_BS)
    diff_N = torch.where(tok.on_N, ref_N - tok.logp_N, torch.zeros_like(tok.logp_N))
    if cfg.ratio == "sequence":
        r_G, clip_G = _clipped_ratio(tok.buckets.mean(diff_N), cfg)
        live_G = tok.buckets.live_G
        r_N = r_G[tok.buckets.seg_N]
        metrics.update(ratio_sum=(r_G * live_G).sum(), ratio_count=tok.num_seqs,
                       ratio_clipped=(clip_G & live_G).sum().float())
    else:
        r_N, clip_N = _clipped_ratio(diff_N, cfg)
        metrics.update(ratio_sum=(tok.mask_N * r_N).sum(), ratio_count=tok.num_tokens,
                       ratio_clipped=(clip_N & tok.on_N).sum().float())
    return Coefficient(factors + (r_N,), metrics)


def _clipped_ratio(log_r: torch.Tensor, cfg: LossConfig):
    """clip(exp(clamp(log_r, −C, C)), r_min, r_max) and whether the clip engaged."""
    raw = log_r.clamp(-cfg.ratio_log_clamp, cfg.ratio_log_clamp).exp()
    return raw.clamp(cfg.ratio_min, cfg.ratio_max), (raw < cfg.ratio_min) | (raw > cfg.ratio_max)


def grpo(tok: Tokens) -> Coefficient:
    """GRPO / Dr.GRPO / DAPO: the clipped-surrogate coefficient sg(A_t·ρ_t), 0 where the clip
    binds (loss/grpo.py, `clipped_coefficient`), and the advantage and mismatch metrics."""
    b = tok.batch
    c_N, metrics = clipped_coefficient(tok.logp_N, tok.per_token(b.old_logp_BS), tok.per_token(b.advantage_BS),
                                       tok.on_N, tok.grpo, tok.cfg.ratio_log_clamp)
    metrics["ratio_count"] = tok.num_tokens
    metrics.update(sequence_metrics(tok.buckets, tok.on_N, b.advantage_BS, b.old_logp_BS, b.rollout_logp_BS))
    return Coefficient((c_N,), metrics)


# loss.method → its coefficient function. The KL methods share their factor with a plain one.
COEFFICIENTS: dict[str, Callable[[Tokens], Coefficient]] = {
    "sft": sft,
    "dft": dft,
    "sft_kl": sft,
    "asft": dft,
    "profit": profit,
    "rasft": rasft,
    "grpo": grpo,
}


def coefficient_for(method: str) -> Callable[[Tokens], Coefficient]:
    """The table's function for `method`; ValueError naming the method and the known ones."""
    try:
        return COEFFICIENTS[method]
    except KeyError:
        raise ValueError(f"loss.method={method!r} has no coefficient function "
                         f"(loss/coefficients.py knows {sorted(COEFFICIENTS)})") from None
