"""Start torch.distributed and Megatron's model-parallel groups, on GPU (NCCL) or CPU (gloo)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_rasft.config import ParallelConfig
from megatron_rasft.parallel import cpu
from megatron_rasft.parallel.net import free_port


def device() -> torch.device:
    """The run's device (`placement.device`)."""
    from megatron_rasft.parallel.placement import device as run_device

    return run_device()


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups, passed as an argument to everything that communicates (the step,
    the reference pass, the rounds, export, checkpointing). Megatron's own `parallel_state` globals
    are read only where Megatron needs them (its schedules, DDP and optimizer read them themselves).

    tp: tensor-parallel; pp: pipeline; dp: data-parallel (without context parallelism); cp: context;
    dp_cp: data × context (the replicas that hold the same weights); mp: model-parallel (TP × PP).
    `collection` is Megatron's `ProcessGroupCollection` of the same groups (for `GPTModel`, DDP; it
    carries the expert groups too: `ep`, `expt_tp`, `expt_dp`, `tp_ep`).
    Mixture of experts: ep: expert-parallel (the ranks an MoE layer's experts are split over, its
    all-to-all); expt_tp: expert tensor-parallel; expt_dp: expert data-parallel (the replicas that hold
    the same experts: world / (expert TP × EP × PP) ranks; the expert gradients are reduced over it).
    On a dense model ep and expt_tp have one rank and expt_dp is dp_cp.
    """

    tp: object
    pp: object
    dp: object
    cp: object
    dp_cp: object
    mp: object
    collection: object
    ep: object = None
    expt_tp: object = None
    expt_dp: object = None

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp)

    @property
    def pp_last_global_rank(self) -> int:
        """Global rank of this pipeline's last stage (the one with the logits and the loss)."""
        return dist.get_process_group_ranks(self.pp)[-1]

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep)

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.ep)

    @property
    def first_replica(self) -> bool:
        """True on the data × context replica 0 (the one that writes shared files)."""
        return dist.get_rank(self.dp_cp) == 0


def init_distributed(pcfg: ParallelConfig, seed: int = 1234) -> ParallelGroups:
    """Initialise the default process group from torchrun's env (or a single process) and Megatron's
    TP/PP/DP/CP groups and the expert groups (EP, expert TP, expert DP), every collective with the
    timeout `pcfg.distributed_timeout_minutes`. Returns them as one `ParallelGroups`. Raises
    ValueError when the world size is not a multiple of TP × PP × CP or of expert TP × EP × PP, RuntimeError for NCCL without CUDA or for a megatron-core
    outside the supported range (`compat.check_megatron`)."""
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
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(minutes=pcfg.distributed_timeout_minutes))
    world = dist.get_world_size()
    mp = pcfg.tensor_model_parallel_size * pcfg.pipeline_model_parallel_size * pcfg.context_parallel_size
    if world % mp:
        raise ValueError(f"world size {world} is not divisible by TP×PP×CP = {mp} "
                         f"(tensor {pcfg.tensor_model_parallel_size}, pipeline "
                         f"{pcfg.pipeline_model_parallel_size}, context {pcfg.context_parallel_size})")
    ep = pcfg.expert_model_parallel_size
    etp = pcfg.expert_tensor_parallel_size or pcfg.tensor_model_parallel_size
    expert_mp = etp * ep * pcfg.pipeline_model_parallel_size
    if world % expert_mp:
        raise ValueError(f"world size {world} is not divisible by expert TP×EP×PP = {expert_mp} (expert tensor "
                         f"{etp}, parallel.expert_model_parallel_size {ep}, pipeline "
                         f"{pcfg.pipeline_model_parallel_size})")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=pcfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=pcfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=pcfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=pcfg.context_parallel_size,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=pcfg.expert_tensor_parallel_size,
            distributed_timeout_minutes=pcfg.distributed_timeout_minutes,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelGroups(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                          dp=ps.get_data_parallel_group(), cp=ps.get_context_parallel_group(),
                          dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
                          mp=ps.get_model_parallel_group(),
                          collection=ProcessGroupCollection.use_mpu_process_groups(),
                          ep=ps.get_expert_model_parallel_group(), expt_tp=ps.get_expert_tensor_parallel_group(),
                          expt_dp=ps.get_expert_data_parallel_group())


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
