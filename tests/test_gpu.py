"""GPU-only paths (skipped without CUDA): Transformer Engine layers and FP8 through our provider and
step, compared with the local (pure Megatron-Core) spec on the same weights and batch.
On a CUDA machine with Transformer Engine: `pytest -m gpu tests/test_gpu.py`."""
import pytest
import torch

from megatron_rasft.config import LossConfig, ModelConfig, OptimConfig, ParallelConfig
from helpers.distributed import spawn

pytestmark = pytest.mark.gpu

MCFG = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
            vocab_size=1000, seq_length=128, max_position_embeddings=256)
# The local spec names the two fused norms on their own; the TE spec stores them inside the linears.
TE_NAME = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
           "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _to_te_names(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for local, te in TE_NAME.items():
            if k.endswith("." + local):
                k = k[: -len(local)] + te
        out[k] = v
    return out


def _steps(rank, world, impl, fp8, weights_path):
    """Two optimizer steps of the tiny model with spec `impl`; the local run saves its initial weights
    to `weights_path`, the TE run loads them. -> (losses, FP8 seen active in the TE layers' forward)."""
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.model.provider import build_model, resolve_impl
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.step import attach_schedule_hooks, forward_backward, make_forward_step, wrap_ddp

    pcfg = ParallelConfig()
    pgs = init_distributed(pcfg, seed=0)
    mcfg = ModelConfig(**MCFG, transformer_impl=impl, fp8=fp8, params_dtype="bf16")
    assert resolve_impl(mcfg) == impl
    model = build_model(mcfg, pcfg).cuda()
    fp8_seen = []
    if impl == "local":
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
                   weights_path)
    else:
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

        state = _to_te_names(torch.load(weights_path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        for m in model.modules():  # TE sets `module.fp8` in each forward from the active FP8 autocast
            if isinstance(m, TransformerEngineBaseModule):
                m.register_forward_hook(lambda mod, *_: fp8_seen.append(bool(getattr(mod, "fp8", False))))
    chunks = wrap_ddp([model], use_distributed_optimizer=True)
    attach_schedule_hooks(chunks)
    optimizer, _ = build_optimizer(chunks, OptimConfig(lr=1e-4), pcfg, total_steps=2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 128), generator=g).cuda()
    batch = dict(tokens=tokens, position_ids=torch.arange(128).expand(2, 128).cuda(),
                 labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(2, 128).cuda())
    loss_func = make_loss_func(LossConfig(method="sft"), tp_group=pgs.tp)
    losses = []
    for _ in range(2):
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(chunks, make_forward_step(loss_func, pgs, vocab_size=1000), [batch], seq_length=128)
        optimizer.step()
        losses.append((reports[0]["loss"][0] / reports[0]["loss"][1]).item())
    return losses, bool(fp8_seen) and all(fp8_seen)


@pytest.mark.parametrize("fp8,rtol", [(None, 2e-2), ("hybrid", 5e-2)])
def test_transformer_engine_step_matches_local_spec(fp8, rtol, tmp_path):
    """The TE layers (bf16, and FP8 where the GPU has it) give the local spec's losses on the same
    weights within bf16 / FP8 rounding, and FP8 is really on in every TE layer when asked for (and
    off otherwise)."""
    pytest.importorskip("transformer_engine")
    if fp8 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("FP8 needs Hopper (sm90) or newer")
    weights = tmp_path / "init.pt"
    # Separate processes: GPTModel writes NVTE_* attention env vars, two specs in one process clash.
    local, _ = spawn(_steps, 1, "local", None, str(weights), timeout_s=600)[0]
    te, fp8_active = spawn(_steps, 1, "te", fp8, str(weights), timeout_s=600)[0]
    assert fp8_active == (fp8 is not None)
    assert all(torch.isfinite(torch.tensor(local + te)))
    assert te == pytest.approx(local, rel=rtol), (te, local)
    assert local[1] < local[0]  # lr 1e-4 on a repeated batch: the loss goes down
