"""Activation memory: measured (bytes autograd keeps for backward) and estimated (per layer, by formula).

`SavedBytes` counts what a forward pass leaves for its backward, on any device: every tensor autograd
saves goes through `torch.autograd.graph.saved_tensors_hooks`, and the distinct storages among them
(parameters excluded) are the activation memory that lives until backward. It is deterministic, so
tests can compare it exactly (unlike time), and it works on CPU, where no allocator statistics exist.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


class SavedBytes:
    """Context manager: `.bytes` = total size of the distinct storages saved for backward inside it.

    `exclude` (e.g. `model.parameters()`): tensors whose storages are not counted (weights are saved
    by every linear layer but are not activations). Storages are identified by data pointer and kept
    alive by the graph while it exists, so a pointer is not reused inside one forward pass."""

    def __init__(self, exclude: Optional[Iterable[torch.Tensor]] = None):
        self._skip = {p.untyped_storage().data_ptr() for p in (exclude or ())}
        self.storages: dict = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self._skip and ptr != 0:
            self.storages[ptr] = s.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())
