"""The CPU shim's device-check mode (parallel/device_check.py): in one fresh process with
MEGATRON_RASFT_DEVICE_CHECK=1, what a GPU would reject is refused and what it would accept passes,
for collectives (also from inside autograd's backward, which the shim's TorchFunctionMode does not
see when a backward is started from inside it) and for GPTModel's forward (inputs, unmoved
parameters, fp32 norms in a bf16 model). The end-to-end check is the dry run of the GPU check
(tests/test_gpu_check.py), which runs the trainer in this mode."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json
    import torch
    import torch.distributed as dist
    from megatron_rasft.config import ModelConfig, ParallelConfig
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.device_check import DeviceMisplaced, active
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.parallel.placement import device, to_device

    pgs = init_distributed(ParallelConfig(), seed=0)
    res = {"active": active(), "device": str(device())}

    def outcome(name, fn):
        try:
            fn()
            res[name] = "ok"
        except DeviceMisplaced as e:
            res[name] = "refused: " + str(e)

    outcome("host_all_reduce", lambda: dist.all_reduce(torch.tensor([1.0]), group=pgs.mp))
    outcome("host_derived_all_reduce", lambda: dist.all_reduce(torch.stack([torch.zeros(2)]).float() * 2))
    outcome("host_broadcast", lambda: dist.broadcast(torch.zeros(2), src=0))
    outcome("host_all_gather_output", lambda: dist.all_gather([torch.zeros(2)], torch.zeros(2, device="cuda")))
    outcome("cpu_moved_all_reduce", lambda: dist.all_reduce(torch.zeros(2, device="cuda").cpu()))
    outcome("device_kw_all_reduce", lambda: dist.all_reduce(torch.tensor([1.0], device=device())))
    outcome("to_device_all_reduce", lambda: dist.all_reduce(to_device(torch.tensor([1.0]))))
    outcome("mixed_op_all_reduce", lambda: dist.all_reduce(torch.zeros(2, device=device()) + torch.ones(2)))
    outcome("megatron_style_all_reduce", lambda: dist.all_reduce(torch.zeros(2, device=torch.cuda.current_device())))
    # Megatron's distributed optimizer calls its own alias, bound when megatron.core was imported.
    from megatron.core.distributed import param_and_grad_buffer as pgb
    outcome("megatron_alias_all_gather",
            lambda: pgb.dist_all_gather_func(torch.zeros(2, device=device()), torch.zeros(2)))

    class HostCollectiveInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            dist.all_reduce(torch.ones(1))  # a host tensor: refused even here
            return g

    class CudaFactoryInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            return g + torch.zeros(g.shape, device="cuda")  # mapped by the shim in backward too

    x = torch.ones(2, requires_grad=True)
    outcome("backward_host_collective", lambda: HostCollectiveInBackward.apply(x).sum().backward())
    outcome("backward_cuda_factory", lambda: CudaFactoryInBackward.apply(x).sum().backward())
    outcome("autograd_backward_cuda_factory",
            lambda: torch.autograd.backward([CudaFactoryInBackward.apply(x).sum()]))

    mcfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, vocab_size=64,
                       seq_length=8, max_position_embeddings=8)
    tokens, pos = torch.randint(0, 64, (1, 8)), torch.arange(8)[None]
    model = build_model(mcfg, ParallelConfig())
    outcome("model_not_moved", lambda: model(*to_device([tokens, pos]), None))
    to_device(model, model.config.params_dtype)
    outcome("host_batch", lambda: model(tokens, pos, None))
    outcome("moved_batch", lambda: model(*to_device([tokens, pos]), None))
    mcfg.params_dtype = "bf16"
    bf16 = to_device(build_model(mcfg, ParallelConfig()))  # moved, not cast: the norms stay fp32
    outcome("bf16_fp32_norms", lambda: bf16(*to_device([tokens, pos]), None))
    to_device(bf16, torch.bfloat16)
    outcome("bf16_cast", lambda: bf16(*to_device([tokens, pos]), None))
    print("RESULT " + json.dumps(res))
''')


def test_device_check_mode_refuses_host_tensors():
    env = dict(os.environ, MEGATRON_RASFT_DEVICE_CHECK="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=240)
    line = next((s for s in p.stdout.splitlines() if s.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, p.stdout[-4000:]
    res = json.loads(line[len("RESULT "):])
    assert res.pop("active") is True and res.pop("device") == "cuda:0"
    refused = {"host_all_reduce": "torch.distributed.all_reduce got a (1,) float32 tensor made on the host",
               "host_derived_all_reduce": "all_reduce got a (1, 2) float32 tensor made on the host",
               "host_broadcast": "torch.distributed.broadcast got a (2,) float32",
               "host_all_gather_output": "torch.distributed.all_gather got a (2,) float32",
               "megatron_alias_all_gather": "got a (2,) float32 tensor made on the host",
               "cpu_moved_all_reduce": "made on the host",
               "backward_host_collective": "torch.distributed.all_reduce got a (1,) float32",
               "model_not_moved": "parameter embedding.word_embeddings.weight",
               "host_batch": "GPTModel.forward got a (1, 8) int64 tensor that did not come through",
               "bf16_fp32_norms": "is torch.float32, the model's params_dtype is torch.bfloat16"}
    for name, words in refused.items():
        assert res[name].startswith("refused: ") and words in res[name], (name, res[name])
    for name in set(res) - set(refused):
        assert res[name] == "ok", (name, res[name])
