"""Typed, versioned JSONL records exchanged between stages (problems → rollouts → verdicts → weights
→ the round result and training sequences the trainer takes; eval samples). Where each file lives
under the run directory: `rundir.py`.

Every line is one JSON object with `schema_version` and `type` plus the dataclass fields. Readers
are strict: a malformed line, an unknown `type`, a wrong version, a missing required field or an
unknown field raises `RecordError` naming the file and line number. The single exception is a last
line without its trailing newline — what a killed writer leaves behind — which readers ignore with
a warning and `RecordWriter` truncates before appending, so a restarted stage never loses finished
records and never crashes on the torn tail.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional

SCHEMA_VERSION = 1


class RecordError(ValueError):
    """A record file (or one of its lines) is not what the schema says."""


@dataclass
class Problem:
    """A training problem. `tests` (code) is a dict: {"format": "humaneval", "test": str,
    "entry_point": str, "code_prefix": str (optional)}, {"format": "mbpp", "asserts": [str, ...],
    "setup": str (optional)} or {"format": "io", "entry_point", "inputs", "reference", "atol"}
    (docs/verify_and_weighting.md). `meta["unverifiable"]`: why the answer is no ground truth."""

    id: str
    prompt: str
    response: str  # the expert demonstration
    answer: Optional[str] = None  # math ground truth; None = last \boxed{} of `response`
    tests: Optional[dict] = None
    meta: dict = field(default_factory=dict)


@dataclass
class Rollout:
    problem_id: str
    round: int
    sample_index: int
    text: str
    token_ids: list
    logprobs: Optional[list] = None
    seed: Optional[int] = None
    finish_reason: Optional[str] = None


@dataclass
class Verdict:
    problem_id: str
    round: int
    sample_index: int
    correct: bool
    reason: str  # correct|wrong|no_answer|timeout|error (math); passed|failed_test|... (code)
    extracted: Optional[str] = None


@dataclass
class ProblemVerdicts:
    """All verdicts of one problem in one round, self-contained for the `weigh` stage: the expert
    response and, in sampling order, each rollout's text with its verdict
    (`{"sample_index", "text", "correct", "reason", "extracted"}`)."""

    problem_id: str
    round: int
    expert_response: str
    rollouts: list


@dataclass
class Weight:
    problem_id: str
    round: int
    kind: str  # "expert" | "rollout"
    sample_index: Optional[int]  # None for the expert demonstration
    weight: float
    p: float
    k: int
    K: int


@dataclass
class TrainSequence:
    """A rollout turned into a training sequence (RUN/train_seqs/round_R.jsonl): `key` is its
    `rundir.rollout_key`, `tokens` the prompt ids + response ids (+ EOS when it stopped), cut to
    seq_length + 1; the loss covers tokens[prompt_len:]. GRPO only (`methods/sequences.py`):
    `advantage` A_j of the rollout, `rollout_logprobs` the server's log-probs of the sampled
    response tokens (tokens[prompt_len:], without an appended EOS)."""

    key: str
    tokens: list
    prompt_len: int
    advantage: Optional[float] = None
    rollout_logprobs: Optional[list] = None


@dataclass
class QueueItem:
    """One sequence waiting in the trainer's queue: its `rundir` key and its weight A (A_E for a
    demonstration, A_s for a rollout, 1 for a GRPO rollout, whose advantage rides on its
    `TrainSequence`). The one form a sequence's weight takes from the round to the loss."""

    key: str
    weight: float

    def __post_init__(self):
        self.weight = float(self.weight)


def _queue_items(items: list, where: str) -> list:
    """`QueueItem`s from what a JSON line holds (objects with `key` and `weight`)."""
    out = []
    for it in items:
        if isinstance(it, QueueItem):
            out.append(it)
        elif isinstance(it, dict) and set(it) == {"key", "weight"}:
            out.append(QueueItem(**it))
        else:
            raise RecordError(f"{where}: a queue item must be {{\"key\", \"weight\"}}, got {it!r}")
    return out


@dataclass
class RoundResult:
    """What one rollout round hands the trainer (RUN/rounds/round_R.json, one record): the one
    record of the weights the trainer trains with.

    items: the queue items the round's window brings, in this order: each problem of the window
        (in the window's order) with its demonstration's A_E (1 for a problem not rolled out), then
        its trained rollouts with their A_s; then the `released` selection's probe demonstrations
        of earlier windows (A = 1 when re-trained, their new A_E and rollouts when rolled out).
        Under grpo: the trained rollouts only (weight 1). `train.state.window_groups` makes the
        queue's groups from them;
    hard_pool: problem id -> times probed, the `released` selection's pool after this round;
    summary: the round's statistics (`weighting.round_summary` plus counts);
    stage_times: seconds spent in this round's stages (export, refresh, rollout, verify).
    """

    round: int
    items: list
    hard_pool: dict
    summary: dict
    stage_times: dict = field(default_factory=dict)

    def __post_init__(self):
        self.items = _queue_items(self.items, f"round_result of round {self.round}")


@dataclass
class RoundStart:
    """What an overlapped round fixes at its window boundary (RUN/rounds/start_R.json, one record),
    so that a resumed run finishes it from the same weights and selection.

    problem_ids: the round's window; hf_dir: the export the server samples from; probe_ids /
    probe_logp: the refresh probe (token ids, their log-probs under that export, by the trainer's
    own forward pass); rollout / probes_retrain / probes_rollout: the selection
    (`methods.selection.select`; `all`: every problem, no probes); hard_pool: the `released`
    selection's pool after the selection.
    """

    round: int
    problem_ids: list
    hf_dir: str
    probe_ids: list
    probe_logp: list
    rollout: list
    probes_retrain: list = field(default_factory=list)
    probes_rollout: list = field(default_factory=list)
    hard_pool: dict = field(default_factory=dict)


@dataclass
class EvalSample:
    """One graded sample of an evaluation (OUT/samples/<benchmark>.jsonl). `gold` is the math
    answer graded against (None for code), `detail` the grader's extra information, if any."""

    benchmark: str
    id: str
    sample_index: int
    prompt: str
    completion: str
    extracted: Optional[str]
    correct: bool
    reason: str
    finish_reason: Optional[str] = None
    num_tokens: Optional[int] = None
    seed: Optional[int] = None
    gold: Optional[str] = None
    detail: Optional[Any] = None


RECORD_TYPES = {"problem": Problem, "rollout": Rollout, "verdict": Verdict,
                "verdicts": ProblemVerdicts, "weight": Weight, "train_sequence": TrainSequence,
                "round_result": RoundResult, "round_start": RoundStart, "eval_sample": EvalSample}
_TYPE_OF = {cls: name for name, cls in RECORD_TYPES.items()}


def to_dict(record) -> dict:
    return {"schema_version": SCHEMA_VERSION, "type": _TYPE_OF[type(record)], **dataclasses.asdict(record)}


def to_line(record) -> str:
    return json.dumps(to_dict(record), ensure_ascii=False) + "\n"


def from_dict(data: Any, where: str, expect: Optional[type] = None):
    """Build a record from a parsed JSON object; `where` ("file:line") prefixes every error."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where}: schema_version must be {SCHEMA_VERSION}, got {version!r}")
    kind = data.get("type")
    cls = RECORD_TYPES.get(kind)
    if cls is None:
        raise RecordError(f"{where}: unknown record type {kind!r}; known: {', '.join(RECORD_TYPES)}")
    if expect is not None and cls is not expect:
        raise RecordError(f"{where}: expected a {_TYPE_OF[expect]!r} record, got {kind!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k not in ("schema_version", "type")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecordError(f"{where}: unknown field(s) for {kind!r}: {', '.join(unknown)}")
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecordError(f"{where}: {kind!r} record is missing required field(s): {', '.join(missing)}")
    return cls(**values)


def read_records(path: str | Path, expect: Optional[type] = None) -> Iterator:
    """Yield the records of a JSONL file in order. A torn last line (no trailing newline) is
    skipped with a warning; any other bad line raises `RecordError` with its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"record file not found: {path}")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # split() leaves "" after a final newline; anything else there is a torn (unterminated) line.
    tail = lines.pop()
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        yield _parse_line(raw, f"{path}:{lineno}", expect)
    if tail.strip():
        try:
            yield _parse_line(tail, f"{path}:{len(lines) + 1}", expect)
        except RecordError as e:
            warnings.warn(f"ignoring a partially written last line ({e})", stacklevel=2)


def _parse_line(raw: bytes, where: str, expect):
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{where}: not valid JSON ({e})") from None
    return from_dict(data, where, expect)


def finished_problem_ids(path: str | Path, expect: type) -> set:
    """Problem ids with a record in `path` (empty if the file does not exist) — resumable stages
    skip them. Uses `problem_id`, or `id` for Problem records."""
    if not Path(path).exists():
        return set()
    key = "id" if expect is Problem else "problem_id"
    return {getattr(r, key) for r in read_records(path, expect)}


def _truncate_torn_tail(path: Path) -> None:
    """Cut a file back to its last newline (the remains of a write interrupted by a kill)."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        warnings.warn(f"{path}: truncating a partially written last line ({len(data) - keep} bytes)",
                      stacklevel=3)
        f.truncate(keep)


class RecordWriter:
    """Append records to a JSONL file; every `write_batch` is flushed and fsync'ed, so after a
    kill at most the batch in flight is lost (and its torn line is truncated on the next open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _truncate_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write_batch(self, records: Iterable) -> None:
        self._file.write("".join(to_line(r) for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_records(path: str | Path, records: Iterable) -> None:
    """Write a whole file of records atomically (`write_atomic`)."""
    write_atomic(path, "".join(to_line(r) for r in records))


# -- atomic writes: the one way a whole file or folder is replaced ---------------------------------

def write_atomic(path: str | Path, data: str | bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Replace the file `path` as a whole: `data` (text as UTF-8, bytes, or a function that writes
    to an open binary file, e.g. `lambda f: torch.save(obj, f)`) goes to `PATH.tmp` beside it,
    which is flushed, fsync'ed and renamed over `path` (`os.replace`, atomic on POSIX). A reader
    sees the old file or the new one, never a torn one; a kill leaves at most a stale `PATH.tmp`,
    overwritten by the next write. Creates the parent folder. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Swap the finished folder `tmp` into place as `out` (same filesystem, e.g. a sibling): an
    existing `out` (folder or file) is first renamed aside to `.OUT.old-PID`, `tmp` renamed to
    `out`, then the old one removed. Readers see the old or the new folder at `out`, except for the
    instant between the two renames, when there is none."""
    import shutil

    tmp, out = Path(tmp), Path(out)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()
