"""The tests' tiny-model kit in one place: the demo's toy model and tokenizer (`megatron_rasft.demo.toy`),
the session server's starter (`devtools.tiny_server`), and a scripted fake of the rollout client's
`Generator` seam (defined here: only unit tests use it).
"""
from __future__ import annotations

from devtools.tiny_server import start_tiny_server  # noqa: F401
from megatron_rasft.demo.toy import (CHAT_TEMPLATE, SPECIAL, addition_solution, arithmetic_corpus,  # noqa: F401
                                     make_tiny_model, reseed_weights, train_tokenizer)


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
