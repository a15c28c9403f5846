"""The rollout stage: K samples per problem → RUN/rollouts/round_NNN.jsonl (resumable).

Resumable through `rollout.sampler.SampleFile` (the loop `eval` uses too): each problem's K
`Rollout` records are appended together, flushed and fsync'ed as soon as the problem finishes; on
restart, problems with all K samples are skipped (never regenerated), lines of a problem left
incomplete by a kill (and a torn last line) are removed and that problem is generated again. Seeds
depend on (seed, round, problem id) only, so a resumed round produces the same samples as an
uninterrupted one.

The round's sampling rules live here (`round_sampling`), so the `rollout` command and the trainer's
round r send identical requests: base seed `seed + 7919·r`, and the stop token ids of
`rollout.stops` (the one rule `eval` uses too); prompts are tokenised like the trainer's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_rasft.records import Problem, RecordError, Rollout, read_records
from megatron_rasft.config import SamplingConfig
from megatron_rasft.data.tokenize import encode_prompt
from megatron_rasft.rollout.sampler import SampleFile
from megatron_rasft.rollout.stops import stop_token_ids
from megatron_rasft.rundir import RunDir


ROUND_SEED_STRIDE = 7919  # a prime: each round draws new samples, far from the previous round's seeds


def round_sampling(sampling: SamplingConfig, round_: int, tokenizer=None) -> SamplingConfig:
    """The sampling of round `round_` from the configured one: base seed `seed + 7919·round_`, and,
    with a tokenizer, the stop token ids of `rollout.stops.stop_token_ids` (EOS, the generation
    config's EOS ids, the chat template's end of turn, ChatML's `<|im_end|>`: special tokens, which
    no stop *string* can match)."""
    stop_ids = list(sampling.stop_token_ids)
    if tokenizer is not None:
        stop_ids = stop_token_ids(tokenizer, configured=stop_ids)
    return dataclasses.replace(sampling, seed=sampling.seed + ROUND_SEED_STRIDE * round_, stop_token_ids=stop_ids)


def rollout_file(path: Path, round_: int, num_samples: int) -> SampleFile:
    """RUN/rollouts/round_R.jsonl as a resumable samples file (`rollout.sampler`): `num_samples`
    `Rollout` records per problem, every one of round `round_` (another round's record raises
    `RecordError` naming the file and record)."""
    def same_round(r: Rollout, where: str) -> None:
        if r.round != round_:
            raise RecordError(f"{where} has round {r.round}, expected {round_}")

    return SampleFile(Path(path), Rollout, num_samples, id_field="problem_id", check=same_round)


def rollout_round(run_dir, round_: int, generate: Callable, sampling: SamplingConfig, tokenizer=None,
                  problem_ids: Optional[Sequence[str]] = None) -> dict:
    """Sample `sampling.n` rollouts for every problem of RUN/problems.jsonl (or `problem_ids`) into
    RUN/rollouts/round_R.jsonl; returns {problems, skipped, rollouts, path}.

    generate(prompts, sampling, keys=..., on_result=...) is the `RolloutClient.generate` seam.
    sampling: the configured sampling; the round's rules are applied here (`round_sampling`).
    tokenizer: prompts are tokenised with it the way the trainer does (`data.tokenize.encode_prompt`,
    so BOS handling matches); None sends the text and lets the server tokenise it.
    Raises ValueError for a negative round or unknown problem ids, RecordError for bad files.
    """
    if round_ < 0:
        raise ValueError(f"round must be >= 0, got {round_}")
    run = RunDir(run_dir)
    problems = list(read_records(run.problems, Problem))
    if problem_ids is not None:
        known = {p.id for p in problems}
        unknown = [pid for pid in problem_ids if pid not in known]
        if unknown:
            raise ValueError(f"problem ids not in problems.jsonl: {unknown[:5]}")
        wanted = set(problem_ids)
        problems = [p for p in problems if p.id in wanted]
    out = run.rollouts(round_)
    samples = rollout_file(out, round_, sampling.n)
    done = samples.complete_ids()
    unverifiable = [p for p in problems if p.meta.get("unverifiable")]  # placeholder answers: no rollouts
    problems = [p for p in problems if not p.meta.get("unverifiable")]
    todo = [p for p in problems if p.id not in done]
    stats = {"problems": len(todo), "skipped": len(problems) - len(todo), "rollouts": 0, "path": str(out)}
    if unverifiable:  # placeholder answers (data/problems.py): counted, never sampled
        stats["unverifiable"] = len(unverifiable)
    if not todo:
        return stats
    sampling = round_sampling(sampling, round_, tokenizer)
    prompts = [encode_prompt(tokenizer, p.prompt) if tokenizer is not None else p.prompt for p in todo]
    stats["rollouts"] = samples.sample(
        generate, prompts, sampling, [f"{round_}:{p.id}" for p in todo],
        lambda i, completions: [Rollout(todo[i].id, round_, j, c.text, c.token_ids, c.logprobs, c.seed,
                                        c.finish_reason) for j, c in enumerate(completions)])
    return stats
