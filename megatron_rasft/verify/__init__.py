"""Verifiers: math answers (math-verify, our normalised rule, or the released code's check) and code (a sandbox)."""
from megatron_rasft.verify.answers import last_boxed, normalize_answer, answers_equal  # noqa: F401
