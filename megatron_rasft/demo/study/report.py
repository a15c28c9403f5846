"""`python -m megatron_rasft study report`: the study's tables from the committed summaries
(RESULTS/seed_S/ARM.json) alone: accuracy per arm and seed, the comparisons of the protocol (paired
differences, bootstrap interval, p-value, Holm's correction for the secondaries: `stats`), and the cost
figures. Writes RESULTS/report.md and replaces the text between the markers
`<!-- study:NAME begin -->` and `<!-- study:NAME end -->` of docs/results.md."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from megatron_rasft.demo.study import stats

NAMES = {"warmup": "warm-up", "sft": "SFT (steps)", "sft_tokens": "SFT (tokens)", "rasft": "RASFT",
         "rasft_overlap": "RASFT (overlapped)", "dft": "DFT", "grpo": "GRPO"}


def load_summaries(results: Path) -> dict:
    """{arm: {seed: summary}} of every RESULTS/seed_*/ARM.json."""
    out = {}
    for path in sorted(Path(results).glob("seed_*/*.json")):
        s = json.loads(path.read_text())
        out.setdefault(s["arm"], {})[s["seed"]] = s
    return out


def _acc(summaries: dict, arm: str) -> dict:
    return {seed: {pid: c / n for pid, (c, n) in s["problems"].items()} for seed, s in summaries[arm].items()}


def comparisons(protocol, summaries: dict) -> list:
    """[(A, B, kind, Comparison, Holm-adjusted p or None)] for the protocol's pairs whose arms have
    results; the secondaries' intervals at level 1 − α/m and their p-values Holm-adjusted."""
    a = protocol.analysis
    pairs = [(x, y, kind) for x, y, kind in protocol.comparisons() if x in summaries and y in summaries]
    m = sum(kind == "secondary" for *_, kind in pairs)
    rows = []
    for x, y, kind in pairs:
        d_SP, _, _ = stats.paired_table(_acc(summaries, x), _acc(summaries, y))
        level = 1 - a.alpha if kind == "primary" else 1 - a.alpha / m
        rows.append([x, y, kind, stats.compare(d_SP, n_boot=a.bootstrap, level=level), None])
    secondary = [r for r in rows if r[2] == "secondary"]
    for r, adj in zip(secondary, stats.holm([r[3].p for r in secondary])):
        r[4] = adj
    return [tuple(r) for r in rows]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_table(protocol, summaries: dict) -> list:
    seeds = sorted({s for arm in summaries.values() for s in arm})
    lines = ["| arm | steps | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for arm in [a for a in protocol.study.arms if a in summaries]:
        row = summaries[arm]
        cells = [_pct(row[s]["accuracy"]) if s in row else "–" for s in seeds]
        steps = "/".join(str(row[s]["steps"]) for s in seeds if s in row)
        lines.append(f"| {NAMES[arm]} | {steps} | " + " | ".join(cells) +
                     f" | {_pct(statistics.mean(r['accuracy'] for r in row.values()))} |")
    return lines


def comparison_table(protocol, rows: list) -> list:
    alpha = protocol.analysis.alpha
    lines = ["| comparison | kind | problems × seeds | difference (points) | per seed | SE over problems | "
             "bootstrap CI | p | p (Holm) | reading |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x, y, kind, c, adj in rows:
        p_used = c.p if adj is None else adj
        reading = f"significant at α = {alpha:g}" if p_used < alpha else "not significant"
        lines.append(f"| {NAMES[x]} − {NAMES[y]} | {kind} | {c.problems} × {c.seeds} | {100 * c.mean:+.1f} | "
                     + ", ".join(f"{100 * v:+.1f}" for v in c.per_seed)
                     + f" | {100 * c.se_problems:.1f} | [{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}] "
                       f"({100 * c.level:.1f} %) | {c.p:.3f} | {'–' if adj is None else f'{adj:.3f}'} | {reading} |")
    return lines


def cost_table(protocol, summaries: dict) -> list:
    """Per arm, means over seeds: wall and CPU-seconds of training, the stages' wall seconds, and the
    ratios to step-matched SFT."""
    def mean_of(arm, f):
        vals = [f(s) for s in summaries[arm].values()]
        vals = [v for v in vals if v is not None]
        return statistics.mean(vals) if vals else float("nan")

    keys = ("rollout", "verify", "round_wait", "reference", "train", "export", "refresh")
    lines = ["| arm | loss tokens | train wall (s) | CPU-s trainer | CPU-s vLLM | " + " | ".join(f"{k} (s)" for k in keys)
             + " | eval wall (s) | load average |", "|---|---|---|---|---|" + "---|" * (len(keys) + 2)]
    for arm in [a for a in protocol.study.arms if a in summaries and a != "warmup"]:
        t = lambda key: mean_of(arm, lambda s: s["time"][key])  # noqa: E731
        st = lambda key: mean_of(arm, lambda s: s["time"]["stages"].get(key, 0.0))  # noqa: E731
        lines.append(f"| {NAMES[arm]} | {mean_of(arm, lambda s: s['loss_tokens']):,.0f} | {t('train_wall_s'):.0f} | "
                     f"{t('train_cpu_s_main'):.0f} | {t('train_cpu_s_vllm'):.0f} | "
                     + " | ".join(f"{st(k):.0f}" for k in keys)
                     + f" | {t('eval_wall_s'):.0f} | {t('load1_mean'):.1f} |")
    ratios = []
    if {"sft", "rasft"} <= set(summaries):
        w = lambda arm, key="train_wall_s": mean_of(arm, lambda s: s["time"][key])  # noqa: E731
        trainer_side = mean_of("rasft", lambda s: sum(s["time"]["stages"].get(k, 0.0)
                                                      for k in ("train", "reference", "export", "refresh")))
        sft_core = mean_of("sft", lambda s: s["time"]["stages"].get("train", 0.0))
        ratios.append(f"RASFT ÷ SFT (steps), wall time of training, synchronous rounds: "
                      f"{w('rasft') / w('sft'):.2f}")
        if "rasft_overlap" in summaries:
            ratios.append(f"RASFT (overlapped rounds) ÷ SFT (steps), wall: {w('rasft_overlap') / w('sft'):.2f}")
        if "sft_tokens" in summaries:
            ratios.append(f"RASFT ÷ SFT (tokens), wall: {w('rasft') / w('sft_tokens'):.2f}")
        ratios.append("projected with rollouts on their own hardware (the trainer's CPU-seconds; generation in the "
                      f"vLLM server's): {w('rasft', 'train_cpu_s_main') / w('sft', 'train_cpu_s_main'):.2f}; "
                      f"from the stages' wall seconds (train + reference + export + refresh of RASFT ÷ train of "
                      f"SFT): {trainer_side / sft_core:.2f}")
    return lines + [""] + [f"- {r}" for r in ratios]


def render(protocol, summaries: dict, command: str) -> str:
    """The report's markdown."""
    commits = sorted({s["commit"] for arm in summaries.values() for s in arm.values()})
    dates = sorted({s["date"] for arm in summaries.values() for s in arm.values()})
    rows = comparisons(protocol, summaries)
    lines = [f"Regenerated by `{command}` from the per-run summaries; runs made on commit(s) "
             f"{', '.join(f'`{c}`' for c in commits)}, {', '.join(dates)}.", "",
             "Held-out accuracy (avg@n, %, mean over problems):", ""] + accuracy_table(protocol, summaries)
    lines += ["", "Paired differences (A − B over the same problems and sampling seeds; bootstrap over problems "
              f"× seeds, {protocol.analysis.bootstrap} replicates; secondaries Holm-adjusted, their intervals at "
              "the Bonferroni level):", ""] + comparison_table(protocol, rows)
    lines += ["", "Cost (means over seeds; stage seconds are the trainer's cumulative `time_*` at its last "
              "step; CPU-seconds per process group):", ""] + cost_table(protocol, summaries)
    return "\n".join(lines) + "\n"


def splice(doc: Path, name: str, text: str) -> None:
    """Replace the text between `<!-- study:NAME begin -->` and `<!-- study:NAME end -->` in `doc`.
    ValueError naming the file when a marker is missing."""
    begin, end = f"<!-- study:{name} begin -->", f"<!-- study:{name} end -->"
    body = Path(doc).read_text()
    if begin not in body or end not in body or body.index(begin) > body.index(end):
        raise ValueError(f"{doc}: needs the lines {begin!r} and {end!r} (in this order) around the study's table")
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    Path(doc).write_text(f"{head}{begin}\n{text}{end}{tail}")


# What a rerun of a unit on the same commit must reproduce exactly; times, dates and the commit are not.
OUTCOME_KEYS = ("steps", "lr", "loss_tokens", "accuracy", "problems")


def _rounds_outcome(summary: dict) -> list:
    return [{"round": r["round"], "hist": r["hist"], "rollouts_added": r["rollouts_added"]}
            for r in summary.get("rounds") or []]


def compare_reruns(first: dict, rerun: dict) -> tuple[list, bool]:
    """A rerun's summaries against the first run's, unit by unit (`load_summaries` dicts), on what a
    rerun must reproduce exactly: steps, lr, loss tokens, accuracy, every problem's correct-sample
    count and each round's solvability histogram and rollouts added (not times, dates or the commit).
    Returns (markdown table lines, whether every unit of the rerun is in the first run and equal).

    Raises ValueError when the two share no unit."""
    order = list(NAMES)
    units = sorted(((arm, seed) for arm in rerun for seed in rerun[arm]),
                   key=lambda u: (u[1], order.index(u[0]) if u[0] in order else len(order), u[0]))
    shared = [(arm, seed) for arm, seed in units if seed in first.get(arm, {})]
    if not shared:
        raise ValueError(f"no unit in common: the rerun has {units}, the first run "
                         f"{sorted((a, s) for a in first for s in first[a])}")
    lines = ["| unit | accuracy (first) | accuracy (rerun) | problems differing | loss tokens (first, rerun) | "
             "rounds | identical |", "|---|---|---|---|---|---|---|"]
    same_all = len(shared) == len(units)
    for arm, seed in units:
        if (arm, seed) not in shared:
            lines.append(f"| seed {seed} {NAMES.get(arm, arm)} | — | {100 * rerun[arm][seed]['accuracy']:.4f} % | "
                         f"not in the first run | | | no |")
            continue
        a, b = first[arm][seed], rerun[arm][seed]
        pa, pb = a["problems"], b["problems"]
        differing = sum(pa.get(k) != pb.get(k) for k in set(pa) | set(pb))
        rounds_same = _rounds_outcome(a) == _rounds_outcome(b)
        same = all(a.get(k) == b.get(k) for k in OUTCOME_KEYS) and rounds_same
        same_all &= same
        rounds = f"{len(a.get('rounds') or [])} equal" if rounds_same else "differ"
        lines.append(f"| seed {seed} {NAMES.get(arm, arm)} | {100 * a['accuracy']:.4f} % | {100 * b['accuracy']:.4f} % | "
                     f"{differing} of {len(set(pa) | set(pb))} | {a.get('loss_tokens')}, {b.get('loss_tokens')} | "
                     f"{rounds if a.get('rounds') or b.get('rounds') else '—'} | {'yes' if same else 'no'} |")
    return lines, same_all
