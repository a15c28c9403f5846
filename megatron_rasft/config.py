"""Run configuration: one dataclass per concern, validated at construction.

A run is described by a TOML file whose tables are named after the fields of `RunConfig`
(`[model]`, `[parallel]`, `[loss]`, ...; nested concerns are sub-tables: `[rollout.sampling]`).
`--set loss.method=sft` style overrides are applied on top; values are parsed as TOML literals
(so `--set train.optim.lr=1e-4`, `--set model.tie_embeddings=true`, `--set rollout.sampling.stop=["\\n"]`),
falling back to a plain string. Every error is a `ConfigError` whose message is one line naming the
file and the key; a key of an earlier version gets "X was renamed to Y" (`RENAMED`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

LOSS_METHODS = ("sft", "dft", "sft_kl", "asft", "profit", "rasft", "grpo")
# Answers that are not ground truth (NuminaMath-style "no closed form" markers); see data/problems.py.
PLACEHOLDER_ANSWERS = ("proof", "notfound", "not found", "none", "null", "nan", "n/a", "na", "-", "?",
                       "tbd", "unknown", "no answer", "no solution")
KL_METHODS = ("sft_kl", "asft")
# Megatron-Core's recompute_modules that exist in a dense GPT layer (the MoE/MLA ones need layers
# this project does not build).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
ROUND_METHODS = ("rasft", "grpo")  # the methods that train on rollout rounds (rollout.batches_per_round)


class ConfigError(ValueError):
    """A bad run configuration: an invalid value, an unknown or renamed key, invalid TOML, or
    sections that contradict each other. Its message is one line that names the file (when there
    is one) and the key; the command line prints it and exits 2."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{name} must be one of {allowed}, got {value!r}")


def released_preset(name: str, value: Any) -> Any:
    """`value`, refused with a "renamed" hint when it is "reference", the old name of the released
    RASFT code's presets ("reference" names the frozen reference model). Raises ConfigError."""
    _check(value != "reference", f'{name} = "reference" was renamed to "released" (the released code\'s preset)')
    return value


@dataclass(slots=True)
class ModelConfig:
    """Decoder-only transformer shape (Llama / Qwen2 / Qwen3 / Mistral families; Qwen2-MoE and
    Qwen3-MoE with `num_moe_experts`, docs/moe_model.md)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 172
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA: number of KV heads; None = MHA
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // heads
    vocab_size: int = 256
    max_position_embeddings: int = 512
    seq_length: int = 128
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF-style, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    add_qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # Qwen3
    tie_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    params_dtype: str = "fp32"  # fp32 | bf16 | fp16
    transformer_impl: str = "auto"  # auto | local | te
    # Core attention of the local spec (the TE spec always uses TE's fused attention): "sdpa" (torch's
    # fused scaled_dot_product_attention; O(s) memory per head) or "local" (Megatron's
    # DotProductAttention, which keeps the [b, heads, s, s] probabilities: ~84 GiB at seq 4096 for a
    # 1B model). Default "sdpa": the same function (tests/test_attention.py), and the only one of
    # the two that fits long sequences on one GPU without Transformer Engine.
    attention: str = "sdpa"  # sdpa | local
    fp8: Optional[str] = None  # None | "hybrid" | "e4m3"
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # Activation recomputation (Megatron-Core's TransformerConfig fields, docs/training.md "Memory
    # settings"): "selective" recomputes `recompute_modules` of every layer in the backward pass;
    # "full" recomputes whole layers, `recompute_method` "uniform" (every layer, in units of
    # `recompute_num_layers`) or "block" (the first `recompute_num_layers` layers of each pipeline stage).
    recompute_granularity: Optional[str] = None  # None | selective | full
    recompute_method: Optional[str] = None  # full only: uniform | block
    recompute_num_layers: Optional[int] = None  # full only
    recompute_modules: Optional[list] = None  # selective only; None = ["core_attn"] (Megatron's default)
    # Where the frozen reference's weights live between reference passes: "device" (always on the
    # device) or "host" (host memory, pinned on a GPU; moved to the device for each reference pass).
    reference_placement: str = "device"  # device | host
    # --- Mixture of experts (Qwen3-MoE, Qwen2-MoE; docs/moe.md). num_moe_experts None = dense. ---
    # Routing (Megatron's TopKRouter, softmax score): the top `moe_router_topk` experts of each token by
    # router logit; their weights are softmax over the top-k logits (= softmax over all experts,
    # renormalised over the top k) when `moe_norm_topk_prob` (HF norm_topk_prob = true, Qwen3-MoE), or
    # the softmax over all experts taken at the top k, not renormalised (false, Qwen2-MoE).
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # per-expert intermediate size (HF moe_intermediate_size)
    moe_shared_expert_intermediate_size: Optional[int] = None  # Qwen2-MoE's shared expert; None = none
    moe_shared_expert_gate: bool = False  # Qwen2-MoE: shared output × sigmoid(x · w_gate), w_gate [1, H]
    moe_norm_topk_prob: bool = True
    # Which layers are MoE: None = every layer; else one 0 (dense, ffn_hidden_size) or 1 (MoE) per
    # layer (`moe_layer_pattern_from_hf` maps HF's decoder_sparse_step and mlp_only_layers).
    moe_layer_pattern: Optional[list] = None
    moe_aux_loss_coeff: float = 0.0  # HF router_aux_loss_coef
    moe_router_dtype: str = "fp32"  # fp32 | fp64: the router's logits and softmax (Megatron's moe_router_dtype)

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            _check(getattr(self, name) > 0, f"model.{name} must be > 0")
        groups = self.num_query_groups or self.num_attention_heads
        _check(self.num_attention_heads % groups == 0,
               f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
               f"model.num_query_groups ({groups})")
        if self.kv_channels is None:
            _check(self.hidden_size % self.num_attention_heads == 0,
                   "model.hidden_size must be divisible by num_attention_heads (or set kv_channels)")
        if self.fp8 in ("none", ""):
            self.fp8 = None
        _one_of("model.params_dtype", self.params_dtype, ("fp32", "bf16", "fp16"))
        _one_of("model.transformer_impl", self.transformer_impl, ("auto", "local", "te"))
        _one_of("model.attention", self.attention, ("sdpa", "local"))
        _one_of("model.fp8", self.fp8, (None, "hybrid", "e4m3"))
        _one_of("model.fp8_recipe", self.fp8_recipe, ("delayed", "tensorwise", "mxfp8", "blockwise"))
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            _one_of("model.rope_scaling.rope_type", kind, ("llama3", "default"))
        self._check_recompute()
        _one_of("model.reference_placement", self.reference_placement, ("device", "host"))
        self._check_moe()

    @property
    def is_moe(self) -> bool:
        """Whether this is a mixture-of-experts model (`num_moe_experts` set)."""
        return self.num_moe_experts is not None

    def _check_moe(self) -> None:
        moe_only = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_pattern")
        if not self.is_moe:
            set_ = [f"model.{n}" for n in moe_only if getattr(self, n) is not None] + \
                   (["model.moe_shared_expert_gate"] if self.moe_shared_expert_gate else []) + \
                   (["model.moe_aux_loss_coeff"] if self.moe_aux_loss_coeff else [])
            _check(not set_, f"{', '.join(set_)} set on a dense model: set model.num_moe_experts (or remove them)")
            return
        e, k = self.num_moe_experts, self.moe_router_topk
        _check(e >= 2, f"model.num_moe_experts must be >= 2 (or null for a dense model), got {e}")
        _check(1 <= k <= e, f"model.moe_router_topk must be in [1, model.num_moe_experts = {e}], got {k}")
        # Top-1 with renormalisation gives every token the weight 1 and the router no gradient
        # (HF's maths); Megatron refuses it too (softmax over one logit).
        _check(k > 1 or not self.moe_norm_topk_prob,
               "model.moe_router_topk = 1 with model.moe_norm_topk_prob = true gives every token weight 1 and "
               "the router no gradient: set moe_norm_topk_prob = false")
        _check(self.moe_ffn_hidden_size is not None and self.moe_ffn_hidden_size > 0,
               f"model.moe_ffn_hidden_size (per-expert intermediate size) must be > 0 on an MoE model, "
               f"got {self.moe_ffn_hidden_size!r}")
        sh = self.moe_shared_expert_intermediate_size
        _check(sh is None or sh > 0, f"model.moe_shared_expert_intermediate_size must be > 0 or null, got {sh!r}")
        _check(not self.moe_shared_expert_gate or sh is not None,
               "model.moe_shared_expert_gate = true needs model.moe_shared_expert_intermediate_size")
        pat = self.moe_layer_pattern
        if pat is not None:
            _check(isinstance(pat, list) and len(pat) == self.num_layers and all(v in (0, 1) for v in pat)
                   and not any(isinstance(v, bool) for v in pat),
                   f"model.moe_layer_pattern must be a list of model.num_layers = {self.num_layers} values "
                   f"0 (dense) or 1 (MoE), got {pat!r}")
            _check(1 in pat, "model.moe_layer_pattern has no MoE layer (all 0): set model.num_moe_experts = null "
                             "for a dense model")
        _check(self.moe_aux_loss_coeff >= 0, f"model.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        _one_of("model.moe_router_dtype", self.moe_router_dtype, ("fp32", "fp64"))
        _check(self.fp8 is None, "model.fp8 with model.num_moe_experts is not supported (the MoE layers are "
                                 "built with Megatron's SequentialMLP experts, tested without FP8)")
        bad = [m for m in (self.recompute_modules or []) if m == "mlp"]
        _check(not bad or pat is not None and 0 in pat,
               "model.recompute_modules 'mlp' recomputes dense MLPs only, and this MoE model has none")

    def moe_layers(self) -> list:
        """Per layer, 1 for an MoE layer and 0 for a dense one (all 0 for a dense model)."""
        if not self.is_moe:
            return [0] * self.num_layers
        return list(self.moe_layer_pattern) if self.moe_layer_pattern is not None else [1] * self.num_layers


    def _check_recompute(self) -> None:
        if self.recompute_granularity in ("none", ""):
            self.recompute_granularity = None
        gran, method, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        _one_of("model.recompute_granularity", gran, (None, "selective", "full"))
        if gran == "full":
            _check(method in ("uniform", "block"),
                   f"model.recompute_granularity = 'full' needs model.recompute_method = 'uniform' or 'block', "
                   f"got {method!r}")
            _check(n is not None and 1 <= n <= self.num_layers,
                   f"model.recompute_granularity = 'full' needs model.recompute_num_layers in [1, "
                   f"model.num_layers = {self.num_layers}], got {n!r}")
        else:
            _check(method is None and n is None,
                   f"model.recompute_method and model.recompute_num_layers apply to model.recompute_granularity "
                   f"= 'full' only (got recompute_granularity = {gran!r}, recompute_method = {method!r}, "
                   f"recompute_num_layers = {n!r})")
        if self.recompute_modules is not None:
            _check(gran == "selective",
                   f"model.recompute_modules applies to model.recompute_granularity = 'selective' only "
                   f"(got {gran!r})")
            bad = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES]
            _check(isinstance(self.recompute_modules, list) and bool(self.recompute_modules) and not bad,
                   f"model.recompute_modules must be a non-empty list of {RECOMPUTE_MODULES}, "
                   f"got {self.recompute_modules!r}")


def moe_layer_pattern_from_hf(num_layers: int, decoder_sparse_step: int = 1,
                              mlp_only_layers: Optional[list] = None) -> Optional[list]:
    """`ModelConfig.moe_layer_pattern` for a Qwen2-MoE / Qwen3-MoE HF config: layer i (from 0) is MoE
    when i is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0 (transformers'
    Qwen3MoeDecoderLayer / Qwen2MoeDecoderLayer rule). Returns None when every layer is MoE.
    Raises ConfigError naming the HF field for a step < 1, a layer index out of range, or no MoE layer."""
    _check(isinstance(decoder_sparse_step, int) and decoder_sparse_step >= 1,
           f"decoder_sparse_step must be an integer >= 1, got {decoder_sparse_step!r}")
    only = list(mlp_only_layers or [])
    bad = [i for i in only if not isinstance(i, int) or not 0 <= i < num_layers]
    _check(not bad, f"mlp_only_layers has layer indices outside [0, num_hidden_layers = {num_layers}): {bad}")
    pat = [int(i not in only and (i + 1) % decoder_sparse_step == 0) for i in range(num_layers)]
    _check(1 in pat, f"decoder_sparse_step = {decoder_sparse_step} and mlp_only_layers = {only} leave no MoE "
                     f"layer among {num_layers}")
    return None if all(pat) else pat


@dataclass(slots=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    # Timeout of every collective (Megatron-LM's name and default). A rollout round does not count
    # against it: the other ranks wait for rank 0's round without a deadline (parallel/wait.py).
    distributed_timeout_minutes: float = 10.0
    # Megatron DDP's bucketed gradient reduction issued during the backward pass (instead of after
    # it), its bucket size (parameters per bucket; None = Megatron's default, max(4e7, 1e6 x DP)),
    # and the distributed optimizer's parameter all-gather issued during the next forward pass.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size: Optional[int] = None
    # Mixture of experts: the experts of each MoE layer are split over `expert_model_parallel_size`
    # ranks (tokens reach them by all-to-all), each expert's matrices over `expert_tensor_parallel_size`
    # ranks (None = tensor_model_parallel_size, Megatron's default). Expert weights are replicated over
    # world / (ETP × EP × PP) expert-data-parallel ranks.
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size"):
            _check(getattr(self, name) >= 1, f"parallel.{name} must be >= 1")
        _check(self.expert_tensor_parallel_size is None or self.expert_tensor_parallel_size >= 1,
               f"parallel.expert_tensor_parallel_size must be >= 1 or null, got {self.expert_tensor_parallel_size}")
        _check(self.distributed_timeout_minutes > 0, "parallel.distributed_timeout_minutes must be > 0")
        _one_of("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        _check(self.context_parallel_size == 1,
               "parallel.context_parallel_size > 1 is not supported yet (the sequence-level ratio "
               "needs a CP reduction)")
        _check(self.bucket_size is None or self.bucket_size >= 1,
               f"parallel.bucket_size must be >= 1 (parameters per bucket) or null, got {self.bucket_size}")
        # Without overlap Megatron reduces every gradient in one bucket after the backward pass.
        _check(self.bucket_size is None or self.overlap_grad_reduce,
               "parallel.bucket_size applies with parallel.overlap_grad_reduce = true only (without it "
               "Megatron reduces all gradients as one bucket)")
        # The all-gather of updated parameters exists only with the distributed optimizer, and
        # Megatron issues it per gradient bucket (Megatron-LM's --overlap-param-gather rule).
        _check(not self.overlap_param_gather or self.use_distributed_optimizer,
               "parallel.overlap_param_gather = true needs parallel.use_distributed_optimizer = true (only the "
               "distributed optimizer all-gathers parameters)")
        _check(not self.overlap_param_gather or self.overlap_grad_reduce,
               "parallel.overlap_param_gather = true needs parallel.overlap_grad_reduce = true (the "
               "all-gather is issued per gradient bucket)")


@dataclass(slots=True)
class LossConfig:
    """The loss family of RASFT.md: per-token loss w_t · ℓ_t summed, normalised once globally."""

    method: str = "rasft"
    ratio: str = "sequence"  # sequence | token | none: granularity of the clipped π_ref/π_θ
    ratio_min: float = 0.4
    ratio_max: float = 1.2
    ratio_log_clamp: float = 20.0  # |log ratio| is clamped before exp (rasft's ratio; grpo's ρ and k3)
    token_factor: str = "dft"  # dft (φ_t = q_t) | none (φ_t = 1); used by `rasft`
    kl_coef: float = 0.1  # λ for sft_kl / asft
    profit_threshold: float = 0.1

    def __post_init__(self):
        _one_of("loss.method", self.method, LOSS_METHODS)
        _one_of("loss.ratio", self.ratio, ("sequence", "token", "none"))
        _one_of("loss.token_factor", self.token_factor, ("dft", "none"))
        _check(0 < self.ratio_min <= self.ratio_max,
               f"loss.ratio_min ({self.ratio_min}) must be > 0 and <= ratio_max ({self.ratio_max})")
        _check(self.kl_coef >= 0, "loss.kl_coef must be >= 0")
        _check(0 <= self.profit_threshold <= 1, "loss.profit_threshold must be in [0, 1]")

    @property
    def needs_ref_logp(self) -> bool:
        return self.method == "rasft" and self.ratio != "none"

    @property
    def needs_ref_logits(self) -> bool:
        return self.method in KL_METHODS


@dataclass(slots=True)
class GRPOConfig:
    """GRPO (`loss.method = "grpo"`, docs/loss.md): group-relative advantages and the clipped surrogate.

    Advantages (megatron_rasft/methods/advantages.py): A_j = (R_j − mean R) / (std R + eps), or R_j − mean R
    with `scale_by_std = false` (Dr.GRPO). Loss: token-level −min(ρ·A, clip(ρ, 1−eps_low, 1+eps_high)·A),
    ρ = π_θ/π_old, plus `kl_coef` · k3 KL to the frozen reference, each token's k3 capped at `k3_max`.
    Every log-prob (π_θ, π_old, π_ref) is of the tempered policy softmax(logits / T), T =
    `rollout.sampling.temperature`, the distribution the rollouts were sampled from
    (`RunConfig.policy_temperature`).
    """

    scale_by_std: bool = True  # false: Dr.GRPO's unscaled advantage R − mean R
    eps: float = 1e-6  # added to the group's std in the advantage's denominator
    eps_low: float = 0.2  # ρ is clipped below at 1 − eps_low
    eps_high: float = 0.2  # ρ is clipped above at 1 + eps_high (DAPO's clip-higher: 0.28)
    kl_coef: float = 0.0  # β of the k3 KL to the frozen reference (0 as in Dr.GRPO and DAPO)
    # Per-token cap on k3's value (verl's 10): beyond it a token adds the constant k3_max and no gradient.
    k3_max: float = 10.0
    loss_aggregation: str = "token_mean"  # token_mean (global token mean) | seq_mean (original GRPO)
    filter_zero_variance: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal

    def __post_init__(self):
        _check(self.eps > 0, f"grpo.eps must be > 0, got {self.eps}")
        _check(0 <= self.eps_low < 1, f"grpo.eps_low must be in [0, 1), got {self.eps_low}")
        _check(self.eps_high >= 0, f"grpo.eps_high must be >= 0, got {self.eps_high}")
        _check(self.kl_coef >= 0, f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
        _check(self.k3_max > 0, f"grpo.k3_max must be > 0, got {self.k3_max}")
        _one_of("grpo.loss_aggregation", self.loss_aggregation, ("token_mean", "seq_mean"))

    @property
    def needs_ref_logp(self) -> bool:
        """The k3 KL needs the frozen reference's log-prob of every label."""
        return self.kl_coef > 0


@dataclass(slots=True)
class WeightingConfig:
    scheme: str = "linear"  # linear | released | constant
    a_max: float = 1.0
    a_min: float = 0.2
    beta: float = 0.5  # correct rollouts together weigh beta * p
    p_min: float = 0.0  # add correct rollouts only when p >= p_min
    add_rollouts: bool = True  # False: rounds only set the expert weights (no rollouts trained on)
    smoothing: Optional[tuple] = None  # Beta(a, b) smoothing of p = (k + a) / (K + a + b)

    def __post_init__(self):
        self.scheme = released_preset("weighting.scheme", self.scheme)
        _one_of("weighting.scheme", self.scheme, ("linear", "released", "constant"))
        _check(self.a_min <= self.a_max, "weighting.a_min must be ≤ a_max")
        _check(self.a_min >= 0, "weighting.a_min must be >= 0")
        _check(self.beta >= 0, "weighting.beta must be >= 0")
        _check(0 <= self.p_min <= 1, "weighting.p_min must be in [0, 1]")
        if self.smoothing is not None:
            self.smoothing = tuple(self.smoothing)
            _check(len(self.smoothing) == 2 and min(self.smoothing) >= 0,
                   "weighting.smoothing must be two non-negative numbers (a, b)")


@dataclass(slots=True)
class SamplingConfig:
    """How the rollout server samples: every request passes all of it explicitly (server and model
    defaults never apply). One definition for the trainer's rounds (`[rollout.sampling]`), the
    `rollout` command, evaluation (`[eval.sampling]`) and the client.

    n: samples per prompt (K); top_k = 0 disables top-k (vLLM's convention; -1 is accepted too);
    seed: the base seed (per-prompt and per-round seeds derive from it: `rollout/client.py`,
    `rollout/stage.py`); stop_token_ids: token ids that end a sample besides the model's EOS (e.g. a
    chat model's <|im_end|>, which a stop *string* cannot match: special tokens are not detokenised).
    Under `loss.method = "grpo"` the rounds' temperature is also that of every log-prob the loss
    uses (π_θ, π_old, π_ref: `RunConfig.policy_temperature`, docs/loss.md "Sampling temperature").
    """

    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    repetition_penalty: float = 1.0
    stop: list = field(default_factory=list)
    seed: int = 1234
    stop_token_ids: list = field(default_factory=list)

    def __post_init__(self):
        _check(self.n >= 1, f"sampling.n must be >= 1, got {self.n}")
        _check(self.max_tokens >= 1, f"sampling.max_tokens must be >= 1, got {self.max_tokens}")
        _check(self.temperature >= 0, f"sampling.temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, f"sampling.top_k must be >= -1, got {self.top_k}")


ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two", "consistent_hash", "sticky_least_loaded")


@dataclass(slots=True)
class ServerConfig:
    """The vLLM rollout server (`[rollout.server]`): the one the trainer starts on rank 0, or an
    external one at `url`, and how the client talks to it."""

    url: Optional[str] = None  # attach to an external server instead of starting one
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    max_model_len: Optional[int] = None  # vLLM's --max-model-len (None: the model's own)
    kv_cache_gib: float = 1.0  # vLLM's KV cache of a started server, GiB
    dtype: str = "auto"  # vLLM's --dtype (auto: the checkpoint's; float32 on CPU)
    startup_timeout_s: float = 300.0  # a started server's start-up; an external one's return after a failure
    concurrency: int = 8  # requests in flight (vLLM batches them)
    request_timeout_s: float = 600.0
    max_retries: int = 3  # per request (timeouts, 5xx); per batch for restarts that made no progress
    refresh_atol: float = 0.05  # max |Δ log-prob| between the server and the trainer on the probe
    # After every refresh the server tensors that changed must be those the trainer changed
    # (rollout/refresh_check.py): full | sample (refresh_check_tensors tensor groups, drawn afresh
    # each refresh; every group when the model has fewer) | off. Sample by default: full hashes the
    # whole model on the server twice per refresh (docs/rollout.md, "Refresh check").
    refresh_check: str = "sample"
    refresh_check_tensors: int = 64
    # A fleet (rollout/fleet.py, docs/rollout.md): `replicas` servers started here behind vllm-router
    # (whose port is `port`), or external replicas at `urls` behind a router started here.
    replicas: int = 1
    urls: list = field(default_factory=list)
    router_policy: str = "round_robin"  # vllm-router's --policy
    router_health_interval_s: float = 2.0  # vllm-router's health checks (its default, 60 s, is too slow to notice a death)
    # An external vllm-router in front of the `urls` replicas (e.g. on the first rollout node under
    # SLURM): generation goes through it; refreshes and checks still go to each replica in `urls`.
    router_url: Optional[str] = None
    # How a round's weights reach the server (docs/rollout.md, "Weight refresh"): "disk" = export
    # to RUN/hf/policy and reload in place; "transfer" = stream from the trainer's ranks through
    # vLLM's weight-transfer API (gloo engine on CPU, nccl on GPU), no export after the first.
    weight_sync: str = "disk"
    bucket_mib: float = 256.0  # transfer: the largest bucket of HF tensors sent at once, MiB
    transfer_timeout_s: float = 300.0  # transfer: every leg's limit (HTTP call, collective, rendezvous)

    def __post_init__(self):
        _check(self.concurrency >= 1, "rollout.server.concurrency must be >= 1")
        _one_of("rollout.server.weight_sync", self.weight_sync, ("disk", "transfer"))
        _check(self.bucket_mib > 0, f"rollout.server.bucket_mib must be > 0, got {self.bucket_mib}")
        _check(self.transfer_timeout_s > 0, f"rollout.server.transfer_timeout_s must be > 0, "
                                            f"got {self.transfer_timeout_s}")
        _check(self.max_retries >= 0, "rollout.server.max_retries must be >= 0")
        _one_of("rollout.server.refresh_check", self.refresh_check, ("full", "sample", "off"))
        _check(self.refresh_check_tensors >= 1, f"rollout.server.refresh_check_tensors must be >= 1, "
                                                f"got {self.refresh_check_tensors}")
        _check(self.replicas >= 1, f"rollout.server.replicas must be >= 1, got {self.replicas}")
        _one_of("rollout.server.router_policy", self.router_policy, ROUTER_POLICIES)
        self.urls = list(self.urls)
        for i, u in enumerate(self.urls):
            _check(isinstance(u, str) and u.startswith(("http://", "https://")),
                   f"rollout.server.urls[{i}] must be an http:// or https:// URL, got {u!r}")
        _check(not (self.url and self.urls), "rollout.server.url attaches to one server and rollout.server.urls to "
                                             "several: set one of them")
        if self.router_url is not None:
            _check(isinstance(self.router_url, str) and self.router_url.startswith(("http://", "https://")),
                   f"rollout.server.router_url must be an http:// or https:// URL, got {self.router_url!r}")
            _check(bool(self.urls), "rollout.server.router_url names an external vllm-router: list the replicas "
                                    "behind it in rollout.server.urls (each is refreshed and verified directly)")
        _check(not (self.replicas > 1 and (self.url or self.urls)),
               f"rollout.server.replicas = {self.replicas} starts replicas here; with rollout.server.url or "
               f"rollout.server.urls (external servers) leave it at 1")

        _check(not (self.weight_sync == "transfer" and self.urls),
               "rollout.server.weight_sync = 'transfer' streams to one attached server or to replicas started here "
               "(rollout.server.replicas); external replicas (rollout.server.urls) are refreshed from the disk "
               "export: set weight_sync = 'disk'")

    @property
    def fleet(self) -> bool:
        """Whether this is a fleet behind a router (several replicas started here, or `urls`)."""
        return self.replicas > 1 or bool(self.urls)


@dataclass(slots=True)
class SelectionConfig:
    """Which problems of a window are rolled out (`[rollout.selection]`, methods/selection.py)."""

    rule: str = "all"  # all | released (the released code's expert-NLL band and hard pool)
    # `released` rule: the share of a window's in-band problems rolled out (rounded up), and of the
    # hard pool probed (rounded down, at least one); the released code's values.
    rollout_fraction: float = 0.35
    probe_fraction: float = 0.03

    def __post_init__(self):
        self.rule = released_preset("rollout.selection.rule", self.rule)
        _one_of("rollout.selection.rule", self.rule, ("all", "released"))
        _check(0 < self.rollout_fraction <= 1, f"rollout.selection.rollout_fraction must be in (0, 1], "
                                               f"got {self.rollout_fraction}")
        _check(0 < self.probe_fraction <= 1, f"rollout.selection.probe_fraction must be in (0, 1], "
                                             f"got {self.probe_fraction}")


@dataclass(slots=True)
class VerifierConfig:
    """How rollouts are checked (`[rollout.verifier]`, docs/verify_and_weighting.md)."""

    kind: str = "math"  # math | math-verify | released (the released code's check) | code
    timeout_s: float = 10.0  # per rollout
    workers: int = 2  # verifier processes

    def __post_init__(self):
        self.kind = released_preset("rollout.verifier.kind", self.kind)
        _one_of("rollout.verifier.kind", self.kind, ("math", "math-verify", "released", "code"))
        _check(self.timeout_s > 0, "rollout.verifier.timeout_s must be > 0")
        _check(self.workers >= 1, "rollout.verifier.workers must be >= 1")


@dataclass(slots=True)
class RolloutConfig:
    """A rollout round's settings, one sub-table per concern: the server, what it samples, which
    problems are rolled out, and how the rollouts are checked."""

    server: ServerConfig = field(default_factory=ServerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # n = K samples per problem
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    # How many global batches of problems one rollout round covers; 0 = no rounds (the rule that
    # refuses > 0 for the methods without rounds is in RunConfig). A round's window is the next
    # batches_per_round × train.schedule.global_batch_size problems of the stream, and the round runs
    # when the queue cannot fill the next global batch (train/stream.py): no code counts steps. With
    # the `all` selection under rasft a window queues exactly one group per problem, so a round feeds
    # batches_per_round steps; under grpo a window queues only the groups that have rollouts to train
    # (grpo.filter_zero_variance drops more), so the next round comes earlier; the `released`
    # selection's re-trained probe demonstrations add groups, so it comes later.
    batches_per_round: int = 0
    # Overlapped rounds: window w+1's round is generated, verified and weighed in the background
    # while window w trains, from the weights of w's boundary (docs/training.md, "Overlapped rounds").
    overlap: bool = False

    def __post_init__(self):
        _check(self.batches_per_round >= 0, f"rollout.batches_per_round must be >= 0, got {self.batches_per_round}")


# The trainer's settings are sub-tables of [train] (as the rollout's are of [rollout]): the TOML stays
# one section per stage, and the stage commands, which read other sections, are not confused by a
# top-level `data` or `optim`.
@dataclass(slots=True)
class TrainDataConfig:
    """The training problems and how they become sequences (`[train.data]`, docs/training.md)."""

    path: Optional[str] = None  # problems JSONL; None = synthetic tokens (smoke runs)
    tokenizer: Optional[str] = None  # HF tokenizer folder (required with path)
    prompt_field: str = "prompt"
    response_field: str = "response"
    answer_field: str = "answer"
    # answers that are not ground truth (data/problems.py): such problems get no rollouts, A_E = 1
    placeholder_answers: list = field(default_factory=lambda: list(PLACEHOLDER_ANSWERS))
    prompt_template: str = "chat"  # chat | released | plain
    overlong: str = "truncate"  # truncate | drop
    pack: bool = False  # pack several sequences per row (block-diagonal attention, local spec)

    def __post_init__(self):
        self.prompt_template = released_preset("train.data.prompt_template", self.prompt_template)
        _one_of("train.data.prompt_template", self.prompt_template, ("chat", "released", "plain"))
        _one_of("train.data.overlong", self.overlong, ("truncate", "drop"))
        _check(self.path is None or self.tokenizer is not None,
               "train.data.tokenizer (an HF tokenizer folder) is required with train.data.path")


@dataclass(slots=True)
class OptimConfig:
    """Megatron's Adam and its learning-rate schedule (`[train.optim]`, engine/optim.py): linear
    warm-up over `lr_warmup_iters`, then cosine decay to `min_lr` over the run."""

    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self):
        _check(self.lr >= 0 and self.min_lr >= 0, "train.optim.lr and train.optim.min_lr must be >= 0")
        _check(self.min_lr <= self.lr, "train.optim.min_lr must be <= train.optim.lr")
        _check(self.lr_warmup_iters >= 0, "train.optim.lr_warmup_iters must be >= 0")


@dataclass(slots=True)
class ScheduleConfig:
    """How long the run is and how a step is batched (`[train.schedule]`; how many global batches a
    rollout round covers is `rollout.batches_per_round`)."""

    train_iters: int = 10  # optimizer steps
    global_batch_size: int = 8  # sequence groups per step (a problem's demonstration with its rollouts)
    micro_batch_size: int = 2

    def __post_init__(self):
        _check(self.train_iters >= 1, "train.schedule.train_iters must be >= 1")
        _check(self.micro_batch_size >= 1, "train.schedule.micro_batch_size must be >= 1")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               "train.schedule.global_batch_size must be a multiple of micro_batch_size")


@dataclass(slots=True)
class LoggingConfig:
    """What the trainer reports (`[train.logging]`, train/log.py)."""

    log_interval: int = 1  # steps between console lines
    log_batch_keys: bool = False  # metrics.jsonl: each DP rank's sequence keys per step (`dp_keys`)
    tensorboard: bool = False  # RUN/tensorboard/
    wandb_project: Optional[str] = None

    def __post_init__(self):
        _check(self.log_interval >= 1, "train.logging.log_interval must be >= 1")


@dataclass(slots=True)
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 1234  # model init, data order, selection draws
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass(slots=True)
class CheckpointConfig:
    load: Optional[str] = None  # Megatron dist checkpoint to start from (converted HF model)
    save_interval: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: bool = False

    def __post_init__(self):
        _check(self.save_interval >= 0, "checkpoint.save_interval must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")


@dataclass(slots=True)
class EvalConfig:
    """Settings of `python -m megatron_rasft eval` (`--config` / `--set eval.KEY=VALUE`): by default
    the released evaluation's headline setting, avg@16 at temperature 1.0."""

    # NAME or NAME=PATH specs; a comma-separated string (`--set eval.benchmarks=math500,aime24`) is
    # split into the list.
    benchmarks: list | str = field(default_factory=list)
    data_dir: Optional[str] = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=16, max_tokens=4096))
    prompt_template: str = "qwen25-math-cot"

    def __post_init__(self):
        if isinstance(self.benchmarks, str):
            self.benchmarks = [b.strip() for b in self.benchmarks.split(",") if b.strip()]
        _check(isinstance(self.benchmarks, list) and all(isinstance(b, str) for b in self.benchmarks),
               f"eval.benchmarks must be a list of NAME or NAME=PATH strings, got {self.benchmarks!r}")
        _one_of("eval.prompt_template", self.prompt_template, ("chat", "qwen25-math-cot", "plain"))


def check_moe_parallel(model: ModelConfig, par: ParallelConfig) -> None:
    """Refuse a parallel layout the model's experts cannot take: expert parallelism on a dense model,
    an expert count not divisible by parallel.expert_model_parallel_size. Raises ConfigError."""
    ep, etp = par.expert_model_parallel_size, par.expert_tensor_parallel_size
    if not model.is_moe:
        _check(ep == 1 and etp is None,
               f"parallel.expert_model_parallel_size = {ep} / expert_tensor_parallel_size = {etp} on a dense model "
               f"(model.num_moe_experts is null): set both to their defaults (1, null)")
        return
    _check(model.num_moe_experts % ep == 0,
           f"model.num_moe_experts ({model.num_moe_experts}) is not divisible by parallel.expert_model_parallel_size "
           f"({ep})")


@dataclass(slots=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        # With a checkpoint, the architecture (max_position_embeddings included) comes from its
        # model_config.json and the check is made against that when the run starts.
        if self.checkpoint.load is None:
            _check(self.model.seq_length <= self.model.max_position_embeddings,
                   f"model.seq_length ({self.model.seq_length}) exceeds model.max_position_embeddings "
                   f"({self.model.max_position_embeddings})")
        # Only rasft and grpo train on rollouts; a round setting for another method would be ignored.
        rounds = self.rollout.batches_per_round
        _check(rounds == 0 or self.loss.method in ROUND_METHODS,
               f"rollout.batches_per_round = {rounds} but loss.method = {self.loss.method!r} has no rollout "
               f"rounds (only {', '.join(ROUND_METHODS)} do): set rollout.batches_per_round = 0")
        # GRPO trains only on the rollouts of a round, under the policy that sampled them (π_old).
        _check(self.loss.method != "grpo" or rounds >= 1,
               "loss.method = 'grpo' needs rollout rounds: set rollout.batches_per_round >= 1")
        # A round samples real prompts and verifies against their answers.
        _check(rounds == 0 or (self.train.data.path is not None and self.train.data.tokenizer is not None),
               "rollout rounds (rollout.batches_per_round > 0) need real problems: set train.data.path and "
               "train.data.tokenizer")
        # GRPO's π_θ and π_old are the tempered policy softmax(logits / T); greedy sampling (T = 0)
        # has no such policy (and gives K identical samples: no group to learn from).
        _check(self.loss.method != "grpo" or self.rollout.sampling.temperature > 0,
               f"loss.method = 'grpo' needs rollout.sampling.temperature > 0 (got "
               f"{self.rollout.sampling.temperature}): the ratios are those of the sampled policy softmax(logits / T)")
        # The ratios are of the full tempered softmax; a truncated sampler (top-p / top-k) is not
        # modelled (as in verl and trl), so say so where it is chosen rather than only in the docs.
        smp = self.rollout.sampling
        if self.loss.method == "grpo" and (smp.top_p < 1 or smp.top_k > 0):
            warnings.warn(f"loss.method = 'grpo' with rollout.sampling.top_p = {smp.top_p}, top_k = {smp.top_k}: "
                          f"pi_theta and pi_old are the full softmax(logits / T), not the truncated sampler; "
                          f"the gap shows in the logp_mismatch metric (docs/loss.md, 'Sampling temperature')",
                          UserWarning, stacklevel=3)
        # π_old is scored by the policy at the round's boundary; an overlapped round was sampled by
        # the policy one window earlier, so the ratio would not be π_θ/π_sampler.
        _check(self.loss.method != "grpo" or not self.rollout.overlap,
               "loss.method = 'grpo' with rollout.overlap = true is not supported: pi_old must be the policy "
               "that sampled the round; set rollout.overlap = false")
        # A GRPO group is every rollout of a problem; the `released` selection rolls out a band of
        # the window only, and would leave the others' demonstrations, which GRPO does not train.
        _check(self.loss.method != "grpo" or self.rollout.selection.rule == "all",
               f"loss.method = 'grpo' rolls out every problem of a window: set rollout.selection.rule = 'all' "
               f"(got {self.rollout.selection.rule!r})")
        # The KL baselines run the reference inside the step, next to the policy's logits: one model
        # chunk, so neither pipeline stages nor virtual ones.
        par = self.parallel
        _check(self.loss.method not in KL_METHODS or (par.pipeline_model_parallel_size == 1
                                                       and (par.virtual_pipeline_model_parallel_size or 1) == 1),
               f"loss.method = {self.loss.method!r} needs the reference logits inside the training step, which "
               f"is supported with parallel.pipeline_model_parallel_size = 1 (and no virtual pipeline) only")

        if self.checkpoint.load is None:  # else the checkpoint's architecture is checked when it is read
            check_moe_parallel(self.model, par)
        # Megatron's MoELayer refuses to train with TP > 1 and no sequence parallelism (a frozen
        # model, in eval mode, runs either way); the run's [model] is the checkpoint's architecture
        # when one is loaded, so the check is repeated where it is read (engine/model.py).
        _check(not self.model.is_moe or par.tensor_model_parallel_size == 1 or par.sequence_parallel,
               f"model.num_moe_experts with parallel.tensor_model_parallel_size = {par.tensor_model_parallel_size} "
               f"needs parallel.sequence_parallel = true (Megatron's MoE layer refuses to train TP without it)")

        # The KL methods read the reference's logits inside every training step: it cannot leave
        # the device between reference passes.
        _check(self.model.reference_placement == "device" or self.loss.method not in KL_METHODS,
               f"model.reference_placement = 'host' with loss.method = {self.loss.method!r}: this method uses the "
               f"frozen reference inside every training step (its KL term), so the reference must stay on the "
               f"device; set model.reference_placement = 'device'")

    @property
    def policy_temperature(self) -> float:
        """The temperature T of the policy the loss trains, and of π_old and π_ref: the rollouts'
        sampling temperature under `grpo` (its ratios and gradient are those of the policy that
        sampled, softmax(logits / T)); 1 for every other method, which fits the model itself to
        demonstrations and selected rollouts (docs/loss.md, "Sampling temperature")."""
        return self.rollout.sampling.temperature if self.loss.method == "grpo" else 1.0

    @property
    def needs_ref_logp(self) -> bool:
        """The frozen reference's log-probs are needed: rasft's ratio, or grpo's k3 KL (kl_coef > 0)."""
        return self.loss.needs_ref_logp or (self.loss.method == "grpo" and self.grpo.needs_ref_logp)

    def replaced(self, **sections) -> "RunConfig":
        """A new RunConfig with `sections` (e.g. `model=ModelConfig(...)`) in place of its own; this
        one is left as it is. The rules are checked again; the warnings, given when this one was
        built, are not repeated. Raises ConfigError as the constructor does."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the configuration as JSON to `path`, atomically (a temporary file beside it, then a
        rename), so a run killed while writing leaves the previous file or the new one, never half."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def pretty(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"  {k} = {v!r}" for k, v in values.items()]
        return "\n".join(lines)


# Keys of earlier (never released) versions -> where the setting lives now: only for the hint of
# the error an old key gets ("X was renamed to Y"). `rollout.selection` and `rollout.verifier` were
# values and are now tables.
RENAMED = {
    "rollout.selection": "rollout.selection.rule", "rollout.verifier": "rollout.verifier.kind",
    "rollout.num_samples": "rollout.sampling.n",
    **{f"rollout.{k}": f"rollout.sampling.{k}"
       for k in ("temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "stop", "seed")},
    "rollout.server_url": "rollout.server.url",
    **{f"rollout.{k}": f"rollout.server.{k}"
       for k in ("host", "port", "concurrency", "request_timeout_s", "max_retries", "max_model_len",
                 "kv_cache_gib", "dtype", "startup_timeout_s", "refresh_atol")},
    "rollout.verifier_timeout_s": "rollout.verifier.timeout_s",
    "rollout.verifier_workers": "rollout.verifier.workers",
    "train.data_path": "train.data.path",
    **{f"train.{k}": f"train.data.{k}"
       for k in ("tokenizer", "prompt_field", "response_field", "answer_field", "placeholder_answers",
                 "prompt_template", "overlong", "pack")},
    **{f"train.{k}": f"train.optim.{k}"
       for k in ("lr", "min_lr", "lr_warmup_iters", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                 "clip_grad")},
    **{f"train.{k}": f"train.schedule.{k}" for k in ("train_iters", "global_batch_size", "micro_batch_size")},
    **{f"train.{k}": f"train.logging.{k}" for k in ("log_interval", "log_batch_keys", "tensorboard", "wandb_project")},
    "eval.n": "eval.sampling.n",
    **{f"eval.{k}": f"eval.sampling.{k}" for k in ("temperature", "top_p", "max_tokens")},
    "train.bf16": 'model.params_dtype ("bf16")',
    # One knob for the rounds: a round covers batches_per_round global batches of problems.
    **{k: "rollout.batches_per_round (a round covers that many global batches of problems)"
       for k in ("train.refresh_interval", "train.window_problems", "train.schedule.refresh_interval",
                 "train.schedule.window_problems")},
}

# Keys of other trainers that are refused on purpose, with the reason.
_NO_DROP = ("token dropping is not offered: every token reaches its top-k experts (Megatron's dropless "
            "alltoall dispatcher), so EP > 1 computes exactly what EP = 1 does")
REFUSED = {"model.moe_expert_capacity_factor": _NO_DROP, "model.moe_token_dropping": _NO_DROP,
           "model.moe_pad_expert_input_to_capacity": _NO_DROP,
           "model.moe_layer_freq": "use model.moe_layer_pattern (one 0/1 per layer; "
                                   "config.moe_layer_pattern_from_hf maps HF's decoder_sparse_step)",
           "model.moe_router_pre_softmax": "use model.moe_norm_topk_prob (HF's norm_topk_prob)"}

# Annotation (as written in the dataclasses above) -> the TOML types it accepts.
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,),
          "dict": (dict,), "tuple": (list, tuple)}


def _renamed(dotted: str) -> ConfigError:
    return ConfigError(f"{dotted} was renamed to {RENAMED[dotted]}")


def _unknown(dotted: str, name: str, known) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''}{close[0]}?)" if close else \
        f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"unknown key {dotted}{hint}")


def _check_type(dotted: str, annotation: str, value: Any) -> None:
    """Refuse a value of the wrong TOML type for a field annotated `annotation` (`int`,
    `Optional[str]`, ...), naming the key, before the dataclass's own rules see it."""
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional["):-1] if optional else annotation
    if base not in _TYPES or (optional and value is None):
        return
    ok = isinstance(value, _TYPES[base]) and (base == "bool" or not isinstance(value, bool))
    _check(ok, f"{dotted} must be {'an' if base == 'int' else 'a'} {base}{' or null' if optional else ''}, "
               f"got {value!r}")


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict (sub-tables build nested config dataclasses).
    Raises ConfigError naming the key for an unknown or renamed key, a value of the wrong type, a
    value where a table belongs, or (from the dataclass) a value its rules refuse."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        dotted = f"{where}.{name}"
        f = known.get(name)
        default = f.default_factory() if f is not None and f.default_factory is not dataclasses.MISSING else None
        table = dataclasses.is_dataclass(default)
        if dotted in RENAMED and (f is None or (table and not isinstance(value, dict))):
            raise _renamed(dotted)
        _check(dotted not in REFUSED, f"{dotted}: {REFUSED.get(dotted)}")
        if f is None:
            raise _unknown(dotted, name, known)
        if table:
            _check(isinstance(value, dict), f"{dotted} must be a table ([{dotted}]), got {value!r}")
            values[name] = _build(type(default), {**dataclasses.asdict(default), **value}, dotted)
        else:
            _check_type(dotted, str(f.type), value)
    try:
        return cls(**values)
    except ConfigError as e:
        # SamplingConfig is both [rollout.sampling] and [eval.sampling]: its rules say `sampling.X`,
        # the error names the table it was read from.
        if cls is SamplingConfig and str(e).startswith("sampling.") and where != "sampling":
            raise ConfigError(where + str(e)[len("sampling"):]) from e
        raise


def build_sections(cls, data: dict, *, skip: tuple = ()) -> dict:
    """The keyword arguments of dataclass `cls`, whose fields (less `skip`) are config dataclasses,
    built from a parsed TOML dict {section: table}: every section of `cls` is built (an absent one
    from its defaults). Raises ConfigError (one line, naming the key) for an unknown section, an
    unknown, renamed or ill-typed key, or a value a rule refuses. Shared by `RunConfig` and the
    study protocol (`demo/study/protocol.py`)."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.name not in skip}
    for name, value in data.items():
        if name not in sections:
            close = difflib.get_close_matches(name, list(sections), n=1, cutoff=0.6)
            raise ConfigError(f"unknown section [{name}]" + (f" (did you mean [{close[0]}]?)" if close else
                                                              f" (known: {', '.join(sections)})"))
        _check(isinstance(value, dict), f"{name} must be a table ([{name}]), got {value!r}")
    return {name: _build(type(factory()), dict(data.get(name, {})), name) for name, factory in sections.items()}


def config_from_dict(data: dict) -> RunConfig:
    """The `RunConfig` of a parsed TOML dict. Raises ConfigError (one line, naming the key) for an
    unknown, renamed or ill-typed key, or a value a rule refuses."""
    return RunConfig(**build_sections(RunConfig, data))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        # `null` is None; `none` stays a string (it is a value of loss.ratio, loss.token_factor, ...).
        return None if text == "null" else text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings to a nested dict (in place) and return it. Raises
    ConfigError for a malformed item, or a path through a value (an old key that became a table
    gets its "renamed" hint)."""
    for item in overrides:
        path, _, text = item.partition("=")
        keys = path.strip().split(".")
        _check(bool(_) and len(keys) >= 2 and all(keys), f"an override must be section.key=value, got {item!r}")
        node = data
        for i, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                dotted = ".".join(keys[:i + 1])
                raise _renamed(dotted) if dotted in RENAMED else ConfigError(
                    f"{path.strip()}: {dotted} is a value, not a table")
        node[keys[-1]] = _parse_value(text.strip())
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """The `RunConfig` of TOML file `path` (optional) with `--set` style `overrides` on top.
    Raises ConfigError whose message is one line naming the file (or `--set`) and the key: a
    missing file, invalid TOML (with its line), an unknown key (with the closest known one), an old
    key (with its new name), a value of the wrong type or one a rule refuses."""
    where = "--set" if path is None else str(path) + (" (with --set)" if overrides else "")
    try:
        data: dict = {}
        if path is not None:
            path = Path(path)
            _check(path.is_file(), "config file not found")
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"invalid TOML: {e}") from e
        apply_overrides(data, overrides or [])
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: " + " ".join(str(e).split())) from e


def load_section(path: Optional[str | Path], overrides: Optional[list[str]], section: str):
    """The table `section` (dotted, e.g. "rollout.verifier") of `load_config(path, overrides)`: what a
    stage command reads. Raises ConfigError for an override outside that table (the command would
    ignore it silently), besides `load_config`'s errors."""
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if "=" in item and key != section and not key.startswith(section + "."):
            raise ConfigError(f"--set {key}: this command reads only [{section}]; give {section}.KEY=VALUE")
    node: Any = load_config(path, overrides)
    for part in section.split("."):
        node = getattr(node, part)
    return node
