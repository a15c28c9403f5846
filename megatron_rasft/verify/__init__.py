"""Verifiers: math answers (math-verify or the `reference` string rule) and code (a sandbox)."""
from megatron_rasft.verify.reference import last_boxed, normalize_answer, reference_equal  # noqa: F401
