"""Tiny tokenizer/model builders, and the rollout stage's resume logic around a scripted generator."""
import json
import os

import pytest
import torch

from megatron_rasft.records import Problem, RecordError, Rollout, read_records, write_records
from megatron_rasft.config import SamplingConfig
from megatron_rasft.rollout.client import prompt_seed
from megatron_rasft.rollout.stage import rollout_round
from megatron_rasft.rundir import RunDir
from helpers.tiny import (ScriptedGenerator, addition_solution, arithmetic_corpus,
                                         make_tiny_model, reseed_weights, train_tokenizer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tok_dir = train_tokenizer(root / "tok")
    return tok_dir, make_tiny_model(root / "model", tok_dir, seed=0)


def test_addition_solution():
    assert addition_solution(4821, 397) == "1+7+0=8;2+9+0=11;8+3+1=12;4+0+1=5;\\boxed{5218}"
    assert addition_solution(0, 5) == "0+5+0=5;\\boxed{5}"


def test_tokenizer_round_trips_and_special_tokens(tiny):
    import sentencepiece  # noqa: F401  (the trainer of the BPE)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[0])
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    for text in arithmetic_corpus(50, seed=9):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert len(ids) < 0.6 * len(text)  # BPE merges: well below one token per character
    # No "▁" is prepended to a piece of text (sentencepiece was trained without a dummy prefix).
    pieces = tok.convert_ids_to_tokens(tok("3+4+0=7;", add_special_tokens=False).input_ids)
    assert "".join(pieces) == "3+4+0=7;"
    assert tok("Q:é").input_ids[-1] == tok.unk_token_id  # unknown characters are <unk>, not dropped
    chat = tok.apply_chat_template([{"role": "user", "content": "Q:1+2;A:"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<s>Q:1+2;A:"


def test_tiny_model_loads_and_reseeds(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny[1])
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 4, 2)
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    other = AutoModelForCausalLM.from_pretrained(reseed_weights(tiny[1], tmp_path / "m1", seed=1))
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    again = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m0", tiny[0], seed=0))
    assert all(torch.equal(a[k], again.state_dict()[k]) for k in a)


def test_prompt_seeds_are_stable_and_far_apart():
    import subprocess
    import sys

    seeds = [prompt_seed(1234, f"0:p{i}") for i in range(1000)]
    # Stable across processes and hash randomisation (a resumed run re-derives the seeds it wrote):
    # a fresh interpreter with another PYTHONHASHSEED gives the same values ...
    code = ("from megatron_rasft.rollout.client import prompt_seed;"
            "print([prompt_seed(1234, f'0:p{i}') for i in range(1000)])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == seeds
    # ... and so does the documented rule (first 8 bytes of sha256("base:key"), little-endian, >> 2),
    # pinned to literal values so that a change of rule (which would orphan old runs' seeds) is seen.
    assert seeds[0] == 3033912597684609959 and prompt_seed(0, "r/x") == 1052707498235856809
    assert len(set(seeds)) == 1000 and prompt_seed(1235, "0:p0") != seeds[0]
    s = sorted(seeds)
    assert min(b - a for a, b in zip(s, s[1:])) > 1000 and max(s) < 2 ** 62  # room for seed + j


def _problems(run, n=4):
    write_records(run / "problems.jsonl", [Problem(id=f"p{i}", prompt=f"Q:{i}+1;A:", response="x") for i in range(n)])


def test_stage_resume_logic_with_scripted_generator(tmp_path):
    _problems(tmp_path)
    gen = ScriptedGenerator(lambda prompt, key, j: f"{prompt}|{key}|{j}")
    sampling = SamplingConfig(n=3, seed=1)
    stats = rollout_round(tmp_path, 2, gen, sampling)
    assert stats == {"problems": 4, "skipped": 0, "rollouts": 12, "path": str(RunDir(tmp_path).rollouts(2))}
    recs = list(read_records(RunDir(tmp_path).rollouts(2), Rollout))
    assert [(r.problem_id, r.sample_index) for r in recs] == [(f"p{i}", j) for i in range(4) for j in range(3)]
    # Round 2 samples with base seed 1 + 7919·2 (the stage's round rule), per-prompt key "2:p1".
    assert recs[4].text == "Q:1+1;A:|2:p1|1" and recs[4].seed == prompt_seed(1 + 7919 * 2, "2:p1") + 1
    # Kill mid-write: p3 has 1 full line and a torn one. Only p3 is generated again.
    path = RunDir(tmp_path).rollouts(2)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:10]) + lines[10][:15])
    with pytest.warns(UserWarning):
        stats = rollout_round(tmp_path, 2, gen, sampling)
    assert stats["problems"] == 1 and stats["skipped"] == 3 and gen.calls[-1] == ["2:p3"]
    assert path.read_text().splitlines() == [l.rstrip("\n") for l in lines]
    # Nothing to do: no call at all.
    assert rollout_round(tmp_path, 2, gen, sampling)["problems"] == 0 and len(gen.calls) == 2
    # A different K on an existing round file is refused, not silently mixed.
    with pytest.raises(RecordError, match="sample_index 2, outside 0..1"):
        rollout_round(tmp_path, 2, gen, SamplingConfig(n=2, seed=1))
    # Only the requested problems; unknown ids are named.
    assert rollout_round(tmp_path, 3, gen, sampling, problem_ids=["p2"])["rollouts"] == 3
    with pytest.raises(ValueError, match="pX"):
        rollout_round(tmp_path, 3, gen, sampling, problem_ids=["pX"])


def test_stage_rejects_malformed_problems(tmp_path):
    _problems(tmp_path, 2)
    with open(tmp_path / "problems.jsonl", "a") as f:
        f.write(json.dumps({"schema_version": 1, "type": "problem", "id": "p9"}) + "\n")
    with pytest.raises(RecordError, match=r"problems.jsonl:3: .*missing required field"):
        rollout_round(tmp_path, 0, ScriptedGenerator(lambda *a: "x"), SamplingConfig())
