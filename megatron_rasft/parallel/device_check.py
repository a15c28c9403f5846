"""The CPU shim's device-check mode: on CPU, tell "the device" from plain host tensors.

Under the CPU shim every tensor is a CPU tensor, so code that forgets to put a tensor on the GPU
(a counter built with `torch.tensor([n])` and all-reduced, a batch handed to the model as built,
a model chunk never moved) runs fine here and fails on the first CUDA run (NCCL accepts only CUDA
tensors; a CPU batch meets CUDA weights). With `MEGATRON_RASFT_DEVICE_CHECK=1` in the environment
(the GPU check's `--cpu-dry-run` sets it), the shim keeps that difference:

- `placement.device()` answers `cuda:0`, as on a GPU, and the shim maps it to the CPU as it does
  for Megatron's own CUDA factories;
- a tensor becomes a *device* tensor when it is created with a CUDA device (`device=`, `.cuda()`,
  `.to("cuda")`, mapped by the shim) or goes through `placement.to_device`; a *host* tensor when a
  factory makes it without a device (or `.cpu()`); an op's result is a device tensor when one of
  its tensor inputs is, a host tensor when all of them are, and unmarked otherwise (gradients made
  by autograd's engine, tensors made inside a function the mode does not see, and tensors made with
  an explicit CPU device: under the shim `device=x.device` of a device tensor names the CPU too);
- every `torch.distributed` collective and point-to-point call (wrapped here at the function
  level, so also when reached from autograd's backward or from a nested call that the shim's
  `TorchFunctionMode` does not see; Megatron-Core's own module-level aliases of them, such as the
  distributed optimizer's reduce-scatter and all-gather, are pointed at the wrapped functions)
  refuses a host tensor;
- `GPTModel.forward` refuses tensor inputs that are not device tensors, parameters or buffers
  that did not go through `placement.to_device`, and floating-point parameters not in the
  model's `params_dtype`.

A refusal raises `DeviceMisplaced`, naming the call and the tensor. Marks live in a table keyed by
the tensor object (weakly: a tensor's mark goes with it), not on the tensor itself, so nothing
extra is pickled into checkpoints. The mode costs a few microseconds per torch call: it is meant for
the dry run and tests, never for real runs (it is never active on a GPU machine).
"""
from __future__ import annotations

import functools
import os
import weakref

import torch

ENV = "MEGATRON_RASFT_DEVICE_CHECK"
HOST, DEVICE, UNKNOWN = "host", "device", "unknown"

_ACTIVE = False
_MARKS: dict = {}  # id(tensor) -> (weakref to it, HOST | DEVICE)


class DeviceMisplaced(RuntimeError):
    """A host tensor reached a collective or the model (CPU shim, device-check mode)."""


def requested() -> bool:
    """Whether the environment asks for the device-check mode."""
    return os.environ.get(ENV, "") not in ("", "0")


def active() -> bool:
    """Whether the mode is on in this process (`activate()` was called)."""
    return _ACTIVE


def _forget(key, _ref=None):
    _MARKS.pop(key, None)


def _set(t: torch.Tensor, where: str) -> None:
    key = id(t)
    entry = _MARKS.get(key)
    if entry is not None and entry[0]() is t:
        if entry[1] != where:
            _MARKS[key] = (entry[0], where)
        return
    _MARKS[key] = (weakref.ref(t, functools.partial(_forget, key)), where)


def place(t: torch.Tensor):
    """HOST, DEVICE or None (unmarked) for `t`."""
    entry = _MARKS.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else None


def mark_device(t: torch.Tensor) -> torch.Tensor:
    """Mark `t` as on the device (called by `placement.to_device`); returns `t`. No-op when inactive."""
    if _ACTIVE and isinstance(t, torch.Tensor):
        _set(t, DEVICE)
    return t


def _tensors(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, depth + 1)


def on_call(func, args, kwargs, out, asked) -> None:
    """Mark the result of one torch call seen by the shim's mode (see the module docstring);
    `asked`: where the call asked for its result (`cpu._requested`: DEVICE, HOST, UNKNOWN or None)."""
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__") or name == "__setitem__":
        return  # in place: the tensor keeps its own place
    outs = list(_tensors(out))
    if not outs:
        return
    if asked in (HOST, DEVICE):
        where = asked
    else:
        places = [place(t) for t in _tensors((args, kwargs))]
        if not places:
            if asked == UNKNOWN:
                return  # a factory given a CPU device: maybe `device=x.device` of a device tensor
            where = HOST  # a factory without a device
        elif DEVICE in places:
            where = DEVICE
        elif all(p == HOST for p in places):
            where = HOST
        else:
            return
    for t in outs:
        _set(t, where)


def _describe(t: torch.Tensor) -> str:
    return f"a {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} tensor"


def _refuse_host(what: str, args, kwargs) -> None:
    for t in _tensors((args, kwargs)):
        if place(t) == HOST:
            raise DeviceMisplaced(
                f"{what} got {_describe(t)} made on the host and never moved to the device: on a GPU, "
                f"NCCL rejects it. Create it with device=placement.device() or move it with "
                f"placement.to_device (docs/training.md, 'Device placement')")


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
                "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce", "gather",
                "scatter", "all_to_all", "all_to_all_single", "send", "recv")
# Also replaced in distributed_c10d itself: `P2POp`/`batch_isend_irecv` compare `op is isend`.
_P2P = ("isend", "irecv")


def _wrap_collective(name: str, fn):
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        _refuse_host(f"torch.distributed.{name}", args, kwargs)
        return fn(*args, **kwargs)

    checked._device_checked = True
    return checked


def _wrap_batch(fn):
    @functools.wraps(fn)
    def checked(p2p_op_list, *args, **kwargs):
        _refuse_host("torch.distributed.batch_isend_irecv", [op.tensor for op in p2p_op_list], {})
        return fn(p2p_op_list, *args, **kwargs)

    checked._device_checked = True
    return checked


def _patch_distributed() -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    replaced = {}  # id(original function) -> (original, wrapped)
    for name in _COLLECTIVES + _P2P:
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "_device_checked", False):
            continue
        wrapped = _wrap_collective(name, fn)
        replaced[id(fn)] = (fn, wrapped)
        setattr(dist, name, wrapped)
        if name in _P2P:
            setattr(c10d, name, wrapped)
    if not getattr(dist.batch_isend_irecv, "_device_checked", False):
        fn = dist.batch_isend_irecv
        dist.batch_isend_irecv = _wrap_batch(fn)
        replaced[id(fn)] = (fn, dist.batch_isend_irecv)
    _rebind_aliases(replaced)


def _rebind_aliases(replaced: dict) -> None:
    """Point module-level aliases of the wrapped functions at the wrapped ones.

    Megatron-Core keeps its own references, bound when its modules are imported (for example
    `param_and_grad_buffer.dist_reduce_scatter_func = torch.distributed.reduce_scatter_tensor`, the
    distributed optimizer's gradient reduce-scatter and parameter all-gather), and the process imports
    `megatron.core` before the shim turns this mode on; without this, those calls would go unchecked.
    """
    import sys

    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith(("megatron.", "megatron_rasft.")):
            continue
        for attr, val in list(getattr(mod, "__dict__", {}).items()):
            entry = replaced.get(id(val))
            if entry is not None and val is entry[0]:
                setattr(mod, attr, entry[1])


def check_model_call(model, args, kwargs) -> None:
    """What `GPTModel.forward` asserts in the device-check mode (see the module docstring)."""
    cls = type(model).__name__
    for t in _tensors((args, kwargs)):
        if place(t) != DEVICE:
            raise DeviceMisplaced(f"{cls}.forward got {_describe(t)} that did not come through "
                                  f"placement.to_device (a batch must be moved in the forward step)")
    want = getattr(getattr(model, "config", None), "params_dtype", None)
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in named:
            if place(t) != DEVICE:
                raise DeviceMisplaced(f"{cls}.forward: {kind} {n} ({_describe(t)}) is not on the device: "
                                      f"move every model chunk with placement.to_device after building it")
            if kind == "parameter" and want is not None and t.is_floating_point() and t.dtype != want:
                raise DeviceMisplaced(f"{cls}.forward: parameter {n} is {t.dtype}, the model's params_dtype "
                                      f"is {want} (cast the chunk with placement.to_device(chunk, dtype))")


def _patch_model() -> None:
    try:
        from megatron.core.models.gpt.gpt_model import GPTModel
    except ImportError:  # megatron-core absent: no model to check
        return
    fwd = GPTModel.forward
    if getattr(fwd, "_device_checked", False):
        return

    @functools.wraps(fwd)
    def forward(self, *args, **kwargs):
        check_model_call(self, args, kwargs)
        return fwd(self, *args, **kwargs)

    forward._device_checked = True
    GPTModel.forward = forward


def activate() -> None:
    """Turn the mode on in this process (the CPU shim calls it when `requested()`). Idempotent."""
    global _ACTIVE
    if _ACTIVE:
        return
    _patch_distributed()
    _patch_model()
    _ACTIVE = True
