"""Benchmark evaluation: loaders (benchmarks.py), prompt templates (prompts.py), grading
(grade.py), metrics (metrics.py), the resumable runner (runner.py) and reports (report.py).

Nothing here imports vLLM: generation goes through the rollout server over HTTP.
"""
