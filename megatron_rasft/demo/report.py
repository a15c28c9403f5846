"""report.md and PNG plots for the demo, from the files the run wrote (nothing typed in by hand)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_rasft.demo.evaluate import report_tag
from megatron_rasft.records import RoundResult, read_records
from megatron_rasft.rundir import RunDir


def paired_difference(a: list, b: list) -> tuple:
    """Mean of per-problem differences a − b and its standard error."""
    diffs = [x - y for x, y in zip(a, b)]
    m = sum(diffs) / len(diffs)
    var = sum((x - m) ** 2 for x in diffs) / max(len(diffs) - 1, 1)
    return m, math.sqrt(var / len(diffs))


def _rounds(rasft_dir: Path) -> list:
    return [r.summary for p in RunDir(rasft_dir).all_round_results() for r in read_records(p, RoundResult)]


def tokens_trained(run_dir: Path) -> int:
    lines = RunDir(run_dir).metrics.read_text().splitlines()
    return sum(json.loads(line).get("tokens", 0) for line in lines)


def _last_metrics(run_dir: Path) -> dict:
    lines = RunDir(run_dir).metrics.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _plots(out: Path, curves: dict, rounds: list, n: int) -> list:  # noqa: C901
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, pts in curves.items():
        ax.errorbar([p["step"] for p in pts], [p["avg_at_n"] for p in pts], yerr=[p["stderr"] for p in pts],
                    marker="o", capsize=3, label=arm)
    ax.set_xlabel("optimizer step after warm-up")
    ax.set_ylabel(f"held-out avg@{n}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_step.png", dpi=120)
    plt.close(fig)
    files.append("accuracy_per_step.png")
    if rounds:
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = [i / 10 + 0.05 for i in range(10)]
        width = 0.8 / (10 * len(rounds))
        for i, r in enumerate(rounds):
            ax.bar([b - 0.04 + i * width for b in bins], r["p_hist"], width=width, label=f"round {r['round']}")
        ax.set_xlabel("solvability p = k/K (bins of 0.1)")
        ax.set_ylabel("problems")
        if len(rounds) <= 8:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "p_histogram.png", dpi=120)
        plt.close(fig)
        files.append("p_histogram.png")
    return files


def write_report(out: Path, dc, curves: dict, rasft_dir: Path, grpo_dir: Path | None = None) -> Path:
    """RUN/report.md (+ plots, results.json) from the evaluated curves and the arms' run directories."""
    rounds = _rounds(rasft_dir)
    grpo_rounds = _rounds(grpo_dir) if grpo_dir is not None else []
    plots = _plots(out, curves, rounds, dc.eval_n)
    n = dc.eval_n
    final = {arm: pts[-1] for arm, pts in curves.items()}
    lines = [
        "# megatron_rasft demo: SFT vs RASFT" + (" vs GRPO" if grpo_dir is not None else "") +
        " on multi-digit addition",
        "",
        f"Task: {dc.train_problems} training / {dc.test_problems} held-out addition problems "
        f"({dc.min_digits}–{dc.max_digits} digits, worked solutions ending in `\\boxed{{}}`). "
        f"Model: a Llama-shaped transformer (hidden {dc.hidden}, {dc.layers} layers) with a "
        f"{dc.vocab}-token BPE trained on the task, random init, converted to Megatron, warmed up with "
        f"{dc.warmup_steps} SFT steps, then trained {dc.arm_steps} more steps per arm from that "
        f"checkpoint, at the same learning rate (not tuned per arm). RASFT: K = {dc.samples} rollouts per "
        f"problem through the vLLM (CPU) server, a round per {dc.batches_per_round} global batches of problems, `linear` "
        f"weights, sequence ratio with DFT factor. "
        + (f"GRPO: the same rounds (K = {dc.samples}, max_tokens {dc.max_tokens}, {dc.batches_per_round} global batches "
           f"of problems per round), every rollout trained with its group-relative advantage, clip ε = 0.2, no KL, "
           f"no demonstration. " if grpo_dir is not None else "") +
        f"Evaluation: avg@{n} at temperature {dc.eval_temperature} on the held-out split, the same "
        f"per-problem sampling seeds for every checkpoint; ± is the standard error over problems. "
        f"Seed {dc.seed}.",
        "",
        "## Result",
        "",
        f"| arm | avg@{n} at step {dc.arm_steps} | best over steps | loss tokens trained |",
        "| --- | --- | --- | --- |",
    ]
    for arm, pts in curves.items():
        best = max(pts[1:] or pts, key=lambda p: p["avg_at_n"])
        tokens = tokens_trained(out / report_tag(arm))
        lines.append(f"| {arm} | {final[arm]['avg_at_n']:.3f} ± {final[arm]['stderr']:.3f} | "
                     f"{best['avg_at_n']:.3f} (step {best['step']}) | {tokens} |")
    lines.append(f"| warm-up (step 0) | {curves[next(iter(curves))][0]['avg_at_n']:.3f} ± "
                 f"{curves[next(iter(curves))][0]['stderr']:.3f} | |")
    arms = list(curves)
    lines.append("")
    for other in [a for a in arms if a != "RASFT"]:
        d, se = paired_difference(final["RASFT"]["per_problem"], final[other]["per_problem"])
        lines.append(f"- RASFT − {other} at its last step: {d:+.3f} ± {se:.3f} (paired over the same held-out "
                     f"problems and sampling seeds; one training seed).")
    lines += ["", "SFT, RASFT and GRPO take the same number of optimizer steps; RASFT's steps also carry the "
                  "correct rollouts (at small weights), so it trains on more tokens (last column); GRPO's "
                  "steps carry all K rollouts of each problem and no demonstration. "
                  "`SFT (tokens)`, when present, is plain SFT run for as many loss tokens as RASFT."]
    # The per-step table and plot cover the arms evaluated at the same steps.
    arms = [a for a in arms if [p["step"] for p in curves[a]] == [p["step"] for p in curves[arms[0]]]]
    lines += ["", "## Accuracy per step", "", "| step | " + " | ".join(arms) + " |",
              "| --- | " + " | ".join("---" for _ in arms) + " |"]
    for i, pt in enumerate(curves[arms[0]]):
        row = [f"{curves[a][i]['avg_at_n']:.3f}" if i < len(curves[a]) else "" for a in arms]
        lines.append(f"| {pt['step']} | " + " | ".join(row) + " |")
    lines += ["", "Accuracy by number of digits at the last step:", "",
              "| digits | " + " | ".join(arms) + " |", "| --- | " + " | ".join("---" for _ in arms) + " |"]
    for dgt in final[arms[0]]["by_digits"]:
        lines.append(f"| {dgt} | " + " | ".join(f"{final[a]['by_digits'].get(dgt, float('nan')):.3f}" for a in arms) + " |")
    lines += ["", "## RASFT rounds", "",
              "| round | problems | p histogram (10 bins) | k=0 | k=K | mean A_E | rollouts added | ESS |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rounds:
        lines.append(f"| {r['round']} | {r['problems']} | {' '.join(map(str, r['p_hist']))} | {r['frac_k0']:.2f} | "
                     f"{r['frac_kK']:.2f} | {r['mean_expert_weight']:.3f} | {r['rollouts_added']} | {r['ess']:.1f} |")
    if grpo_dir is not None:
        lines += ["", "## GRPO rounds", "",
                  "| round | problems | mean reward | zero-variance groups | groups trained | rollouts trained |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in grpo_rounds:
            lines.append(f"| {r['round']} | {r['grpo_groups']} | {r['grpo_mean_reward']:.3f} | "
                         f"{r['grpo_zero_variance_frac']:.2f} | {r['grpo_groups_trained']} | {r['grpo_sequences']} |")
    tm = _last_metrics(rasft_dir)
    lines += ["", "## Time", "", "Wall seconds per stage. The SFT arm runs while the rollout server starts, and the "
              "token-matched SFT arm beside the GRPO arm, so those stages overlap: they add up to more than the total.",
              "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in dc.times.items()]
    lines += ["", "RASFT arm, inside the trainer (cumulative): " +
              ", ".join(f"{k[5:]} {tm[k]:.1f}s" for k in sorted(tm) if k.startswith("time_")), ""]
    lines += [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"curves": curves, "rounds": rounds, "grpo_rounds": grpo_rounds,
                                                  "times": dc.times}, indent=1))
    return path
