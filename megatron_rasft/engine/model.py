"""Build the policy (DDP-wrapped, trainable) and the frozen reference with the same TP/PP layout."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from megatron_rasft.config import ModelConfig, ParallelConfig

if TYPE_CHECKING:
    from megatron_rasft.engine.offload import HostReference

# Fields that describe how to run the model rather than what it is: the run config decides them.
_RUNTIME_FIELDS = ("seq_length", "params_dtype", "transformer_impl", "attention", "fp8", "fp8_recipe",
                   "fp8_amax_history_len", "fp8_amax_compute_algo", "recompute_granularity", "recompute_method",
                   "recompute_num_layers", "recompute_modules", "reference_placement",
                   # MoE: the aux-loss weight is a training choice (HF's router_aux_loss_coef is only the
                   # checkpoint's suggestion); the router's dtype, a numerical one.
                   "moe_aux_loss_coeff", "moe_router_dtype")


@dataclass
class Models:
    policy: list  # DDP-wrapped model chunks (one per virtual pipeline stage)
    reference: Optional[list]  # frozen chunks, same layout (for ref_logp), or None
    kl_reference: Optional[torch.nn.Module]  # frozen model used inside the step (KL methods, PP=1)
    model_config: ModelConfig
    hf_config: Optional[dict]
    num_params: int  # whole model (all ranks), for MFU
    # model.reference_placement = "host": the reference's weights in host memory between passes
    # (engine/offload.py); None: they stay on the device.
    reference_host: Optional["HostReference"] = None

    @contextmanager
    def reference_on_device(self):
        """`with models.reference_on_device() as chunks:` the reference chunks with their weights on
        the device for the block (the reference pass); with `host` placement they leave it again
        when the block ends."""
        if self.reference_host is None:
            yield self.reference
        else:
            with self.reference_host.on_device() as chunks:
                yield chunks


def resolve_model_config(model: ModelConfig, load: Optional[str]) -> tuple[ModelConfig, Optional[dict]]:
    """The architecture to build -> (ModelConfig, the checkpoint's HF config or None): the
    checkpoint's (`load`, a converted Megatron checkpoint's folder) when one is loaded, with the
    runtime fields (`_RUNTIME_FIELDS`) of the run's `model`; `model` itself otherwise. Raises
    ValueError when model.seq_length exceeds the checkpoint's max_position_embeddings."""
    if load is None:
        return model, None
    from megatron_rasft.convert.mcore_io import read_model_config

    ckpt_cfg, meta = read_model_config(load)
    runtime = {f: getattr(model, f) for f in _RUNTIME_FIELDS}
    if runtime["seq_length"] > ckpt_cfg.max_position_embeddings:
        raise ValueError(f"model.seq_length ({runtime['seq_length']}) exceeds the checkpoint's "
                         f"max_position_embeddings ({ckpt_cfg.max_position_embeddings})")
    return dataclasses.replace(ckpt_cfg, **runtime), meta.get("hf_config")


def count_params(chunks: list, groups) -> int:
    """The whole model's parameter count (all ranks; every expert counted once). TP shards and PP
    stages are disjoint, DP replicas are not: dense parameters are summed over the model-parallel
    group (TP × PP). Expert-parallel parameters (Megatron's `allreduce = False`, EP > 1) are split over
    expert TP × EP × PP ranks instead: summed over that group. Collective when torch.distributed is up."""
    import torch.distributed as dist

    from megatron_rasft.parallel.placement import device

    dense = sum(p.numel() for c in chunks for p in c.parameters() if getattr(p, "allreduce", True))
    expert = sum(p.numel() for c in chunks for p in c.parameters() if not getattr(p, "allreduce", True))
    n = torch.tensor([dense, expert], dtype=torch.float64, device=device())
    if dist.is_initialized():
        d, e = n[:1].clone(), n[1:].clone()
        dist.all_reduce(d, group=groups.mp)
        dist.all_reduce(e, group=groups.collection.tp_ep_pp)
        n = torch.cat([d, e])
    return int(n.sum().item())


def check_moe_layout(mcfg: ModelConfig, parallel: ParallelConfig) -> None:
    """The checks `RunConfig` makes on [model] × [parallel], for the architecture actually built (a
    checkpoint's, when one is loaded): experts divisible by EP, no EP on a dense model, sequence
    parallelism for an MoE model trained with TP > 1. Raises ConfigError naming the fields."""
    from megatron_rasft.config import ConfigError, check_moe_parallel

    check_moe_parallel(mcfg, parallel)
    if mcfg.is_moe and parallel.tensor_model_parallel_size > 1 and not parallel.sequence_parallel:
        raise ConfigError(f"model.num_moe_experts with parallel.tensor_model_parallel_size = "
                          f"{parallel.tensor_model_parallel_size} needs parallel.sequence_parallel = true (Megatron's "
                          f"MoE layer refuses to train TP without it)")


def _chunks(mcfg, pcfg, pgs):
    """This rank's model chunks, on the run's device and every parameter in the model's dtype (the
    one place a chunk is moved: Megatron builds its local-spec norms on the CPU in fp32)."""
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.placement import to_device

    vpp = pcfg.virtual_pipeline_model_parallel_size
    chunks = [build_model(mcfg, pcfg, pg_collection=pgs, vp_stage=i) for i in range(vpp)] if vpp else \
        [build_model(mcfg, pcfg, pg_collection=pgs)]
    return [to_device(c, c.config.params_dtype) for c in chunks]


def build_policy_and_reference(model: ModelConfig, parallel: ParallelConfig, load: Optional[str], groups, *,
                               reference: bool, kl_reference: bool) -> Models:
    """The policy (DDP-wrapped) and, when `reference`, the frozen reference, on the layout of
    `groups` (the run's `ParallelGroups`). model, parallel: the run's `[model]` and `[parallel]`
    (the architecture comes from the checkpoint `load` when one is given: `resolve_model_config`);
    kl_reference: the loss needs the reference's logits inside the step (the KL methods; implies
    `reference`; `RunConfig` allows them only without pipeline stages, so there is one chunk)."""
    from megatron_rasft.convert.mcore_io import load_mcore_into_model
    from megatron_rasft.engine.step import attach_schedule_hooks, wrap_ddp

    mcfg, hf_config = resolve_model_config(model, load)
    check_moe_layout(mcfg, parallel)
    policy = _chunks(mcfg, parallel, groups.collection)
    if load:
        load_mcore_into_model(policy, load)
    ref_chunks = None
    if reference or kl_reference:
        ref_chunks = _chunks(mcfg, parallel, groups.collection)
        if load:
            load_mcore_into_model(ref_chunks, load)
        else:  # no checkpoint: the reference is the policy's own initial weights
            for src, dst in zip(policy, ref_chunks):
                dst.load_state_dict(src.state_dict())
        for chunk in ref_chunks:
            chunk.eval()
            chunk.requires_grad_(False)
    kl_model = ref_chunks[0] if kl_reference else None
    host = None
    if ref_chunks is not None and mcfg.reference_placement == "host":
        if kl_reference:  # RunConfig refuses it; a direct caller gets the same answer
            raise ValueError("model.reference_placement = 'host' cannot serve a reference used inside every "
                             "training step (the KL methods)")
        from megatron_rasft.engine.offload import HostReference

        host = HostReference(ref_chunks)
    n_params = count_params(policy, groups)
    policy = wrap_ddp(policy, use_distributed_optimizer=parallel.use_distributed_optimizer,
                      overlap_grad_reduce=parallel.overlap_grad_reduce,
                      overlap_param_gather=parallel.overlap_param_gather, bucket_size=parallel.bucket_size)
    attach_schedule_hooks(policy)
    return Models(policy, ref_chunks, kl_model, mcfg, hf_config, n_params, reference_host=host)
