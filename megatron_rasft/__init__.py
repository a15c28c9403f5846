"""megatron_rasft: Rollout-Adaptive Supervised Fine-Tuning on Megatron-Core.

Importing the package is cheap: vLLM, Transformer Engine and CUDA-only code load lazily, only in
the functions that need them.
"""
__version__ = "0.1.0"
