"""Reports of an evaluation: results.json, results.md (Markdown table), results.png (bar chart),
and the comparison of several evaluation directories (`--compare`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from megatron_rasft.eval.metrics import macro
from megatron_rasft.records import write_atomic


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _label(metric: str, n) -> str:
    return metric.replace("@n", f"@{n}") if n else metric


def pass_keys(results: dict) -> list[str]:
    ks = sorted({int(k[5:]) for r in results.values() for k in r if k.startswith("pass@")})
    return [f"pass@{k}" for k in ks]


def markdown(results: dict, meta: dict) -> str:
    """One row per benchmark plus the macro average; metrics in percent."""
    passes = pass_keys(results)
    n = (meta.get("sampling") or {}).get("n") or (min(r["n"] for r in results.values()) if results else None)
    head = ["benchmark", "problems", "samples", _label("avg@n", n)] + passes + [_label("maj@n", n),
                                                                              "no answer / failed", "mean tokens", "truncated"]
    lines = [_intro(meta), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        bad = sum(v for k, v in r.get("reasons", {}).items() if k in ("no_answer", "crash", "syntax_error", "timeout"))
        cells = [name, str(r["problems"]), str(r["count"]), _pct(r["avg@n"])]
        cells += [_pct(r.get(k)) for k in passes]
        cells += [_pct(r.get("maj@n")), _pct(bad / r["count"]),
                  "–" if r.get("mean_tokens") is None else f"{r['mean_tokens']:.0f}", _pct(r.get("truncated"))]
        lines.append("| " + " | ".join(cells) + " |")
    if len(results) > 1:
        m = macro(results)
        cells = ["**macro average**", str(m["problems"]), str(m["count"]), _pct(m.get("avg@n"))]
        cells += [_pct(m.get(k)) for k in passes] + [_pct(m.get("maj@n")), "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "avg@n: mean accuracy over the n samples; pass@k: unbiased estimator "
              "1 − C(n−c,k)/C(n,k); maj@n: majority vote over extracted answers (math). Percent.", ""]
    return "\n".join(lines)


def _intro(meta: dict) -> str:
    s = meta.get("sampling") or {}
    if meta.get("mode") == "grading-only":
        return f"# Evaluation (grading only: {meta.get('responses', '')})"
    return (f"# Evaluation of `{meta.get('model', '?')}`\n\nPrompt template: `{meta.get('template')}` "
            f"({meta.get('template_text')}). Sampling: n={s.get('n')}, temperature={s.get('temperature')}, "
            f"top_p={s.get('top_p')}, top_k={s.get('top_k')}, max_tokens={s.get('max_tokens')}, seed={s.get('seed')}.")


def bar_chart(results: dict, path: Path, title: str = "") -> None:
    """Grouped bars per benchmark (and macro average): avg@n, the largest pass@k, maj@n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = dict(results)
    if len(rows) > 1:
        rows["macro"] = macro(results)
    passes = pass_keys(results)
    n = min(r["n"] for r in results.values())
    series = [("avg@n", f"avg@{n}")] + ([(passes[-1], passes[-1])] if len(passes) > 1 else [])
    if any("maj@n" in r for r in results.values()):
        series.append(("maj@n", f"maj@{n}"))
    names = list(rows)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 1), 3.8))
    for s, (key, label) in enumerate(series):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [100 * (rows[nm].get(key) or 0.0) for nm in names], width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out_dir: Path, results: dict, meta: dict) -> None:
    out_dir = Path(out_dir)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2))  # what --compare reads
    write_atomic(out_dir / "results.md", markdown(results, meta))
    if results:
        bar_chart(results, out_dir / "results.png", str(meta.get("model") or meta.get("responses") or ""))


# ----------------------------------------------------------------------------- comparison
def compare(dirs: Sequence[str | Path]) -> str:
    """A Markdown table: a row per (benchmark, metric), a column per run, then run − first run."""
    if len(dirs) < 2:
        raise ValueError("--compare needs at least two evaluation directories")
    runs = []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--compare: {path} not found")
        runs.append(json.loads(path.read_text()))
    labels = _unique_labels(dirs)
    names = list(dict.fromkeys(n for r in runs for n in r))
    shared = [n for n in names if all(n in r for r in runs)]
    metrics = ["avg@n"] + [k for k in pass_keys({n: r[n] for r in runs for n in r})
                           if all(k in r[n] for r in runs for n in shared)] + ["maj@n"]
    head = ["benchmark", "metric"] + labels + [f"{lab} − {labels[0]}" for lab in labels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(n, [r.get(n) for r in runs]) for n in names]
    if len(shared) > 1:
        rows.append(("macro average", [macro({n: r[n] for n in shared}) for r in runs]))
    for name, entries in rows:
        for m in metrics:
            vals = [None if e is None else e.get(m) for e in entries]
            if all(v is None for v in vals):
                continue
            deltas = ["–" if v is None or vals[0] is None else f"{100 * (v - vals[0]):+.1f}" for v in vals[1:]]
            lines.append("| " + " | ".join([name, m] + [_pct(v) for v in vals] + deltas) + " |")
    return "\n".join(lines) + "\n"


def _unique_labels(dirs) -> list[str]:
    labels = [Path(d).resolve().name for d in dirs]
    if len(set(labels)) == len(labels):
        return labels
    return [str(Path(d)) for d in dirs]
