"""Load the tokenizer and problems and turn expert demonstrations into training sequences."""
from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_rasft.config import ModelConfig, TrainDataConfig
from megatron_rasft.data.batching import Seq
from megatron_rasft.data.problems import Problem, read_problems
from megatron_rasft.data.tokenize import Counts, build_sequence, check_tokenizer, encode_prompt, render_prompt
from megatron_rasft.rundir import expert_key


@dataclass
class Dataset:
    tokenizer: object  # None for synthetic data
    problems: dict  # id -> Problem
    prompt_ids: dict  # id -> prompt token ids (what the rollout server is sent)
    experts: dict  # expert_key(id) -> Seq
    pad_id: int
    eos_id: int
    counts: Counts


def load_dataset(dcfg: TrainDataConfig, mcfg: ModelConfig, seed: int) -> Dataset:
    """The problems of `dcfg.path` tokenised (or, without a path, synthetic sequences drawn with
    `seed`). Raises ValueError when every problem is dropped as over-long."""
    max_len = mcfg.seq_length + 1  # inputs are tokens[:-1]
    if dcfg.path is None:
        return _synthetic(mcfg, seed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dcfg.tokenizer)
    check_tokenizer(tok, mcfg.vocab_size, where=f" {dcfg.tokenizer}")
    problems = read_problems(dcfg.path, prompt_field=dcfg.prompt_field,
                             response_field=dcfg.response_field, answer_field=dcfg.answer_field,
                             placeholders=dcfg.placeholder_answers)
    counts = Counts()
    prompt_ids, experts = {}, {}
    for p in problems:
        ids = encode_prompt(tok, render_prompt(tok, p.prompt, dcfg.prompt_template))
        resp = tok(p.response, add_special_tokens=False)["input_ids"]
        built = build_sequence(ids, resp, tok.eos_token_id, max_len=max_len, overlong=dcfg.overlong,
                               counts=counts, key=f"problem {p.id}")
        if built is None:
            continue
        prompt_ids[p.id] = ids
        experts[expert_key(p.id)] = Seq(expert_key(p.id), built[0], built[1])
    if not experts:
        raise ValueError(f"{dcfg.path}: every problem was dropped ({counts.summary()}); "
                         f"raise model.seq_length ({mcfg.seq_length}) or use train.data.overlong = 'truncate'")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Dataset(tok, {p.id: p for p in problems if p.id in prompt_ids}, prompt_ids, experts, pad,
                   tok.eos_token_id, counts)


def _synthetic(mcfg: ModelConfig, seed: int, n: int = 256) -> Dataset:
    """Random token sequences (a smoke-test stream that exercises the whole Megatron path)."""
    rng = random.Random(seed)
    experts, problems, prompt_ids = {}, {}, {}
    for i in range(n):
        length = rng.randint(mcfg.seq_length // 2, mcfg.seq_length + 1)
        toks = [rng.randrange(2, mcfg.vocab_size) for _ in range(length)]
        pid = str(i)
        experts[expert_key(pid)] = Seq(expert_key(pid), toks, 4)
        problems[pid] = Problem(pid, "", "")
        prompt_ids[pid] = toks[:4]
    return Dataset(None, problems, prompt_ids, experts, 0, 1, Counts())
