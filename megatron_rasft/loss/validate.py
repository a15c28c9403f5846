"""Input checks of `compute_loss`: types, shapes and presence before any work (`check_inputs`), and
the values (`check_values`, one host sync for all of them) once the kernels have run.

Legend: B = rows, S = sequence length, v = local vocab shard, N = B·S tokens, V = the global vocab.
Every error is a ValueError naming the argument (the batch's fields by their docs/loss.md names).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_rasft.config import GRPOConfig, LossConfig
from megatron_rasft.loss.batch import LossBatch


class NonFiniteLogits(ValueError):
    """The policy's (or the reference's) logits contain NaN or Inf: the model diverged."""


def check_inputs(batch: LossBatch, logits: torch.Tensor, cfg: LossConfig, grpo: GRPOConfig,
                 temperature: float) -> None:
    """Types, the temperature, `[B, S]` shapes, integer dtypes and the inputs `cfg` needs."""
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    if not isinstance(grpo, GRPOConfig):
        raise ValueError(f"grpo must be a GRPOConfig, got {type(grpo).__name__}")
    if not isinstance(batch, LossBatch):
        raise ValueError(f"batch must be a LossBatch, got {type(batch).__name__}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature != 1 and cfg.method != "grpo":
        # The SFT family fits the model itself (docs/loss.md, "Sampling temperature").
        raise ValueError(f"temperature={temperature} applies to loss.method='grpo' only; "
                         f"loss.method={cfg.method!r} trains the untempered policy (temperature=1)")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab_shard], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    BS = tuple(logits.shape[:2])
    named = dict(labels=batch.labels_BS, loss_mask=batch.loss_mask_BS, seq_id=batch.seq_id_BS,
                 seq_weight=batch.seq_weight_BS, ref_logp=batch.ref_logp_BS, old_logp=batch.old_logp_BS,
                 advantage=batch.advantage_BS, rollout_logp=batch.rollout_logp_BS)
    for name, t in named.items():
        if t is not None and tuple(t.shape) != BS:
            raise ValueError(f"{name} must have shape {BS} (logits' [batch, seq]), got {tuple(t.shape)}")
    for name in ("labels", "seq_id"):
        t = named[name]
        if t is not None and (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    ref_logits = batch.ref_logits_BSv
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    if cfg.needs_ref_logp and batch.ref_logp_BS is None:
        raise ValueError(f"ref_logp is required for loss.method={cfg.method!r} with "
                         f"loss.ratio={cfg.ratio!r} (set loss.ratio='none' to train without it)")
    if cfg.needs_ref_logits and ref_logits is None:
        raise ValueError(f"ref_logits is required for loss.method={cfg.method!r} (full-vocab KL)")
    if cfg.method == "grpo":
        for name in ("old_logp", "advantage"):
            if named[name] is None:
                raise ValueError(f"{name} is required for loss.method='grpo'")
        if grpo.needs_ref_logp and batch.ref_logp_BS is None:
            raise ValueError(f"ref_logp is required for loss.method='grpo' with grpo.kl_coef={grpo.kl_coef} "
                             f"(the k3 KL to the reference; set grpo.kl_coef=0 to train without it)")


def check_values(batch: LossBatch, cfg: LossConfig, grpo: GRPOConfig, V: int, mask_N: torch.Tensor,
                 logp_N: torch.Tensor, ent_N: torch.Tensor, kl_N: Optional[torch.Tensor]) -> None:
    """Labels in [0, V), a 0/1 mask, finite logits (via the kernels' `logp_N`, `ent_N`, `kl_N`:
    `NonFiniteLogits`), seq_id in range and finite per-token inputs where the mask is set. Every
    value checked is identical on all tensor-parallel ranks (logits only via all-reduced
    statistics), so either every rank raises or none does: no rank is left waiting in a collective."""
    N = mask_N.numel()
    on_N = mask_N > 0
    lab_N = batch.labels_BS.reshape(N)
    checks = [
        ((((lab_N >= 0) & (lab_N < V)) | ~on_N).all(),
         f"labels must lie in [0, {V}) (the global vocab) where loss_mask is set"),
        (((mask_N == 0) | (mask_N == 1)).all(), "loss_mask must contain only 0 and 1"),
        (torch.isfinite(logp_N).all() & torch.isfinite(ent_N).all(), "logits contain NaN or Inf",
         NonFiniteLogits),
    ]
    if batch.seq_id_BS is not None:
        sid_N = batch.seq_id_BS.reshape(N)
        S = batch.seq_id_BS.shape[1]
        checks.append((((sid_N >= -1) & (sid_N < S)).all() & ((sid_N >= 0) | ~on_N).all(),
                       f"seq_id must be in [0, {S}) for tokens with loss_mask set, or -1 for padding"))
    if batch.seq_weight_BS is not None:
        checks.append(((torch.isfinite(batch.seq_weight_BS.reshape(N)) | ~on_N).all(),
                       "seq_weight must be finite where loss_mask is set"))
    if batch.ref_logp_BS is not None and cfg.needs_ref_logp:
        checks.append(((torch.isfinite(batch.ref_logp_BS.reshape(N)) | ~on_N).all(),
                       "ref_logp must be finite where loss_mask is set"))
    if kl_N is not None:
        checks.append((torch.isfinite(kl_N).all(), "ref_logits contain NaN or Inf", NonFiniteLogits))
    if cfg.method == "grpo":
        finite = dict(old_logp=batch.old_logp_BS, advantage=batch.advantage_BS, ref_logp=batch.ref_logp_BS)
        for name in ("old_logp", "advantage") + (("ref_logp",) if grpo.needs_ref_logp else ()):
            checks.append(((torch.isfinite(finite[name].reshape(N)) | ~on_N).all(),
                           f"{name} must be finite where loss_mask is set"))
        if batch.rollout_logp_BS is not None:
            checks.append(((~torch.isinf(batch.rollout_logp_BS.reshape(N)) | ~on_N).all(),
                           "rollout_logp must be finite (or NaN: unknown) where loss_mask is set"))
    _raise_first_failed(checks)


def _raise_first_failed(checks: list) -> None:
    """Raise for the first failed (ok, message[, exception class]) check; one host sync for all."""
    flags = torch.stack([c[0] for c in checks]).tolist()
    for flag, check in zip(flags, checks):
        if not flag:
            raise (check[2] if len(check) > 2 else ValueError)(check[1])
