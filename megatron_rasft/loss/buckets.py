"""Per-sequence sums over a packed micro-batch, in a fixed order.

Legend: B = micro-batch rows, S = sequence length, N = B·S tokens, G = B·S + 1 sequence buckets
(row·S + seq_id for each packed sequence, the last one for padding).
"""
from __future__ import annotations

from typing import Optional

import torch


def _segments(seq_id_BS: Optional[torch.Tensor], B: int, S: int, device) -> torch.Tensor:
    """Flat bucket index `[N]` of each token's sequence: row·S + seq_id, padding → B·S."""
    row_BS = torch.arange(B, device=device)[:, None] * S
    if seq_id_BS is None:
        return row_BS.expand(B, S).reshape(-1)
    seg_BS = torch.where(seq_id_BS >= 0, row_BS + seq_id_BS.long(), torch.full_like(row_BS, B * S))
    return seg_BS.reshape(-1)


def bucket_sum(x_N: torch.Tensor, seq_id_BS: Optional[torch.Tensor], B: int, S: int) -> torch.Tensor:
    """Σ of the detached `x_N` over each bucket (`[G]`, fp32), in a fixed order.
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


class Buckets:
    """The sequences of one micro-batch: `seg_N` (each token's bucket), `count_G` (loss tokens per
    bucket, from the fp32 0/1 `mask_N`), `live_G` (buckets of real sequences with a loss token)."""

    def __init__(self, seq_id_BS: Optional[torch.Tensor], mask_N: torch.Tensor, B: int, S: int):
        self.seq_id_BS, self.B, self.S = seq_id_BS, B, S
        self.seg_N = _segments(seq_id_BS, B, S, mask_N.device)
        self.count_G = bucket_sum(mask_N, seq_id_BS, B, S)

    def sum(self, x_N: torch.Tensor) -> torch.Tensor:
        """Σ of the detached `x_N` over each bucket, `[G]` fp32 (`bucket_sum`)."""
        return bucket_sum(x_N, self.seq_id_BS, self.B, self.S)

    def mean(self, x_N: torch.Tensor) -> torch.Tensor:
        """Σ / (loss tokens) of each bucket, `[G]`; x_N must be 0 off the loss tokens."""
        return self.sum(x_N) / self.count_G.clamp(min=1)

    @property
    def live_G(self) -> torch.Tensor:
        live_G = self.count_G > 0
        live_G[self.B * self.S] = False
        return live_G
