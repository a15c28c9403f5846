"""The run directory RUN/ (`train.run_dir`): every path under it, and the sequence-key protocol.

Layout (R = round number, three digits):

    RUN/config.json                 the resolved run config (rank 0, at start)
    RUN/problems.jsonl              `problem` records, prompts rendered as the model sees them
    RUN/rollouts/round_R.jsonl      `rollout` records: K samples per problem        (rollout stage)
    RUN/verdicts/round_R.jsonl      `verdicts` records: one per problem             (verify stage)
    RUN/weights/round_R.jsonl       `weight` records: A_E and A_s per problem (the `weigh` command;
                                    the trainer's rounds keep their weights in round_R.json alone)
    RUN/train_seqs/round_R.jsonl    `train_sequence` records: the round's rollouts as token sequences
    RUN/rounds/round_R.json         one `round_result` record: what the round hands the trainer, its
                                    queue items with their weights; written last, so its presence
                                    marks a finished round
    RUN/rounds/start_R.json         one `round_start` record: an overlapped round's export, probe and
                                    selection, fixed at its window boundary (`rollout.overlap`)
    RUN/rounds/nll_band.json        the `released` selection's NLL thresholds (computed once)
    RUN/ref_logp/window_NNNNN.pt    frozen-reference log-probs, `{sequence key: [floats]}` per window
    RUN/old_logp/round_RRR.pt       GRPO's π_old: the round's rollouts scored by the policy that sampled them
    RUN/hf/policy/                  the policy exported for the rollout server (refreshed each round; with
                                    weight_sync = transfer written once, the server's start-up weights)
    RUN/ckpt/                       training checkpoints (layout: `engine/checkpoint.py`)
    RUN/metrics.jsonl               one JSON object per optimizer step
    RUN/tensorboard/                optional TensorBoard events
    RUN/logs/vllm.log               the trainer-managed rollout server's log
    RUN/rollouts/vllm_server.log    the log of a server the `rollout` command starts

Sequence keys name every training sequence: `e/<problem id>` for a problem's expert demonstration,
`r<round>/<problem id>/<sample index>` for a rollout. Build them with `expert_key`/`rollout_key` and
read them with `parse_key`; no other module looks inside a key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class StaleRunDir(ValueError):
    """A run directory (or one of its checkpoints) written in a format this version no longer reads,
    or holding cached values computed under settings the resumed run does not use (log-probs at
    another temperature); the package converts none: the run starts in a new run directory."""


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created until a writer needs it)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def problems(self) -> Path:
        return self.root / "problems.jsonl"

    def rollouts(self, round_: int) -> Path:
        return self._round_file("rollouts", round_)

    def verdicts(self, round_: int) -> Path:
        return self._round_file("verdicts", round_)

    def weights(self, round_: int) -> Path:
        return self._round_file("weights", round_)

    def train_seqs(self, round_: int) -> Path:
        return self._round_file("train_seqs", round_)

    def all_train_seqs(self) -> list[Path]:
        """Every round's `train_seqs` file, in round order."""
        return sorted((self.root / "train_seqs").glob("round_*.jsonl"))

    def round_result(self, round_: int) -> Path:
        _check_round(round_)
        return self.root / "rounds" / f"round_{round_:03d}.json"

    def round_start(self, round_: int) -> Path:
        """What an overlapped round fixed at its window boundary (export, probe, selection)."""
        _check_round(round_)
        return self.root / "rounds" / f"start_{round_:03d}.json"

    def all_round_results(self) -> list[Path]:
        """Every finished round's result file, in round order."""
        return sorted((self.root / "rounds").glob("round_*.json"))

    @property
    def nll_band(self) -> Path:
        return self.root / "rounds" / "nll_band.json"

    @property
    def ref_logp(self) -> Path:
        return self.root / "ref_logp"

    @staticmethod
    def ref_logp_group(window: int) -> str:
        """Name of the reference log-prob file of one window (under `ref_logp`)."""
        return f"window_{window:05d}"

    @property
    def old_logp(self) -> Path:
        return self.root / "old_logp"

    @staticmethod
    def old_logp_group(round_: int) -> str:
        """Name of the π_old log-prob file of one GRPO round (under `old_logp`)."""
        _check_round(round_)
        return f"round_{round_:03d}"

    @property
    def policy_export(self) -> Path:
        return self.root / "hf" / "policy"

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def server_log(self) -> Path:
        return self.root / "logs" / "vllm.log"

    @property
    def rollout_command_log(self) -> Path:
        return self.root / "rollouts" / "vllm_server.log"

    def _round_file(self, stage: str, round_: int) -> Path:
        _check_round(round_)
        return self.root / stage / f"round_{round_:03d}.jsonl"


def _check_round(round_: int) -> None:
    if not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"round must be an integer >= 0, got {round_!r}")


# -- sequence keys ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeqKey:
    """A parsed sequence key. `round` and `sample_index` are None for an expert demonstration."""

    kind: str  # "expert" | "rollout"
    problem_id: str
    round: Optional[int] = None
    sample_index: Optional[int] = None

    @property
    def is_expert(self) -> bool:
        return self.kind == "expert"


def expert_key(problem_id: str) -> str:
    """`e/<problem id>`: the expert demonstration of a problem."""
    return f"e/{problem_id}"


def rollout_key(round_: int, problem_id: str, sample_index: int) -> str:
    """`r<round>/<problem id>/<sample index>`: one rollout of one round."""
    return f"r{round_}/{problem_id}/{sample_index}"


def parse_key(key: str) -> SeqKey:
    """The parts of a key made by `expert_key` or `rollout_key` (problem ids may contain `/`).
    Raises ValueError naming the key when it is neither."""
    if key.startswith("e/") and len(key) > 2:
        return SeqKey("expert", key[2:])
    head, sep, rest = key.partition("/")
    pid, sep2, j = rest.rpartition("/")
    if key.startswith("r") and sep and sep2 and pid and head[1:].isdigit() and j.isdigit():
        return SeqKey("rollout", pid, int(head[1:]), int(j))
    raise ValueError(f"sequence key {key!r} is neither 'e/<problem>' nor 'r<round>/<problem>/<j>'")


def is_expert_key(key: str) -> bool:
    return parse_key(key).is_expert
