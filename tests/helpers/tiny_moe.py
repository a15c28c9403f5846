"""Tiny random mixture-of-experts checkpoints (Qwen3-MoE, Qwen2-MoE) written by transformers itself.

Sizes are multiples of 32 where vLLM's CPU fused-MoE path needs it (hidden 64, per-expert
intermediate 32, head dim 32), so the same helper serves conversion tests and a served model.
`save_pretrained` writes the per-expert Hub names (`mlp.experts.{j}.{gate,up,down}_proj.weight`);
`fuse_experts` rewrites a folder with transformers' fused in-memory names instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")


def tiny_moe_config(family: str = "qwen3_moe", **overrides):
    """A transformers `Qwen3MoeConfig` / `Qwen2MoeConfig`: 2 layers, hidden 64, 4 heads of 32 (2 KV
    heads), 4 experts of intermediate 32, top-2, vocab 250 (not a multiple of 128: the padding is
    exercised), initializer_range 0.2 (routing far from ties). Qwen2-MoE adds a gated shared expert
    of 64. `overrides` replace any of these (e.g. `decoder_sparse_step=2` or `mlp_only_layers`)."""
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    values = dict(vocab_size=250, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                  initializer_range=0.2, tie_word_embeddings=False, rope_theta=1e6, dtype="float32")
    if family == "qwen3_moe":
        values.update(norm_topk_prob=True)
        values.update(overrides)
        return Qwen3MoeConfig(**values)
    if family == "qwen2_moe":
        values.update(norm_topk_prob=False, shared_expert_intermediate_size=64, qkv_bias=True)
        values.update(overrides)
        return Qwen2MoeConfig(**values)
    raise ValueError(f"tiny_moe_config: family must be one of {MOE_FAMILIES}, got {family!r}")


def make_tiny_moe(out_dir: str | Path, family: str = "qwen3_moe", seed: int = 0,
                  tokenizer_dir: Optional[str | Path] = None, **overrides) -> Path:
    """Save a random tiny MoE causal LM (fp32 safetensors, per-expert Hub names) to `out_dir` and
    return it. With `tokenizer_dir` the vocabulary is that tokenizer's and its files are copied.
    Biases and q/k norms get non-trivial values, so a mapping that drops or swaps them shows."""
    import torch
    from transformers import AutoTokenizer, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

    tok = None
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        overrides = dict(dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id), **overrides)
    config = tiny_moe_config(family, **overrides)
    torch.manual_seed(seed)
    cls = Qwen3MoeForCausalLM if family == "qwen3_moe" else Qwen2MoeForCausalLM
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(out_dir)
    else:
        (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return out_dir


def fuse_experts(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy the checkpoint in `src_dir` to `out_dir` (one `model.safetensors`) with each MoE layer's
    per-expert tensors replaced by transformers' fused in-memory ones: `mlp.experts.gate_up_proj`
    [E, 2I, H] (expert j's rows `[gate_j; up_j]`) and `mlp.experts.down_proj` [E, H, I]."""
    import re
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(src_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    per = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    groups: dict = {}
    for name in list(tensors):
        m = per.match(name)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = tensors.pop(name)
    for prefix, parts in groups.items():
        n = 1 + max(j for j, _ in parts)
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(j, "gate")], parts[(j, "up")]])
                                                         for j in range(n)]).contiguous()
        tensors[f"{prefix}.down_proj"] = torch.stack([parts[(j, "down")] for j in range(n)]).contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in src_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out_dir / f.name)
    return out_dir
