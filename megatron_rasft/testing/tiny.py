"""Test helpers around the demo's toy model and tokenizer (`demo/toy.py`): a vLLM server on a tiny
model, and a scripted fake of the rollout client's `Generator` seam.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_rasft.demo.toy import (CHAT_TEMPLATE, SPECIAL, addition_solution, arithmetic_corpus,  # noqa: F401
                                     make_tiny_model, reseed_weights, train_tokenizer)


def start_tiny_server(work_dir: str | Path, seed: int = 0, log_file: Optional[str | Path] = None,
                      **config_overrides):
    """Build a tokenizer and a tiny model under `work_dir` and start a vLLM server on it with a
    small footprint (0.25 GiB KV cache, 512-token context). Returns the started `RolloutServer`
    (`.url`, `.model_dir`, `.stop()`)."""
    from megatron_rasft.config import ServerConfig
    from megatron_rasft.rollout.server import RolloutServer

    work_dir = Path(work_dir)
    tok_dir = train_tokenizer(work_dir / "tokenizer")
    model_dir = make_tiny_model(work_dir / "model", tok_dir, seed=seed)
    cfg = ServerConfig(**{"kv_cache_gib": 0.25, "max_model_len": 512, "concurrency": 4,
                           **config_overrides})
    return RolloutServer(model_dir, cfg, log_file=log_file or work_dir / "vllm_server.log").start()


class ScriptedGenerator:
    """A fake of the `Generator` seam (`RolloutClient.generate`) for unit tests of the logic around
    it: completion j of the prompt with key k is `script(prompt, k, j)` (text), its token ids are
    the characters' code points, its log-probs -1.0 each. Records every call in `calls`."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def __call__(self, prompts, sampling, keys=None, on_result=None):
        from megatron_rasft.rollout.client import Completion, prompt_seed

        keys = list(range(len(prompts))) if keys is None else list(keys)
        self.calls.append(list(keys))
        out = []
        for i, (prompt, key) in enumerate(zip(prompts, keys)):
            seed = prompt_seed(sampling.seed, key)
            comps = []
            for j in range(sampling.n):
                text = self.script(prompt, key, j)
                comps.append(Completion(text, [ord(ch) for ch in text], [-1.0] * len(text), "stop", seed + j))
            if on_result is not None:
                on_result(i, comps)
            out.append(comps)
        return out

    generate = __call__
