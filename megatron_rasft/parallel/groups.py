"""Start torch.distributed and Megatron's model-parallel groups, on GPU (NCCL) or CPU (gloo)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_rasft.config import ParallelConfig
from megatron_rasft.parallel import cpu


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(pcfg: ParallelConfig, seed: int = 1234, timeout_s: float = 600.0):
    """Initialise the default process group from torchrun's env (or a single process) and Megatron's
    TP/PP/DP groups. Returns Megatron's `ProcessGroupCollection` for the model-parallel groups.
    Raises RuntimeError for a megatron-core outside the supported range (`compat.check_megatron`)."""
    from megatron_rasft.compat import check_megatron

    check_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    on_cpu = cpu.enable()
    backend = pcfg.backend if pcfg.backend != "auto" else ("gloo" if on_cpu else "nccl")
    if backend == "nccl" and on_cpu:
        raise RuntimeError("parallel.backend = 'nccl' needs CUDA, and torch.cuda.is_available() is False")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from megatron_rasft.rollout.server import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    mp = pcfg.tensor_model_parallel_size * pcfg.pipeline_model_parallel_size * pcfg.context_parallel_size
    if world % mp:
        raise ValueError(f"world size {world} is not divisible by TP×PP×CP = {mp} "
                         f"(tensor {pcfg.tensor_model_parallel_size}, pipeline "
                         f"{pcfg.pipeline_model_parallel_size}, context {pcfg.context_parallel_size})")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=pcfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=pcfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=pcfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=pcfg.context_parallel_size,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    """`dist.barrier()` that is a no-op in a single process without a process group."""
    if dist.is_initialized():
        dist.barrier()
