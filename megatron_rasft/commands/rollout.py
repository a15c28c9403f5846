"""Sample K rollouts per problem with vLLM (resumable: finished problems are never regenerated).

  python -m megatron_rasft rollout --run-dir RUN --round 0 --model HF_DIR --set rollout.sampling.n=4
  python -m megatron_rasft rollout --run-dir RUN --round 0 --tokenizer HF_DIR \\
      --set rollout.server.url=http://127.0.0.1:8000 --set rollout.sampling.n=4

Reads RUN/problems.jsonl (Problem records; `prompt` is the rendered prompt text) and appends K
`rollout` records per problem to RUN/rollouts/round_NNN.jsonl. With --model a server is started
for the run (and stopped at the end); without it, the running server at `rollout.server.url` is
used. Prompts are tokenised with the model's tokenizer the way the trainer does (BOS added unless
present). Sampling and server settings are the [rollout.sampling] and [rollout.server] tables of
--config, with --set overrides (e.g. --set rollout.sampling.temperature=0.7), else their defaults;
the round's seed and stop-token rules are the rollout stage's (`rollout/stage.py`), so round N
here samples exactly what the trainer's round N samples.
"""
HELP = "sample K rollouts per problem into RUN/rollouts/round_NNN.jsonl (vLLM; resumable)"

from megatron_rasft.commands import error


def add_arguments(p):
    p.add_argument("--run-dir", required=True, help="run directory holding problems.jsonl")
    p.add_argument("--round", type=int, required=True, help="round number N (rollouts/round_NNN.jsonl)")
    p.add_argument("--model", help="HF checkpoint directory: start a vLLM server on it for this run "
                                   "(default: attach to rollout.server.url)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model); needed with rollout.server.url")
    p.add_argument("--config", help="run config TOML; its [rollout.sampling] and [rollout.server] tables are used")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set rollout.sampling.n=8")
    p.add_argument("--problem-ids", help="file with one problem id per line (default: all problems)")
    p.add_argument("--log-file", help="server log (default: RUN/rollouts/vllm_server.log)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    from pathlib import Path

    from megatron_rasft.config import load_section
    from megatron_rasft.records import RecordError
    from megatron_rasft.rollout.server import ServerError
    from megatron_rasft.rollout.session import RolloutSession
    from megatron_rasft.rollout.stage import rollout_round
    from megatron_rasft.rundir import RunDir

    try:
        rcfg = load_section(args.config, args.set, "rollout")
        if args.round < 0:
            raise ValueError("--round must be >= 0")
        if args.model and rcfg.server.url:
            raise ValueError(f"--model starts a server, rollout.server.url = {rcfg.server.url!r} names a running "
                             f"one: give one of them")
        if not (args.model or rcfg.server.url):
            raise ValueError("give --model HF_DIR (start a server) or --set rollout.server.url=URL (use a running one)")
        tok_dir = args.tokenizer or args.model
        if tok_dir is None:
            raise ValueError("--tokenizer is required with rollout.server.url (prompts are tokenised "
                             "like the trainer does)")
        if not Path(tok_dir).is_dir():
            raise FileNotFoundError(f"{'--tokenizer' if args.tokenizer else '--model'} {tok_dir!r}: no such directory")
        ids = None
        if args.problem_ids:
            ids = [line.strip() for line in Path(args.problem_ids).read_text().splitlines() if line.strip()]
        if not RunDir(args.run_dir).problems.is_file():
            raise FileNotFoundError(f"{RunDir(args.run_dir).problems} not found")
    except (ValueError, FileNotFoundError) as e:
        error(e)
        return 2

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    log_file = args.log_file or RunDir(args.run_dir).rollout_command_log
    try:
        with RolloutSession.open(args.model or rcfg.server.url, rcfg.server, log_file=log_file,
                                 progress=not args.no_progress) as session:
            out = rollout_round(args.run_dir, args.round, session.generate, rcfg.sampling, tokenizer=tokenizer,
                                problem_ids=ids)
    except (RecordError, ValueError, FileNotFoundError, ServerError) as e:
        error(e)
        return 2
    print(f"round {args.round}: {out['rollouts']} rollouts for {out['problems']} problems "
          f"({out['skipped']} already done) -> {out['path']}", flush=True)
    return 0
