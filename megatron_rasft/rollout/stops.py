"""The stop token ids of every request: training rounds, the `rollout` command and `eval`.

A chat model's end-of-turn token (`<|im_end|>`, `<|eot_id|>`) is a special token, and vLLM matches
stop *strings* on text decoded without special tokens, so only a stop token id can end a sample
there. The server runs with `--generation-config vllm` (sampling defaults come from the request
alone), so it does not read `generation_config.json` either: its end-of-sequence ids come in here.

The rule (docs/rollout.md): a sample ends at the first token that any of these sources names;
no source removes or replaces another's ids (the union, in this order, without repeats):
1. the configured ids (`rollout.sampling.stop_token_ids`);
2. the tokenizer's EOS;
3. `eos_token_id` of the model's `generation_config.json` (an id or a list), when the file exists;
4. the chat template's end-of-turn: the token the template writes right after an assistant
   message's content, when that is a special token (ChatML `<|im_end|>`, Llama 3 `<|eot_id|>`);
5. ChatML's `<|im_end|>` when the vocabulary has it as a single special token (the `released` and
   `qwen25-math-cot` prompts are ChatML whatever the tokenizer's own template is).
A base model without a chat template gets 1-3 (and 5 when its vocabulary has `<|im_end|>`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

_MARKER = "\u2063STOP-RULE-MARKER\u2063"  # an assistant message no template alters


def generation_config_eos(model_dir) -> list[int]:
    """`eos_token_id` of `model_dir/generation_config.json` as a list ([] when the file or the key
    is absent). Raises ValueError naming the file when it is not JSON or the field is not an int
    or a list of ints."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e})") from None
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
    return ids


def _special_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The special token the tokenizer's chat template writes right after an assistant message's
    content, or None (no template, a template without assistant turns, or plain text there)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _MARKER}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation names no end of turn
        return None
    if _MARKER not in text:
        return None
    after = text.split(_MARKER, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in _special_ids(tokenizer) else None


def chatml_end_id(tokenizer) -> Optional[int]:
    """`<|im_end|>`'s id when the vocabulary has it as one special token, else None."""
    if "<|im_end|>" not in tokenizer.get_vocab():
        return None
    i = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return i if i in _special_ids(tokenizer) else None


def stop_token_ids(tokenizer, model_dir=None, configured: Sequence[int] = ()) -> list[int]:
    """The stop token ids of a request (rule in the module docstring), in source order without
    repeats. `model_dir`: where `generation_config.json` is read (default: the tokenizer's own
    directory, `tokenizer.name_or_path`, when that is one). Raises ValueError when an id is not a
    token of the tokenizer (naming its source) or the generation config is malformed."""
    if model_dir is None:
        name = getattr(tokenizer, "name_or_path", "") or ""
        model_dir = name if name and Path(name).is_dir() else None
    sources = [("rollout.sampling.stop_token_ids", list(configured)),
               ("the tokenizer's EOS", [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
               (f"{model_dir}/generation_config.json eos_token_id",
                generation_config_eos(model_dir) if model_dir is not None else []),
               ("the chat template's end of turn", [end_of_turn_id(tokenizer)]),
               ("ChatML <|im_end|>", [chatml_end_id(tokenizer)])]
    n = len(tokenizer)
    out: list[int] = []
    for where, ids in sources:
        for i in ids:
            if i is None:
                continue
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                raise ValueError(f"stop token id {i!r} from {where} is not a token of the tokenizer "
                                 f"({n} tokens)")
            if i not in out:
                out.append(i)
    return out
