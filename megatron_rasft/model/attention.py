"""Core attention for Megatron's local layer spec on `torch.nn.functional.scaled_dot_product_attention`.

Megatron-Core's local `DotProductAttention` materialises the score and probability tensors
(`[b, heads, s, s]`, the probabilities kept for backward in fp32 and in the model dtype): at seq 4,096
with 32 heads that is ~3.2 GB per sequence per layer, which does not fit a ~1B model on one 80 GB GPU
without Transformer Engine. `SDPAttention` computes the same function with torch's fused kernels
(flash / memory-efficient on CUDA, the flash CPU kernel on CPU), which keep O(s) per head for backward.

It is a drop-in `core_attention` of the local spec (`model.attention = "sdpa"`, see
`model/provider.py`): same call (`query [sq, b, np, hn]`, `key`/`value [sk, b, ng, hn]`, Megatron's
boolean `attention_mask`, True = masked, `[b or 1, 1, sq, sk]`), same output `[sq, b, np·hn]`, no
parameters (checkpoints are interchangeable with the local one). Under tensor parallelism each rank
receives its own heads (np = heads / TP, ng = KV groups / TP); GQA groups are expanded as Megatron
does (query head i uses KV group i // (np/ng)).

One documented difference: a query row whose mask hides every key (the padding slots of a packed
row, seq_id −1, which carry no loss) attends to itself here, where Megatron's `masked_fill(-10000)`
averages all values uniformly. Either output is arbitrary and never reaches a loss token (no real
query attends to a padding key), so parameter gradients of a loss that masks those slots agree.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
# Imported by model/provider.py only when a local-spec model is built: megatron-core is loaded then.
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


class _MaskCache:
    """The additive mask of the last boolean mask seen, shared by every layer of a forward pass:
    one `[b, 1, s, s]` tensor (kept for backward once, not once per layer). Keyed on the identity
    and version of the boolean mask (a weak reference, so a freed mask is never matched by address).
    One tuple, replaced whole: a forward pass in another thread never sees a mixed entry."""

    def __init__(self):
        self.entry: Optional[tuple] = None  # (weakref to the boolean mask, key, additive mask)

    def get(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (mask._version, tuple(mask.shape), dtype, mask.device)
        entry = self.entry
        if entry is not None and entry[0]() is mask and entry[1] == key:
            return entry[2]
        value = additive_mask(mask, dtype)
        self.entry = (weakref.ref(mask), key, value)
        return value


_MASKS = _MaskCache()


def additive_mask(mask_B1QK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Megatron's boolean mask (True = masked) → SDPA's additive mask (0 kept, −inf masked) in
    `dtype`. A row that masks every key keeps its diagonal (itself), so that no row of the softmax
    is empty (an empty row is NaN in SDPA, and NaN·0 would still poison the gradients).

    Shape `[B or 1, 1, sq, sk]` in, the same shape out. Raises ValueError on a non-boolean mask."""
    if mask_B1QK.dtype != torch.bool:
        raise ValueError(f"attention_mask must be boolean (True = masked), got {mask_B1QK.dtype}")
    keep = ~mask_B1QK
    empty = ~keep.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        sq, sk = keep.shape[-2:]
        eye = torch.eye(sq, sk, dtype=torch.bool, device=keep.device)
        keep = keep | (empty & eye)
    out = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return out.masked_fill_(~keep, float("-inf"))


class SDPAttention(MegatronModule):
    """`core_attention` of the local spec on `scaled_dot_product_attention` (see the module docstring).

    Built by Megatron's `Attention` with the keywords of its `CoreAttentionBuilder` protocol. Raises
    ValueError for the settings the local module supports and this one does not (context
    parallelism, sliding-window attention, softmax offsets, attention dropout), naming the setting."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        unsupported = []
        if config.context_parallel_size != 1:
            unsupported.append(f"context_parallel_size {config.context_parallel_size}")
        if getattr(config, "window_size", None) is not None:
            unsupported.append(f"window_size {config.window_size}")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            unsupported.append(f"softmax_type {config.softmax_type!r}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            unsupported.append(f"attention_dropout {dropout}")
        if unsupported:
            raise ValueError("model.attention = 'sdpa' does not support " + ", ".join(unsupported) +
                             "; use model.attention = 'local'")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        # Megatron's apply_query_key_layer_scaling divides the scale by the layer number and
        # multiplies the scores back before the softmax: the same function, so it is ignored.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """`query [sq, b, np, hn]`, `key`/`value [sk, b, ng, hn]` (this rank's heads), boolean
        `attention_mask [b or 1, 1, sq, sk]` (True = masked) or None (causal) → `[sq, b, np·hn]`."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("model.attention = 'sdpa' takes a boolean attention_mask; packed_seq_params "
                             "(THD) and attention_bias need the Transformer Engine spec")
        sq, b, n_heads, hn = query.shape
        groups = key.shape[2]
        if n_heads != groups:
            # Expanded rather than SDPA's enable_gqa: the CUDA memory-efficient kernel (the one that
            # takes a mask) does not implement it, and a fallback to the math kernel would
            # materialise the scores again.
            key = key.repeat_interleave(n_heads // groups, dim=2)
            value = value.repeat_interleave(n_heads // groups, dim=2)
        q_BNQH, k_BNKH, v_BNKH = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        bias = None
        causal = False
        if attention_mask is not None:
            bias = _MASKS.get(attention_mask, query.dtype)
        else:
            causal = mask_type in _CAUSAL and sq > 1
        out_BNQH = F.scaled_dot_product_attention(q_BNQH, k_BNKH, v_BNKH, attn_mask=bias, is_causal=causal,
                                                  scale=self.softmax_scale)
        return out_BNQH.permute(2, 0, 1, 3).reshape(sq, b, n_heads * hn)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """No parameters: nothing to checkpoint (as the local module with a vanilla softmax)."""
        return {}
