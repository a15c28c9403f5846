"""The resumable sampler (`rollout/sampler.py`) behind the rollout stage and eval: which items count
as done, what a restart keeps and regenerates, and the errors for a file written otherwise. The
expected files are written out by hand here (line lists), not recomputed with the sampler."""
import json

import pytest

from helpers.tiny import ScriptedGenerator
from megatron_rasft.config import SamplingConfig
from megatron_rasft.records import EvalSample, Problem, RecordError, Rollout, read_records, write_records
from megatron_rasft.rollout.stage import rollout_file, rollout_round
from megatron_rasft.rundir import RunDir


def _rollouts(path, spec, round_=0):
    """spec: [(problem id, sample index), ...] in file order."""
    write_records(path, [Rollout(pid, round_, j, f"{pid}.{j}", [1]) for pid, j in spec])


def test_complete_ids_counts_only_all_n_distinct_samples(tmp_path):
    path = tmp_path / "round_000.jsonl"
    # a: 0..2 (complete, out of order); b: n-1 samples; c: a duplicate instead of sample 2; d: complete.
    spec = [("a", 2), ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1), ("c", 1),
            ("d", 0), ("d", 1), ("d", 2)]
    _rollouts(path, spec)
    with pytest.warns(UserWarning, match=r"dropping 2 incompletely written item\(s\) \['b', 'c'\]"):
        assert rollout_file(path, 0, 3).complete_ids() == {"a", "d"}
    kept = [(r.problem_id, r.sample_index) for r in read_records(path, Rollout)]
    assert kept == [("a", 2), ("a", 0), ("a", 1), ("d", 0), ("d", 1), ("d", 2)]  # file order kept


def test_torn_tail_is_cut_and_its_problem_regenerated(tmp_path):
    path = tmp_path / "round_000.jsonl"
    _rollouts(path, [("a", 0), ("a", 1)])
    whole = path.read_text()
    path.write_text(whole + whole.splitlines(keepends=True)[0][:20])  # a torn third line
    with pytest.warns(UserWarning):
        assert rollout_file(path, 0, 2).complete_ids() == {"a"}
    assert path.read_text() == whole


def test_records_of_another_round_or_n_name_the_file_and_record(tmp_path):
    path = tmp_path / "round_001.jsonl"
    _rollouts(path, [("a", 0), ("a", 1)], round_=1)
    with pytest.raises(RecordError, match=rf"{path}: record #1 has round 1, expected 2"):
        rollout_file(path, 2, 2).complete_ids()
    with pytest.raises(RecordError, match=rf"{path}: record #2 \(problem_id 'a'\) has sample_index 1, outside 0..0"):
        rollout_file(path, 1, 1).complete_ids()


def test_rollout_round_regenerates_a_problem_left_one_sample_short(tmp_path):
    write_records(RunDir(tmp_path).problems, [Problem(id=f"p{i}", prompt=f"Q{i}", response="x") for i in range(3)])
    gen = ScriptedGenerator(lambda prompt, key, j: f"{key}|{j}")
    sampling = SamplingConfig(n=3, seed=5)
    rollout_round(tmp_path, 0, gen, sampling)
    path = RunDir(tmp_path).rollouts(0)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:8]))  # p2 keeps samples 0 and 1 of 3
    with pytest.warns(UserWarning, match="p2"):
        stats = rollout_round(tmp_path, 0, gen, sampling)
    assert stats["problems"] == 1 and stats["skipped"] == 2 and gen.calls[-1] == ["0:p2"]
    assert path.read_text() == "".join(lines)  # same seeds, same records, same order


def test_eval_regenerates_a_problem_left_one_sample_short(tmp_path):
    from megatron_rasft.eval.runner import evaluate

    problems = [{"prompt": f"Q:{a}+1;A:", "answer": str(a + 1)} for a in range(3)]
    script = ScriptedGenerator(lambda prompt, key, j: "\\boxed{%d}" % (int(prompt[2:-5]) + 1 + j))
    first = evaluate(script, {"b": problems}, SamplingConfig(n=2, seed=3), tmp_path, template="plain")
    path = tmp_path / "samples" / "b.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert [json.loads(x)["sample_index"] for x in lines] == [0, 1, 0, 1, 0, 1]
    path.write_text("".join(lines[:3] + lines[4:]))  # problem "1" keeps one of its 2 samples
    with pytest.warns(UserWarning, match=r"\['1'\]"):
        again = evaluate(script, {"b": problems}, SamplingConfig(n=2, seed=3), tmp_path, template="plain")
    assert script.calls == [["b:0", "b:1", "b:2"], ["b:1"]]
    assert sorted(path.read_text().splitlines(keepends=True)) == sorted(lines) and again == first
    assert first["b"]["avg@n"] == pytest.approx(0.5)  # sample 0 right, sample 1 off by one
    # A samples file written with another n is refused with the file and record named.
    write_records(tmp_path / "x.jsonl", [EvalSample("b", "0", 3, "", "", None, False, "wrong")])
    from megatron_rasft.eval.runner import samples_file

    with pytest.raises(RecordError, match=r"x.jsonl: record #1 \(id '0'\) has sample_index 3, outside 0..1"):
        samples_file(tmp_path / "x.jsonl", 2).complete_ids()


def test_session_stops_only_a_server_it_owns(tmp_path, monkeypatch):
    """eval hands `RolloutSession.open` the caller's running `RolloutServer` (the demo's): closing
    the session must leave it running; a server the session started is stopped. (`stop` is
    recorded instead of run: no vLLM process here; starting and attaching are tested against the
    real server in test_rollout_server.py / test_eval.py.)"""
    from megatron_rasft.config import ServerConfig
    from megatron_rasft.rollout.server import RolloutServer
    from megatron_rasft.rollout.session import RolloutSession

    stopped = []
    monkeypatch.setattr(RolloutServer, "stop", lambda self, timeout_s=20.0: stopped.append(self))
    theirs = RolloutServer(tmp_path, ServerConfig())
    theirs.url = "http://127.0.0.1:9"
    with RolloutSession.open(theirs, ServerConfig(), progress=False) as session:
        assert session.server is theirs and not session.owns and session.label == str(tmp_path)
    assert stopped == []
    with RolloutSession(theirs, session.client) as own:  # as `open` returns a server it started
        assert own.owns
    assert stopped == [theirs]
