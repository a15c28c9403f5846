"""Run unmodified Megatron-Core on CPU (gloo), for development boxes and CI.

Megatron-Core's model, schedules, DDP wrapper and optimizers hard-code CUDA in a few ways:
`device="cuda"` / `torch.cuda.current_device()` tensor factories, `.cuda()` calls,
`tensor.type() == "torch.cuda.FloatTensor"` checks, the CUDA RNG state tracker, and
`torch.cuda.synchronize()` / streams / events. Rather than fork any of it, `enable()`:

1. pushes a process-wide `TorchFunctionMode` that rewrites CUDA devices in tensor factories and
   `.to()/.cuda()` to CPU, and reports CUDA type names from `Tensor.type()`;
2. points the CUDA RNG helpers at the CPU generator (forking/restoring states still works, so the
   tensor-parallel RNG tracker keeps its semantics);
3. replaces synchronize/streams/events/memory stats with no-ops.

It is applied only when `torch.cuda.is_available()` is False, and must run in every process
(`init_distributed` calls it). Nothing here is active on a GPU machine.
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE = None

_CPU = torch.device("cpu")
# Tensor methods whose positional arguments may carry a device.
_DEVICE_METHODS = {torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros,
                   torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_tensor}
_CUDA_TYPE_NAMES = {"torch.FloatTensor", "torch.DoubleTensor", "torch.HalfTensor",
                    "torch.BFloat16Tensor", "torch.LongTensor", "torch.IntTensor",
                    "torch.ByteTensor", "torch.BoolTensor", "torch.CharTensor", "torch.ShortTensor"}


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(d, int) and not isinstance(d, bool)


def _map(d):
    return _CPU if _is_cuda_device(d) else d


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _map(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and "dtype" not in kwargs:
                name = func(*args, **kwargs)
                return name.replace("torch.", "torch.cuda.", 1) if name in _CUDA_TYPE_NAMES else name
            args = (args[0],) + tuple(a.replace("torch.cuda.", "torch.") if isinstance(a, str) else a
                                      for a in args[1:])
        elif func in _DEVICE_METHODS and len(args) > 1:
            args = (args[0],) + tuple(_CPU if (isinstance(a, (str, torch.device)) and _is_cuda_device(a))
                                      else a for a in args[1:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _Stream:
    """Stand-in for torch.cuda.Stream/Event: every operation is already synchronous on CPU."""

    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _Stream()

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *a, **k):
        pass

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_torch_cuda() -> None:
    c = torch.cuda

    # torch._dynamo keeps a rule per torch.cuda function object: each name needs its own function.
    def noop():
        return lambda *a, **k: None

    def zero():
        return lambda *a, **k: 0

    c.current_device = lambda: 0
    c.set_device = noop()
    c.synchronize = noop()
    c.empty_cache = noop()
    c.Stream = _Stream
    c.Event = _Stream
    c.current_stream = lambda *a, **k: _Stream()
    c.default_stream = lambda *a, **k: _Stream()
    c.stream = lambda *a, **k: contextlib.nullcontext()
    c.nvtx = types.SimpleNamespace(range_push=noop(), range_pop=noop(), mark=noop(),
                                   range=lambda *a, **k: contextlib.nullcontext())
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(c, name, zero())
    c.reset_peak_memory_stats = noop()
    c.reset_max_memory_allocated = noop()
    # The RNG tracker forks/restores "the CUDA generator"; the CPU generator plays that role.
    c.get_rng_state = lambda device="cuda": torch.get_rng_state()
    c.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    c.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    c.manual_seed_all = noop()
    c.random.get_rng_state = c.get_rng_state
    c.random.set_rng_state = c.set_rng_state
    c.random.manual_seed = c.manual_seed


def _patch_megatron() -> None:
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:  # megatron-core absent: nothing to patch
        return
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def enable() -> bool:
    """Apply the CPU shim in this process if CUDA is absent. Idempotent; returns whether active."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if not _ENABLED:
        _patch_torch_cuda()
        _patch_megatron()
        _MODE = _CudaToCpu()
        _MODE.__enter__()  # stays pushed for the life of the process
        _ENABLED = True
    return True

