"""GPU-only paths (skipped without CUDA): Transformer Engine layers and FP8 through our provider and
step, NCCL groups. On a CUDA machine with Transformer Engine: `pytest -m gpu tests/test_gpu.py`."""
import pytest
import torch

from megatron_rasft.config import LossConfig, ModelConfig, ParallelConfig, TrainConfig
from megatron_rasft.testing.distributed import spawn

pytestmark = pytest.mark.gpu

MCFG = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
            vocab_size=1000, seq_length=128, max_position_embeddings=256)


def _te_step(rank, world, fp8):
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.model.provider import build_model, resolve_impl
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.train.optim import build_optimizer
    from megatron_rasft.train.step import attach_schedule_hooks, forward_backward, make_forward_step, wrap_ddp

    pcfg = ParallelConfig()
    pgs = init_distributed(pcfg, seed=0)
    mcfg = ModelConfig(**MCFG, transformer_impl="te", fp8=fp8, params_dtype="bf16")
    assert resolve_impl(mcfg) == "te"
    chunks = wrap_ddp([build_model(mcfg, pcfg).cuda()], use_distributed_optimizer=True)
    attach_schedule_hooks(chunks)
    optimizer, _ = build_optimizer(chunks, TrainConfig(lr=1e-4), pcfg, total_steps=2)
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
    return losses


@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_transformer_engine_step(fp8):
    pytest.importorskip("transformer_engine")
    if fp8 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("FP8 needs Hopper (sm90) or newer")
    losses = spawn(_te_step, 1, fp8, timeout_s=600)[0]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0] + 1.0
