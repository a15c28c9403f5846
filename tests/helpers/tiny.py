"""The tests' tiny-model kit in one place: the demo's toy model and tokenizer (`megatron_rasft.demo.toy`),
the session server's starter (`devtools.tiny_server`), and a scripted fake of the rollout client's
`Generator` seam (defined here: only unit tests use it).
"""
from __future__ import annotations

from pathlib import Path

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


def teach_tiny(model_dir: str | Path, out_dir: str | Path, problems: list[dict], steps: int = 8,
               lr: float = 3e-3) -> Path:
    """`model_dir` (an HF Llama with its tokenizer) trained for `steps` full-batch Adam steps on the
    problems' demonstrations (prompt, then response + EOS) in plain PyTorch, saved to `out_dir` with
    the tokenizer files. With the defaults the tiny model solves some toy additions sometimes (not
    all, not always), so rollout groups have mixed rewards. Returns `out_dir`."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [(tok(p["prompt"])["input_ids"], tok(p["response"], add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id]) for p in problems]
    width = max(len(a) + len(b) for a, b in rows)
    ids_BS = torch.full((len(rows), width), tok.pad_token_id)
    labels_BS = torch.full((len(rows), width), -100)
    for i, (a, b) in enumerate(rows):
        ids_BS[i, :len(a) + len(b)] = torch.tensor(a + b)
        labels_BS[i, len(a):len(a) + len(b)] = torch.tensor(b)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        model(input_ids=ids_BS, labels=labels_BS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in model_dir.iterdir():  # tokenizer and generation config
        if f.is_file() and not (out_dir / f.name).exists():
            shutil.copy(f, out_dir / f.name)
    return out_dir
