"""Prompt rendering and tokenisation of (prompt, response) pairs into training sequences.

A sequence is `tokens = prompt_ids + response_ids + [eos]`; the loss covers the response and the
EOS (labels on the prompt are masked). Over-long sequences are truncated (response cut to fit) or
dropped, as configured, and every such case is counted so the caller can report it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# The released code's system prompt (ChatML), used by the `released` template.
RELEASED_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def render_prompt(tokenizer, prompt: str, template: str) -> str:
    """The text the model sees before its response: `chat` (the tokenizer's own chat template),
    `released` (ChatML with the released code's system prompt) or `plain` (the prompt as is)."""
    if template == "plain":
        return prompt
    if template == "released":
        return (f"<|im_start|>system\n{RELEASED_SYSTEM}<|im_end|>\n"
                f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            where = getattr(tokenizer, "name_or_path", "") or "(in memory)"
            raise ValueError(f"prompt_template = 'chat' but the tokenizer {where} has no chat template "
                             "(no chat_template in its tokenizer_config.json or chat_template.jinja); "
                             "use 'released' or 'plain', or give a tokenizer that has one")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"unknown prompt template {template!r} (chat | released | plain)")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt token ids; BOS is added unless the rendered text already carries it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


@dataclass
class Counts:
    """What happened to over-long inputs; reported in the log, never silent."""

    truncated: int = 0
    dropped_overlong: int = 0
    dropped_prompt_too_long: int = 0
    examples: list = field(default_factory=list)

    def note(self, what: str, key: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        if len(self.examples) < 5:
            self.examples.append(f"{key}: {what}")

    def summary(self) -> str:
        return (f"{self.truncated} truncated, {self.dropped_overlong} dropped (over-long), "
                f"{self.dropped_prompt_too_long} dropped (prompt alone exceeds the context)")


def build_sequence(prompt_ids: list[int], response_ids: list[int], eos_id: int, *, max_len: int,
                   overlong: str, counts: Counts, key: str) -> Optional[tuple[list[int], int]]:
    """`(tokens, prompt_len)` or None when dropped. `max_len` counts all tokens of the sequence."""
    min_response = 1
    if len(prompt_ids) + min_response + 1 > max_len:
        counts.note("dropped_prompt_too_long", key)
        return None
    tokens = prompt_ids + list(response_ids) + [eos_id]
    if len(tokens) > max_len:
        if overlong == "drop":
            counts.note("dropped_overlong", key)
            return None
        counts.note("truncated", key)
        tokens = tokens[:max_len]
    return tokens, len(prompt_ids)


def check_tokenizer(tokenizer, vocab_size: int, where: str = "") -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(f"tokenizer{where} has {n} tokens but the model's vocab_size is {vocab_size}: "
                         "the tokenizer does not match the checkpoint")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer{where} has no EOS token; set one before training")
