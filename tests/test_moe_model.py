"""The mixture-of-experts model at EP=1, EP=2 (× DP=2) and TP=2 × EP=2 (expert TP 1, sequence parallel).

1. The MoE layer of the provider's model, loaded with the same full weights at every layout (each
   rank takes its experts and TP shards by name), against an independent float64 recomputation of
   the routed-experts maths written here (router softmax, top-k, renormalisation or not, SwiGLU
   experts, the shared expert with its sigmoid gate): outputs, input gradients, and every
   parameter's gradient (the ranks' raw gradients of the copies of one parameter slice summed =
   the full-data gradient). Both routers: Qwen3-MoE's (norm_topk_prob = true, no shared expert) and
   Qwen2-MoE's (false, gated shared expert).
2. The whole model (a dense layer then an MoE layer) in Megatron DDP with the distributed optimizer:
   EP=2 gives the logits, reduced gradients and Adam update of EP=1 (the only difference between the
   two being the expert all-to-all and the expert-parallel gradient buffers); the EP=2 training
   checkpoint saves and loads back exactly.
3. Bad input: clear errors naming the field.
All layouts run in one spawned job of two ranks.
"""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from megatron_rasft.config import ConfigError, ModelConfig, ParallelConfig, config_from_dict, \
    moe_layer_pattern_from_hf
from helpers.distributed import spawn

H, E, I_EXP, I_SHARED, SEQ, BATCH = 64, 4, 32, 48, 8, 2
BASE = dict(hidden_size=H, ffn_hidden_size=96, num_attention_heads=4, vocab_size=128, seq_length=SEQ,
            max_position_embeddings=32, make_vocab_size_divisible_by=64, num_moe_experts=E,
            moe_ffn_hidden_size=I_EXP, moe_router_topk=2)
ROUTERS = {  # the MoE layer's two families
    "qwen3": dict(moe_norm_topk_prob=True),
    "qwen2": dict(moe_norm_topk_prob=False, moe_shared_expert_intermediate_size=I_SHARED, moe_shared_expert_gate=True),
}
LAYOUTS = {  # name: (tp, ep, expert tp, sequence parallel); world 2 (TP=2 × EP=2: the same two ranks)
    "ep1": (1, 1, None, False),
    "ep2": (1, 2, None, False),
    "tp2ep2": (2, 2, 1, False),
}
FULL_MODEL = dict(BASE, num_layers=2, moe_layer_pattern=[0, 1], **ROUTERS["qwen2"])


def _full_weights(router: str) -> dict:
    """The MoE layer's full weights, by name relative to the layer (`mlp.`), scaled so that the
    router's logits and the experts' outputs are O(1)."""
    g = torch.Generator().manual_seed(11)
    w = {"router.weight": torch.randn(E, H, generator=g) / math.sqrt(H)}
    for e in range(E):
        w[f"experts.local_experts.{e}.linear_fc1.weight"] = torch.randn(2 * I_EXP, H, generator=g) / math.sqrt(H)
        w[f"experts.local_experts.{e}.linear_fc2.weight"] = torch.randn(H, I_EXP, generator=g) / math.sqrt(I_EXP)
    if ROUTERS[router].get("moe_shared_expert_intermediate_size"):
        w["shared_experts.linear_fc1.weight"] = torch.randn(2 * I_SHARED, H, generator=g) / math.sqrt(H)
        w["shared_experts.linear_fc2.weight"] = torch.randn(H, I_SHARED, generator=g) / math.sqrt(I_SHARED)
        w["shared_experts.gate_weight"] = torch.randn(1, H, generator=g) / math.sqrt(H)
    return w


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Per data-parallel rank r: hidden states x[r] [S, B, H] and output weights w[r] [S, B, H] (the
    loss is Σ out · w)."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, SEQ, BATCH, H, generator=g), torch.randn(2, SEQ, BATCH, H, generator=g)


def reference_moe(x_TH: torch.Tensor, w: dict, *, topk: int, norm_topk_prob: bool) -> torch.Tensor:
    """The routed-experts block of Qwen3-MoE / Qwen2-MoE (transformers' Qwen3MoeSparseMoeBlock,
    Qwen2MoeSparseMoeBlock): p = softmax(x Wr^T) over the experts; the top-k experts of each token
    by p; their weights p_top, renormalised to sum 1 when `norm_topk_prob`; out = Σ_top p_e ·
    W2_e (silu(W_gate,e x) ⊙ W_up,e x) [+ sigmoid(w_g · x) · shared(x)]. x [T, H] -> [T, H]."""
    probs_TE = torch.softmax(x_TH @ w["router.weight"].T, dim=-1)
    top_p, top_i = probs_TE.topk(topk, dim=-1)
    if norm_topk_prob:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(x_TH)
    for e in range(E):
        gate, up = w[f"experts.local_experts.{e}.linear_fc1.weight"].chunk(2, dim=0)
        y = (F.silu(x_TH @ gate.T) * (x_TH @ up.T)) @ w[f"experts.local_experts.{e}.linear_fc2.weight"].T
        out = out + (top_p * (top_i == e)).sum(-1, keepdim=True) * y
    if "shared_experts.gate_weight" in w:
        gate, up = w["shared_experts.linear_fc1.weight"].chunk(2, dim=0)
        s = (F.silu(x_TH @ gate.T) * (x_TH @ up.T)) @ w["shared_experts.linear_fc2.weight"].T
        out = out + torch.sigmoid(x_TH @ w["shared_experts.gate_weight"].T) * s
    return out


def _topk_margin(x_TH, w, topk) -> float:
    """The smallest gap between a token's k-th and (k+1)-th router logit: the float32 layouts must
    pick the same experts as the float64 reference, so the data must not sit on a tie."""
    s = (x_TH @ w["router.weight"].T).sort(dim=-1, descending=True).values
    return (s[:, topk - 1] - s[:, topk]).min().item()


# --- inside the spawned ranks ---------------------------------------------------------------------

def _placement(name: str, tp_rank: int, tp: int, ep_rank: int, ep: int, etp: int) -> tuple[str, int, int, str]:
    """A local MoE-layer parameter -> (full name, shard index, shards, kind): experts are numbered
    locally (rank r's local j is global r·E/EP + j) and split over expert TP; the shared expert
    over TP; the router and the shared gate are replicated."""
    if name.startswith("experts.local_experts."):
        j, rest = name[len("experts.local_experts."):].split(".", 1)
        full = f"experts.local_experts.{ep_rank * (E // ep) + int(j)}.{rest}"
        kind = "glu" if rest.startswith("linear_fc1") else "cols"
        return full, tp_rank % etp, etp, kind
    if name.startswith("shared_experts.linear_fc"):
        return name, tp_rank, tp, "glu" if "linear_fc1" in name else "cols"
    return name, 0, 1, "replicated"


def _shard(full: torch.Tensor, idx: int, n: int, kind: str) -> torch.Tensor:
    if n == 1 or kind == "replicated":
        return full
    if kind == "glu":  # [gate; up]: each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(n, 0)[idx], up.chunk(n, 0)[idx]], dim=0)
    return full.chunk(n, dim=1)[idx]


def _init(tp, ep, etp, sp, distopt=False):
    from megatron.core import parallel_state as ps

    from megatron_rasft.parallel.groups import init_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    pcfg = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                          expert_tensor_parallel_size=etp, sequence_parallel=sp, use_distributed_optimizer=distopt)
    return pcfg, init_distributed(pcfg, seed=0)


def _layer_case(layout: str, router: str) -> dict:
    """One MoE layer at `layout`: this rank's output, input gradient and raw parameter gradients."""
    from megatron_rasft.model.provider import build_model

    tp, ep, etp, sp = LAYOUTS[layout]
    pcfg, pgs = _init(tp, ep, etp, sp)
    mcfg = ModelConfig(**dict(BASE, num_layers=1, **ROUTERS[router]))
    mlp = build_model(mcfg, pcfg).decoder.layers[0].mlp
    if tp > 1:
        # Megatron trains MoE with TP > 1 only under sequence parallelism, which the local spec's
        # torch norm refuses (a GPU with Apex/TE has it); in eval mode the layer's maths are the
        # same (no aux loss, no jitter) and the gradients still flow.
        mlp.eval()
    tp_rank, ep_rank = pgs.tp_rank, pgs.ep_rank
    full = _full_weights(router)
    where = {}
    with torch.no_grad():
        for n, p in mlp.named_parameters():
            where[n] = _placement(n, tp_rank, tp, ep_rank, ep, etp or tp)
            g, idx, k, kind = where[n]
            p.copy_(_shard(full[g], idx, k, kind))
    assert {w[0] for w in where.values()} <= set(full), (set(full), where)
    xs, ws = _data()
    # DP ranks take their own data; TP ranks (no sequence parallelism) the same whole sequence.
    x, w = xs[pgs.dp_rank], ws[pgs.dp_rank]
    x = x.clone().requires_grad_(True)
    out, bias = mlp(x)
    assert bias is None
    (out * w).sum().backward()
    grads = {n: (*where[n], p.grad.detach().clone()) for n, p in mlp.named_parameters()}
    return dict(out=out.detach(), x_grad=x.grad.detach(), grads=grads, tp_rank=tp_rank, dp_rank=pgs.dp_rank,
                ep_size=pgs.ep_size, local_experts=len(mlp.experts.local_experts))


def _named_weight(name: str, shape: tuple) -> torch.Tensor:
    """The full-model weight `name` (global name, experts by global index): seeded by the name, so
    each rank makes only the tensors it holds. Norm weights 1; matrices N(0, 1/fan_in)."""
    if len(shape) == 1:
        return torch.ones(shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(*shape, generator=g) / math.sqrt(shape[1])


def _model_case(layout: str, distopt: bool, ckpt_dir) -> dict:
    """The whole model (`FULL_MODEL`) in Megatron DDP (with the distributed optimizer when `distopt`):
    this rank's logits, gradients after `finalize_model_grads` (without the distributed optimizer,
    which leaves each rank only its slice of them) and parameters after one Adam step (global names);
    with `ckpt_dir`, the training checkpoint saved there and loaded into a fresh model and optimizer."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_rasft.config import OptimConfig
    from megatron_rasft.engine import checkpoint
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.step import attach_schedule_hooks, wrap_ddp
    from megatron_rasft.model.provider import build_model, unwrap

    tp, ep, etp, sp = LAYOUTS[layout]
    pcfg, pgs = _init(tp, ep, etp, sp, distopt=distopt)
    mcfg = ModelConfig(**FULL_MODEL)

    def glob(n):
        if ".local_experts." not in n:
            return n
        head, rest = n.split(".local_experts.", 1)
        j, tail = rest.split(".", 1)
        return f"{head}.local_experts.{pgs.ep_rank * (E // ep) + int(j)}.{tail}"

    def built():
        model = build_model(mcfg, pcfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(_named_weight(glob(n), tuple(p.shape)))
        chunks = wrap_ddp([model], use_distributed_optimizer=distopt)
        attach_schedule_hooks(chunks)
        # clip_grad: the global gradient norm must span the expert-parallel ranks' experts too.
        opt, sched = build_optimizer(chunks, OptimConfig(lr=1e-2, clip_grad=1.0, adam_eps=1e-6), pcfg,
                                     total_steps=2)
        return chunks, opt, sched

    chunks, opt, sched = built()
    g = torch.Generator().manual_seed(100 + pgs.dp_rank)
    tokens = torch.randint(0, 128, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(BATCH, SEQ).contiguous()
    w_out = torch.randn(BATCH, SEQ, 128, generator=g)
    for c in chunks:
        c.zero_grad_buffer()
    opt.zero_grad()
    logits = chunks[0](tokens, pos, None)
    (logits * w_out).sum().backward()
    finalize_model_grads(chunks)
    model = unwrap(chunks)[0]
    grads = {} if distopt else {glob(n): p.main_grad.detach().clone() for n, p in model.named_parameters()}
    _, grad_norm, _ = opt.step()
    params = {glob(n): p.detach().clone() for n, p in model.named_parameters()}
    from megatron_rasft.engine.model import count_params

    out = dict(logits=logits.detach(), grads=grads, params=params, dp_rank=pgs.dp_rank,
               num_params=count_params(chunks, pgs), grad_norm=float(grad_norm))
    if ckpt_dir:
        from pathlib import Path

        path = checkpoint.save(Path(ckpt_dir), 1, chunks, opt, sched, {"step": 1}, pgs, model_config=mcfg,
                               hf_config=None, keep_last=1)
        chunks2, opt2, sched2 = built()  # the initial weights again, a fresh optimizer
        state = checkpoint.load(path, chunks2, opt2, sched2)
        model2 = unwrap(chunks2)[0]
        out["loaded_step"] = state["step"]
        out["param_diff"] = max((p2 - p).abs().max().item() for p, p2 in zip(model.parameters(), model2.parameters()))
        sd, sd2 = _adam_state(opt), _adam_state(opt2)
        out["optim_diff"] = _max_diff(sd, sd2)
        out["optim_tensors"] = _count_tensors(sd)
    return out


def _adam_state(optimizer) -> list:
    """This rank's Adam moments (exp_avg, exp_avg_sq) and fp32 main parameters, per inner optimizer
    (dense and expert-parallel ones), in parameter order."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                out.append([p.detach().clone()] + [st[k].detach().clone() for k in ("exp_avg", "exp_avg_sq")])
    return out


def _max_diff(a, b) -> float:
    """The largest |a − b| over the tensors of two nested optimizer state dicts of the same structure."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert set(a) == set(b), (set(a) ^ set(b))
        return max([_max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max([_max_diff(x, y) for x, y in zip(a, b)] or [0.0])
    return 0.0


def _count_tensors(a) -> int:
    if isinstance(a, torch.Tensor):
        return int(a.numel() > 1)
    if isinstance(a, dict):
        return sum(_count_tensors(v) for v in a.values())
    if isinstance(a, (list, tuple)):
        return sum(_count_tensors(v) for v in a)
    return 0


def _names(layout: str) -> list:
    """`model.named_parameters()` of `FULL_MODEL` at `layout` (name, shape) on this rank."""
    from megatron_rasft.model.provider import build_model

    tp, ep, etp, sp = LAYOUTS[layout]
    pcfg, _ = _init(tp, ep, etp, sp)
    return [(n, tuple(p.shape)) for n, p in build_model(ModelConfig(**FULL_MODEL), pcfg).named_parameters()]


def _pp2_names() -> list:
    """`FULL_MODEL`'s parameter names on this rank's stage at PP=2 (one layer per stage)."""
    from megatron.core import parallel_state as ps

    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed

    ps.destroy_model_parallel()
    pcfg = ParallelConfig(pipeline_model_parallel_size=2)
    init_distributed(pcfg, seed=0)
    return [n for n, _ in build_model(ModelConfig(**FULL_MODEL), pcfg).named_parameters()]


def _job(rank, world, ckpt_dir):
    import time

    out, t = {}, time.perf_counter()
    for layout in LAYOUTS:
        for router in ROUTERS:
            out[("layer", layout, router)] = _layer_case(layout, router)
        out[("names", layout)] = _names(layout)
        out[("time", layout)] = time.perf_counter() - t
    out[("names", "pp2")] = _pp2_names()
    out[("model", "ep1")] = _model_case("ep1", False, None)
    out[("model", "ep2")] = _model_case("ep2", False, None)
    out[("time", "model")] = time.perf_counter() - t
    out[("model", "ep2_distopt")] = _model_case("ep2", True, ckpt_dir)
    out[("time", "ckpt")] = time.perf_counter() - t
    return out


# --- the test -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_job, 2, str(tmp_path_factory.mktemp("moe_ckpt")), timeout_s=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_moe_layer_matches_float64_reference(ranks, layout, router):
    tp = LAYOUTS[layout][0]
    full = {k: v.double().requires_grad_(True) for k, v in _full_weights(router).items()}
    xs, ws = _data()
    topk, norm = BASE["moe_router_topk"], ROUTERS[router]["moe_norm_topk_prob"]
    # The data each DP rank saw: its own (EP=1/EP=2 × DP=2), or DP rank 0's on both TP ranks.
    seen = [0] if tp > 1 else [0, 1]
    x64 = xs.double().requires_grad_(True)
    total = 0
    outs = {}
    for d in seen:
        x_TH = x64[d].reshape(-1, H)
        assert _topk_margin(x_TH.detach(), {k: v.detach() for k, v in full.items()}, topk) > 1e-3
        outs[d] = reference_moe(x_TH, full, topk=topk, norm_topk_prob=norm).reshape(SEQ, BATCH, H)
        total = total + (outs[d] * ws[d].double()).sum()
    total.backward()
    summed = {}
    for r in ranks:
        res = r[("layer", layout, router)]
        ep = LAYOUTS[layout][1]
        assert (res["ep_size"], res["local_experts"]) == (ep, E // ep), (layout, res["ep_size"], res["local_experts"])
        want_out, want_xg = outs[res["dp_rank"]], x64.grad[res["dp_rank"]]
        torch.testing.assert_close(res["out"].double(), want_out.detach(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{layout}/{router}: MoE output: {m}")
        torch.testing.assert_close(res["x_grad"].double(), want_xg, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{layout}/{router}: input gradient: {m}")
        for name, (g, idx, k, kind, grad) in res["grads"].items():
            if tp > 1:
                # Without sequence parallelism each TP rank holds the whole sequence and is its own
                # copy of the loss: replicated and TP-split parameters get the full gradient on each
                # rank. The experts receive each token once per TP rank (Megatron trains this layout
                # only with sequence parallelism), so their gradients are not compared here.
                if "local_experts" not in g:
                    torch.testing.assert_close(grad.double(), _shard(full[g].grad, idx, k, kind), rtol=1e-5,
                                               atol=1e-5, msg=lambda m, g=g: f"{layout}/{router}: gradient of {g}: {m}")
                summed[(g, idx, k, kind)] = None
                continue
            key = (g, idx, k, kind)
            summed[key] = summed.get(key, 0) + grad.double()
    # Every slice of every full parameter is held somewhere, and its copies' gradients sum to the
    # full-data gradient.
    assert {k[0] for k in summed} == set(full), set(full) ^ {k[0] for k in summed}
    for (g, idx, k, kind), grad in summed.items():
        if grad is None:
            continue
        torch.testing.assert_close(grad, _shard(full[g].grad, idx, k, kind), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, g=g: f"{layout}/{router}: gradient of {g}: {m}")


def test_moe_model_ep2_equals_ep1_in_ddp_with_checkpoint(ranks):
    """EP=2 × DP=2 against EP=1 × DP=2 (each DP rank its own batch): the same logits, the same
    gradients after Megatron's reduction (experts: the all-to-all brings every rank's tokens, the
    expert-data-parallel group has one rank; dense: summed over DP), the same Adam update with and
    without the distributed optimizer; the EP=2 checkpoint loads back bit for bit."""
    for d, r in enumerate(ranks):
        ep1 = r[("model", "ep1")]
        for case in ("ep2", "ep2_distopt"):
            ep2 = r[("model", case)]
            assert ep1["dp_rank"] == ep2["dp_rank"] == d
            torch.testing.assert_close(ep2["logits"], ep1["logits"], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"rank {d}: {case}: logits: {m}")
            for key in ("grads", "params"):
                assert set(ep2[key]) <= set(ep1[key])
                for n, t in ep2[key].items():
                    torch.testing.assert_close(t, ep1[key][n], rtol=1e-4, atol=1e-6,
                                               msg=lambda m, n=n, key=key: f"rank {d}: {case}: {key} of {n}: {m}")
            # The norm Megatron clips by: over every parameter once, experts of both EP ranks included
            # (EP=1 × DP=2 without the distributed optimizer holds every reduced gradient on each rank).
            want = math.sqrt(sum(float((g.double() ** 2).sum()) for g in ep1["grads"].values()))
            assert want > 1.0  # so clip_grad = 1 clips
            assert ep2["grad_norm"] == pytest.approx(want, rel=1e-5), (case, ep2["grad_norm"], want)
        assert ep1["grad_norm"] == pytest.approx(want, rel=1e-5)
        ep2 = r[("model", "ep2")]
        assert all(ep2["grads"][n].abs().sum() > 0 for n in ep2["grads"])
        # Every expert counted once: the EP=1 model's size (a rank holds all of it there).
        assert ep2["num_params"] == ep1["num_params"] == sum(t.numel() for t in ep1["params"].values())
        ck = r[("model", "ep2_distopt")]
        assert ck["loaded_step"] == 1
        assert ck["param_diff"] == 0.0 and ck["optim_diff"] == 0.0 and ck["optim_tensors"] > 0, ck
    # Each rank holds half the experts at EP=2; together all of them.
    held = set().union(*(r[("model", "ep2")]["params"] for r in ranks))
    assert held == set(ranks[0][("model", "ep1")]["params"])


def test_moe_parameter_names(ranks):
    """The names the converter maps (docs/moe_names.txt): rank r's local expert j is global r·E/EP + j."""
    for layout, (tp, ep, etp, sp) in LAYOUTS.items():
        names = [n for n, _ in ranks[0][("names", layout)]]
        experts = [n for n in names if ".local_experts." in n]
        assert len(experts) == 2 * E // ep, (layout, experts)
        assert "decoder.layers.1.mlp.router.weight" in names and "decoder.layers.0.mlp.linear_fc1.weight" in names
        assert "decoder.layers.1.mlp.shared_experts.gate_weight" in names
    # PP=2: stage 0 builds the dense layer 0, stage 1 the MoE layer 1 (its local layer 0).
    first, last = ranks[0][("names", "pp2")], ranks[1][("names", "pp2")]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in first and not any("router" in n for n in first)
    assert "decoder.layers.0.mlp.router.weight" in last
    assert sum(".local_experts." in n for n in last) == 2 * E


def test_moe_bad_input_names_the_field():
    moe = dict(num_moe_experts=4, moe_ffn_hidden_size=8)
    cases = [
        (dict(model=moe, parallel=dict(expert_model_parallel_size=3)),
         "model.num_moe_experts (4) is not divisible by parallel.expert_model_parallel_size (3)"),
        (dict(parallel=dict(expert_model_parallel_size=2)), "parallel.expert_model_parallel_size = 2"),
        (dict(model=dict(moe, moe_expert_capacity_factor=1.25)), "model.moe_expert_capacity_factor: token dropping"),
        (dict(model=dict(num_moe_experts=4)), "model.moe_ffn_hidden_size"),
        (dict(model=dict(moe, moe_router_topk=5)), "model.moe_router_topk"),
        (dict(model=dict(moe, moe_router_topk=1)), "model.moe_norm_topk_prob"),
        (dict(model=dict(moe, moe_shared_expert_gate=True)), "model.moe_shared_expert_gate"),
        (dict(model=dict(moe, moe_layer_pattern=[1, 0, 1])), "model.moe_layer_pattern"),
        (dict(model=dict(moe_ffn_hidden_size=8)), "model.moe_ffn_hidden_size set on a dense model"),
        (dict(model=moe, parallel=dict(tensor_model_parallel_size=2)), "parallel.sequence_parallel = true"),
        (dict(model=dict(moe, moe_layer_freq=2)), "model.moe_layer_freq: use model.moe_layer_pattern"),
    ]
    for data, msg in cases:
        with pytest.raises(ConfigError, match=None) as e:
            config_from_dict(data)
        assert msg in str(e.value), (data, str(e.value))
    assert moe_layer_pattern_from_hf(4, 1, None) is None
    assert moe_layer_pattern_from_hf(4, 2, []) == [0, 1, 0, 1]
    assert moe_layer_pattern_from_hf(4, 1, [0]) == [0, 1, 1, 1]
    for args, msg in (((4, 0, None), "decoder_sparse_step"), ((4, 1, [4]), "mlp_only_layers"),
                      ((2, 3, None), "leave no MoE layer")):
        with pytest.raises(ConfigError, match=msg):
            moe_layer_pattern_from_hf(*args)


def test_moe_patch_gates(monkeypatch):
    """Each Megatron patch applies exactly within its version gate (model/moe_compat.py)."""
    from packaging.version import Version

    from megatron_rasft.model import moe_compat

    def in_force(v):
        monkeypatch.setattr(moe_compat, "mcore_version", lambda: Version(v))
        return {p.name for p in moe_compat.PATCHES if moe_compat._in_gate(p)}

    gemm, move = "moe_utils.te_general_gemm", "moe_utils.maybe_move_tensor_to_cpu"
    assert in_force("0.16.1") == {gemm, move}
    assert in_force("0.17.0") == in_force("0.19.2") == {move}
    assert in_force("0.20.0") == set()
