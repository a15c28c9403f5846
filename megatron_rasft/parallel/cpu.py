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

Autograd's backward (`Tensor.backward`, `torch.autograd.backward`) is itself a torch function: torch
would run the whole backward pass from inside the mode's handler, with the mode off; the mode runs
it with itself pushed instead, so backward code meets mapped devices too. With
`MEGATRON_RASFT_DEVICE_CHECK=1` the mode also tells device tensors from host tensors
(`device_check.py`), so that the dry run fails where a GPU run would on a tensor left on the host.

It is applied only when `torch.cuda.is_available()` is False, and must run in every process
(`init_distributed` calls it). Nothing here is active on a GPU machine.
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode

from megatron_rasft.parallel import device_check

_ENABLED = False
_MODE = None

_CPU = torch.device("cpu")
# Tensor methods whose positional arguments may carry a device.
_DEVICE_METHODS = {torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros,
                   torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_tensor}
_MOVES = (torch.Tensor.to, torch.Tensor.cuda)
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


def _requested(func, args, kwargs):
    """Where the call would put its result on a GPU: "device" (a CUDA device named), "host"
    (`.cpu()`), "unknown" (a CPU device named: under the shim `device=x.device` of a device tensor
    names the CPU too, so it cannot be told from a real CPU placement), or None (no device named)."""
    if func is torch.Tensor.cuda:
        return device_check.DEVICE
    if func is torch.Tensor.cpu:
        return device_check.HOST
    devs = [kwargs["device"]] if kwargs.get("device") is not None else []
    if func in _DEVICE_METHODS:
        devs += [a for a in args[1:] if isinstance(a, (str, torch.device))]
    if not devs:
        return None
    return device_check.DEVICE if any(_is_cuda_device(d) for d in devs) else device_check.UNKNOWN


def _backward_under(mode, func, args, kwargs):
    """`Tensor.backward(gradient, retain_graph, create_graph, inputs)` or `torch.autograd.backward(
    tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs)` with `mode` pushed:
    what torch.autograd.backward does after its torch-function check."""
    try:
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward
    except ImportError:  # another torch: run it as before, with the mode off
        return func(*args, **kwargs)
    if func is torch.Tensor.backward:
        kw = dict(zip(("gradient", "retain_graph", "create_graph", "inputs"), args[1:]), **kwargs)
        kw["grad_tensors"] = kw.pop("gradient", None)
    else:
        kw = dict(zip(("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs"), args[1:]),
                  **kwargs)
        if kw.get("grad_variables") is not None:
            kw["grad_tensors"] = kw["grad_variables"]
    tensors = (args[0],) if isinstance(args[0], torch.Tensor) else tuple(args[0])
    inputs = kw.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    create = bool(kw.get("create_graph", False))
    retain = create if kw.get("retain_graph") is None else kw["retain_graph"]
    with mode:
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(kw.get("grad_tensors"), len(tensors)),
                            is_grads_batched=False)
        _engine_run_backward(tensors, grads, retain, create, inputs, allow_unreachable=True, accumulate_grad=True)


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # Called from inside this handler, the whole backward pass would run with the mode off
            # (Megatron's autograd functions would meet unmapped CUDA devices): run it under the mode.
            return _backward_under(self, func, args, kwargs)
        if device_check.active():
            asked = _requested(func, args, kwargs)
            out = self._call(func, args, kwargs)
            if (asked == device_check.DEVICE and func in _MOVES and out is args[0]
                    and device_check.place(out) != device_check.DEVICE):
                # A GPU would return a new tensor and leave this one on the host: keep them apart,
                # so that code using the original instead of the moved copy fails here too.
                out = out.clone()
            device_check.on_call(func, args, kwargs, out, asked)
            return out
        return self._call(func, args, kwargs)

    @staticmethod
    def _call(func, args, kwargs):
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
        if device_check.requested():
            device_check.activate()
    return True

