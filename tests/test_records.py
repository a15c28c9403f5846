"""Records: round trip, strict errors with line numbers, torn-tail recovery for resumable stages."""
import json

import pytest

from megatron_rasft.records import (Problem, ProblemVerdicts, RecordError, RecordWriter, Rollout,
                                    Verdict, Weight, finished_problem_ids, read_records, to_line,
                                    write_records)


def _examples():
    return [Problem("p1", "Q?", "A \\boxed{1}", answer="1", meta={"src": "t"}),
            Rollout("p1", 0, 0, "text", [1, 2, 3], logprobs=[-0.1, -0.2, -0.3], seed=7, finish_reason="stop"),
            Verdict("p1", 0, 0, True, "correct", "1"),
            ProblemVerdicts("p1", 0, "A", [{"sample_index": 0, "text": "t", "correct": True,
                                            "reason": "correct", "extracted": "1"}]),
            Weight("p1", 0, "expert", None, 0.6, 0.5, 1, 2)]


def test_round_trip(tmp_path):
    path = tmp_path / "r.jsonl"
    write_records(path, _examples())
    first = json.loads(path.read_text().splitlines()[0])
    assert first["schema_version"] == 1 and first["type"] == "problem"
    assert list(read_records(path)) == _examples()


@pytest.mark.parametrize("line,match", [
    ("{not json", "not valid JSON"),
    ('{"schema_version": 1, "type": "weight", "problem_id": "p"}', "missing required field"),
    ('{"schema_version": 2, "type": "verdict"}', "schema_version must be 1"),
    ('{"schema_version": 1, "type": "nope"}', "unknown record type"),
    ('{"schema_version": 1, "type": "verdict", "problem_id": "p", "round": 0, "sample_index": 0, '
     '"correct": true, "reason": "x", "colour": 1}', "unknown field"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_line_is_reported_with_path_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(to_line(_examples()[2]) + "\n" + line + "\n" + to_line(_examples()[2]))
    with pytest.raises(RecordError, match=match) as e:
        list(read_records(path))
    assert f"{path}:3:" in str(e.value)


def test_missing_fields_are_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"schema_version": 1, "type": "rollout", "problem_id": "p", "round": 0}\n')
    with pytest.raises(RecordError, match="sample_index, text, token_ids"):
        list(read_records(path))


def test_wrong_type_expected(tmp_path):
    path = tmp_path / "w.jsonl"
    write_records(path, [_examples()[0]])
    with pytest.raises(RecordError, match="expected a 'verdict' record, got 'problem'"):
        list(read_records(path, Verdict))


def test_torn_tail_is_ignored_then_truncated_and_nothing_finished_is_lost(tmp_path):
    path = tmp_path / "v.jsonl"
    with RecordWriter(path) as w:
        w.write_batch([Verdict("a", 0, 0, True, "correct"), Verdict("b", 0, 0, False, "wrong")])
    torn = to_line(Verdict("c", 0, 0, True, "correct"))[:25]
    with open(path, "a") as f:  # what a kill mid-write leaves behind
        f.write(torn)
    with pytest.warns(UserWarning, match="partially written"):
        assert finished_problem_ids(path, Verdict) == {"a", "b"}
    with pytest.warns(UserWarning, match="truncating"):
        w = RecordWriter(path)
    w.write_batch([Verdict("c", 0, 0, True, "correct")])
    w.close()
    assert [v.problem_id for v in read_records(path)] == ["a", "b", "c"]
    # A bad line that is NOT the last one is an error, never skipped.
    path.write_text(path.read_text().replace('"b"', '"b', 1))
    with pytest.raises(RecordError, match=":2:"):
        finished_problem_ids(path, Verdict)


def test_finished_ids_of_missing_file_and_problems(tmp_path):
    assert finished_problem_ids(tmp_path / "none.jsonl", Verdict) == set()
    write_records(tmp_path / "p.jsonl", [_examples()[0]])
    assert finished_problem_ids(tmp_path / "p.jsonl", Problem) == {"p1"}
    with pytest.raises(FileNotFoundError, match="none.jsonl"):
        list(read_records(tmp_path / "none.jsonl"))


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    from megatron_rasft.records import write_atomic

    path = tmp_path / "sub" / "state.json"
    assert write_atomic(path, '{"step": 1}\n') == path and path.read_text() == '{"step": 1}\n'
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"

    def dies_half_way(f):
        f.write(b'{"step": 2, "half')
        raise KeyboardInterrupt  # a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies_half_way)
    assert path.read_bytes() == b"\x00\x01"  # the reader still sees the whole old file
    assert (path.parent / "state.json.tmp").exists()  # what the dead writer left beside it
    write_atomic(path, lambda f: f.write("é".encode()))
    assert path.read_text(encoding="utf-8") == "é" and [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_replace_dir_swaps_a_finished_folder_in(tmp_path):
    from megatron_rasft.records import replace_dir

    out, new = tmp_path / "hf", tmp_path / ".hf.tmp"
    for content in ("old", "new"):
        new.mkdir()
        (new / "config.json").write_text(content)
        replace_dir(new, out)
        assert (out / "config.json").read_text() == content and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the old folder is gone
    (tmp_path / "f").write_text("a file")
    new.mkdir()
    replace_dir(new, tmp_path / "f")
    assert (tmp_path / "f").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["f", "hf"]


def test_round_result_and_start_round_trip_with_typed_queue_items(tmp_path):
    from megatron_rasft.records import QueueItem, RoundResult, RoundStart

    result = RoundResult(3, [QueueItem("e/p", 0.25), QueueItem("r3/p/1", 0.5)], {"q": 1}, {"problems": 1},
                         {"rollout": 1.5})
    start = RoundStart(3, ["p"], "/x/hf", [1, 2], [-0.5, -0.25], ["p"], [], [], {"q": 1})
    write_records(tmp_path / "r.json", [result])
    write_records(tmp_path / "s.json", [start])
    (got,) = read_records(tmp_path / "r.json", RoundResult)
    assert got == result and all(isinstance(it, QueueItem) for it in got.items)
    assert read_records(tmp_path / "s.json", RoundStart).__next__() == start
    bad = to_line(result).replace('"weight": 0.25}', '"w": 0.25}')
    (tmp_path / "bad.json").write_text(bad)
    with pytest.raises(RecordError, match="queue item"):
        list(read_records(tmp_path / "bad.json"))


def test_old_loop_state_and_old_run_directory_are_refused_in_one_line(tmp_path):
    """The queue's items became typed (`QueueItem`) and the round result holds them: a checkpoint's
    loop state of the old format, and an old run directory's round records, are refused with one
    line that names the file and what to do."""
    from megatron_rasft.records import QueueItem
    from megatron_rasft.rounds.round import Rounds
    from megatron_rasft.rundir import RunDir, StaleRunDir
    from megatron_rasft.train.state import LoopState

    state = LoopState(step=2, queue=[[QueueItem("e/p", 0.5)]])
    assert LoopState.from_json(json.loads(json.dumps(state.to_json()))) == state
    old = {"step": 2, "epoch": 0, "cursor": 4, "window": 1, "queue": [[["e/p", 0.5]]], "rounds": [],
           "tokens_trained": 10, "hard_pool": {}, "ahead": []}
    where = tmp_path / "ckpt" / "iter_0000002" / "state.json"
    with pytest.raises(StaleRunDir) as e:
        LoopState.from_json(old, where=where)
    msg = str(e.value)
    assert "\n" not in msg and str(where) in msg and "format 1" in msg and "new train.run_dir" in msg
    with pytest.raises(StaleRunDir) as e:  # the current format number over old-style items
        LoopState.from_json({**old, "format": 2}, where=where)
    msg = str(e.value)
    assert "\n" not in msg and str(where) in msg and "['e/p', 0.5]" in msg and "new train.run_dir" in msg

    run = RunDir(tmp_path / "run")
    run.problems.parent.mkdir(parents=True)
    run.problems.write_text("")  # the rounds' problems file is there already
    run.round_result(0).parent.mkdir(parents=True)
    old_result = {"schema_version": 1, "type": "round_result", "round": 0, "expert_weight": {"p": 0.5},
                  "rollout_items": [["r0/p/1", 0.25]], "hard_pool": {}, "summary": {}, "stage_times": {}}
    run.round_result(0).write_text(json.dumps(old_result) + "\n")
    run.round_start(1).write_text(json.dumps({"round": 1, "problem_ids": ["p"], "hf_dir": "x"}))
    rounds = Rounds(run, data=None, probe=None, stages=None, prompt_template=None)
    for call, path in ((lambda: rounds.read_result(0), run.round_result(0)),
                       (lambda: rounds.read_start(1), run.round_start(1))):
        with pytest.raises(StaleRunDir) as e:
            call()
        assert "\n" not in str(e.value) and str(path) in str(e.value) and "new train.run_dir" in str(e.value)
