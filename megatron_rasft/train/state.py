"""The loop's resumable state and the deterministic training stream.

Problems are consumed in windows: an epoch is a seeded permutation of the problem ids, and each
window takes the next `W = rollout.batches_per_round × global_batch_size` of them (`global_batch_size`
without rounds). A window becomes a queue of groups, one per problem in a seeded order: the expert
demonstration followed by that problem's trained rollouts from the window's round (`QueueItem`s,
`window_groups`; under GRPO one group of rollouts per problem, `grpo_window_groups`) (then, with the
`released` selection, the re-trained probe demonstrations, one group each). Every optimizer step
trains the next `global_batch_size` groups, and the next window (and its round) is drawn when the
queue cannot fill a global batch: nothing counts steps. Under rasft with the `all` selection a window
is exactly `batches_per_round` steps; the probes' extra groups make a window longer, and GRPO's
windows (only the groups with rollouts to train: `grpo_window_groups`) shorter. A rollout is
trained in the same step as its problem's demonstration (never left waiting in a queue). The number
of sequences per step therefore varies; the loss is normalised by the global token count either
way. The expert order depends on the seed and the window size only, never on rollouts.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from megatron_rasft.records import QueueItem
from megatron_rasft.rundir import StaleRunDir, expert_key, parse_key

# The checkpointed loop state's format (`LoopState.format`). 2: the queue holds `QueueItem`
# objects and rounds hand over typed `RoundResult.items` (1, unversioned: `[key, weight]` pairs).
LOOP_STATE_FORMAT = 2


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    cursor: int = 0  # position in the epoch's permutation
    window: int = 0  # windows (rounds) started so far
    queue: list = field(default_factory=list)  # groups not yet trained on: [[QueueItem, ...], ...]
    rounds: list = field(default_factory=list)  # per-round summaries
    tokens_trained: int = 0
    hard_pool: dict = field(default_factory=dict)  # `released` selection: problem id -> times probed
    # Overlapped rounds: the problem ids of window `window`, whose round runs in the background.
    ahead: list = field(default_factory=list)
    format: int = LOOP_STATE_FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "the checkpoint's loop state") -> "LoopState":
        """The state `to_json` wrote. `where` (the file it came from) names it in errors.
        Raises `rundir.StaleRunDir` for a state of another format, or one whose queue items are
        not `{key, weight}` objects."""
        if d.get("format") != LOOP_STATE_FORMAT:
            raise StaleRunDir(f"{where}: loop state of format {d.get('format', 1)}, this version reads format "
                              f"{LOOP_STATE_FORMAT} only: start the run in a new train.run_dir (runs of "
                              f"older versions cannot be continued)")
        bad = [it for group in d["queue"] for it in group if not (isinstance(it, dict) and set(it) == {"key", "weight"})]
        if bad:
            raise StaleRunDir(f"{where}: a queue item must be {{\"key\", \"weight\"}}, got {bad[0]!r}: start "
                              f"the run in a new train.run_dir")
        queue = [[QueueItem(**it) for it in group] for group in d["queue"]]
        return cls(**{**d, "queue": queue})


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


def expert_items(problem_ids: list[str]) -> list[QueueItem]:
    """The queue items of a window without a round: every demonstration with A = 1."""
    return [QueueItem(expert_key(pid), 1.0) for pid in problem_ids]


def window_groups(window: int, problem_ids: list[str], items: list, seed: int) -> list[list]:
    """Queue groups of one window -> `[[QueueItem, ...], ...]`: one group per problem of
    `problem_ids`, in a seeded order, its demonstration first, then its rollouts; after them, one
    group per further demonstration (the `released` selection's probes of earlier windows, with
    their rollouts). `items` as `RoundResult.items` orders them: a demonstration, then the
    rollouts of its problem. Raises ValueError when a window problem has no demonstration."""
    order = list(problem_ids)
    random.Random(f"{seed}/window/{window}/experts").shuffle(order)
    groups: dict = {pid: [] for pid in order}
    tail, latest = [], {}  # latest: problem id -> the group its next rollouts join
    for it in items:
        key = parse_key(it.key)
        if key.is_expert:
            group = groups.get(key.problem_id)
            if group is None or group:  # not of this window, or its demonstration is queued: a probe
                group = []
                tail.append(group)
            group.append(it)
            latest[key.problem_id] = group
        else:
            latest[key.problem_id].append(it)
    missing = [pid for pid in order if not groups[pid]]
    if missing:
        raise ValueError(f"window {window}: no demonstration among the items for problem(s) {missing[:5]}")
    return [groups[pid] for pid in order] + tail


def grpo_window_groups(window: int, items: list, seed: int) -> list[list]:
    """Queue groups of one GRPO round -> `[[QueueItem, ...], ...]`: one group per problem (its
    trained rollouts, in sample order), the problems in a seeded order."""
    groups: dict = {}
    for it in items:
        groups.setdefault(parse_key(it.key).problem_id, []).append(it)
    order = sorted(groups)
    random.Random(f"{seed}/window/{window}/grpo").shuffle(order)
    return [groups[pid] for pid in order]
