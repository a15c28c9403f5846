"""Verify the rollouts of one round (resumable: problems already verified are skipped).

  python -m megatron_rasft verify --run-dir RUN --round 0 [--config run.toml] \\
      [--set rollout.verifier.kind=math|math-verify|released|code]

Reads RUN/problems.jsonl and RUN/rollouts/round_NNN.jsonl; appends one `verdicts` record per
problem (expert response + every rollout's text, correctness and reason) to
RUN/verdicts/round_NNN.jsonl. A killed run restarts where it stopped. The verifier (kind, workers,
timeout_s per rollout) is the [rollout.verifier] table of --config with --set overrides, else its
defaults (math, 2 workers, 10 s): the check the trainer's rounds make. Kinds: math (math-verify or
normalised string match), math-verify (math-verify only), released (the released code's answer
check), code (test sandbox).
"""
HELP = "verify a round's rollouts (math answers or code tests) into RUN/verdicts/round_NNN.jsonl"

from megatron_rasft.commands import error


def add_arguments(p):
    p.add_argument("--run-dir", required=True, help="run directory (holds problems.jsonl, rollouts/)")
    p.add_argument("--round", type=int, required=True, help="rollout round number N (round_NNN.jsonl)")
    p.add_argument("--config", help="run config TOML; its [rollout.verifier] table is used")
    p.add_argument("--set", action="append", default=[], metavar="rollout.verifier.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set rollout.verifier.kind=code")
    p.add_argument("--batch-problems", type=int, default=16, help="problems per flushed batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    from megatron_rasft.config import load_section
    from megatron_rasft.records import RecordError
    from megatron_rasft.verify.stage import verify_round

    if args.round < 0 or args.batch_problems < 1:
        error("--round must be >= 0, --batch-problems >= 1")
        return 2
    try:
        vcfg = load_section(args.config, args.set, "rollout.verifier")
        out = verify_round(args.run_dir, args.round, vcfg.kind, vcfg.workers, vcfg.timeout_s,
                           args.batch_problems, progress=not args.no_progress)
    except (RecordError, FileNotFoundError, ValueError) as e:
        error(e)
        return 2
    print(f"verified {out['rollouts']} rollouts of {out['problems']} problems "
          f"({out['skipped']} already done) -> {out['path']}; reasons {out['reasons']}", flush=True)
    return 0
