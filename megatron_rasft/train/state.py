"""The loop's resumable state and the deterministic training stream.

Problems are consumed in windows: an epoch is a seeded permutation of the problem ids, and each
window takes the next `W = rollout.batches_per_round × global_batch_size` of them (`global_batch_size`
without rounds). A window becomes a queue of groups, one per problem in a seeded order: the expert
demonstration followed by that problem's correct rollouts from the window's round (then, with the
`released` selection, the re-trained probe demonstrations, one group each). Every optimizer step
trains the next `global_batch_size` groups, and the next window (and its round) is drawn when the
queue cannot fill a global batch: nothing counts steps. Under rasft with the `all` selection a window
is exactly `batches_per_round` steps; the probes' extra groups make a window longer, and GRPO's
windows (only the groups with rollouts to train: `stream.py`, `grpo_round.py`) shorter. A rollout is
trained in the same step as its problem's demonstration (never left waiting in a queue). The number
of sequences per step therefore varies; the loss is normalised by the global token count either
way. The expert order depends on the seed and the window size only, never on rollouts.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from megatron_rasft.rundir import expert_key, parse_key


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    cursor: int = 0  # position in the epoch's permutation
    window: int = 0  # windows (rounds) started so far
    queue: list = field(default_factory=list)  # groups not yet trained on: [[[seq key, weight], ...], ...]
    rounds: list = field(default_factory=list)  # per-round summaries
    tokens_trained: int = 0
    hard_pool: dict = field(default_factory=dict)  # `released` selection: problem id -> times probed
    # Overlapped rounds: the problem ids of window `window`, whose round runs in the background.
    ahead: list = field(default_factory=list)

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


def window_groups(window: int, problem_ids: list[str], expert_weight: dict, extra_items: list,
                  seed: int) -> list[list]:
    """Queue groups for one window, in a seeded order of the window's problems. `extra_items`
    (`[key, weight]`) are rollouts (`r<round>/<problem>/<j>`, joined to their problem's group) and
    re-trained probe demonstrations (`e/<problem>` of an earlier window, a group of their own,
    appended after the window's problems)."""
    order = list(problem_ids)
    random.Random(f"{seed}/window/{window}/experts").shuffle(order)
    groups = {pid: [[expert_key(pid), float(expert_weight.get(pid, 1.0))]] for pid in order}
    tail = []
    for key, w in extra_items:
        parsed = parse_key(key)
        if parsed.is_expert:
            tail.append([[key, float(w)]])
        else:
            groups[parsed.problem_id].append([key, float(w)])
    return [groups[pid] for pid in order] + tail
