"""HF ⇄ Megatron conversion of mixture-of-experts models (Qwen3-MoE, Qwen2-MoE): config mapping and
refusals, bit-exact round trips at several TP × PP × EP layouts from per-expert and fused HF names,
resharding, logits of the Megatron MoE model against `transformers` (float64, loaded from disk) at
EP=1, EP=2 and TP=2 × EP=2, the in-memory export at EP > 1, a checkpoint saved by Megatron at EP=2,
and bad input.

Models (tests/helpers/tiny_moe.py): Qwen3-MoE with every layer MoE (4 experts, top-2, normalised
top-k), Qwen2-MoE with layer 0 dense and layer 1 MoE (`decoder_sparse_step = 2`; gated shared expert,
q/k/v biases, top-k not normalised). The distributed checks run in one spawned job per world size.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_rasft.convert import hf_io, names, pipeline
from helpers.distributed import megatron_logits, spawn
from helpers.tiny_moe import fuse_experts, make_tiny_moe, tiny_moe_config

REPO = Path(__file__).resolve().parents[1]
VOCAB = 250
SEQ = 12
# Megatron (fp32) against transformers in float64: the difference is fp32 rounding through two
# layers (measured 3.5e-6 at EP1/EP2, 4e-6 at TP2, |logits| up to 7); a wrong expert, a swapped
# gate/up or a lost shared expert moves logits by > 0.1 (swapping gate/up: 4.2).
LOGITS_TOL = 1e-4
FAMILIES = {"qwen3_moe": {}, "qwen2_moe": {"decoder_sparse_step": 2}}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb), sorted(set(ta) ^ set(tb))
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """{family: (hf_dir, reference logits [2, SEQ, VOCAB] float64 from transformers loaded from disk, tokens)}."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("convert_moe_models")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    out = {}
    for i, (family, overrides) in enumerate(FAMILIES.items()):
        path = make_tiny_moe(root / family, family, seed=10 + i, **overrides)
        # eager experts: transformers' plain per-expert loop (its grouped_mm path has no float64)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
        with torch.no_grad():
            out[family] = (path, model(tokens).logits, tokens)
    return out


# ------------------------------------------------------------------------------------------------
# Single-process checks
# ------------------------------------------------------------------------------------------------


def test_moe_config_mapping_and_refusals():
    for family, overrides in FAMILIES.items():
        hf = tiny_moe_config(family, **overrides).to_dict()
        mcfg = names.model_config_from_hf(hf)
        assert names.family_of(mcfg) == family
        assert names.model_config_from_hf(names.hf_config_from_model_config(mcfg)) == mcfg, family
        names.hf_config_from_model_config(mcfg, base=hf)  # consistent with its own source
    q2 = names.model_config_from_hf(tiny_moe_config("qwen2_moe", decoder_sparse_step=2).to_dict())
    assert (q2.moe_layer_pattern, q2.moe_shared_expert_intermediate_size, q2.moe_shared_expert_gate,
            q2.moe_norm_topk_prob, q2.add_qkv_bias, q2.num_moe_experts) == ([0, 1], 64, True, False, True, 4)
    q3 = names.model_config_from_hf(tiny_moe_config("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1]).to_dict())
    assert q3.moe_layer_pattern == [1, 0, 1] and q3.qk_layernorm and q3.moe_norm_topk_prob
    assert names.model_config_from_hf(tiny_moe_config("qwen3_moe").to_dict()).moe_layer_pattern is None
    q3_hf = tiny_moe_config("qwen3_moe").to_dict()
    bad = {
        "mixture-of-experts architecture .*deepseek_v3.*supported MoE families": dict(
            q3_hf, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], n_routed_experts=8),
        "mixture-of-experts architecture .*mixtral": dict(
            q3_hf, model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=8),
        "shared_expert_intermediate_size": dict(tiny_moe_config("qwen2_moe").to_dict(),
                                                shared_expert_intermediate_size=0),
        "num_experts": dict(q3_hf, num_experts=1),
        "mlp_only_layers": dict(q3_hf, mlp_only_layers=[5]),
        "decoder_sparse_step": dict(q3_hf, decoder_sparse_step=0),
    }
    for what, cfg in bad.items():
        with pytest.raises(ValueError, match=what):
            names.model_config_from_hf(cfg)
    with pytest.raises(ValueError, match="matches no supported HF family"):
        names.family_of(dataclasses.replace(q3, moe_shared_expert_intermediate_size=64))
    with pytest.raises(ValueError, match="--hf-config-from: moe_layer_pattern"):
        names.hf_config_from_model_config(q3, base=tiny_moe_config("qwen3_moe", num_hidden_layers=3).to_dict())
    with pytest.raises(ValueError, match="--ep 3 does not divide num_experts 4"):
        names.validate_parallel(q2, tp=1, pp=1, ep=3)
    with pytest.raises(ValueError, match="--etp 3 .* does not divide moe_intermediate_size 32"):
        names.validate_parallel(q2, tp=1, pp=1, ep=1, etp=3)
    dense = names.model_config_from_hf(dict(q3_hf, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                                            num_experts=None, num_experts_per_tok=None))
    with pytest.raises(ValueError, match="--ep 2 .* needs a mixture-of-experts model"):
        names.validate_parallel(dense, tp=1, pp=1, ep=2)


def test_expert_layout_of_ranks():
    from megatron_rasft.convert import layout

    assert [list(layout.experts_of_rank(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    name = "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight"
    assert layout.expert_index(name) == 1 and layout.layer_index(name) == 3
    assert layout.rename_expert(name, 5) == "decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight"
    assert layout.split_kind(name) == "glu" and layout.split_kind("decoder.layers.0.mlp.router.weight") == "replicated"
    # expert TP splits [gate; up] per rank like a dense fc1 (rank r: [gate_r; up_r])
    full = torch.arange(8.0).reshape(8, 1)
    assert layout.shard(name, full, 1, 2).flatten().tolist() == [2.0, 3.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="does not divide num_experts 6"):
        layout.experts_of_rank(6, 4, 0)


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 2, 2), (1, 1, 4)])
def test_round_trip_is_bit_exact(moe_models, tmp_path, tp, pp, ep):
    from megatron_rasft.convert.mcore_io import McoreCheckpoint

    for family, (hf_dir, _, _) in moe_models.items():
        mc, back = tmp_path / f"{family}-mc", tmp_path / f"{family}-hf"
        pipeline.hf_to_mcore(hf_dir, mc, tp=tp, pp=pp, ep=ep, quiet=True)
        meta = json.loads((mc / "model_config.json").read_text())
        assert meta["parallel"]["expert_model_parallel_size"] == ep and meta["model"]["num_moe_experts"] == 4
        ck = McoreCheckpoint(mc)  # per-layer keys, experts on an expert axis (what Megatron's MoE model asks for)
        assert ck.scheme.per_layer
        assert tuple(ck.tensors["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"].size) == (4, 64, 64)
        pipeline.mcore_to_hf(mc, back, quiet=True, max_shard_size="40KB")
        _assert_same_tensors(hf_dir, back)
        assert len(json.loads((back / hf_io.INDEX).read_text())["weight_map"]) == len(_tensors(hf_dir))
        cfg = json.loads((back / "config.json").read_text())
        assert cfg["model_type"] == family and cfg.get("num_experts", cfg.get("num_local_experts")) == 4


def test_fused_expert_names_are_read_and_exported_per_expert(moe_models, tmp_path):
    for family, (hf_dir, _, _) in moe_models.items():
        fused = fuse_experts(hf_dir, tmp_path / f"{family}-fused")
        assert any(n.endswith("mlp.experts.gate_up_proj") for n in _tensors(fused))
        pipeline.hf_to_mcore(fused, tmp_path / f"{family}-mc", ep=2, quiet=True)
        pipeline.mcore_to_hf(tmp_path / f"{family}-mc", tmp_path / f"{family}-back", quiet=True)
        _assert_same_tensors(hf_dir, tmp_path / f"{family}-back")  # per-expert Hub names, same values


def test_reshard_ep2_to_ep1_and_tp(moe_models, tmp_path):
    hf_dir = moe_models["qwen2_moe"][0]
    pipeline.hf_to_mcore(hf_dir, tmp_path / "ep2", ep=2, tp=2, quiet=True)
    pipeline.reshard(tmp_path / "ep2", tmp_path / "ep1", ep=1, quiet=True)
    meta = json.loads((tmp_path / "ep1" / "model_config.json").read_text())
    assert meta["parallel"]["expert_model_parallel_size"] == 1 and meta["padded_vocab_size"] == 256
    pipeline.mcore_to_hf(tmp_path / "ep1", tmp_path / "hf", quiet=True)
    _assert_same_tensors(hf_dir, tmp_path / "hf")
    with pytest.raises(ValueError, match="--ep 3 does not divide num_experts 4"):
        pipeline.reshard(tmp_path / "ep2", tmp_path / "ep3", ep=3, quiet=True)
    assert not (tmp_path / "ep3").exists()


def test_bad_moe_input_gives_clear_errors(moe_models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = moe_models["qwen3_moe"][0]
    out = tmp_path / "out"

    def variant(name, edit_tensors=None, edit_config=None):
        d = tmp_path / name
        fuse_experts(src, d) if name.startswith("fused") else shutil.copytree(src, d)
        if edit_tensors is not None:
            t = load_file(d / "model.safetensors")
            edit_tensors(t)
            save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        if edit_config is not None:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    per_expert = _tensors(src)
    cases = {
        # a layer holding both forms
        "has both fused .* and per-expert": variant("fused-and-per-expert", lambda t: t.update(
            {k: v for k, v in per_expert.items() if ".layers.0.mlp.experts.1." in k})),
        "down_proj is missing": variant("fused-half", lambda t: t.pop("model.layers.1.mlp.experts.down_proj")),
        "holds 4 experts but config.json has num_experts = 8": variant(
            "fused-count", edit_config=lambda c: c.update(num_experts=8, num_local_experts=8)),
        "down_proj has shape": variant("fused-shape", lambda t: t.update({
            "model.layers.0.mlp.experts.down_proj": t["model.layers.0.mlp.experts.down_proj"][:, :, :16].contiguous()})),
        r"missing, e\.g\. \['model.layers.0.mlp.experts.3.gate_proj.weight'": variant(
            "per-expert-missing", lambda t: t.pop("model.layers.0.mlp.experts.3.gate_proj.weight")),
        "mixture-of-experts architecture .*'olmoe'": variant(
            "olmoe", edit_config=lambda c: c.update(model_type="olmoe", architectures=["OlmoeForCausalLM"])),
    }
    for what, d in cases.items():
        with pytest.raises(ValueError, match=what):
            pipeline.hf_to_mcore(d, out, quiet=True)
    with pytest.raises(ValueError, match="--ep 3 does not divide num_experts 4"):
        pipeline.hf_to_mcore(src, out, ep=3, quiet=True)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # The command line: --ep is documented and a bad value is one line naming the flag, exit 2.
    from importlib.machinery import SourceFileLoader

    tool = SourceFileLoader("convert_checkpoint", str(REPO / "tools" / "convert_checkpoint.py")).load_module()
    for cmd in ("hf-to-mcore", "reshard"):
        sub = tool.build_parser()._subparsers._group_actions[0].choices[cmd]
        assert "--ep" in sub.format_help() and "expert" in sub.format_help()
    assert tool.main(["hf-to-mcore", "--hf-dir", str(src), "--out", str(out), "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ep 3 does not divide num_experts 4") and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# Distributed: load at a layout, forward through Megatron's schedule, export, save
# ------------------------------------------------------------------------------------------------


def _moe_layout_job(rank, world_size, layouts):
    """For each (tp, ep, etp, jobs): re-initialise model parallelism (etp: expert TP, None = tp), and for each (mcore_dir, tokens,
    export_dir, save_dir) build the model, load, forward, export and/or save with Megatron's writer.
    Returns per layout the list of logits (None off the reporting rank)."""
    import multiprocessing

    from megatron.core import parallel_state as ps

    from megatron_rasft.config import ParallelConfig
    from megatron_rasft.convert.export import export_to_hf
    from megatron_rasft.convert.mcore_io import load_mcore_into_model, read_model_config, save_model_as_mcore
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed

    results = []
    for tp, ep, etp, jobs in layouts:
        ps.destroy_model_parallel()
        # eval only: Megatron's MoE layer asks for sequence parallelism with TP in training only
        pcfg = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=etp, sequence_parallel=False)
        groups = init_distributed(pcfg)
        out = []
        for mcore_dir, tokens, export_dir, save_dir in jobs:
            mcfg, meta = read_model_config(mcore_dir)
            mcfg.transformer_impl = "local"
            model = build_model(mcfg, pcfg).eval()
            load_mcore_into_model([model], mcore_dir)
            out.append(megatron_logits([model], tokens, first_replica_only=True))
            if export_dir is not None:
                export_to_hf([model], export_dir, mcfg, groups, hf_config=meta["hf_config"],
                             tokenizer_dir=Path(mcore_dir) / "hf_extras", max_shard_size="50KB")
            if save_dir is not None:
                multiprocessing.current_process()._config["daemon"] = False  # Megatron's writer forks
                save_model_as_mcore([model], save_dir, mcfg, groups, hf_config=meta["hf_config"])
        results.append(out)
    return results


def _check(per_rank, layout_index, refs, label):
    final = [out[layout_index] for out in per_rank if out[layout_index][0] is not None]
    assert len(final) == 1, f"{label}: {len(final)} ranks returned logits"
    for (family, ref), logits in zip(refs, final[0]):
        diff = (logits[..., :VOCAB].double() - ref).abs().max().item()
        assert diff <= LOGITS_TOL, f"{label} {family}: max |Δlogits| = {diff}"
        assert logits[..., VOCAB:].abs().max() == 0


def _jobs(moe_models, tmp_path, tag, export=False, save=False):
    jobs, refs = [], []
    for family, (hf_dir, ref, tokens) in moe_models.items():
        mc = tmp_path / f"{family}-{tag}-mc"
        if not mc.exists():
            pipeline.hf_to_mcore(hf_dir, mc, quiet=True)
        jobs.append((str(mc), tokens, str(tmp_path / f"{family}-{tag}-export") if export else None,
                     str(tmp_path / f"{family}-{tag}-saved") if save else None))
        refs.append((family, ref))
    return jobs, refs


def test_logits_export_and_megatron_save_on_two_ranks(moe_models, tmp_path):
    """One 2-process job: EP=1 (× DP 2), EP=2, TP=2 (expert TP 2) and TP=2 × EP=2 (expert TP 1, the EP
    group spanning the TP ranks) for both families — logits of
    the model loaded from the converted checkpoint against transformers; the in-memory export at each
    layout bit-exact; a checkpoint saved by Megatron at EP=2 converts back to the original
    HF tensors; an EP=2 checkpoint resharded to EP=1 loads at EP=1."""
    ep1, refs = _jobs(moe_models, tmp_path, "d", export=True)
    ep2, _ = _jobs(moe_models, tmp_path, "a", export=True)
    ep2[1] = ep2[1][:3] + (str(tmp_path / "qwen2_moe-a-saved"),)  # Megatron's own writer, the mixed model
    tp2, _ = _jobs(moe_models, tmp_path, "b", export=True)
    tp2ep2, _ = _jobs(moe_models, tmp_path, "e", export=True)
    hf2 = moe_models["qwen2_moe"][0]
    pipeline.hf_to_mcore(hf2, tmp_path / "r-ep2", ep=2, quiet=True)
    pipeline.reshard(tmp_path / "r-ep2", tmp_path / "r-ep1", ep=1, quiet=True)
    per_rank = spawn(_moe_layout_job, 2, [
        (1, 1, None, ep1 + [(str(tmp_path / "r-ep1"), moe_models["qwen2_moe"][2], None, None)]), (1, 2, None, ep2),
        (2, 1, None, tp2), (2, 2, 1, tp2ep2)],
        timeout_s=600)
    _check(per_rank, 0, refs + [("qwen2_moe resharded ep2→ep1", moe_models["qwen2_moe"][1])], "ep1 dp2")
    _check(per_rank, 1, refs, "ep2")
    _check(per_rank, 2, refs, "tp2 (expert tp2)")
    _check(per_rank, 3, refs, "tp2 x ep2 (expert tp1)")
    for family, (hf_dir, _, _) in moe_models.items():
        for tag in "abde":
            _assert_same_tensors(hf_dir, tmp_path / f"{family}-{tag}-export")
        assert json.loads((tmp_path / f"{family}-a-export" / "config.json").read_text())["model_type"] == family
    saved = tmp_path / "qwen2_moe-a-saved"
    assert json.loads((saved / "model_config.json").read_text())["parallel"]["expert_model_parallel_size"] == 2
    pipeline.mcore_to_hf(saved, tmp_path / "saved-hf", quiet=True)
    _assert_same_tensors(hf2, tmp_path / "saved-hf")


@pytest.mark.slow
def test_logits_and_export_at_tp2_ep2(moe_models, tmp_path):
    """Four ranks: TP=2 × EP=2 with expert TP 2 for both families (slow: a 4-process job costs ~1 min
    of start-up on the 2-core CI box; the 2-rank job covers TP=2 × EP=2 with expert TP 1, and expert
    TP 2 at EP=1)."""
    jobs, refs = _jobs(moe_models, tmp_path, "c", export=True)
    per_rank = spawn(_moe_layout_job, 4, [(2, 2, None, jobs)], timeout_s=600)
    _check(per_rank, 0, refs, "tp2 ep2")
    for family, (hf_dir, _, _) in moe_models.items():
        _assert_same_tensors(hf_dir, tmp_path / f"{family}-c-export")
