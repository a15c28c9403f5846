"""HF ⇄ Megatron-Core: config mapping, a declarative name map and small named transforms.

Everything here is pure: configs are dicts/dataclasses, transforms are functions on tensors (they
also run on `meta` tensors, which is how shapes are planned without touching any data).

Megatron names are *global* parameter names of the local layer spec at TP = PP = 1
(`decoder.layers.{i}.self_attention.linear_qkv.weight`, ...). The logical (TP=1) layouts:
- `linear_qkv` rows grouped per KV group: `[q heads of g; k_g; v_g]` for g = 0..G-1
  (HF q/k are used as they are: both sides use the same non-interleaved RoPE).
- `linear_fc1` = `[gate; up]`.
- embedding / output layer: the vocabulary padded with zero rows to `padded_vocab` (trimmed on export).
Mixture-of-experts layers (Qwen3-MoE, Qwen2-MoE; Megatron's MoELayer with SequentialMLP experts):
- `mlp.router.weight` [E, H] = HF `mlp.gate.weight`.
- `mlp.experts.local_experts.{j}.linear_fc1.weight` [2I, H] = `[gate_j; up_j]` and `linear_fc2` [H, I]
  = `down_j`, with j the *global* expert index (the names of an EP=1 model); HF `mlp.experts.{j}.
  {gate,up,down}_proj.weight` (the Hub names `save_pretrained` writes; transformers' fused in-memory
  `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]` are read too, by `hf_io`).
- Qwen2-MoE's shared expert: `mlp.shared_experts.linear_fc1/fc2.weight` = `mlp.shared_expert.
  {gate,up,down}_proj.weight`, `mlp.shared_experts.gate_weight` [1, H] = `mlp.shared_expert_gate.weight`.
Legend: H hidden, V vocab, Vp padded vocab, N query heads, G KV groups, D head dim, F ffn hidden,
E experts, I per-expert intermediate (moe_intermediate_size), S shared-expert intermediate.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_rasft.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------------------------

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe")
# Keys by which other mixture-of-experts configs announce their experts (to name the refusal).
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
_SUPPORTED_ROPE = ("default", "llama3")


def _rope(hf: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from either the transformers-4 keys (`rope_theta`,
    `rope_scaling`) or the transformers-5 `rope_parameters` dict."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in _SUPPORTED_ROPE:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {_SUPPORTED_ROPE}); "
                         "converting would silently change the positional encoding")
    if kind == "default":
        return theta, None
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    scaling["rope_type"] = kind
    return theta, scaling


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """Our `ModelConfig` from a Hugging Face `config.json` dict. Anything that would change the
    maths and that Megatron's local spec does not implement is refused by name."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or [ARCHITECTURES.get(model_type, "?")]
    if model_type not in ARCHITECTURES and any(k in hf for k in _MOE_KEYS):
        raise ValueError(f"mixture-of-experts architecture {archs} (model_type {model_type!r}) is not "
                         f"supported; supported MoE families: {list(MOE_FAMILIES)} "
                         f"(dense: {sorted(k for k in ARCHITECTURES if k not in MOE_FAMILIES)})")
    if model_type not in ARCHITECTURES or archs[0] != ARCHITECTURES[model_type]:
        raise ValueError(f"unsupported architecture {archs} (model_type {model_type!r}); "
                         f"supported: {sorted(ARCHITECTURES.values())}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu': SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias = true is not supported (Megatron's MLP here has no biases)")
    if hf.get("attention_bias") and model_type not in ("qwen2", "qwen2_moe"):
        raise ValueError(f"attention_bias = true is not supported for {model_type} (it also biases "
                         "o_proj, which the local spec does not have)")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mistral") and window is not None
    if uses_window and window < hf.get("max_position_embeddings", 0):
        raise ValueError(f"sliding_window = {window} (< max_position_embeddings "
                         f"{hf.get('max_position_embeddings')}) is not supported: Megatron's local "
                         "spec attends to the whole causal context")
    if "layer_types" in hf and any(t != "full_attention" for t in hf["layer_types"]):
        raise ValueError(f"layer_types {sorted(set(hf['layer_types']))} are not supported "
                         "(only full_attention)")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    max_pos = hf.get("max_position_embeddings", 4096)
    values = dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"], max_position_embeddings=max_pos, seq_length=min(max_pos, 4096),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), rotary_base=theta, rope_scaling=scaling,
        add_qkv_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if model_type in MOE_FAMILIES:
        values.update(_moe_values(hf, model_type))
    values.update(overrides)
    return ModelConfig(**values)


def _moe_values(hf: dict, model_type: str) -> dict:
    """The MoE fields of `ModelConfig` from a Qwen2-MoE / Qwen3-MoE config.json (transformers'
    Qwen2MoeConfig / Qwen3MoeConfig; `save_pretrained` may write `num_local_experts` for
    `num_experts`). The layer pattern follows transformers' decoder-layer rule (`config.
    moe_layer_pattern_from_hf`). Raises ValueError naming the HF field for values the model cannot take."""
    from megatron_rasft.config import moe_layer_pattern_from_hf

    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not isinstance(experts, int) or experts < 2:
        raise ValueError(f"num_experts = {experts!r} in a {model_type} config: need an integer >= 2 "
                         "(a model without experts is the dense family)")
    for key in ("moe_intermediate_size", "num_experts_per_tok"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise ValueError(f"{key} = {hf.get(key)!r} in a {model_type} config: need an integer >= 1")
    values = dict(
        num_moe_experts=experts, moe_router_topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"], moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layer_pattern=moe_layer_pattern_from_hf(hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1),
                                                    hf.get("mlp_only_layers")),
        # transformers adds the load-balancing loss to the training loss only with output_router_logits.
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0,
    )
    if model_type == "qwen2_moe":  # Qwen2MoeSparseMoeBlock always has the gated shared expert
        shared = hf.get("shared_expert_intermediate_size")
        if not isinstance(shared, int) or shared < 1:
            raise ValueError(f"shared_expert_intermediate_size = {shared!r} in a qwen2_moe config: need an "
                             "integer >= 1 (transformers' Qwen2-MoE always has the gated shared expert)")
        values.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
    return values


def family_of(mcfg: ModelConfig) -> str:
    """The HF family whose maths our config describes (Mistral and Llama are the same maths).
    Raises ValueError for a combination no supported HF family has."""
    if mcfg.is_moe:
        shared, gate = mcfg.moe_shared_expert_intermediate_size, mcfg.moe_shared_expert_gate
        if mcfg.qk_layernorm and not mcfg.add_qkv_bias and shared is None:
            return "qwen3_moe"
        if not mcfg.qk_layernorm and shared is not None and gate:
            return "qwen2_moe"
        raise ValueError(f"this MoE config (qk_layernorm {mcfg.qk_layernorm}, add_qkv_bias {mcfg.add_qkv_bias}, "
                         f"moe_shared_expert_intermediate_size {shared}, moe_shared_expert_gate {gate}) matches no "
                         f"supported HF family {list(MOE_FAMILIES)}: Qwen3-MoE has q/k norms and no shared "
                         "expert, Qwen2-MoE a gated shared expert and no q/k norms")
    if mcfg.qk_layernorm:
        if mcfg.add_qkv_bias:
            raise ValueError("qk_layernorm together with add_qkv_bias matches no supported HF family")
        return "qwen3"
    return "qwen2" if mcfg.add_qkv_bias else "llama"


# ModelConfig fields that decide tensor names and shapes of an MoE model (checked against a base config).
_MOE_SHAPE_FIELDS = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                     "moe_shared_expert_gate", "moe_layer_pattern", "moe_router_topk", "moe_norm_topk_prob")


def _moe_hf_keys(mcfg: ModelConfig, family: str) -> dict:
    """The MoE keys of a Qwen2-MoE / Qwen3-MoE config.json for `mcfg` (the layer pattern as
    `mlp_only_layers` with `decoder_sparse_step` 1, which expresses any pattern)."""
    out = dict(num_experts=mcfg.num_moe_experts, num_experts_per_tok=mcfg.moe_router_topk,
               moe_intermediate_size=mcfg.moe_ffn_hidden_size, norm_topk_prob=mcfg.moe_norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=[i for i, m in enumerate(mcfg.moe_layers()) if not m],
               router_aux_loss_coef=mcfg.moe_aux_loss_coeff, output_router_logits=mcfg.moe_aux_loss_coeff > 0)
    if family == "qwen2_moe":
        out.update(shared_expert_intermediate_size=mcfg.moe_shared_expert_intermediate_size,
                   qkv_bias=mcfg.add_qkv_bias)
    return out


def hf_config_from_model_config(mcfg: ModelConfig, base: Optional[dict] = None,
                                dtype: Optional[str] = None) -> dict:
    """A Hugging Face `config.json` dict for `mcfg`. With `base` (the source checkpoint's config)
    every key is kept and the shape keys are checked against `mcfg`; otherwise one is built."""
    family = family_of(mcfg)
    theta_params = {"rope_theta": float(mcfg.rotary_base), **(mcfg.rope_scaling or {"rope_type": "default"})}
    shape = dict(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size, intermediate_size=mcfg.ffn_hidden_size,
        num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_attention_heads,
        num_key_value_heads=mcfg.num_query_groups or mcfg.num_attention_heads,
        head_dim=mcfg.kv_channels or mcfg.hidden_size // mcfg.num_attention_heads,
        tie_word_embeddings=mcfg.tie_embeddings,
    )
    if base is not None:
        out = copy.deepcopy(base)
        back = model_config_from_hf(base)
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size", "add_qkv_bias", "qk_layernorm",
                     "tie_embeddings", "rope_scaling") + _MOE_SHAPE_FIELDS:
            if getattr(back, name) != getattr(mcfg, name):
                raise ValueError(f"--hf-config-from: {name} = {getattr(back, name)!r} there, "
                                 f"{getattr(mcfg, name)!r} in the Megatron checkpoint")
    else:
        out = dict(architectures=[ARCHITECTURES[family]], model_type=family, hidden_act="silu",
                   max_position_embeddings=mcfg.max_position_embeddings, rms_norm_eps=mcfg.norm_epsilon,
                   rope_theta=float(mcfg.rotary_base), rope_parameters=theta_params,
                   use_cache=True, **shape)
        if family not in ("qwen2", "qwen2_moe"):
            out.update(attention_bias=False, mlp_bias=False)
        if mcfg.rope_scaling:
            out["rope_scaling"] = dict(mcfg.rope_scaling)
        if family in ("qwen2", "qwen3") + MOE_FAMILIES:
            out.update(use_sliding_window=False, sliding_window=None)
        if family in MOE_FAMILIES:
            out.update(_moe_hf_keys(mcfg, family))
    if dtype is not None:
        out["torch_dtype"] = dtype
        out["dtype"] = dtype
    return out


# ---------------------------------------------------------------------------------------------
# Name map + transforms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapContext:
    """What the transforms need beyond the tensors."""

    mcfg: ModelConfig
    padded_vocab: int

    @property
    def groups(self) -> int:
        return self.mcfg.num_query_groups or self.mcfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.mcfg.kv_channels or self.mcfg.hidden_size // self.mcfg.num_attention_heads


def _identity_in(ts, ctx):
    return ts[0]


def _identity_out(t, ctx):
    return [t]


def pad_vocab(ts, ctx):
    """[V, H] → [Vp, H] with zero rows (padding logits never win: rows are zero, and the
    vocab-parallel loss only sees real labels)."""
    t = ts[0]
    if t.shape[0] > ctx.padded_vocab:
        raise ValueError(f"vocabulary {t.shape[0]} exceeds the padded size {ctx.padded_vocab}")
    if t.shape[0] == ctx.padded_vocab:
        return t
    return torch.cat([t, t.new_zeros((ctx.padded_vocab - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def _trim_vocab(t, ctx):
    return [t[: ctx.mcfg.vocab_size]]


def _qkv_in(ts, ctx):
    """q [N·D, ...], k [G·D, ...], v [G·D, ...] → [G·(N/G + 2)·D, ...] grouped per KV group."""
    q, k, v = ts
    g, d = ctx.groups, ctx.head_dim
    rest = tuple(q.shape[1:])
    q = q.reshape((g, -1, d) + rest)  # [G, N/G, D, ...]
    k = k.reshape((g, 1, d) + rest)
    v = v.reshape((g, 1, d) + rest)
    return torch.cat([q, k, v], dim=1).reshape((-1,) + rest)


def _qkv_out(t, ctx):
    g, d = ctx.groups, ctx.head_dim
    per_group = ctx.mcfg.num_attention_heads // g
    rest = tuple(t.shape[1:])
    t = t.reshape((g, per_group + 2, d) + rest)
    q, k, v = t.split([per_group, 1, 1], dim=1)
    return [x.reshape((-1,) + rest) for x in (q, k, v)]


def _glu_in(ts, ctx):
    return torch.cat(ts, dim=0)  # [gate; up]: [2F, H]


def _glu_out(t, ctx):
    return list(t.chunk(2, dim=0))


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor ⇄ one or more HF tensors. `{i}` in names is the layer index, `{j}` the
    global expert index (rules with `per_expert` are instantiated once per expert)."""

    mcore: str
    hf: tuple
    to_mcore: Callable = _identity_in
    to_hf: Callable = _identity_out
    when: Callable[[ModelConfig], bool] = lambda m: True
    per_expert: bool = False


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
ATTENTION_RULES = (
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
    Rule(_L + "self_attention.linear_qkv.weight",
         tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"), _qkv_in, _qkv_out),
    Rule(_L + "self_attention.linear_qkv.bias",
         tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"), _qkv_in, _qkv_out,
         when=lambda m: m.add_qkv_bias),
    Rule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
         when=lambda m: m.qk_layernorm),
    Rule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
         when=lambda m: m.qk_layernorm),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",)),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
)
DENSE_MLP_RULES = (
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
         _glu_in, _glu_out),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",)),
)
LAYER_RULES = ATTENTION_RULES + DENSE_MLP_RULES  # a dense layer
_X = _H + "mlp.experts.{j}."
_SHARED = lambda m: m.moe_shared_expert_intermediate_size is not None  # noqa: E731
MOE_MLP_RULES = (
    Rule(_L + "mlp.router.weight", (_H + "mlp.gate.weight",)),
    Rule(_L + "mlp.experts.local_experts.{j}.linear_fc1.weight", (_X + "gate_proj.weight", _X + "up_proj.weight"),
         _glu_in, _glu_out, per_expert=True),
    Rule(_L + "mlp.experts.local_experts.{j}.linear_fc2.weight", (_X + "down_proj.weight",), per_expert=True),
    Rule(_L + "mlp.shared_experts.linear_fc1.weight",
         (_H + "mlp.shared_expert.gate_proj.weight", _H + "mlp.shared_expert.up_proj.weight"), _glu_in, _glu_out,
         when=_SHARED),
    Rule(_L + "mlp.shared_experts.linear_fc2.weight", (_H + "mlp.shared_expert.down_proj.weight",), when=_SHARED),
    Rule(_L + "mlp.shared_experts.gate_weight", (_H + "mlp.shared_expert_gate.weight",),
         when=lambda m: m.moe_shared_expert_gate),
)
PRE_RULES = (Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), pad_vocab, _trim_vocab),)
POST_RULES = (
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), pad_vocab, _trim_vocab,
         when=lambda m: not m.tie_embeddings),
)


@dataclass(frozen=True)
class Entry:
    """A concrete rule: Megatron name, HF names, layer (None outside the decoder layers), global
    expert index (None outside the routed experts)."""

    mcore: str
    hf: tuple
    layer: Optional[int]
    rule: Rule
    expert: Optional[int] = None

    def to_mcore(self, hf_tensors: list, ctx: MapContext) -> torch.Tensor:
        return self.rule.to_mcore(hf_tensors, ctx)

    def to_hf(self, tensor: torch.Tensor, ctx: MapContext) -> dict:
        return dict(zip(self.hf, self.rule.to_hf(tensor, ctx)))


def _layer_entries(mcfg: ModelConfig, i: int, moe: bool) -> list:
    """Layer i's entries; the per-expert rules expert by expert (fc1_0, fc2_0, fc1_1, ...)."""
    out = []
    rules = [r for r in ATTENTION_RULES + (MOE_MLP_RULES if moe else DENSE_MLP_RULES) if r.when(mcfg)]
    expert_rules = [r for r in rules if r.per_expert]
    for r in rules:
        if not r.per_expert:
            out.append(Entry(r.mcore.format(i=i), tuple(h.format(i=i) for h in r.hf), i, r))
        elif r is expert_rules[0]:
            out += [Entry(x.mcore.format(i=i, j=j), tuple(h.format(i=i, j=j) for h in x.hf), i, x, j)
                    for j in range(mcfg.num_moe_experts) for x in expert_rules]
    return out


def entries(mcfg: ModelConfig, layers: Optional[list] = None, pre: bool = True, post: bool = True) -> list:
    """Concrete entries in HF file order: embedding, layers (all, or `layers`), final norm, head.
    An MoE layer (`mcfg.moe_layers()`) lists its router, then every expert's fc1 and fc2 in global
    expert order, then the shared expert."""
    out = []
    if pre:
        out += [Entry(r.mcore, r.hf, None, r) for r in PRE_RULES if r.when(mcfg)]
    pattern = mcfg.moe_layers()
    for i in (range(mcfg.num_layers) if layers is None else layers):
        out += _layer_entries(mcfg, i, bool(pattern[i]))
    if post:
        out += [Entry(r.mcore, r.hf, None, r) for r in POST_RULES if r.when(mcfg)]
    return out


def mcore_shapes(ctx: MapContext) -> dict:
    """Global (TP=1, EP=1) shape of every Megatron tensor, by name, from the config alone."""
    m, g, d = ctx.mcfg, ctx.groups, ctx.head_dim
    h, n, f = m.hidden_size, m.num_attention_heads, m.ffn_hidden_size
    per_layer = {
        "input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": ((n + 2 * g) * d, h),
        "self_attention.linear_qkv.bias": ((n + 2 * g) * d,), "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,), "self_attention.linear_proj.weight": (h, n * d),
        "pre_mlp_layernorm.weight": (h,), "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f),
    }
    if m.is_moe:
        i_, s_ = m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size or 0
        per_layer.update({
            "mlp.router.weight": (m.num_moe_experts, h), "mlp.experts.linear_fc1.weight": (2 * i_, h),
            "mlp.experts.linear_fc2.weight": (h, i_), "mlp.shared_experts.linear_fc1.weight": (2 * s_, h),
            "mlp.shared_experts.linear_fc2.weight": (h, s_), "mlp.shared_experts.gate_weight": (1, h)})
    out = {}
    for e in entries(m):
        if e.layer is None:
            out[e.mcore] = (h,) if "layernorm" in e.mcore else (ctx.padded_vocab, h)
        else:
            rest = e.mcore.split(f"layers.{e.layer}.", 1)[1]
            if e.expert is not None:
                rest = rest.replace(f"local_experts.{e.expert}.", "")
            out[e.mcore] = per_layer[rest]
    return out


def hf_shapes(ctx: MapContext, entries_: list) -> dict:
    """HF tensor shapes, derived by running the transforms on meta tensors."""
    shapes = mcore_shapes(ctx)
    out = {}
    for e in entries_:
        for name, t in e.to_hf(torch.empty(shapes[e.mcore], device="meta"), ctx).items():
            out[name] = tuple(t.shape)
    return out


def validate_parallel(mcfg: ModelConfig, tp: int, pp: int, vpp: Optional[int] = None, ep: int = 1,
                      etp: Optional[int] = None) -> None:
    """Clear errors (ValueError naming the flag and the config field) for layouts Megatron cannot
    build with this model: TP must divide the heads, KV heads and ffn sizes; PP (× VPP) the layers;
    EP (`--ep`, expert parallelism) the expert count; expert TP (`--etp`, default `--tp`) the
    per-expert intermediate size."""
    groups = mcfg.num_query_groups or mcfg.num_attention_heads
    if tp < 1 or pp < 1 or ep < 1 or (etp is not None and etp < 1):
        raise ValueError(f"--tp, --pp, --ep and --etp must be >= 1, got tp={tp} pp={pp} ep={ep} etp={etp}")
    if not mcfg.is_moe and (ep != 1 or etp is not None):
        raise ValueError(f"--ep {ep} / --etp {etp}: expert parallelism needs a mixture-of-experts model, "
                         "and this one is dense (no num_experts in its config)")
    if mcfg.is_moe:
        if mcfg.num_moe_experts % ep:
            raise ValueError(f"--ep {ep} does not divide num_experts {mcfg.num_moe_experts} (each EP rank "
                             "holds num_experts / ep whole experts)")
        if mcfg.moe_ffn_hidden_size % (etp or tp):
            raise ValueError(f"--etp {etp or tp} (expert tensor parallelism; default --tp) does not divide "
                             f"moe_intermediate_size {mcfg.moe_ffn_hidden_size}")
        shared = mcfg.moe_shared_expert_intermediate_size
        if shared is not None and shared % tp:
            raise ValueError(f"--tp {tp} does not divide shared_expert_intermediate_size {shared}")
    from megatron_rasft.model.provider import check_heads_divide

    check_heads_divide(mcfg, tp, flag="--tp")
    if 0 in mcfg.moe_layers() and mcfg.ffn_hidden_size % tp:
        raise ValueError(f"--tp {tp} does not divide intermediate_size {mcfg.ffn_hidden_size}")
    stages = pp * (vpp or 1)
    if mcfg.num_layers % stages:
        raise ValueError(f"num_hidden_layers {mcfg.num_layers} is not divisible by --pp {pp}"
                         + (f" × --vpp {vpp}" if vpp else ""))
