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
        """Bytes of the distinct storages saved for backward inside the block (each storage once)."""
        return sum(self.storages.values())


# ---------------------------------------------------------------------------------------------------
# Estimates. Every term is an item autograd keeps for backward in Megatron-Core's local spec (RMSNorm,
# SwiGLU, RoPE, no biases), read off `SavedBytes` per module and checked against it at small shapes
# by tests/test_attention.py (exactly in fp32, as an upper bound in bf16).
# ---------------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def layer_activation_terms(*, micro_batch: int, seq: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                           head_dim: int, params_dtype: str = "bf16", attention: str = "sdpa", tp: int = 1,
                           device: str = "cuda") -> dict:
    """Bytes one transformer layer keeps for backward per micro-batch, by item (`{name: bytes}`).

    T = micro_batch·seq tokens, d = bytes of `params_dtype`, n = heads/tp query heads of this rank.
    - norms: two RMSNorms, each x and x·rstd (fp32: torch.nn.RMSNorm computes in its fp32 weight's
      dtype; an upper bound once the norms run in bf16) and rstd `[T]` fp32: 2·(2·T·h·4 + 4·T);
    - linear inputs: linear_qkv's and linear_fc1's inputs `[T, h]`: 2·T·h·d;
    - rope: cos and sin `[s, head_dim]` for q and for k: 4·s·hd·d;
    - attention ("sdpa"): q, k and v (GQA groups expanded to n heads) and the output, `[T, n·hd]`
      each: 4·T·n·hd·d; the log-sum-exp `[b, n, s]` fp32: 4·b·n·s; on CUDA the output's copy into
      linear_proj's input layout (flash/memory-efficient kernels return `[b, s, n, hd]` memory): T·n·hd·d;
      ("local", Megatron's DotProductAttention): q, k, v and linear_proj's input 4·T·n·hd·d, and the
      probabilities `[b, n, s, s]` in fp32 (softmax output) plus, in bf16/fp16, their cast: b·n·s²·(4 + d);
    - mlp: linear_fc1's output `[T, 2·f/tp]`, SwiGLU's two `[T, f/tp]` intermediates and linear_fc2's
      input: 5·T·(f/tp)·d.
    Raises ValueError for an unknown dtype or attention."""
    if params_dtype not in _DTYPE_BYTES or attention not in ("sdpa", "local"):
        raise ValueError(f"params_dtype {params_dtype!r} / attention {attention!r}: expected one of "
                         f"{tuple(_DTYPE_BYTES)} / ('sdpa', 'local')")
    d = _DTYPE_BYTES[params_dtype]
    T, n, f = micro_batch * seq, heads // tp, ffn // tp
    terms = {"norms": 2 * (2 * T * hidden * 4 + 4 * T), "linear_inputs": 2 * T * hidden * d,
             "rope": 4 * seq * head_dim * d}
    if attention == "sdpa":
        terms["attention_qkv_out"] = 4 * T * n * head_dim * d
        terms["attention_lse"] = 4 * micro_batch * n * seq
        if device == "cuda":
            terms["attention_out_copy"] = T * n * head_dim * d
    else:
        terms["attention_qkv_proj_in"] = 4 * T * n * head_dim * d
        terms["attention_probs"] = micro_batch * n * seq * seq * (4 + (d if d != 4 else 0))
    terms["mlp"] = 5 * T * f * d
    return terms


def model_activation_terms(*, layers: int, micro_batch: int, seq: int, hidden: int, vocab: int,
                           params_dtype: str = "bf16", attention: str = "sdpa", packed: bool = True, tp: int = 1,
                           **layer_kw) -> dict:
    """Bytes a whole GPTModel forward keeps for backward per micro-batch (`{name: bytes}`): the
    layers (`layer_activation_terms` × layers) plus the token ids (int64, 8·T; + T under TP), the final norm
    (2·T·h·4 + 4·T), the output layer's input (T·h·d) and the attention mask of a packed batch
    (sdpa: one additive `[b, 1, s, s]` mask in dtype d shared by all layers; local: the boolean one,
    b·s²; a causal batch without a mask: local builds an `[s, s]` boolean in every layer, SDPA none).
    The logits are counted by `loss_peak_terms`. Raises ValueError as `layer_activation_terms`."""
    d = _DTYPE_BYTES.get(params_dtype, 4)
    T = micro_batch * seq
    per_layer = layer_activation_terms(micro_batch=micro_batch, seq=seq, hidden=hidden, params_dtype=params_dtype,
                                       attention=attention, tp=tp, **layer_kw)
    terms = {f"layers.{k}": layers * v for k, v in per_layer.items()}
    # Token ids (int64); under TP the vocab-parallel embedding also keeps its out-of-shard mask (bool).
    terms.update(token_ids=8 * T + (T if tp > 1 else 0), final_norm=2 * T * hidden * 4 + 4 * T, output_layer_input=T * hidden * d)
    if packed:
        terms["mask"] = micro_batch * seq * seq * (d if attention == "sdpa" else 1)
    elif attention == "local":
        terms["mask"] = layers * seq * seq  # Megatron builds the causal [s, s] boolean in every layer
    return terms


def loss_peak_terms(*, micro_batch: int, seq: int, vocab: int, params_dtype: str = "bf16", tp: int = 1) -> dict:
    """The logits and the loss's transients at their peak, per micro-batch (`{name: bytes}`): the
    logits `[T, V/tp]` in dtype d (kept for backward by the loss kernel, loss/kernels.py), and the
    kernel's fp32 work tensors: the fp32 copy of bf16 logits and exp(x − max) in forward, the fp32
    softmax gradient and its cast in backward: about 2·T·(V/tp)·4 bytes at once."""
    d = _DTYPE_BYTES[params_dtype]
    T, v = micro_batch * seq, vocab // tp
    return {"logits": T * v * d, "loss_fp32_work": 2 * T * v * 4}


def static_terms(*, params: int, params_dtype: str = "bf16", dp: int = 1, reference: bool = False) -> dict:
    """Weights, gradients and optimizer state per GPU (`{name: bytes}`) for `params` parameters on this
    rank: the weights (d·P), Megatron DDP's fp32 gradient buffer (grad_reduce_in_fp32: 4·P), the
    distributed optimizer's fp32 main weights (bf16/fp16 only) and Adam's two moments, sharded over
    `dp` ((4 + 8)·P/dp, or 8·P/dp in fp32), and a frozen reference copy of the weights (d·P) when
    the loss needs one (rasft's reference pass, the KL baselines)."""
    d = _DTYPE_BYTES[params_dtype]
    terms = {"weights": d * params, "grad_buffer_fp32": 4 * params,
             "optimizer_state": ((4 if d != 4 else 0) + 8) * params // dp}
    if reference:
        terms["reference_weights"] = d * params
    return terms
