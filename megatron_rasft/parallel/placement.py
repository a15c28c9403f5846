"""Where tensors live: the one function that puts the run's tensors and model chunks on its device.

The rule (docs/training.md, "Device placement"): every tensor that meets the model or a collective
is created on the run's device (`device=device()`) or moved there by `to_device`, in one place per
path: micro-batches in the forward step, model chunks (policy and frozen reference) right after
they are built. On a GPU a forgotten move is a crash (NCCL takes only CUDA tensors; a CPU batch
meets CUDA weights); on the CPU shim it would pass silently, so in the shim's device-check mode
(`parallel/device_check.py`) this function is also what marks a tensor as "on the device".
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_rasft.parallel import device_check


def device() -> torch.device:
    """The run's device: this rank's CUDA device, or the CPU where CUDA is absent. In the CPU shim's
    device-check mode, `cuda:0` (which the shim maps to the CPU), so that what is created with
    `device=device()` counts as on the device, as on a GPU."""
    if device_check.active():
        return torch.device("cuda", 0)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(x, dtype: Optional[torch.dtype] = None):
    """`x` on the run's device: a tensor, a dict/list/tuple of tensors (other values pass through),
    or an `nn.Module` (moved in place and returned; with `dtype`, its floating-point parameters and
    buffers are cast to it: Megatron's local-spec norms are created in fp32 whatever the model's
    dtype, and a bf16 model with fp32 norm weights sends torch to its slow unfused RMSNorm).
    `dtype` applies to modules only. Non-blocking copies are not used: the batch is small next to
    a step and a synchronous copy keeps the host buffers' lifetime simple."""
    dev = device()
    if isinstance(x, torch.nn.Module):
        x.to(device=dev) if dtype is None else x.to(device=dev, dtype=dtype)
        for t in list(x.parameters()) + list(x.buffers()):
            device_check.mark_device(t)
        return x
    if isinstance(x, torch.Tensor):
        return device_check.mark_device(x.to(dev))
    if isinstance(x, dict):
        return {k: to_device(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v) for v in x)
    return x
