"""The loss's typed micro-batch: the per-token tensors `compute_loss` reads, besides the logits.

Legend: B = micro-batch rows, S = sequence length, v = local vocab shard. Every tensor is `[B, S]`
except `ref_logits_BSv` (the reference's logits, same shard as the policy's). Optional tensors are
None when the batch has no such column; `compute_loss` says which method needs which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True, slots=True)
class LossBatch:
    """One micro-batch as the loss sees it (docs/loss.md, "API", gives each field's meaning).

    labels_BS: next-token ids (int) in [0, V) where loss_mask_BS is 1, anything elsewhere.
    loss_mask_BS: 1 for the tokens that carry loss, 0 elsewhere.
    seq_id_BS: packed-sequence number within the row (int), −1 = padding; None = one sequence per row.
    seq_weight_BS: the sequence's weight A_s on each of its tokens; None = 1.
    ref_logp_BS: log π_ref(label) (the frozen reference pass); `rasft` with a ratio, `grpo` with a KL.
    ref_logits_BSv: the reference's logits, sharded like the policy's; `sft_kl` and `asft`.
    old_logp_BS, advantage_BS: `grpo`: log π_old(label) and the sequence's advantage on its tokens.
    rollout_logp_BS: `grpo`, optional: the rollout server's log-prob of the label, NaN = unknown.
    """

    labels_BS: torch.Tensor
    loss_mask_BS: torch.Tensor
    seq_id_BS: Optional[torch.Tensor] = None
    seq_weight_BS: Optional[torch.Tensor] = None
    ref_logp_BS: Optional[torch.Tensor] = None
    ref_logits_BSv: Optional[torch.Tensor] = None
    old_logp_BS: Optional[torch.Tensor] = None
    advantage_BS: Optional[torch.Tensor] = None
    rollout_logp_BS: Optional[torch.Tensor] = None

    @classmethod
    def from_microbatch(cls, mb: dict, ref_logits_BSv: Optional[torch.Tensor] = None) -> "LossBatch":
        """The loss's view of one micro-batch dict of `data.batching.stack_microbatches` (its
        `labels`, `loss_mask`, and whichever of `seq_id`, `seq_weight`, `ref_logp`, `old_logp`,
        `advantage`, `rollout_logp` it has), plus the reference's logits of the KL methods.
        Raises KeyError naming a missing `labels` / `loss_mask`."""
        return cls(labels_BS=mb["labels"], loss_mask_BS=mb["loss_mask"], seq_id_BS=mb.get("seq_id"),
                   seq_weight_BS=mb.get("seq_weight"), ref_logp_BS=mb.get("ref_logp"),
                   ref_logits_BSv=ref_logits_BSv, old_logp_BS=mb.get("old_logp"),
                   advantage_BS=mb.get("advantage"), rollout_logp_BS=mb.get("rollout_logp"))
