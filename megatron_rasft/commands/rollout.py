"""Sample K rollouts per problem with vLLM (resumable: finished problems are never regenerated).

  python -m megatron_rasft rollout --run-dir RUN --round 0 --model HF_DIR --num-samples 4
  python -m megatron_rasft rollout --run-dir RUN --round 0 --server-url http://127.0.0.1:8000 \
      --tokenizer HF_DIR --num-samples 4

Reads RUN/problems.jsonl (Problem records; `prompt` is the rendered prompt text) and appends K
`rollout` records per problem to RUN/rollouts/round_NNN.jsonl. With --model a server is started
for the run (and stopped at the end); with --server-url an external one is used. Prompts are
tokenised with the model's tokenizer the way the trainer does (BOS added unless present).
Sampling options default to the [rollout.sampling] table of --config, else to SamplingConfig's
defaults; the round's seed and stop-token rules are the rollout stage's (`rollout/stage.py`), so
round N here samples exactly what the trainer's round N samples.
"""
HELP = "sample K rollouts per problem into RUN/rollouts/round_NNN.jsonl (vLLM; resumable)"

_SAMPLING = {  # flag -> SamplingConfig field
    "num_samples": ("n", int), "temperature": ("temperature", float), "top_p": ("top_p", float),
    "top_k": ("top_k", int), "max_tokens": ("max_tokens", int),
    "repetition_penalty": ("repetition_penalty", float), "seed": ("seed", int),
}
_SERVER = {  # flag -> ServerConfig field ([rollout.server])
    "concurrency": int, "kv_cache_gib": float, "max_model_len": int, "port": int, "request_timeout_s": float,
}


def add_arguments(p):
    p.add_argument("--run-dir", required=True, help="run directory holding problems.jsonl")
    p.add_argument("--round", type=int, required=True, help="round number N (rollouts/round_NNN.jsonl)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF checkpoint directory: start a vLLM server on it for this run")
    src.add_argument("--server-url", help="use a running vLLM server at this URL")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model); needed with --server-url")
    p.add_argument("--config",
                   help="run config TOML whose [rollout.sampling] and [rollout.server] tables give the defaults")
    for name, (field, typ) in _SAMPLING.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"rollout.sampling.{field}")
    for name, typ in _SERVER.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"rollout.server.{name}")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--problem-ids", help="file with one problem id per line (default: all problems)")
    p.add_argument("--log-file", help="server log (default: RUN/rollouts/vllm_server.log)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    import dataclasses
    from pathlib import Path

    from megatron_rasft.config import load_config
    from megatron_rasft.records import RecordError
    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.server import RolloutServer, ServerError
    from megatron_rasft.rollout.stage import rollout_round
    from megatron_rasft.rundir import RunDir

    try:
        base = load_config(args.config).rollout
        sampling = {f: getattr(args, k) for k, (f, _) in _SAMPLING.items() if getattr(args, k) is not None}
        if args.stop is not None:
            sampling["stop"] = args.stop
        server_fields = {k: getattr(args, k) for k in _SERVER if getattr(args, k) is not None}
        sampling_cfg = dataclasses.replace(base.sampling, **sampling)
        server_cfg = dataclasses.replace(base.server, **server_fields)
        if args.round < 0:
            raise ValueError("--round must be >= 0")
        tok_dir = args.tokenizer or args.model
        if tok_dir is None:
            raise ValueError("--tokenizer is required with --server-url (prompts are tokenised "
                             "like the trainer does)")
        ids = None
        if args.problem_ids:
            ids = [line.strip() for line in Path(args.problem_ids).read_text().splitlines() if line.strip()]
        if not RunDir(args.run_dir).problems.is_file():
            raise FileNotFoundError(f"{RunDir(args.run_dir).problems} not found")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", flush=True)
        return 2

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    log_file = args.log_file or RunDir(args.run_dir).rollout_command_log
    try:
        if args.model:
            server = RolloutServer(args.model, server_cfg, log_file=log_file)
            print(f"starting vLLM on {args.model} (log {log_file}) ...", flush=True)
            server.start()
        else:
            server = RolloutServer.attach(args.server_url, server_cfg)
        with server:
            client = RolloutClient(server, server_cfg, progress=not args.no_progress)
            out = rollout_round(args.run_dir, args.round, client.generate, sampling_cfg, tokenizer=tokenizer,
                                problem_ids=ids)
    except (RecordError, ValueError, FileNotFoundError, ServerError) as e:
        print(f"error: {e}", flush=True)
        return 2
    print(f"round {args.round}: {out['rollouts']} rollouts for {out['problems']} problems "
          f"({out['skipped']} already done) -> {out['path']}", flush=True)
    return 0
