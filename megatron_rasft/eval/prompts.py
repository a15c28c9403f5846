"""Prompt templates for evaluation, and the stop strings that go with them.

- `chat`: the model's own chat template (tokenizer from the model directory), one user turn; math
  questions get the step-by-step/\\boxed{} instruction appended, code questions ask for a fenced
  Python block.
- `qwen25-math-cot`: ChatML with the system prompt of the Qwen2.5-Math evaluation (the template the
  RASFT release evaluates with); code benchmarks keep ChatML with a neutral system prompt, since
  the \\boxed{} instruction makes no sense for them.
- `plain`: completion mode: the question as it is (HumanEval: the function stub to continue).
"""
from __future__ import annotations

from typing import Optional

from megatron_rasft.eval.benchmarks import EvalProblem

TEMPLATES = ("chat", "qwen25-math-cot", "plain")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_SYSTEM = "You are a helpful assistant."
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one "
                    "```python code block.")
CODE_TASK = "Write a Python function for the task below. Reply with the code in one ```python code block."
# Completion-mode HumanEval stops where the function body ends (Codex paper's stop sequences).
PLAIN_CODE_STOPS = ["\nclass", "\ndef", "\n#", "\nif"]  # vLLM takes at most 4
CHATML_STOPS = ["<|im_end|>", "<|endoftext|>"]


def chatml(system: str, user: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def user_message(problem: EvalProblem) -> str:
    """The user turn of the chat-style templates."""
    if problem.kind == "math":
        return f"{problem.question}\n{MATH_INSTRUCTION}"
    if problem.code_prefix:  # HumanEval: continue a stub
        return f"{CODE_INSTRUCTION}\n\n```python\n{problem.code_prefix.rstrip()}\n```"
    return f"{CODE_TASK}\n\n{problem.question}"


def render(problem: EvalProblem, template: str, tokenizer=None) -> str:
    """The prompt text the model continues."""
    if template == "plain":
        return problem.code_prefix if problem.kind == "code" and problem.code_prefix else problem.question
    if template == "qwen25-math-cot":
        if problem.kind == "math":
            return chatml(MATH_INSTRUCTION, problem.question)
        return chatml(CODE_SYSTEM, user_message(problem))
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("eval.prompt_template = chat needs a tokenizer with a chat template (from --model "
                             "or --tokenizer); use qwen25-math-cot or plain")
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(problem)}],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def stops(kind: str, template: str, has_prefix: bool) -> list[str]:
    """Stop strings for a benchmark of `kind` under `template`. Special tokens (EOS, `<|im_end|>`)
    are matched by id, not here: `rollout.stops.stop_token_ids`."""
    if template == "plain" and kind == "code" and has_prefix:
        return list(PLAIN_CODE_STOPS)
    if template == "qwen25-math-cot":
        return list(CHATML_STOPS)  # for tokenizers where these are plain text, not EOS
    return []


def describe(template: str) -> Optional[str]:
    """What the report records about the template."""
    return {"chat": "the model's chat template (one user turn)",
            "qwen25-math-cot": "ChatML, system: " + MATH_INSTRUCTION,
            "plain": "completion mode (question as is)"}.get(template)
