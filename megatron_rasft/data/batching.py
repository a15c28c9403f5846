"""Training sequences → fixed-shape Megatron micro-batches (padded, or packed with per-sequence ids).

Every micro-batch has shape `[b, s]` with s = model.seq_length (pipeline stages exchange
fixed-shape activations). Position t predicts token t+1: `labels[t] = tokens[t+1]`, and
`loss_mask[t] = 1` where token t+1 belongs to the response. `ref_logp` is aligned with labels.
GRPO's per-token inputs (`old_logp`, `advantage`, `rollout_logp`) are columns of the rows only when
some sequence of the batch carries them, so the batches of the other methods are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Seq:
    key: str  # stable id: "e/<problem>" for expert demonstrations, "r<round>/<problem>/<j>" for rollouts
    tokens: list  # prompt + response + eos
    prompt_len: int
    weight: float = 1.0  # A_s
    ref_logp: Optional[list] = None  # len(tokens) - 1 values (reference log-prob of tokens[1:])
    # GRPO: log π_old of tokens[1:] (len(tokens) - 1 values), the sequence's advantage A, and the
    # rollout server's log-probs of tokens[1:] (None = unknown: the mismatch metric skips them).
    old_logp: Optional[list] = None
    advantage: float = 0.0
    rollout_logp: Optional[list] = None


# Optional columns: name → the value of a position no sequence fills (NaN: "unknown").
_GRPO_COLUMNS = {"old_logp": 0.0, "advantage": 0.0, "rollout_logp": float("nan")}


def _row(s_len: int, pad_id: int, extra: tuple = ()) -> dict:
    row = dict(tokens=torch.full((s_len,), pad_id, dtype=torch.long),
               labels=torch.full((s_len,), pad_id, dtype=torch.long),
               position_ids=torch.zeros(s_len, dtype=torch.long),
               loss_mask=torch.zeros(s_len), seq_id=torch.full((s_len,), -1, dtype=torch.long),
               seq_weight=torch.zeros(s_len), ref_logp=torch.zeros(s_len))
    for name in extra:
        row[name] = torch.full((s_len,), _GRPO_COLUMNS[name])
    return row


def _extra_columns(seqs: list[Seq]) -> tuple:
    """The GRPO columns this batch needs: old_logp and advantage together, rollout_logp if known."""
    extra = ("old_logp", "advantage") if any(s.old_logp is not None for s in seqs) else ()
    return extra + (("rollout_logp",) if any(s.rollout_logp is not None for s in seqs) else ())


def _place(row: dict, seq: Seq, start: int, sid: int) -> int:
    """Write `seq` into `row` at offset `start`; returns the next free offset."""
    n = len(seq.tokens) - 1  # inputs are tokens[:-1], labels tokens[1:]
    toks = torch.tensor(seq.tokens, dtype=torch.long)
    sl = slice(start, start + n)
    row["tokens"][sl] = toks[:-1]
    row["labels"][sl] = toks[1:]
    row["position_ids"][sl] = torch.arange(n)
    mask = torch.zeros(n)
    mask[max(seq.prompt_len - 1, 0):] = 1.0
    row["loss_mask"][sl] = mask
    row["seq_id"][sl] = sid
    row["seq_weight"][sl] = seq.weight
    if seq.ref_logp is not None:
        row["ref_logp"][sl] = torch.tensor(seq.ref_logp[:n], dtype=torch.float32)
    for name in ("old_logp", "rollout_logp"):
        values = getattr(seq, name)
        if values is not None:
            if len(values) < n:
                raise ValueError(f"sequence {seq.key}: {name} has {len(values)} values, needs {n} "
                                 f"(one per token after the first)")
            row[name][sl] = torch.tensor(values[:n], dtype=torch.float32)
    if "advantage" in row:
        row["advantage"][sl] = seq.advantage
    return start + n


def _causal_block_mask(seq_id_S: torch.Tensor) -> torch.Tensor:
    """`[1, s, s]` boolean mask, True = masked: causal and within the same packed sequence."""
    s = seq_id_S.numel()
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = (seq_id_S[:, None] == seq_id_S[None, :]) & (seq_id_S[:, None] >= 0)
    return ~(causal & same)[None]


def make_rows(seqs: list[Seq], seq_length: int, pad_id: int, *, pack: bool,
              placements: Optional[list] = None) -> list[dict]:
    """One row per sequence (padded), or sequences packed first-fit in order (packed).
    `placements`, if given, receives `(row, offset)` of each sequence."""
    for seq in seqs:
        if len(seq.tokens) - 1 > seq_length:
            raise ValueError(f"sequence {seq.key} has {len(seq.tokens)} tokens, more than "
                             f"model.seq_length + 1 = {seq_length + 1}")
    rows: list[dict] = []
    extra = _extra_columns(seqs)
    if not pack:
        for seq in seqs:
            row = _row(seq_length, pad_id, extra)
            _place(row, seq, 0, 0)
            rows.append(row)
            if placements is not None:
                placements.append((len(rows) - 1, 0))
        return rows
    free: list[int] = []
    counts: list[int] = []
    for seq in seqs:
        n = len(seq.tokens) - 1
        i = next((i for i, f in enumerate(free) if seq_length - f >= n), None)
        if i is None:
            rows.append(_row(seq_length, pad_id, extra))
            free.append(0)
            counts.append(0)
            i = len(rows) - 1
        if placements is not None:
            placements.append((i, free[i]))
        free[i] = _place(rows[i], seq, free[i], counts[i])
        counts[i] += 1
    for row in rows:
        row["attention_mask"] = _causal_block_mask(row["seq_id"])
    return rows


def stack_microbatches(rows: list[dict], micro_batch_size: int, seq_length: int, pad_id: int) -> list[dict]:
    """Group rows into `[b, s]` micro-batches; the last one is filled with empty (fully masked) rows
    (and a rank with no rows at all still gets one micro-batch, to take part in the collectives)."""
    rows = list(rows)
    packed = any("attention_mask" in r for r in rows)
    extra = tuple(k for k in _GRPO_COLUMNS if rows and k in rows[0])
    while len(rows) % micro_batch_size or not rows:
        empty = _row(seq_length, pad_id, extra)
        if packed:
            empty["attention_mask"] = _causal_block_mask(empty["seq_id"])
        rows.append(empty)
    out = []
    for i in range(0, len(rows), micro_batch_size):
        chunk = rows[i:i + micro_batch_size]
        mb = {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}
        out.append(mb)
    return out
