"""Fixes to Megatron-Core's MoE layer that it needs to run without Transformer Engine, each gated by
the megatron-core releases that have the bug (checked against the released sources; `PATCHES` lists
them with the reason). `apply_moe_patches()` is called by the model provider when it builds an MoE
model, never at import: a dense model runs Megatron-Core untouched. Applying twice changes nothing.

1. `te_general_gemm` (megatron-core 0.16.x): `moe_utils` binds `te_general_gemm` only when
   Transformer Engine imports, but `RouterGatingLinearFunction.forward/backward` test
   `te_general_gemm is not None` unconditionally, so the first router forward without TE raises
   NameError, on CPU and on a GPU alike. 0.17.0 binds it to None when TE is missing (moe_utils.py's
   `else:` branch of `if HAVE_TE:`), so the fix is gated to releases before 0.17.
2. `maybe_move_tensor_to_cpu` (0.16.1 … 0.19.x, and Megatron-LM main when checked): it converts a
   tensor to numpy only when the tensor is on CUDA (`if tensor.is_cuda:`), so on CPU the
   alltoall dispatcher's split sizes stay tensors and `torch.distributed.all_to_all_single` raises
   TypeError at EP > 1. The fix honours `as_numpy` for a CPU tensor too (the function's documented
   contract); a CUDA tensor takes Megatron's own path unchanged. Gated to releases before 0.20
   (the supported range's end: a new release is checked again when the range grows).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rasft.compat import mcore_version


@dataclass(frozen=True)
class Patch:
    name: str
    applies_from: str  # first megatron-core release with the bug (inclusive)
    fixed_in: str  # first release without it (exclusive bound of the gate)
    reason: str


PATCHES = (
    Patch("moe_utils.te_general_gemm", "0.16.1", "0.17.0",
          "RouterGatingLinearFunction reads te_general_gemm, bound only when Transformer Engine imports "
          "(NameError at the first router forward without TE); 0.17.0 binds it to None"),
    Patch("moe_utils.maybe_move_tensor_to_cpu", "0.16.1", "0.20",
          "as_numpy is ignored for a CPU tensor, so the alltoall dispatcher's split sizes stay tensors and "
          "all_to_all_single raises TypeError at EP > 1 on CPU; still so in 0.19.x and Megatron-LM main"),
)

_APPLIED: set = set()


def _in_gate(p: Patch) -> bool:
    v = mcore_version().release
    from packaging.version import Version

    return Version(p.applies_from).release <= v < Version(p.fixed_in).release


def _cpu_aware_move(original):
    import torch

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        # Megatron's own path for a CUDA tensor; a CPU tensor becomes numpy when asked, as documented.
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu.__wrapped__ = original
    return maybe_move_tensor_to_cpu


def apply_moe_patches() -> list[str]:
    """Apply every patch of `PATCHES` whose version gate holds for the installed megatron-core, once
    per process. Returns the names of the patches in force (applied now or before)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    for p in PATCHES:
        if p.name in _APPLIED or not _in_gate(p):
            continue
        if p.name == "moe_utils.te_general_gemm":
            # Exactly 0.17.0's behaviour: None when TE did not import (the torch.mm path is taken).
            if not hasattr(moe_utils, "te_general_gemm"):
                moe_utils.te_general_gemm = None
        elif p.name == "moe_utils.maybe_move_tensor_to_cpu":
            fixed = _cpu_aware_move(moe_utils.maybe_move_tensor_to_cpu)
            moe_utils.maybe_move_tensor_to_cpu = fixed
            # token_dispatcher imported the function by name: rebind it there too.
            token_dispatcher.maybe_move_tensor_to_cpu = fixed
        _APPLIED.add(p.name)
    return sorted(_APPLIED)
