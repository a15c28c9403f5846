"""The loop's resumable state and the deterministic training stream.

Problems are consumed in windows: an epoch is a seeded permutation of the problem ids, and each
window takes the next `W` of them. A window's sequences (its expert demonstrations, in a seeded
order, plus any correct rollouts inserted at seeded positions) are appended to a queue, and every
optimizer step takes the next global batch from the queue. A new window (and rollout round) starts
when the queue cannot fill the next batch. The expert order never depends on rollouts, so a run
whose rounds add nothing sees exactly the sequences, in exactly the order, of a plain SFT run.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    cursor: int = 0  # position in the epoch's permutation
    window: int = 0  # windows (rounds) started so far
    queue: list = field(default_factory=list)  # [[seq key, weight], ...] not yet trained on
    rounds: list = field(default_factory=list)  # per-round summaries
    tokens_trained: int = 0
    hard_pool: dict = field(default_factory=dict)  # `reference` selection: problem id -> times probed

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LoopState":
        return cls(**d)


def next_window_ids(state: LoopState, problem_ids: list[str], size: int, seed: int) -> list[str]:
    """The next `size` problem ids of the stream (wrapping into new epochs); advances `state`."""
    out: list[str] = []
    while len(out) < size:
        perm = random.Random(f"{seed}/epoch/{state.epoch}").sample(problem_ids, len(problem_ids))
        take = perm[state.cursor:state.cursor + size - len(out)]
        out += take
        state.cursor += len(take)
        if state.cursor >= len(perm):
            state.epoch, state.cursor = state.epoch + 1, 0
    return out


def window_items(window: int, problem_ids: list[str], expert_weight: dict, rollout_items: list,
                 seed: int) -> list[list]:
    """Queue entries for one window: experts shuffled by one seeded RNG, rollouts inserted at
    positions drawn from a second one (so the expert order is the same with or without them)."""
    experts = [[f"e/{pid}", float(expert_weight.get(pid, 1.0))] for pid in problem_ids]
    random.Random(f"{seed}/window/{window}/experts").shuffle(experts)
    rng = random.Random(f"{seed}/window/{window}/rollouts")
    items = list(experts)
    for key, w in rollout_items:
        items.insert(rng.randint(0, len(items)), [key, float(w)])
    return items
