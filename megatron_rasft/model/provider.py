"""Our model config → Megatron-Core `TransformerConfig` + layer spec → `GPTModel`, in one place.

Layer specs: `local` (pure Megatron-Core modules; what runs on CPU) or `te` (Transformer Engine;
required for FP8). `transformer_impl = "auto"` picks `te` on a GPU with TE importable and `local`
otherwise. Asking for FP8 or `te` where TE or CUDA is missing fails here, naming what is missing.
The local spec's core attention is `model.attention`: "sdpa" (model/attention.py, torch's fused
kernels) or "local" (Megatron's DotProductAttention, which materialises the scores).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_rasft.config import ModelConfig, ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_impl(mcfg: ModelConfig) -> str:
    """Which layer spec to use; raises a clear error when `te`/FP8 cannot run here."""
    impl = mcfg.transformer_impl
    want_te = impl == "te" or mcfg.fp8 is not None
    if impl == "auto" and not want_te:
        return "te" if (torch.cuda.is_available() and te_available()) else "local"
    if want_te:
        missing = []
        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
        if not te_available():
            missing.append("Transformer Engine (pip install 'megatron_rasft[te]' on a CUDA host)")
        if missing:
            what = f"model.fp8 = {mcfg.fp8!r}" if mcfg.fp8 else "model.transformer_impl = 'te'"
            raise RuntimeError(f"{what} needs " + " and ".join(missing) +
                               "; use model.transformer_impl = 'local' and model.fp8 = none on CPU")
        if impl == "local":
            raise ValueError("model.fp8 needs the Transformer Engine layer spec: set "
                             "model.transformer_impl = 'te' (or 'auto')")
        return "te"
    return impl


def padded_vocab_size(mcfg: ModelConfig, tp: int) -> int:
    """`mcfg.vocab_size` rounded up to a multiple of `make_vocab_size_divisible_by × tp`, so every
    tensor-parallel shard of the embedding and output layer has the same, aligned size (Megatron-LM's
    `_vocab_size_with_padding`). The padding rows are zero and masked out of the softmax."""
    multiple = mcfg.make_vocab_size_divisible_by * tp
    return int(math.ceil(mcfg.vocab_size / multiple) * multiple)


def unwrap(model_chunks: list) -> list:
    """The bare `GPTModel` chunks inside wrappers (Megatron DDP, whose state-dict keys gain a
    `module.` prefix, or any `.module` wrapper without its own `sharded_state_dict`)."""
    from megatron.core.distributed import DistributedDataParallel

    out = []
    for chunk in model_chunks:
        while isinstance(chunk, DistributedDataParallel) or (
                hasattr(chunk, "module") and not hasattr(chunk, "sharded_state_dict")):
            chunk = chunk.module
        out.append(chunk)
    return out


def check_heads_divide(mcfg: ModelConfig, tp: int, flag: str = "parallel.tensor_model_parallel_size") -> None:
    """TP splits whole query heads and whole KV groups; refuse a size that divides either count
    unevenly (Megatron would fail deep inside with a bare assertion). Raises ValueError."""
    groups = mcfg.num_query_groups or mcfg.num_attention_heads
    if mcfg.num_attention_heads % tp or groups % tp:
        raise ValueError(f"{flag} {tp} does not divide the attention heads: num_attention_heads "
                         f"{mcfg.num_attention_heads} (query heads) and num_key_value_heads {groups} (KV heads) must "
                         f"both be multiples of the tensor-parallel size")


def transformer_config(mcfg: ModelConfig, pcfg: ParallelConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_heads_divide(mcfg, pcfg.tensor_model_parallel_size)
    impl = resolve_impl(mcfg)
    params_dtype = _DTYPES[mcfg.params_dtype]  # the one source of the training dtype
    fp8 = {}
    if mcfg.fp8 is not None:
        fp8 = dict(fp8=mcfg.fp8, fp8_recipe=mcfg.fp8_recipe, fp8_amax_history_len=mcfg.fp8_amax_history_len,
                   fp8_amax_compute_algo=mcfg.fp8_amax_compute_algo)
    on_gpu = torch.cuda.is_available()
    recompute = dict(recompute_granularity=mcfg.recompute_granularity, recompute_method=mcfg.recompute_method,
                     recompute_num_layers=mcfg.recompute_num_layers)
    if mcfg.recompute_modules is not None:
        recompute["recompute_modules"] = list(mcfg.recompute_modules)
    moe = moe_kwargs(mcfg, pcfg)
    return TransformerConfig(
        num_layers=mcfg.num_layers,
        hidden_size=mcfg.hidden_size,
        ffn_hidden_size=mcfg.ffn_hidden_size,
        num_attention_heads=mcfg.num_attention_heads,
        num_query_groups=mcfg.num_query_groups or mcfg.num_attention_heads,
        kv_channels=mcfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=mcfg.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=mcfg.add_qkv_bias,
        qk_layernorm=mcfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=mcfg.init_method_std,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=pcfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=pcfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=pcfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=pcfg.context_parallel_size,
        sequence_parallel=pcfg.sequence_parallel and pcfg.tensor_model_parallel_size > 1,
        # The loss returns (Σ w·ℓ, Σ tokens); the schedule divides once by the global count.
        calculate_per_token_loss=True,
        # Fusions that need CUDA kernels (or Apex/TE) are off unless we are on a GPU with TE.
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=on_gpu and impl == "te",
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=not on_gpu,
        cross_entropy_loss_fusion=False,
        **recompute,
        **fp8,
        **moe,
    )


def moe_kwargs(mcfg: ModelConfig, pcfg: ParallelConfig) -> dict:
    """The MoE fields of Megatron's `TransformerConfig` for `mcfg` (empty for a dense model).

    Routing maths (megatron/core/transformer/moe/moe_utils.py, `topk_routing_with_score_function`,
    softmax score): `moe_router_pre_softmax = False` takes the top-k logits and softmaxes over them,
    which is HF's softmax over all experts renormalised over the top k (`norm_topk_prob = true`);
    `True` softmaxes over all experts and keeps the top-k probabilities as they are (`false`). No
    scaling factor, no expert bias, no group-limited routing. Dispatch is the dropless alltoall
    dispatcher (no capacity factor): EP > 1 computes the same function as EP = 1. Raises
    ConfigError for a layout the experts cannot take (`config.check_moe_parallel`)."""
    from megatron_rasft.config import check_moe_parallel

    check_moe_parallel(mcfg, pcfg)
    if not mcfg.is_moe:
        return {}
    return dict(
        num_moe_experts=mcfg.num_moe_experts,
        moe_ffn_hidden_size=mcfg.moe_ffn_hidden_size,
        moe_router_topk=mcfg.moe_router_topk,
        moe_router_pre_softmax=not mcfg.moe_norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype=mcfg.moe_router_dtype,
        moe_shared_expert_intermediate_size=mcfg.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=mcfg.moe_shared_expert_gate,
        moe_layer_freq=mcfg.moe_layers(),
        moe_aux_loss_coeff=mcfg.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if mcfg.moe_aux_loss_coeff > 0 else "none",
        moe_token_dispatcher_type="alltoall",
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,  # SequentialMLP: per-expert weights, any backend (see layer_spec)
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=pcfg.expert_model_parallel_size,
        expert_tensor_parallel_size=pcfg.expert_tensor_parallel_size,
    )


def layer_spec(mcfg: ModelConfig, num_experts: Optional[int] = None):
    """The transformer layer's `ModuleSpec`: TE's, or the local one with `model.attention`'s core
    attention; with `num_experts`, an MoE layer (Megatron's MoELayer: TopKRouter, SequentialMLP
    experts, the shared expert when configured)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    # SequentialMLP (moe_grouped_gemm False) on both backends: the experts' parameters are
    # `experts.local_experts.{i}.linear_fc{1,2}.weight` whatever the backend (the converter's names).
    moe = dict(num_experts=num_experts, moe_grouped_gemm=False) if num_experts else {}
    if resolve_impl(mcfg) == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=mcfg.qk_layernorm, **moe)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=mcfg.qk_layernorm, normalization="RMSNorm", **moe)
    if mcfg.attention == "sdpa":
        from megatron_rasft.model.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def block_spec(mcfg: ModelConfig, tcfg, vp_stage: Optional[int], pp_rank: int):
    """The decoder block of an MoE model: per layer of this pipeline stage (and virtual stage), the
    MoE layer spec or the dense one (`mcfg.moe_layers()`); the final norm is the one Megatron gives a
    dense model (`transformer_block.LayerNormImpl`, what it builds for a single layer spec)."""
    from megatron.core.transformer.transformer_block import (LayerNormImpl, TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    dense, moe = layer_spec(mcfg), layer_spec(mcfg, mcfg.num_moe_experts)
    per_layer = [moe if m else dense for m in mcfg.moe_layers()]
    offset = get_transformer_layer_offset(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=per_layer[offset:offset + n], layer_norm=LayerNormImpl)


def _rope_kwargs(mcfg: ModelConfig) -> dict:
    rs = mcfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind != "llama3":
        return {}
    return dict(rope_scaling=True, rope_scaling_factor=float(rs.get("factor", 8.0)))


def _fix_llama3_rope(model, mcfg: ModelConfig) -> None:
    """Megatron applies llama3 scaling with fixed low/high factors and context (1, 4, 8192);
    recompute the inverse frequencies with the checkpoint's own values."""
    rs = mcfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) != "llama3" or not hasattr(model, "rotary_pos_emb"):
        return
    rope = model.rotary_pos_emb
    dim = rope.inv_freq.numel() * 2
    base = 1.0 / (mcfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
    rope.inv_freq = rope._apply_scaling(
        base, factor=float(rs.get("factor", 8.0)), low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)))


def build_model(mcfg: ModelConfig, pcfg: ParallelConfig, *, pg_collection=None, vp_stage: Optional[int] = None,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None):
    """Build this rank's `GPTModel` chunk (call after `init_distributed`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tcfg = transformer_config(mcfg, pcfg)
    spec = layer_spec(mcfg)
    if mcfg.is_moe:
        from megatron_rasft.model.moe_compat import apply_moe_patches

        apply_moe_patches()
        pp_rank = pg_collection.pp.rank() if pg_collection is not None else ps.get_pipeline_model_parallel_rank()
        spec = block_spec(mcfg, tcfg, vp_stage, pp_rank)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(mcfg, pcfg.tensor_model_parallel_size),
        max_sequence_length=mcfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # keep logits vocab-sharded: the loss is vocab-parallel
        share_embeddings_and_output_weights=mcfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(mcfg.rotary_base),
        pg_collection=pg_collection,
        vp_stage=vp_stage,
        **_rope_kwargs(mcfg),
    )
    _fix_llama3_rope(model, mcfg)
    return model
