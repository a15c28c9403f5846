"""Megatron-Core tensor-parallel layouts: how a full (TP=1) parameter splits across TP ranks.

Pure functions on tensors, keyed by the parameter's Megatron name (local or TE spec names).
- vocab-parallel (embedding, output layer): split rows (dim 0); the vocabulary is padded beforehand.
- `linear_qkv`: rows are grouped per KV group `[q heads of g; k_g; v_g]`; TP takes whole groups,
  i.e. contiguous row chunks.
- `linear_fc1` (SwiGLU): the full weight is `[gate; up]`; rank r holds `[gate_r; up_r]`.
- row-parallel (`linear_proj`, `linear_fc2`): split columns (dim 1).
- everything else (norms, q/k norms, the MoE router, the shared expert's gate) is replicated.

Experts (Megatron's SequentialMLP): expert parallelism (EP = e) gives each EP rank E/e whole experts,
local expert j on EP rank r being global expert r·E/e + j (`experts_of_rank`); each expert's fc1/fc2
split over the expert-tensor-parallel ranks exactly as a dense MLP's over TP (same names, same rules).
"""
from __future__ import annotations

import re

import torch

_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")
_COLS = ("linear_proj.weight", "linear_fc2.weight")
_GLU = ("linear_fc1.weight",)
_LAYER_RE = re.compile(r"decoder\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def split_kind(name: str) -> str:
    """'rows' | 'cols' | 'glu' | 'replicated' for a Megatron parameter name."""
    if name.endswith(_ROWS):
        return "rows"
    if name.endswith(_COLS):
        return "cols"
    if name.endswith(_GLU):
        return "glu"
    return "replicated"


def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The TP shard `tp_rank` of full parameter `full` (a view where possible)."""
    kind = split_kind(name)
    if tp_size == 1 or kind == "replicated":
        return full
    dim = 1 if kind == "cols" else 0
    if full.shape[dim] % (tp_size * (2 if kind == "glu" else 1)):
        raise ValueError(f"{name}: dim {dim} of shape {tuple(full.shape)} does not split into {tp_size} TP ranks")
    if kind == "glu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard`: the full parameter from its TP shards in rank order."""
    kind = split_kind(name)
    if len(shards) == 1 or kind == "replicated":
        return shards[0]
    if kind == "glu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=1 if kind == "cols" else 0)


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    return _LAYER_RE.sub(f"decoder.layers.{new_index}.", name, count=1)


def expert_index(name: str) -> int | None:
    """j of `...mlp.experts.local_experts.{j}...` (None for a non-expert name)."""
    m = _EXPERT_RE.search(name)
    return int(m.group(1)) if m else None


def rename_expert(name: str, new_index: int) -> str:
    return _EXPERT_RE.sub(f".mlp.experts.local_experts.{new_index}.", name, count=1)


def experts_of_rank(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global indices of the experts EP rank `ep_rank` holds: local expert j is global expert
    ep_rank·E/ep_size + j (Megatron's `SequentialMLP.sharded_state_dict` offset). Raises ValueError
    when `ep_size` does not divide `num_experts`."""
    if num_experts % ep_size:
        raise ValueError(f"expert parallelism {ep_size} does not divide num_experts {num_experts}")
    per = num_experts // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


def experts_module(layer):
    """The SequentialMLP of a TransformerLayer (None for a dense layer)."""
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    return experts if hasattr(experts, "local_experts") else None


def local_to_global_names(model) -> dict[str, str]:
    """Map this pipeline stage's parameter names (local layer numbers, local expert numbers) to
    global names, using each TransformerLayer's 1-based global `layer_number` and each MoE layer's
    EP rank (`experts_of_rank`)."""
    layer_numbers, expert_offsets = {}, {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            layer_numbers[i] = layer.layer_number - 1
            experts = experts_module(layer)
            if experts is not None:
                expert_offsets[i] = experts.ep_group.rank() * experts.num_local_experts
    out = {}
    for name, _ in model.named_parameters():
        idx = layer_index(name)
        glob = name if idx is None else rename_layer(name, layer_numbers[idx])
        j = expert_index(name)
        out[name] = glob if j is None else rename_expert(glob, expert_offsets[idx] + j)
    return out
