"""Sample n completions per item into a resumable JSONL: the one loop behind the rollout stage
(RUN/rollouts/round_R.jsonl, `rollout/stage.py`) and evaluation (OUT/samples/<bench>.jsonl,
`eval/runner.py`).

A file holds n records per item (one per sample index 0..n-1), identified by one id field. Each
item's n records are appended together, flushed and fsync'ed as soon as the server returns them
(`records.RecordWriter`), so a killed job loses at most the items in flight. On restart
`SampleFile.complete_ids` reads the file back: items with all n samples are kept and skipped; the
lines of an item left incomplete by the kill, and a torn last line, are removed (with a warning)
and that item is generated again. Callers derive every seed from (base seed, item key) only
(`rollout.client.prompt_seed`), so a resumed job produces the same samples as an uninterrupted one.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_rasft.records import RecordError, RecordWriter, read_records, write_records


@dataclass(frozen=True)
class SampleFile:
    """One resumable samples file.

    path: the JSONL file; record_type: its record class (it has a `sample_index` field);
    n: samples per item; id_field: the record field naming the item ("problem_id", "id");
    check(record, where): an extra rule for every record read back (e.g. "of this round"); it
    raises `RecordError` starting with `where` ("FILE: record #N").
    """

    path: Path
    record_type: type
    n: int
    id_field: str = "problem_id"
    check: Optional[Callable] = None

    def complete_ids(self) -> set:
        """Ids of the items with all n samples (sample indices exactly 0..n-1). Rewrites the file
        (atomically) without the other items' lines and without a torn last line, with a warning
        naming the dropped items, so that they can be appended anew. A record whose sample index
        is outside 0..n-1 raises `RecordError` naming the file and record: the file was written
        with another n, and mixing them would be silent."""
        path = Path(self.path)
        if not path.exists():
            return set()
        records = list(read_records(path, self.record_type))
        by_id = defaultdict(list)
        for num, r in enumerate(records, start=1):
            where = f"{path}: record #{num}"
            if self.check is not None:
                self.check(r, where)
            item = getattr(r, self.id_field)
            if not 0 <= r.sample_index < self.n:
                raise RecordError(f"{where} ({self.id_field} {item!r}) has sample_index {r.sample_index}, "
                                  f"outside 0..{self.n - 1}: was the file written with another number of "
                                  f"samples per item? Write a new file (another round or output) or remove it")
            by_id[item].append(r.sample_index)
        complete = {i for i, js in by_id.items() if sorted(js) == list(range(self.n))}
        if len(complete) < len(by_id) or not path.read_bytes().endswith(b"\n"):
            dropped = sorted(set(by_id) - complete)
            if dropped:
                warnings.warn(f"{path}: dropping {len(dropped)} incompletely written item(s) {dropped[:5]} "
                              f"to regenerate them", stacklevel=2)
            write_records(path, [r for r in records if getattr(r, self.id_field) in complete])
        return complete

    def sample(self, generate: Callable, prompts: Sequence, sampling, keys: Sequence[str],
               records_of: Callable[[int, list], list]) -> int:
        """Generate `sampling.n` completions for each prompt and append each prompt's records as
        one flushed batch as soon as they arrive; -> the number of records written.

        generate(prompts, sampling, keys=, on_result=): the `rollout.client.Generator` seam;
        keys: one per prompt, the per-prompt seed's key; records_of(i, completions): the records
        of prompt i (n of them, sample indices 0..n-1, in this file's record type).
        Errors of `generate` propagate; the batches already written stay.
        """
        if sampling.n != self.n:
            raise ValueError(f"{self.path}: sampling.n = {sampling.n}, but the file holds {self.n} per item")
        written = 0
        with RecordWriter(self.path) as writer:
            def on_result(i: int, completions: list) -> None:
                nonlocal written
                batch = list(records_of(i, completions))
                writer.write_batch(batch)
                written += len(batch)

            generate(prompts, sampling, keys=list(keys), on_result=on_result)
        return written
