"""The study command (megatron_rasft/demo/study, docs/results.md "Protocol"): its statistics against
independent computations (a hand-made table with a known paired difference; the exact bootstrap
distribution enumerated over every resample of a small problems × seeds table; Holm's worked
example), the report regenerated from summary files, the protocol's refusals, the power formula
against the textbook sample-size formula, the stage runner's CPU accounting and budget stop on real
processes, resumability, and (slow) the whole pipeline on SmolLM2 with tiny settings."""
from __future__ import annotations

import itertools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _summary(arm: str, seed: int, acc: dict, **extra) -> dict:
    """A summary file's content with per-problem accuracies given as (correct, samples)."""
    base = {"study": "t", "seed": seed, "arm": arm, "method": arm, "steps": 4, "lr": 5e-5, "commit": "abc1234",
            "date": "2026-12-06", "problems": {p: list(cn) for p, cn in acc.items()},
            "accuracy": float(np.mean([c / n for c, n in acc.values()])), "loss_tokens": 1000, "rounds": [],
            "time": {"train_wall_s": 100.0, "train_cpu_s_main": 150.0, "train_cpu_s_vllm": 0.0, "export_wall_s": 10.0,
                     "eval_wall_s": 50.0, "load1_mean": 2.0, "invocations": 1,
                     "stages": {"train": 60.0, "reference": 0.0, "rollout": 0.0, "verify": 0.0, "export": 0.0,
                                "refresh": 0.0, "round_wait": 0.0}}}
    base.update(extra)
    return base


def test_paired_difference_and_bootstrap_on_a_known_shift():
    """A = B + 0.25 on every problem of every seed: the difference is exactly +0.25 and every bootstrap
    replicate is too; a table with a shuffled pairing would not give it."""
    from megatron_rasft.demo.study import stats

    rng = np.random.default_rng(3)
    b = {s: {f"p{i}": float(x) for i, x in enumerate(rng.uniform(0, 0.75, size=30))} for s in (1, 2, 3)}
    a = {s: {p: v + 0.25 for p, v in b[s].items()} for s in b}
    a[1]["only_in_a"] = 1.0  # not in both: left out
    d_SP, seeds, ids = stats.paired_table(a, b)
    assert seeds == [1, 2, 3] and len(ids) == 30 and "only_in_a" not in ids
    c = stats.compare(d_SP, n_boot=2000)
    assert abs(c.mean - 0.25) < 1e-12 and c.ci == pytest.approx((0.25, 0.25), abs=1e-12) and c.p == 0.0
    assert c.per_seed == pytest.approx([0.25] * 3) and c.se_problems == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_matches_the_exact_enumerated_distribution():
    """2 seeds × 4 problems: every one of the 2² × 4⁴ equally likely (seed, problem) resamples
    enumerated in plain Python gives the exact bootstrap distribution of the mean; the sampled
    bootstrap's CDF at several points, its mean and the p-value match it within Monte Carlo error."""
    from megatron_rasft.demo.study import stats

    d = [[0.5, -0.25, 0.0, 0.75], [0.25, -0.5, 0.25, 0.0]]
    exact = []
    for si in itertools.product(range(2), repeat=2):
        for pi in itertools.product(range(4), repeat=4):
            exact.append(sum(d[s][p] for s in si for p in pi) / 8)
    exact = sorted(exact)
    boot = stats.bootstrap_means(np.array(d), 40_000, seed=1)
    for x in (-0.2, -0.05, 0.0, 0.1, 0.2, 0.3):
        want = sum(e <= x for e in exact) / len(exact)
        assert abs(float(np.mean(boot <= x)) - want) < 0.01, (x, want)
    assert abs(boot.mean() - sum(exact) / len(exact)) < 0.003
    p_exact = min(1.0, 2 * min(sum(e <= 0 for e in exact), sum(e >= 0 for e in exact)) / len(exact))
    c = stats.compare(np.array(d), n_boot=40_000, seed=2)
    assert abs(c.p - p_exact) < 0.015 and c.mean == pytest.approx(1.0 / 8)
    # The naive SE: SD over problems of the seed-averaged differences / sqrt(4), by hand.
    per_p = [(d[0][j] + d[1][j]) / 2 for j in range(4)]
    m = sum(per_p) / 4
    assert c.se_problems == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in per_p) / 3 / 4))


def test_holm_adjustment_worked_example():
    """Holm's procedure by hand: p = (0.01, 0.04, 0.03) → sorted 0.01·3, 0.03·2, 0.04·1 → made
    non-decreasing: (0.03, 0.06, 0.06)."""
    from megatron_rasft.demo.study import stats

    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_report_regenerates_the_table_from_summary_files(tmp_path):
    """`study report` on hand-made summaries: the accuracies, the primary difference (+10 points: a
    known shift), the secondary with its Holm-adjusted p, the cost ratio, and docs/results.md's
    marked block replaced (the text around it kept)."""
    from megatron_rasft.commands import study as cmd
    from megatron_rasft.cli import main

    res = tmp_path / "results"
    base = {f"q{i}": (i % 5, 4) for i in range(20)}  # accuracies 0, .25, ..., 1
    for seed in (1, 2):
        sft = {p: (max(c - 1, 0), n) for p, (c, n) in base.items()}
        tok = {p: (c, n) for p, (c, n) in base.items()}
        ras = {p: (c, n) if c == 4 else (c + 1, n) for p, (c, n) in base.items()}  # +1 sample where possible
        for arm, acc in (("sft", sft), ("sft_tokens", tok), ("rasft", ras)):
            extra = {"loss_tokens": 2000} if arm != "sft" else {}
            if arm == "rasft":
                extra["time"] = dict(_summary(arm, seed, acc)["time"], train_wall_s=300.0, train_cpu_s_main=200.0)
            path = res / f"seed_{seed}" / f"{arm}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_summary(arm, seed, acc, **extra)))
    proto = tmp_path / "protocol.toml"
    proto.write_text('[study]\nname = "t"\nseeds = [1, 2]\narms = ["sft", "rasft", "sft_tokens"]\n'
                     'primary = ["rasft", "sft_tokens"]\nsecondary = [["rasft", "sft"], ["sft_tokens", "sft"]]\n[analysis]\nbootstrap = 500\n')
    docs = tmp_path / "results.md"
    docs.write_text("# R\nbefore\n<!-- study:t begin -->\nold table\n<!-- study:t end -->\nafter\n")
    assert main(["study", "report", "--protocol", str(proto), "--results", str(res), "--docs", str(docs)]) == 0
    text = (res / "report.md").read_text()
    out = docs.read_text()
    assert "old table" not in out and out.startswith("# R\nbefore\n") and out.endswith("after\n") and text in out
    # By hand: rasft − sft_tokens: +0.25 on the 16 problems with c < 4, 0 on the 4 with c = 4 → +20 points.
    diff = np.mean([0.25 if c < 4 else 0.0 for c, _ in base.values()])
    assert f"| RASFT − SFT (tokens) | primary | 20 × 2 | {100 * diff:+.1f} |" in text, text
    sft_diff = np.mean([(min(c + 1, 4) if c < 4 else 4) / 4 - max(c - 1, 0) / 4 for c, _ in base.values()])
    assert f"| RASFT − SFT (steps) | secondary | 20 × 2 | {100 * sft_diff:+.1f} |" in text, text
    # Two secondaries: their intervals at 1 − 0.05 / 2, the primary's at 95 %; p = 0 stays 0 under Holm.
    assert text.count("(97.5 %)") == 2 and text.count("(95.0 %)") == 1, text
    assert text.count("| 0.000 | 0.000 | significant at α = 0.05 |") == 2, text
    assert "wall time of training, synchronous rounds: 3.00" in text and "CPU-seconds" in text
    acc_sft = np.mean([max(c - 1, 0) / 4 for c, _ in base.values()])
    assert f"| SFT (steps) | 4/4 | {100 * acc_sft:.1f} | {100 * acc_sft:.1f} | {100 * acc_sft:.1f} |" in text
    del cmd


@pytest.mark.parametrize("body, message", [
    ('[study]\narms = ["sft", "rasft", "nope"]\n', "unknown arm 'nope'"),
    ('[study]\nseeds = "1"\n', "study.seeds must be a list, got '1'"),
    ('[arms]\nsteps = 2.5\n', "arms.steps must be an int, got 2.5"),
    ('[arms]\nstep = 2\n', "unknown key arms.step (did you mean arms.steps?)"),
    ('[evaluation]\nn = 2\n', "unknown section [evaluation] (known: study, data, warmup, arms, eval, analysis)"),
    ('[study]\narms = ["sft_tokens", "sft", "rasft"]\nprimary = ["rasft", "sft"]\n', "sft_tokens needs sft and rasft"),
    ('[study]\narms = ["sft", "rasft"]\nprimary = ["rasft", "dft"]\nsecondary = []\n', "is not a pair of two listed"),
    ('[data]\ntest_seed = 10\n', "data.test_seed"),
    ('[study]\narms = ["sft", "rasft"]\nprimary = ["rasft", "sft"]\nsecondary = []\nfirst_seed_only = ["sft"]\n',
     "compares a first-seed-only (cost) arm"),
])
def test_protocol_refuses_bad_input_naming_file_and_key(tmp_path, body, message, capsys):
    from megatron_rasft.cli import main

    proto = tmp_path / "bad.toml"
    proto.write_text(body)
    assert main(["study", "report", "--protocol", str(proto)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(proto) in err, err


def test_committed_protocols_load():
    from megatron_rasft.demo.study import plan, protocol

    for path in sorted((ROOT / "results").glob("*/protocol.toml")):
        p = protocol.load(path)
        assert plan.total_hours(p) < 5.5, path  # the budget of docs/results.md's protocol


def test_power_matches_the_textbook_sample_size():
    """τ = 0, conservative bound: n = ((z_{1−α/2} + z_{0.8}) σ / δ)² (the one-sided-tail textbook
    formula), within one problem; and more seeds help only the optimistic bound."""
    from statistics import NormalDist

    from megatron_rasft.demo.study import power

    sigma, delta = 0.3, 0.03
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    textbook = math.ceil((z * sigma / delta) ** 2)
    got = power.problems_needed(delta, sigma, 0.0, 3)
    assert abs(got - textbook) <= 1, (got, textbook)
    assert power.problems_needed(delta, sigma, 0.0, 3, conservative=False) == pytest.approx(textbook / 3, abs=1)
    assert power.problems_needed(delta, sigma, 0.03, 3) is None  # τ = δ with 3 seeds: no number of problems
    assert 0.79 < power.power(delta, power.se(sigma, 0.0, textbook, 1)) < 0.82


def test_token_matched_steps():
    from megatron_rasft.demo.study.summary import token_matched_steps

    assert token_matched_steps({"seed": 1, "loss_tokens": 1000}, {"loss_tokens": 1600}, 24) == 38
    assert token_matched_steps({"seed": 1, "loss_tokens": 1000}, {"loss_tokens": 800}, 24) == 24
    with pytest.raises(ValueError, match="seed 1"):
        token_matched_steps({"seed": 1, "loss_tokens": 0}, {"loss_tokens": 800}, 24)


def test_stage_runner_counts_cpu_and_stops_the_whole_tree(tmp_path):
    """A real command that spawns a busy child: its CPU-seconds are counted (the child's too), its
    progress lines echoed; `stop_when` terminates parent and child (no process left)."""
    import psutil

    from megatron_rasft.demo.study.stages import run_stage

    busy = "import time\nt=time.process_time()\nwhile time.process_time()-t<1.0: pass\n"  # 1 CPU-second each
    script = (f"import subprocess, sys\nprint('step 1/1', flush=True)\n"
              f"subprocess.run([sys.executable, '-c', {busy!r}])\n{busy}")
    echoed = []
    u = run_stage(["-c", script], tmp_path / "a.log", tag="a", interval_s=0.2,
                  out=lambda s, flush=True: echoed.append(s))
    assert u["exit"] == 0 and not u["stopped"] and echoed == ["   [a] step 1/1"]
    # 2 CPU-seconds of loops plus two interpreters' start; each process's last 0.2 s may be missed.
    assert 1.5 < u["cpu_s_main"] < 4.0 and u["cpu_s_vllm"] == 0.0, u
    # A child of a process whose command line names vllm (as the server's engine core, started by
    # multiprocessing, is) counts as the server's.
    server = f"import subprocess, sys  # vllm\nsubprocess.run([sys.executable, '-c', {busy!r}])\n"
    u = run_stage(["-c", server], tmp_path / "v.log", tag="v", interval_s=0.2)
    assert u["cpu_s_vllm"] > 0.7 and u["cpu_s_main"] < 0.3, u
    pid_file = tmp_path / "child.pid"
    forever = (f"import subprocess, sys, time\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
               f"open({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(600)\n")
    t0 = time.time()
    u = run_stage(["-c", forever], tmp_path / "b.log", tag="b", interval_s=0.2,
                  stop_when=lambda: pid_file.is_file() and time.time() - t0 > 1.0)
    assert u["stopped"] and u["wall_s"] < 60
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_keep_seeds_leaves_the_cost_arms_on_the_protocols_first_seed():
    """`study run --seeds` (a rerun of one seed): the cost arms run for the protocol's first seed only,
    so a subset without it has none, and a subset with it keeps them on that seed (expected lists by hand)."""
    from megatron_rasft.demo.study import protocol

    def section():
        return protocol.StudySection(seeds=[1, 2, 3], arms=["warmup", "sft", "rasft", "sft_tokens", "rasft_overlap"],
                                     first_seed_only=["warmup", "rasft_overlap"])

    s = section()
    s.keep_seeds([2])
    assert s.units() == [(2, "sft"), (2, "rasft"), (2, "sft_tokens")]
    s = section()
    s.keep_seeds([3, 1])
    assert s.units() == [(1, "sft"), (1, "rasft"), (1, "sft_tokens"), (3, "sft"), (3, "rasft"), (3, "sft_tokens"),
                         (1, "warmup"), (1, "rasft_overlap")]
    with pytest.raises(ValueError, match=r"--seeds 2,7: \[7\] not among the protocol's seeds \[1, 2, 3\]"):
        section().keep_seeds([2, 7])


def test_run_skips_finished_units_and_stops_on_budget(tmp_path, monkeypatch):
    """Resumability and the budget, around the units (the units themselves are the slow test's): a unit
    whose summary exists is skipped; with the budget spent no unit starts and the exit code is 3."""
    from megatron_rasft.demo.study import protocol, runner

    p = protocol.smoke()
    p.study.seeds = [1, 2]
    p.study.arms = ["sft", "rasft", "rasft_overlap"]
    p.study.first_seed_only = ["rasft_overlap"]
    res = tmp_path / "res"
    (res / "seed_1").mkdir(parents=True)
    (res / "seed_1" / "sft.json").write_text("{}")
    ran = []
    monkeypatch.setattr(runner.Study, "prepare", lambda self: None)
    monkeypatch.setattr(runner.Study, "warmup", lambda self: tmp_path / "warm")

    def unit(self, seed, arm, warm):
        ran.append((seed, arm))
        (res / f"seed_{seed}" / f"{arm}.json").parent.mkdir(parents=True, exist_ok=True)
        (res / f"seed_{seed}" / f"{arm}.json").write_text("{}")

    monkeypatch.setattr(runner.Study, "unit", unit)
    logs = []
    assert runner.Study(p, tmp_path / "out", res, log=lambda s, flush=True: logs.append(s)).run() == 0
    assert ran == [(1, "rasft"), (2, "sft"), (2, "rasft"), (1, "rasft_overlap")]  # the cost arm last, once
    assert any("seed_1/sft: already done, skipped" in s for s in logs) and any("run ETA" in s for s in logs)
    (res / "seed_2" / "rasft.json").unlink()
    ran.clear()
    assert runner.Study(p, tmp_path / "out", res, budget_hours=1e-9, log=lambda s, flush=True: logs.append(s)).run() == 3
    assert ran == [] and "budget spent before seed_2/rasft" in logs[-1]


@pytest.mark.slow  # ~6-10 min on 2 cores: prepares SmolLM2, 3 training runs, 2 vLLM evaluations, a round's server
def test_smoke_study_end_to_end(tmp_path):
    """`study run --smoke` (SmolLM2, two arms, one seed, 1 warm-up + 2 steps each, a real round) then
    `study report --smoke`: summaries with per-problem results and per-stage times; a second `run`
    skips everything."""
    import subprocess

    out, res = tmp_path / "out", tmp_path / "res"
    cmd = [sys.executable, "-m", "megatron_rasft", "study", "run", "--smoke", "--out", str(out), "--results", str(res)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sft, ras = (json.loads((res / "seed_1" / f"{a}.json").read_text()) for a in ("sft", "rasft"))
    assert len(sft["problems"]) == 4 and sft["problems"].keys() == ras["problems"].keys()
    assert sft["steps"] == ras["steps"] == 2 and ras["rounds"] and ras["time"]["stages"]["rollout"] > 0
    assert ras["time"]["train_cpu_s_vllm"] > 0 and sft["time"]["train_cpu_s_vllm"] == 0
    assert not (out / "seed_1" / "rasft" / "ckpt").exists()  # deleted once its summary is written
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0 and r2.stdout.count("already done, skipped") == 3, r2.stdout  # shared + 2 units
    rep = subprocess.run([sys.executable, "-m", "megatron_rasft", "study", "report", "--smoke", "--results", str(res),
                          "--docs", ""], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert rep.returncode == 0 and "| RASFT − SFT (steps) | primary | 4 × 1 |" in rep.stdout, rep.stdout + rep.stderr
    assert rep.stdout.startswith("Regenerated by `python -m megatron_rasft study report --smoke"), rep.stdout


def test_solvability_histogram():
    from megatron_rasft.demo.study.power import solvability

    got = solvability({"a/1/0": [0, 4], "a/1/1": [2, 4], "b/1/0": [4, 4], "a/1/2": [2, 4]})
    assert got == {"a": [1, 0, 2, 0, 0], "b": [0, 0, 0, 0, 1]}
    with pytest.raises(ValueError, match="a/1/1: 2 samples"):
        solvability({"a/1/0": [0, 4], "a/1/1": [1, 2]})


def test_power_command_on_pilot_summaries(tmp_path, capsys):
    """`study power` reads a pilot's summaries: the SD over problems of the paired difference, by hand."""
    from megatron_rasft.cli import main

    a = {f"t/1/{i}": (i % 5, 4) for i in range(10)}
    b = {f"t/1/{i}": ((i * 3) % 5, 4) for i in range(10)}
    for arm, acc in (("rasft", a), ("sft", b)):
        (tmp_path / "seed_0").mkdir(exist_ok=True)
        (tmp_path / "seed_0" / f"{arm}.json").write_text(json.dumps(_summary(arm, 0, acc)))
    assert main(["study", "power", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    d = np.array([a[k][0] / 4 - b[k][0] / 4 for k in a])
    assert f"rasft − sft = {100 * d.mean():+.1f} points over 10 problems, SD over problems {100 * d.std(ddof=1):.1f}" in out
    assert "| seeds | τ (points) |" in out and "t                10 problems  [2, 2, 2, 2, 2]" in out, out
    # The sampling noise by hand: the unbiased variance of a mean of 4 Bernoulli draws, both arms, averaged.
    var_e = np.mean([sum((c / 4) * (1 - c / 4) / 3 for c in (a[k][0], b[k][0])) for k in a])
    assert f"sampling noise (σ_e, measured per problem): {100 * np.sqrt(var_e):.1f} points" in out, out


def test_units_build_summaries_from_their_stage_outputs(tmp_path, monkeypatch):
    """The unit logic around the stages (the stages themselves run in the slow smoke test): with a
    stand-in for `run_stage` that writes what each command writes (a checkpoint with its step,
    metrics lines, an export's config.json, graded samples), a seed's sft, rasft and sft_tokens
    units give summaries with the problems' own ids, the loss tokens summed, the token-matched step
    count from their ratio, and each arm's checkpoints deleted once exported."""
    from megatron_rasft.demo.study import protocol, runner
    from megatron_rasft.records import EvalSample, write_records

    p = protocol.smoke()
    p.study.arms = ["sft", "rasft", "sft_tokens"]
    out, res = tmp_path / "out", tmp_path / "res"
    (out / "data").mkdir(parents=True)
    ids = ["chain_sum/2000000/0", "leg_counting/2000000/0", "chain_sum/2000000/1"]
    (out / "data" / "test.jsonl").write_text("".join(json.dumps({"id": i, "question": "q", "answer": "1"}) + "\n"
                                                     for i in ids))
    tokens = {"sft": 100, "rasft": 175, "sft_tokens": 100}
    calls, export_text = [], ["{}"]

    def fake_stage(args, log, *, tag, stop_when=None, out=print):
        args = [str(a) for a in args]
        calls.append(tag)
        if "train" in args:
            sets = dict(a.split("=", 1) for a in args if "=" in a)
            run, steps = Path(sets["train.run_dir"]), int(sets["train.schedule.train_iters"])
            arm = run.name
            ck = run / "ckpt" / f"iter_{steps:07d}"
            (ck / "model").mkdir(parents=True)
            (ck / "state.json").write_text(json.dumps({"step": steps}))
            (run / "ckpt" / "latest").write_text(ck.name)
            with (run / "metrics.jsonl").open("w") as f:
                for s in range(1, steps + 1):
                    f.write(json.dumps({"kind": "train", "step": s, "tokens": tokens.get(arm, 50),
                                        "time_train": 2.0 * s}) + "\n")
        elif "mcore-to-hf" in args:
            dest = Path(args[args.index("--out") + 1])
            dest.mkdir(parents=True)
            (dest / "config.json").write_text(export_text[0])
        elif "eval" in args:
            dest = Path(args[args.index("--out") + 1])
            arm = dest.name
            write_records(dest / "samples" / "heldout.jsonl",
                          [EvalSample("heldout", str(i), j, "p", "c", None, (i + j + (arm == "rasft")) % 2 == 0, "")
                           for i in range(3) for j in range(2)])
            (dest / "results.json").write_text("{}")
        return {"exit": 0, "stopped": False, "wall_s": 10.0, "cpu_s_main": 15.0, "cpu_s_vllm": 5.0,
                "load1_mean": 1.0}

    monkeypatch.setattr(runner, "run_stage", fake_stage)
    warm = tmp_path / "warm" / "model"
    study = runner.Study(p, out, res, log=lambda s, flush=True: None)
    for arm in p.study.arms:
        study.unit(1, arm, warm)
    sft, ras, tok = (json.loads((res / "seed_1" / f"{a}.json").read_text()) for a in p.study.arms)
    assert sorted(sft["problems"]) == sorted(ids) and sft["problems"]["chain_sum/2000000/0"] == [1, 2]
    assert ras["problems"]["leg_counting/2000000/0"] == [1, 2] and ras["loss_tokens"] == 2 * 175
    assert tok["steps"] == round(2 * 175 / 100) == 4 and tok["loss_tokens"] == 4 * 100
    assert sft["time"]["train_wall_s"] == 10.0 and sft["time"]["eval_wall_s"] == 10.0 and sft["time"]["stages"]["train"] == 4.0
    assert not (out / "seed_1" / "rasft" / "ckpt").exists() and not (out / "hf" / "seed_1_rasft").exists()
    # A rerun of a unit whose export and evaluation exist trains nothing.
    calls.clear()
    (res / "seed_1" / "sft.json").unlink()
    (out / "hf" / "seed_1_sft").mkdir(parents=True)
    (out / "hf" / "seed_1_sft" / "config.json").write_text("{}")
    again = study.unit(1, "sft", warm)
    assert calls == [] and again["problems"] == sft["problems"] and again["time"]["train_wall_s"] == 10.0
    # Training redone to another model: the old model's evaluation folder is not reused (nor resumed from).
    (res / "seed_1" / "sft.json").unlink()
    shutil.rmtree(out / "seed_1" / "sft")
    export_text[0] = '{"changed": true}'
    logs = []
    study.log = lambda s, flush=True: logs.append(s)
    (out / "eval" / "seed_1" / "sft" / "stale_marker").write_text("")
    study.unit(1, "sft", warm)
    assert calls == ["seed_1/sft train", "export seed_1_sft", "eval seed_1/sft"], calls
    assert not (out / "eval" / "seed_1" / "sft" / "stale_marker").exists()
    assert any("holds the evaluation of another export" in s for s in logs), logs


def test_compare_reruns_flags_one_changed_problem(tmp_path, capsys):
    """`study compare`: equal outcomes (times and dates may differ) give exit 0; one problem's count
    changed, or a round's histogram, gives exit 1 and names the unit."""
    from megatron_rasft.cli import main

    acc = {f"t/1/{i}": (i % 5, 4) for i in range(10)}
    first, rerun = tmp_path / "first", tmp_path / "rerun"
    for folder, wall in ((first, 100.0), (rerun, 250.0)):
        for arm in ("sft", "rasft"):
            s = _summary(arm, 2, acc)
            s["time"] = {"train_wall_s": wall}
            s["rounds"] = [{"round": 0, "hist": {"t": [1, 2, 3, 0, 4]}, "rollouts_added": 7,
                            "stage_times": {"rollout": wall}}] if arm == "rasft" else []
            (folder / "seed_2").mkdir(parents=True, exist_ok=True)
            (folder / "seed_2" / f"{arm}.json").write_text(json.dumps(s))
    assert main(["study", "compare", "--results", str(first), "--rerun", str(rerun)]) == 0
    out = capsys.readouterr().out
    assert "| seed 2 RASFT | 50.0000 % | 50.0000 % | 0 of 10 |" in out and "1 equal | yes |" in out, out
    assert out.rstrip().endswith(f"identical: {rerun} against {first}"), out
    s = json.loads((rerun / "seed_2" / "sft.json").read_text())
    s["problems"]["t/1/3"] = [2, 4]
    (rerun / "seed_2" / "sft.json").write_text(json.dumps(s))
    assert main(["study", "compare", "--results", str(first), "--rerun", str(rerun)]) == 1
    out = capsys.readouterr().out
    assert "| seed 2 SFT (steps) | 50.0000 % | 50.0000 % | 1 of 10 |" in out and "| no |" in out, out
    assert "NOT identical" in out
    (rerun / "seed_2" / "sft.json").write_text((first / "seed_2" / "sft.json").read_text())
    r = json.loads((rerun / "seed_2" / "rasft.json").read_text())
    r["rounds"][0]["hist"]["t"] = [2, 1, 3, 0, 4]
    (rerun / "seed_2" / "rasft.json").write_text(json.dumps(r))
    assert main(["study", "compare", "--results", str(first), "--rerun", str(rerun)]) == 1
    assert "| differ | no |" in capsys.readouterr().out


def test_a_training_stage_stopped_by_the_budget_keeps_its_usage(tmp_path, monkeypatch):
    """A training invocation stopped at a checkpoint by the budget raises BudgetSpent and its measured
    usage is recorded, so the resumed unit's training time is that of both invocations."""
    from megatron_rasft.demo.study import protocol, runner

    def fake_stage(args, log, *, tag, stop_when=None, out=print):
        sets = dict(str(a).split("=", 1) for a in args if "=" in str(a))
        run = Path(sets["train.run_dir"])
        stopped = stop_when is not None
        step = 2 if stopped else int(sets["train.schedule.train_iters"])
        ck = run / "ckpt" / f"iter_{step:07d}"
        (ck / "model").mkdir(parents=True, exist_ok=True)
        (ck / "state.json").write_text(json.dumps({"step": step}))
        (run / "ckpt" / "latest").write_text(ck.name)
        return {"exit": 0, "stopped": stopped, "wall_s": 7.0 if stopped else 10.0, "cpu_s_main": 1.0,
                "cpu_s_vllm": 0.0, "load1_mean": 1.0}

    monkeypatch.setattr(runner, "run_stage", fake_stage)
    p = protocol.smoke()
    run = tmp_path / "out" / "seed_1" / "sft"
    study = runner.Study(p, tmp_path / "out", tmp_path / "res", budget_hours=1.0, log=lambda s, flush=True: None)
    sets = study.train_sets(run, tmp_path / "warm", "sft", 4, 1, rounds=False)
    with pytest.raises(runner.BudgetSpent, match="stopped at checkpoint"):
        study._train(run, sets, "seed_1/sft train")
    study.deadline = None
    assert study._train(run, sets, "seed_1/sft train") == run / "ckpt" / "iter_0000004" / "model"
    train = json.loads((run / "study_usage.json").read_text())["train"]
    assert [u.get("wall_s") for u in train] == [7.0, 10.0] and train[0]["stopped_at_budget"], train
