"""`python -m megatron_rasft demo --quick`: the whole loop (Megatron trainer, converter, vLLM CPU
server, math-verify, weighting, evaluation) end to end, with every output the report promises."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "megatron_rasft", "demo", "--quick", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "## Result" in p.stdout and "| RASFT |" in p.stdout and "| GRPO |" in p.stdout  # the table is printed
    report = (out / "report.md").read_text()
    for section in ("## Result", "## Accuracy per step", "## RASFT rounds", "## GRPO rounds", "## Time", "Seed 0"):
        assert section in report
    for f in ("accuracy_per_step.png", "p_histogram.png", "results.json", "eval/curves.json"):
        assert (out / f).is_file(), f
    assert (out / "accuracy_per_step.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    curves = results["curves"]
    assert set(curves) == {"SFT", "RASFT", "GRPO", "SFT (tokens)"}
    # Every number in the report comes from the run: the table holds the evaluated values.
    for arm, pts in curves.items():
        if arm == "SFT (tokens)":  # plain SFT for as many loss tokens as RASFT: more steps, one eval
            assert pts[0]["step"] == 0 and len(pts) == 2 and pts[1]["step"] >= 12
        else:
            assert [pt["step"] for pt in pts] == [0, 6, 12]
        assert f"| {arm} | {pts[-1]['avg_at_n']:.3f} ± {pts[-1]['stderr']:.3f}" in report
        assert all(0.0 <= pt["avg_at_n"] <= 1.0 for pt in pts)
    assert "RASFT − SFT (tokens) at its last step" in report and "RASFT − GRPO at its last step" in report
    # The per-step table has a column per step-matched arm, GRPO included.
    assert "| step | SFT | RASFT | GRPO |" in report
    rounds = results["rounds"]
    assert len(rounds) >= 2 and all(sum(r["p_hist"]) == r["problems"] for r in rounds)
    # The RASFT and GRPO arms really went through the stages, with their records on disk.
    for arm in ("rasft", "grpo"):
        for sub in ("rollouts", "verdicts", "train_seqs"):
            assert (out / arm / sub / "round_000.jsonl").is_file()
        assert (out / arm / "rounds" / "round_000.json").is_file()
    assert (out / "grpo" / "old_logp" / "round_000.pt").is_file()
    grpo_rounds = results["grpo_rounds"]
    assert len(grpo_rounds) == len(rounds)  # same rounds: same steps and batches per round
    for r in grpo_rounds:
        assert f"| {r['round']} | {r['grpo_groups']} | {r['grpo_mean_reward']:.3f} |" in report
    grpo_steps = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in grpo_steps if m.get("kind") == "train"] == list(range(1, 13))
    evals = sorted((out / "eval").glob("*/samples/addition.jsonl"))
    assert len(evals) == 8  # warm-up, 2 checkpoints per step-matched arm (3), 1 token-matched; via `megatron_rasft.eval`
    assert all((p.parent.parent / "results.json").is_file() for p in evals)
