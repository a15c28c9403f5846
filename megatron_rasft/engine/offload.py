"""The frozen reference's placement between reference passes (`model.reference_placement`).

`device`: the reference stays on the device for the whole run. `host`: its parameters live in host
memory (pinned on a GPU, so the copy back is a plain DMA) and are copied to the device for each
reference pass only; in between, the device copies' storages are released (size 0), so the
policy's activations and optimizer get that memory. Buffers (rotary frequencies) are small and stay.
The KL methods use the reference inside every step and keep `device` (a `RunConfig` rule).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class HostReference:
    """The reference chunks with their parameters kept in host memory between passes.

    `chunks`: the frozen model chunks (built on the run's device). After construction the device
    copies are released; `on_device()` brings them back for the duration of a `with` block.
    """

    def __init__(self, chunks: list):
        self.chunks = chunks
        pin = torch.cuda.is_available()  # pinned memory exists only with CUDA
        self._host = {}
        for c in chunks:
            for p in c.parameters():
                host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                host.copy_(p.detach())
                self._host[p] = host
        self.release()

    def release(self) -> None:
        """Free the device copies: every parameter's data becomes an empty tensor on the device."""
        for p in self._host:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def restore(self) -> None:
        """Copy every parameter from host memory to a fresh device tensor (its storage allocated here)."""
        from megatron_rasft.parallel.placement import device
        from megatron_rasft.parallel import device_check

        dev = device()
        for p, host in self._host.items():
            p.data = host.to(dev, copy=True)
            device_check.mark_device(p)

    @contextmanager
    def on_device(self):
        """The chunks, with their parameters on the device until the block ends."""
        self.restore()
        try:
            yield self.chunks
        finally:
            self.release()
