"""Evaluate a model (through the rollout server) or given completions on benchmarks.

Output directory:
  config.json              template, sampling, model, benchmarks (a resumed run must match it)
  samples/<bench>.jsonl    one `eval_sample` record (records.py) per sample: benchmark, id,
                           sample_index, prompt, completion, extracted, correct, reason,
                           finish_reason, num_tokens, seed, gold, detail
  results.json             {benchmark: metrics}  (metrics.py)
  results.md, results.png  table and bar chart (report.py)

Resumable through `rollout.sampler.SampleFile` (the rollout stage's loop): a problem's n samples
are generated, graded and appended (flushed, fsync'ed) together as soon as the problem finishes; on
restart problems with all n samples are skipped, lines of incomplete problems and a torn last line
are dropped and those problems generated again. Seeds depend on (seed, benchmark, problem id) only,
so the resumed run produces the same samples.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from megatron_rasft.eval import prompts as P
from megatron_rasft.eval.benchmarks import BenchmarkError, EvalProblem, problems_from_dicts
from megatron_rasft.eval.grade import Grader
from megatron_rasft.eval.metrics import summarize
from megatron_rasft.records import EvalSample, read_records, write_atomic, write_records

_GUARDED = ("n", "temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed")


# ----------------------------------------------------------------------------- sample files
# `eval_sample` records (records.py: typed, versioned, strict errors with file:line, torn last line
# tolerated); the rest of the evaluation reads them as dicts.
def sample_path(out_dir, benchmark: str) -> Path:
    return Path(out_dir) / "samples" / f"{benchmark}.jsonl"


def read_samples(path: Path) -> list[dict]:
    """Rows (dicts of `EvalSample` fields) of a samples file; [] when it does not exist. A torn
    last line is skipped with a warning; any other bad line raises RecordError naming file:line."""
    if not path.exists():
        return []
    return [dataclasses.asdict(r) for r in read_records(path, EvalSample)]


def samples_file(path: Path, n: int):
    """A benchmark's samples file as a resumable samples file (`rollout.sampler.SampleFile`): n
    `eval_sample` records per problem id."""
    from megatron_rasft.rollout.sampler import SampleFile

    return SampleFile(Path(path), EvalSample, n, id_field="id")


def write_samples(path: Path, rows: Sequence[dict]) -> None:
    """Whole file, atomically."""
    write_records(path, [EvalSample(**r) for r in rows])


def sample_row(benchmark: str, problem: EvalProblem, j: int, prompt: str, completion: str,
               verdict: dict, finish_reason=None, num_tokens=None, seed=None) -> dict:
    """One sample's row (the fields of `EvalSample`); `gold` for math problems."""
    return dataclasses.asdict(EvalSample(
        benchmark, problem.id, j, prompt, completion, verdict.get("extracted"), verdict["correct"],
        verdict["reason"], finish_reason, num_tokens, seed,
        gold=problem.answer if problem.kind == "math" else None, detail=verdict.get("detail") or None))


# ----------------------------------------------------------------------------- generation source
def _open_source(source, server_cfg, out_dir: Path, progress: bool):
    """-> (generate, session or None, model label, model dir or None). A model folder or URL opens
    a `RolloutSession` (started here and stopped by the caller, or attached); a `RolloutServer`
    is used as it is (left running)."""
    from megatron_rasft.rollout.server import RolloutServer
    from megatron_rasft.rollout.session import RolloutSession

    if isinstance(source, (str, Path, RolloutServer)):
        session = RolloutSession.open(source, server_cfg, log_file=out_dir / "vllm_server.log", progress=progress,
                                      label="[eval] ")
        label = str(source) if isinstance(source, (str, Path)) else session.label
        return session.generate, session, label, session.server.model_dir
    if callable(source):
        return source, None, getattr(source, "__name__", type(source).__name__), None
    raise TypeError(f"evaluate: source must be a model dir, a URL, a RolloutServer or a generator, got {source!r}")


def _load_tokenizer(tokenizer, model_dir):
    if tokenizer is None and model_dir is not None:
        tokenizer = model_dir
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _check_config(out_dir: Path, config: dict) -> None:
    """Refuse to resume into a directory evaluated with other sampling or another template."""
    path = out_dir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in ("template",) if old.get(k) != config.get(k)]
        diff += [f"sampling.{k}" for k in _GUARDED if old.get("sampling", {}).get(k) != config["sampling"].get(k)]
        if diff:
            raise ValueError(f"{out_dir} holds an evaluation with different {', '.join(diff)} "
                             f"({', '.join(str(old.get('sampling', {}).get(k.split('.')[-1], old.get(k))) for k in diff)}); "
                             f"use another --out or remove it")
        config = {**old, **config, "benchmarks": {**old.get("benchmarks", {}), **config["benchmarks"]}}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(config, indent=2))


# ----------------------------------------------------------------------------- the evaluation
def evaluate(source, benchmarks: dict, sampling, out_dir, *, template: str = "plain", tokenizer=None,
             workers: int = 2, math_mode: str = "math", grade_timeout_s: float = 10.0, server_cfg=None,
             progress: bool = False, report: bool = True) -> dict:
    """Generate `sampling.n` completions per problem, grade them, write samples and reports.

    source: an HF model directory (a server is started and stopped here), a server URL, a
        `RolloutServer`, or a generator `fn(prompts, sampling, keys=, on_result=)`.
    benchmarks: name -> list of `EvalProblem`s or dicts (`prompt` + `answer`, or `tests`).
    sampling: `SamplingConfig` (its `stop` is extended per benchmark by the template's stops; with
        a tokenizer its `stop_token_ids` by `rollout.stops.stop_token_ids`, the rounds' rule).
    server_cfg: the `ServerConfig` of the server started or attached here, and of the client.
    tokenizer: tokenizer or its directory (default: the model's); prompts are sent as token ids
        (BOS added like the trainer does) when there is one, as text otherwise.
    Returns {benchmark: metrics} (also in out_dir/results.json).
    """
    if template not in P.TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(P.TEMPLATES)}")
    out_dir = Path(out_dir)
    problems = {name: problems_from_dicts(items, name) for name, items in benchmarks.items()}
    config = {"template": template, "template_text": P.describe(template),
              "sampling": {k: getattr(sampling, k) for k in _GUARDED},
              "benchmarks": {name: len(ps) for name, ps in problems.items()}}
    _check_config(out_dir, config)
    generate, session, label, model_dir = _open_source(source, server_cfg, out_dir, progress)
    try:
        tok = _load_tokenizer(tokenizer, model_dir)
        if template == "chat" and tok is None:
            raise ValueError("eval.prompt_template = chat needs a tokenizer (--tokenizer DIR with --server-url)")
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        from megatron_rasft.rollout.stops import stop_token_ids

        stops = stop_token_ids(tok, model_dir, sampling.stop_token_ids) if tok is not None else None
        _check_resolved(out_dir, cfg, {"stop_token_ids": stops, "math_mode": math_mode})
        cfg.update(model=label, stop_token_ids=stops, math_mode=math_mode)
        write_atomic(cfg_path, json.dumps(cfg, indent=2))
        with Grader(workers, math_mode, grade_timeout_s) as grader:
            for name, ps in problems.items():
                stats = _run_benchmark(name, ps, generate, grader, sampling, template, tok, out_dir, stops)
                print(f"[eval] {name}: {stats['generated']} problems generated, {stats['skipped']} "
                      f"already done, {stats['seconds']:.1f}s", flush=True)
            return finish(out_dir, problems, grader.equivalent)
    finally:
        if session is not None:
            session.close()


def _check_resolved(out_dir: Path, old: dict, resolved: dict) -> None:
    """Refuse to resume into a directory whose samples were drawn with other stop token ids or
    graded in another math mode (both resolved at run time, so not in the sampling check above).
    A directory with samples but no record of them predates the record: refused too, since its
    samples may have run past the end-of-turn token."""
    has_samples = any((out_dir / "samples").glob("*.jsonl"))
    for key, value in resolved.items():
        if key in old and old[key] != value:
            raise ValueError(f"{out_dir} holds an evaluation with {key} = {old[key]}, this one has {value}; "
                             f"use another --out or remove it")
        if key not in old and has_samples:
            raise ValueError(f"{out_dir} holds samples without a record of their {key} (written by an "
                             f"earlier version); use another --out or remove it")


def _run_benchmark(name: str, problems: list, generate: Callable, grader: Grader, sampling,
                   template: str, tokenizer, out_dir: Path, stops: list | None = None) -> dict:
    """Generate and grade the problems of one benchmark that lack their n samples; `stops`: the
    resolved stop token ids (`rollout.stops.stop_token_ids`), None without a tokenizer."""
    from megatron_rasft.data.tokenize import encode_prompt

    t0 = time.monotonic()
    samples = samples_file(sample_path(out_dir, name), sampling.n)
    done = samples.complete_ids()
    todo = [p for p in problems if p.id not in done]
    stats = {"generated": len(todo), "skipped": len(problems) - len(todo)}
    if todo:
        texts = [P.render(p, template, tokenizer) for p in todo]
        prompts = [encode_prompt(tokenizer, t) for t in texts] if tokenizer is not None else texts
        kinds = {p.kind for p in todo}
        extra = P.stops("code" if kinds == {"code"} else "math", template, any(p.code_prefix for p in todo))
        bench_sampling = dataclasses.replace(sampling, stop=list(dict.fromkeys(list(sampling.stop) + extra)))
        if stops is not None:  # the rounds' rule: an end-of-turn special token ends the sample
            bench_sampling = dataclasses.replace(bench_sampling, stop_token_ids=stops)
        else:
            warnings.warn("eval without a tokenizer: samples end only at the server's EOS and at stop "
                          "strings, which cannot match a special end-of-turn token; give --tokenizer",
                          stacklevel=2)

        def records_of(i: int, completions: list) -> list:
            p = todo[i]
            verdicts = grader.grade([(p, c.text) for c in completions])
            return [EvalSample(**sample_row(name, p, j, texts[i], c.text, v, c.finish_reason, len(c.token_ids), c.seed))
                    for j, (c, v) in enumerate(zip(completions, verdicts))]

        samples.sample(generate, prompts, bench_sampling, [f"{name}:{p.id}" for p in todo], records_of)
    stats["seconds"] = time.monotonic() - t0
    return stats


def finish(out_dir: Path, problems: dict, equivalent=None) -> dict:
    """Metrics of the current problems from the samples files; write results and reports.
    `equivalent`: the grader's pairwise answer equivalence for maj@n (`Grader.equivalent`;
    default: the `math` rule in this process)."""
    from megatron_rasft.eval import report

    results = {}
    for name, ps in problems.items():
        wanted = {p.id for p in ps}
        by_problem = defaultdict(list)
        for r in read_samples(sample_path(out_dir, name)):
            if r["id"] in wanted:
                by_problem[r["id"]].append(r)
        if by_problem:
            results[name] = summarize(dict(by_problem), ps[0].kind, equivalent)
    config_path = out_dir / "config.json"
    meta = json.loads(config_path.read_text()) if config_path.exists() else {}
    report.write_all(out_dir, results, meta)
    return results


# ----------------------------------------------------------------------------- grading only
def read_responses(path) -> list[dict]:
    """`--responses` rows: `benchmark`, `id` (0-based problem index), `completion`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--responses file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        missing = [k for k in ("benchmark", "id", "completion") if k not in row] if isinstance(row, dict) else ["an object"]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        if not isinstance(row["completion"], str):
            raise ValueError(f"{path}:{lineno}: 'completion' must be a string")
        row["_line"] = lineno
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no responses")
    return rows


def grade_responses(rows: Sequence[dict], problems: dict, out_dir, *, workers: int = 2,
                    math_mode: str = "math", grade_timeout_s: float = 10.0, source: str = "") -> dict:
    """Grade given completions (no server). problems: benchmark -> list of EvalProblem; a row's
    `id` is looked up among the problem ids (its 0-based index in the file)."""
    out_dir = Path(out_dir)
    index = {name: {p.id: p for p in ps} for name, ps in problems.items()}
    items, keys = [], []
    counters = defaultdict(int)
    for row in rows:
        where = f"{source}:{row.get('_line', '?')}"
        if row["benchmark"] not in index:
            raise ValueError(f"{where}: unknown benchmark {row['benchmark']!r} (loaded: {', '.join(index)})")
        pid = str(row["id"])
        if pid not in index[row["benchmark"]]:
            raise ValueError(f"{where}: benchmark {row['benchmark']!r} has no problem id {pid!r} "
                             f"(ids are 0-based line indices, 0..{len(index[row['benchmark']]) - 1})")
        p = index[row["benchmark"]][pid]
        j = row.get("sample_index", counters[(row["benchmark"], pid)])
        counters[(row["benchmark"], pid)] += 1
        items.append((p, row["completion"]))
        keys.append((row["benchmark"], p, j, row))
    t0 = time.monotonic()
    grader = Grader(workers, math_mode, grade_timeout_s)
    try:
        verdicts = grader.grade(items)
        return _finish_graded(out_dir, source, keys, verdicts, problems, grader, time.monotonic() - t0)
    finally:
        grader.close()


def _finish_graded(out_dir: Path, source: str, keys: list, verdicts: list, problems: dict, grader,
                   seconds: float) -> dict:
    """Write the graded samples of `grade_responses` and their metrics."""
    print(f"[eval] graded {len(keys)} completions in {seconds:.1f}s", flush=True)
    by_bench = defaultdict(list)
    for (name, p, j, row), v in zip(keys, verdicts):
        by_bench[name].append(sample_row(name, p, j, row.get("prompt"), row["completion"], v,
                                         row.get("finish_reason"), row.get("num_tokens"), row.get("seed")))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, srows in by_bench.items():
        write_samples(sample_path(out_dir, name), srows)
    write_atomic(out_dir / "config.json", json.dumps(
        {"mode": "grading-only", "responses": source, "benchmarks": {n: len(r) for n, r in by_bench.items()}},
        indent=2))
    seen = {(k[0], k[1].id) for k in keys}
    graded = {name: [p for p in problems[name] if (name, p.id) in seen] for name in by_bench}
    return finish(out_dir, graded, grader.equivalent)


__all__ = ["evaluate", "grade_responses", "read_responses", "BenchmarkError"]
