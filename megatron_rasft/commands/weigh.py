"""Compute per-sequence weights A for one round from its verdicts.

  python -m megatron_rasft weigh --run-dir RUN --round 0 [--config run.toml] \\
      [--set weighting.scheme=linear|released|constant] [--set weighting.beta=0.25 ...]

Reads RUN/verdicts/round_NNN.jsonl alone (each record carries the expert response and the
rollouts' texts with correctness) and writes RUN/weights/round_NNN.jsonl (rewritten atomically):
one `expert` weight per problem and one `rollout` weight per correct rollout trained on. The
scheme and its parameters are the [weighting] table of --config with --set overrides, else its
defaults (scheme linear).
"""
HELP = "compute solvability weights (linear | released | constant) into RUN/weights/round_NNN.jsonl"

from megatron_rasft.commands import error


def add_arguments(p):
    p.add_argument("--run-dir", required=True, help="run directory (holds verdicts/)")
    p.add_argument("--round", type=int, required=True, help="round number N (round_NNN.jsonl)")
    p.add_argument("--config", help="TOML run configuration; its [weighting] table is used")
    p.add_argument("--set", action="append", default=[], metavar="weighting.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set weighting.scheme=released")


def main(args) -> int:
    from megatron_rasft.config import load_section
    from megatron_rasft.records import ProblemVerdicts, RecordError, read_records, write_records
    from megatron_rasft.rundir import RunDir
    from megatron_rasft.methods.weighting import round_summary, weight_records

    try:
        cfg = load_section(args.config, args.set, "weighting")
        src = RunDir(args.run_dir).verdicts(args.round)
        recs = []
        for pv in read_records(src, ProblemVerdicts):
            if pv.round != args.round:
                raise RecordError(f"{src}: problem {pv.problem_id!r} has round {pv.round}, expected {args.round}")
            recs += weight_records(pv, cfg.scheme, cfg)
    except (RecordError, FileNotFoundError, ValueError) as e:
        error(e)
        return 2
    dst = RunDir(args.run_dir).weights(args.round)
    write_records(dst, recs)
    s = round_summary(recs)
    print(f"scheme {cfg.scheme}: {s['problems']} problems, {s['rollouts_added']} rollouts added, "
          f"mean A_E {s['mean_expert_weight']:.4f}, k=0 {s['frac_k0']:.1%}, k=K {s['frac_kK']:.1%}, "
          f"ESS {s['ess']:.1f} -> {dst}", flush=True)
    return 0
