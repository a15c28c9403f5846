"""Helpers for tests: spawning real multi-process gloo jobs, tiny models and tokenizers."""
