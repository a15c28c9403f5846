"""Forward-only scoring: per-token log-probs of training sequences under a (frozen) model.

Runs through Megatron's schedule with the model's own TP/PP layout; each DP rank scores its share,
and the last pipeline stage's results are exchanged over the data-parallel group and the pipeline so
that every rank ends with the scores of every sequence (they are small: one float per token).
Used for the frozen reference (ref_logp for the ratio r_s, cached on disk per sequence) and for the
`released` selection's expert NLL under the current policy.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rasft.data.batching import Seq, make_rows, stack_microbatches
from megatron_rasft.records import write_atomic
from megatron_rasft.rundir import StaleRunDir


def _logprob_loss_func(tp_group, temperature: float = 1.0):
    from megatron_rasft.loss.kernels import vocab_parallel_logprob

    def loss_func(batch, logits):
        # Scoring reads only the labels of the `LossBatch`; its other columns ride along.
        b, s, v = logits.shape
        logp_BS = vocab_parallel_logprob(logits.reshape(b * s, v).float(), batch.labels_BS.reshape(-1),
                                         tp_group=tp_group, temperature=temperature).view(b, s)
        zero = logits.new_zeros(())
        return zero, logits.new_zeros((), dtype=torch.int), {"logp": logp_BS.detach().clone()}

    return loss_func


@torch.no_grad()
def score(model_chunks: list, seqs: list[Seq], groups, *, micro_batch_size: int, seq_length: int, pad_id: int,
          vocab_size: int | None = None, temperature: float = 1.0) -> dict[str, list]:
    """`{seq.key: per-token log-probs of tokens[1:]}` (a list of len(tokens) − 1 floats, natural
    log) for every sequence, on every rank. `groups`: the run's `ParallelGroups`; each DP rank
    scores its share. `temperature` T: log-probs of softmax(logits / T) (GRPO's π_old and π_ref
    at the sampling temperature, `RunConfig.policy_temperature`). Collective over all ranks."""
    from megatron_rasft.engine.step import forward_backward, make_forward_step

    mine = seqs[groups.dp_rank::groups.dp_size]
    out: dict[str, list] = {}
    for c in model_chunks:
        c.eval()
    step = make_forward_step(_logprob_loss_func(groups.tp, temperature), groups, vocab_size=vocab_size)
    chunk = micro_batch_size * 16  # bound the number of micro-batches per schedule call
    n_rounds = _max_over_dp(-(-len(mine) // chunk), groups.dp)
    for i in range(n_rounds):
        part = mine[i * chunk:(i + 1) * chunk]
        # Ranks with nothing left still run an (empty) schedule to keep collectives matched.
        where: list = []  # packed: several sequences per row, each attending only to itself
        rows = make_rows(part, seq_length, pad_id, pack=True, placements=where)
        batches = stack_microbatches(rows, micro_batch_size, seq_length, pad_id)
        reports = forward_backward(model_chunks, step, batches, seq_length=seq_length, forward_only=True)
        if reports:  # last pipeline stage
            logp_NS = torch.cat([r["logp"] for r in reports])
            for seq, (row, start) in zip(part, where):
                out[seq.key] = logp_NS[row, start:start + len(seq.tokens) - 1].tolist()
    for c in model_chunks:
        c.train()
    return _share(out)


def _max_over_dp(n: int, dp_group) -> int:
    from megatron_rasft.parallel.placement import device

    if not dist.is_initialized():
        return n
    t = torch.tensor([n], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dp_group)
    return int(t.item())


def _share(local: dict) -> dict:
    """Union of every rank's results (only last-stage ranks have any)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged: dict = {}
    for part in gathered:
        merged.update(part)
    return merged


class RefCache:
    """Reference (or π_old) log-probs on disk: one `torch.save`d dict per group (each window's
    experts, each round's rollouts), so every sequence is scored once, when it is first needed.

    `temperature`: the T of the softmax(logits / T) they are scored under (`RunConfig.policy_temperature`),
    recorded in ROOT/scored_with.json with the first group saved. Values scored at another T are
    other numbers for the same keys, so a run resumed with another T (a changed `loss.method` or GRPO
    `rollout.sampling.temperature`) is refused rather than mixing them.

    Raises `rundir.StaleRunDir` (at construction) when ROOT holds values scored at another T."""

    META = "scored_with.json"

    def __init__(self, root: Path, *, temperature: float):
        self.root = Path(root)
        self.temperature = float(temperature)
        meta = self.root / self.META
        if meta.is_file():  # caches written before it was recorded have none: taken as they are
            old = json.loads(meta.read_text())["temperature"]
            if old != self.temperature:
                raise StaleRunDir(f"{self.root}: log-probs scored at temperature {old:g}, this run's policy "
                                  f"temperature is {self.temperature:g} (loss.method or rollout.sampling.temperature "
                                  f"changed since they were scored); resume with the run's settings or start a new "
                                  f"run directory")

    def load_all(self) -> dict:
        merged: dict = {}
        for p in sorted(self.root.glob("*.pt")):
            merged.update(torch.load(p, weights_only=False))
        return merged

    def path(self, group: str) -> Path:
        return self.root / f"{group}.pt"

    def load(self, group: str) -> dict | None:
        p = self.path(group)
        return torch.load(p, weights_only=False) if p.is_file() else None

    def save(self, group: str, values: dict) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        meta = self.root / self.META
        if not meta.is_file():
            write_atomic(meta, json.dumps({"temperature": self.temperature}) + "\n")
        write_atomic(self.path(group), lambda f: torch.save(values, f))
