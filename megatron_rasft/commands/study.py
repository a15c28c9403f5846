"""The real-model study (docs/results.md, "Protocol"): arms × seeds on SmolLM2-135M-Instruct.

  python -m megatron_rasft study run --protocol results/study/protocol.toml [--budget-hours 5]
  python -m megatron_rasft study run --smoke --out DIR --results DIR     # tiny settings, minutes
  python -m megatron_rasft study report --protocol results/study/protocol.toml
  python -m megatron_rasft study power --results results/pilot --a rasft --b sft
  python -m megatron_rasft study compare --results results/study --rerun DIR   # a rerun reproduces them?

`run` is resumable: a finished arm × seed (its RESULTS/seed_S/ARM.json exists) is skipped, a killed
one continues from its last checkpoint. It exits 3 when --budget-hours stopped it (rerun to go on).
`report` regenerates the tables from the committed summaries and writes them into docs/results.md.
`compare` checks a rerun (`run --seeds S --results DIR` on the same commit) against the summaries: exit
0 when every rerun unit's outcome (accuracy, per-problem counts, loss tokens, rounds) is identical, 1
when one differs.
"""
HELP = "the real-model study: run the protocol's arms × seeds (resumable, budgeted), report, power, compare"

from megatron_rasft.commands import error


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run every unit not yet done")
    rep = sub.add_parser("report", help="tables from the committed summaries → RESULTS/report.md, docs/results.md")
    for q in (run, rep):
        q.add_argument("--protocol", help="the protocol TOML (results/study/protocol.toml)")
        q.add_argument("--smoke", action="store_true", help="the built-in tiny protocol (two arms, one seed)")
        q.add_argument("--results", help="summaries folder (default: the protocol file's folder)")
    run.add_argument("--out", default="runs/study", help="work folder: models, checkpoints, logs (not tracked)")
    run.add_argument("--budget-hours", type=float, help="start no unit after this; stop a running one at its next checkpoint")
    run.add_argument("--seeds", help="comma-separated subset of the protocol's seeds (e.g. a rerun of one seed "
                                     "into another --results folder)")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep each arm's checkpoint and export")
    rep.add_argument("--docs", default="docs/results.md", help="file whose study markers receive the tables ('' = none)")
    cmp_ = sub.add_parser("compare", help="a rerun's summaries against the first run's: identical outcomes?")
    cmp_.add_argument("--results", required=True, help="the first run's summaries folder (results/study)")
    cmp_.add_argument("--rerun", required=True, help="the rerun's summaries folder (its `run --results`)")
    pw = sub.add_parser("power", help="problems and seeds needed to detect a difference, from pilot results")
    pw.add_argument("--results", required=True, help="the pilot's summaries folder (one seed)")
    pw.add_argument("--a", default="rasft")
    pw.add_argument("--b", default="sft")
    pw.add_argument("--delta", type=float, default=0.03, help="the difference to detect (fraction; 0.03 = 3 points)")
    pw.add_argument("--alpha", type=float, default=0.05)


def _protocol(args):
    from pathlib import Path

    from megatron_rasft.demo.study import protocol

    if args.smoke == bool(args.protocol):
        raise ValueError("give exactly one of --protocol FILE and --smoke")
    p = protocol.smoke() if args.smoke else protocol.load(args.protocol)
    results = Path(args.results) if args.results else (None if args.smoke else Path(args.protocol).parent)
    if results is None:
        raise ValueError("--smoke needs --results DIR")
    return p, results


def main(args) -> int:
    from megatron_rasft.demo.study.protocol import ProtocolError

    try:
        return _main(args)
    except (ProtocolError, ValueError, FileNotFoundError) as e:
        error(e)
        return 2


def _main(args) -> int:
    import shlex
    import sys

    if args.action == "power":
        return _power(args)
    if args.action == "compare":
        return _compare(args)
    p, results = _protocol(args)
    if args.action == "run":
        from megatron_rasft.demo.study import plan
        from megatron_rasft.demo.study.runner import Study

        if args.seeds:
            p.study.keep_seeds([int(x) for x in args.seeds.split(",")])

        print(f"[study] {p.study.name}: {len(p.study.units())} units ({len(p.study.seeds)} seeds × "
              f"{len(p.study.arms) - len(p.study.first_seed_only)} arms + {len(p.study.first_seed_only)} cost arm(s)), planned "
              f"{plan.total_hours(p):.1f} h on a quiet 2-core box; summaries → {results}", flush=True)
        return Study(p, args.out, results, budget_hours=args.budget_hours, keep_checkpoints=args.keep_checkpoints).run()
    from megatron_rasft.demo.study import report

    summaries = report.load_summaries(results)
    if not summaries:
        raise FileNotFoundError(f"{results}: no seed_*/ARM.json summaries")
    # The command as typed (`python -m megatron_rasft study report ...`); the plain form when called in-process.
    text = report.render(p, summaries, "python -m megatron_rasft " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                         if sys.argv[1:3] == ["study", "report"] else "python -m megatron_rasft study report")
    (results / "report.md").write_text(text)
    if args.docs:
        report.splice(args.docs, p.study.name, text)
    print(text, end="", flush=True)
    return 0


def _power(args) -> int:
    from pathlib import Path

    from megatron_rasft.demo.study import power, report

    summaries = report.load_summaries(Path(args.results))
    for arm in (args.a, args.b):
        if arm not in summaries:
            raise FileNotFoundError(f"{args.results}: no summaries of arm {arm!r} (have {sorted(summaries)})")
    for arm, by_seed in sorted(summaries.items()):
        for seed, s in sorted(by_seed.items()):
            print(f"solvability, {arm} seed {seed} (problems with c of n samples correct, c = 0..n; 0 < c < n):")
            for task, h in power.solvability(s["problems"]).items():
                print(f"  {task:<14} {sum(h):>4} problems  {h}  {sum(h[1:-1]) / sum(h):.0%}  accuracy "
                      f"{sum(c * k for c, k in enumerate(h)) / (sum(h) * (len(h) - 1)):.1%}")
    for seed in sorted(set(summaries[args.a]) & set(summaries[args.b])):
        acc = {arm: {k: c / n for k, (c, n) in summaries[arm][seed]["problems"].items()} for arm in (args.a, args.b)}
        sigma, mean, n = power.pilot_sigma(acc[args.a], acc[args.b])
        print(f"seed {seed}: {args.a} − {args.b} = {100 * mean:+.1f} points over {n} problems, SD over problems "
              f"{100 * sigma:.1f} points (SE {100 * sigma / n ** 0.5:.1f})")
        sigma_e = power.sampling_variance(summaries[args.a][seed]["problems"], summaries[args.b][seed]["problems"]) ** 0.5
        print(f"of which the evaluation's sampling noise (σ_e, measured per problem): {100 * sigma_e:.1f} points; "
              f"the rest (σ_a): {100 * max(sigma ** 2 - sigma_e ** 2, 0) ** 0.5:.1f} points")
        print(f"\nProblems needed for 80 % power to detect {100 * args.delta:.0f} points (two-sided α = {args.alpha}):\n")
        print("\n".join(power.table(args.delta, sigma, [0.0, 0.01, 0.02], [1, 3, 5], args.alpha, sigma_e)), flush=True)
    return 0


def _compare(args) -> int:
    from pathlib import Path

    from megatron_rasft.demo.study import report

    first, rerun = report.load_summaries(Path(args.results)), report.load_summaries(Path(args.rerun))
    for folder, found in ((args.results, first), (args.rerun, rerun)):
        if not found:
            raise FileNotFoundError(f"{folder}: no seed_*/ARM.json summaries")
    lines, same = report.compare_reruns(first, rerun)
    print("\n".join(lines))
    print(f"\n{'identical' if same else 'NOT identical'}: {args.rerun} against {args.results}", flush=True)
    return 0 if same else 1
