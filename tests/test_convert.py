"""HF ⇄ Megatron conversion: exact round trips, logits parity with transformers at TP/PP layouts,
resharding, the in-memory export, loading by transformers (and vLLM, slow), and bad input.

Tiny random models (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 250 — not a multiple of 128) of
each family, tied and untied, made on the spot. Distributed checks run in one spawned job per layout
(gloo on CPU), each covering every model.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rasft.convert import hf_io, names, pipeline
from helpers.distributed import megatron_logits, spawn

REPO = Path(__file__).resolve().parents[1]
VOCAB = 250
SEQ = 12
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _hf_config(family: str, tied: bool):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied, initializer_range=0.2, head_dim=16)
    if family == "llama":  # llama3 RoPE scaling that actually bends frequencies at these lengths
        return LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
                           rope_theta=10000.0)
    if family == "qwen2":
        return Qwen2Config(**common, rope_theta=1e6)
    if family == "qwen3":
        return Qwen3Config(**common, rope_theta=1e6)
    return MistralConfig(**common, sliding_window=None, rope_theta=1e6)


def _causal_lm(family: str):
    import transformers as tf

    return getattr(tf, names.ARCHITECTURES[family])


def _load_hf(path: Path, family: str):
    return _causal_lm(family).from_pretrained(path, dtype=torch.float32).eval()


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb), (sorted(set(ta) ^ set(tb)))
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{(family, tied): (hf_dir, reference logits [2, SEQ, VOCAB] in fp32, tokens)}."""
    root = tmp_path_factory.mktemp("convert_models")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    out = {}
    for i, family in enumerate(FAMILIES):
        for tied in (False, True):
            torch.manual_seed(100 + 2 * i + tied)
            model = _causal_lm(family)(_hf_config(family, tied)).float().eval()
            if family in ("qwen2", "qwen3"):  # make biases / q-k norms non-trivial
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
            path = root / f"{family}-{'tied' if tied else 'untied'}"
            model.save_pretrained(path)
            (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
            with torch.no_grad():
                logits = model(tokens).logits.float()
            out[(family, tied)] = (path, logits, tokens)
    return out


# ------------------------------------------------------------------------------------------------
# Single-process checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_is_bit_exact(models, tmp_path, tp):
    for (family, tied), (hf_dir, _, _) in models.items():
        mc, back = tmp_path / f"{family}{tied}-mc", tmp_path / f"{family}{tied}-hf"
        pipeline.hf_to_mcore(hf_dir, mc, tp=tp, quiet=True)
        meta = json.loads((mc / "model_config.json").read_text())
        assert meta["padded_vocab_size"] == 128 * tp * -(-VOCAB // (128 * tp))
        assert meta["hf_config"]["model_type"] == family
        pipeline.mcore_to_hf(mc, back, quiet=True, max_shard_size="60KB")
        _assert_same_tensors(hf_dir, back)
        index = json.loads((back / hf_io.INDEX).read_text())
        assert len(set(index["weight_map"].values())) > 1  # really sharded
        assert json.loads((back / "config.json").read_text())["model_type"] == family
        assert (back / "tokenizer_config.json").is_file() and (back / "generation_config.json").is_file()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_exported_folder_loads_in_transformers(models, tmp_path):
    hf_dir, ref, tokens = models[("qwen3", True)]
    pipeline.hf_to_mcore(hf_dir, tmp_path / "mc", quiet=True)
    pipeline.mcore_to_hf(tmp_path / "mc", tmp_path / "hf", quiet=True, dtype="bf16")
    model = _causal_lm("qwen3").from_pretrained(tmp_path / "hf").eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        got = model.float()(tokens).logits
    assert (got - ref).abs().max() < 0.1  # bf16 weights


def test_config_mapping_round_trip_and_refusals():
    for family in FAMILIES:
        hf = _hf_config(family, False).to_dict()
        mcfg = names.model_config_from_hf(hf)
        again = names.model_config_from_hf(names.hf_config_from_model_config(mcfg))
        assert again == mcfg, family
    llama = _hf_config("llama", False).to_dict()
    assert names.model_config_from_hf(llama).rope_scaling["rope_type"] == "llama3"
    bad = {
        "yarn": dict(llama, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
        "attention_bias": dict(llama, attention_bias=True),
        "mlp_bias": dict(llama, mlp_bias=True),
        "hidden_act": dict(llama, hidden_act="gelu"),
        "sliding_window": dict(_hf_config("mistral", False).to_dict(), sliding_window=64),
        "unsupported architecture": dict(llama, model_type="gemma", architectures=["GemmaForCausalLM"]),
    }
    for what, cfg in bad.items():
        with pytest.raises(ValueError, match=what):
            names.model_config_from_hf(cfg)
    mcfg = names.model_config_from_hf(llama)
    with pytest.raises(ValueError, match="KV heads"):
        names.validate_parallel(mcfg, tp=4, pp=1)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        names.validate_parallel(mcfg, tp=1, pp=4)


def _no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_bad_input_gives_clear_errors_and_no_output(models, tmp_path):
    src = models[("llama", False)][0]

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        pipeline.hf_to_mcore(tmp_path / "nope", out, quiet=True)
    d = copy("noconfig")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        pipeline.hf_to_mcore(d, out, quiet=True)
    d = copy("truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        pipeline.hf_to_mcore(d, out, quiet=True)
    d = copy("shapes")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight has shape"):
        pipeline.hf_to_mcore(d, out, quiet=True)
    with pytest.raises(ValueError, match="does not divide the attention heads"):
        pipeline.hf_to_mcore(src, out, tp=3, quiet=True)
    _no_output(tmp_path, out)
    # A failure in the middle of writing (a tensor vanishes) leaves nothing behind either.
    d = copy("vanishing")
    hf = hf_io.HFCheckpoint(d)
    orig_get = hf_io.HFCheckpoint.get

    def flaky(self, name):
        if "layers.1.mlp" in name:
            raise OSError(f"simulated read error on {name}")
        return orig_get(self, name)

    hf_io.HFCheckpoint.get = flaky
    try:
        with pytest.raises(OSError, match="simulated"):
            pipeline.hf_to_mcore(d, out, quiet=True)
    finally:
        hf_io.HFCheckpoint.get = orig_get
    _no_output(tmp_path, out)
    del hf
    # Non-empty output is refused without force; with force it is replaced.
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        pipeline.hf_to_mcore(src, out, quiet=True)
    assert (out / "keep").exists()
    pipeline.hf_to_mcore(src, out, quiet=True, force=True)
    assert not (out / "keep").exists() and (out / "model_config.json").exists()
    # A truncated Megatron checkpoint is refused before anything is written.
    shard = next(out.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        pipeline.mcore_to_hf(out, tmp_path / "hf", quiet=True)
    _no_output(tmp_path, tmp_path / "hf")


def test_cli_round_trip(models, tmp_path):
    src = models[("mistral", True)][0]
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(tool + ["hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "mc"), "--tp", "2",
                               "--pp", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "GB/s" in r.stdout and "peak RSS" in r.stdout
    r = subprocess.run(tool + ["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "hf")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    _assert_same_tensors(src, tmp_path / "hf")
    r = subprocess.run(tool + ["hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "mc"), "--tp", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "does not divide" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# Distributed: load at a layout, forward through Megatron's schedule, export back
# ------------------------------------------------------------------------------------------------


def _layout_job(rank, world_size, layouts):
    """For each (tp, pp, jobs) in turn (model parallelism re-initialised in between; spare ranks are
    data-parallel replicas), and each (mcore_dir, tokens, export_dir, save_dir) of `jobs`: build the
    model, load, forward, export to HF and/or save with save_model_as_mcore. Returns, per layout,
    the logits of each job on the last stage's TP rank 0 of the first replica (None elsewhere)."""
    from megatron.core import parallel_state as ps

    from megatron_rasft.config import ParallelConfig
    from megatron_rasft.convert.export import export_to_hf
    from megatron_rasft.convert.mcore_io import load_mcore_into_model, read_model_config, save_model_as_mcore
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed

    results = []
    for tp, pp, jobs in layouts:
        ps.destroy_model_parallel()
        pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
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
                # Megatron's checkpoint writer forks worker processes, which a daemonic process (what
                # `spawn` starts) may not; torchrun ranks are not daemonic.
                import multiprocessing

                multiprocessing.current_process()._config["daemon"] = False
                save_model_as_mcore([model], save_dir, mcfg, groups, hf_config=meta["hf_config"])
        results.append(out)
    return results


def _check_logits(per_rank, refs, label):
    final = [out for out in per_rank if out[0] is not None]
    assert len(final) == 1, f"{label}: {len(final)} ranks returned logits (expected 1)"
    for (key, ref), logits in zip(refs, final[0]):
        diff = (logits[..., :VOCAB] - ref).abs().max().item()
        assert diff <= 1e-4, f"{label} {key}: max |Δlogits| = {diff}"
        assert logits[..., VOCAB:].abs().max() == 0  # padded vocab rows are zero


def _layout_jobs(models, tmp_path, tp, pp):
    """Convert every model for (tp, pp); the spawned jobs, the references, the export pairs."""
    jobs, refs, exports = [], [], []
    for key, (hf_dir, ref, tokens) in models.items():
        mc = tmp_path / f"{key[0]}{key[1]}-tp{tp}pp{pp}-mc"
        pipeline.hf_to_mcore(hf_dir, mc, tp=tp, pp=pp, quiet=True)
        exp = tmp_path / f"{key[0]}{key[1]}-tp{tp}pp{pp}-export"
        jobs.append((str(mc), tokens, str(exp), None))
        refs.append((key, ref))
        exports.append((hf_dir, exp))
    return (tp, pp, jobs), refs, exports


def _check_exports(exports):
    for hf_dir, exp in exports:  # the in-memory export of the sharded model is bit-exact
        _assert_same_tensors(hf_dir, exp)
        assert json.loads((exp / "config.json").read_text())["architectures"] == \
            json.loads((hf_dir / "config.json").read_text())["architectures"]
        assert (exp / "tokenizer_config.json").is_file()


def test_logits_parity_export_and_reshard_on_two_ranks(models, tmp_path):
    """TP1 (×DP2), TP2, PP2 for every model, then reshard TP2 → TP1 → PP2 and a TP2 checkpoint saved
    by Megatron itself loaded at PP2 — all in one 2-process job."""
    layouts, all_refs, all_exports = [], [], []
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        layout_, refs, exports = _layout_jobs(models, tmp_path, tp, pp)
        layouts.append(layout_)
        all_refs.append(refs)
        all_exports += exports
    hf_dir, ref, tokens = models[("qwen2", True)]
    r = tmp_path / "reshard"
    pipeline.hf_to_mcore(hf_dir, r / "tp2", tp=2, quiet=True)
    pipeline.reshard(r / "tp2", r / "tp1", tp=1, quiet=True)
    pipeline.reshard(r / "tp1", r / "pp2", tp=1, pp=2, quiet=True)
    assert json.loads((r / "pp2" / "model_config.json").read_text())["parallel"]["pipeline_model_parallel_size"] == 2
    layouts.append((2, 1, [(str(r / "tp2"), tokens, None, str(r / "saved"))]))
    layouts.append((1, 2, [(str(r / "pp2"), tokens, None, None), (str(r / "saved"), tokens, None, None)]))
    all_refs += [[("tp2", ref)], [("resharded tp2→tp1→pp2", ref), ("megatron-saved tp2 → pp2", ref)]]
    per_rank = spawn(_layout_job, 2, layouts, timeout_s=600)
    labels = ["tp1 dp2", "tp2", "pp2", "tp2 (save)", "pp2 (resharded)"]
    for i, label in enumerate(labels):
        _check_logits([out[i] for out in per_rank], all_refs[i], label)
    _check_exports(all_exports)
    pipeline.mcore_to_hf(r / "saved", r / "hf", quiet=True)
    _assert_same_tensors(hf_dir, r / "hf")


def test_logits_parity_and_export_tp2_pp2(models, tmp_path):
    layout_, refs, exports = _layout_jobs(models, tmp_path, 2, 2)
    per_rank = spawn(_layout_job, 4, [layout_], timeout_s=600)
    _check_logits([out[0] for out in per_rank], refs, "tp2 pp2")
    _check_exports(exports)


# ------------------------------------------------------------------------------------------------
# vLLM (slow: restarts the session's vLLM server twice, ~1 min on CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vllm_serves_exported_folder_like_transformers(vllm_server, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rasft.rollout.server import http_json

    original = vllm_server.model_dir
    pipeline.hf_to_mcore(original, tmp_path / "mc", tp=2, quiet=True)
    pipeline.mcore_to_hf(tmp_path / "mc", tmp_path / "hf", quiet=True, max_shard_size="100KB")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    vllm_server.restart(tmp_path / "hf")
    try:
        for prompt in ["Q:12+34;A:", "Q:905+7;A:", "Q:1+1;A:"]:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                want = model.generate(ids, max_new_tokens=8, do_sample=False, top_k=0, top_p=1.0,
                                      eos_token_id=None)[0, ids.shape[1]:].tolist()
            status, reply = http_json(f"{vllm_server.url}/v1/completions", {
                "model": vllm_server.model_name(), "prompt": ids[0].tolist(), "max_tokens": 8,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}, timeout=120)
            assert status == 200, reply
            choice = reply["choices"][0]
            got = choice.get("token_ids") or tokenizer(choice["text"], add_special_tokens=False).input_ids
            assert got == want, (prompt, got, want)
    finally:
        vllm_server.restart(original)


def test_vllm_reloads_a_converted_export_greedy_like_transformers(vllm_server, tmp_path):
    """The CI version of the check above, without restarts (seconds instead of ~1 min): other weights
    of the served shapes go HF → Megatron (TP=2) → HF and are reloaded in place into the session
    server; its greedy tokens then equal transformers' on the exported folder. The server's own
    weights are put back (conftest checks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rasft.rollout.client import RolloutClient
    from megatron_rasft.rollout.refresh import refresh_weights
    from megatron_rasft.rollout.server import http_json
    from helpers.tiny import reseed_weights

    original = vllm_server.model_dir
    other = reseed_weights(original, tmp_path / "other", seed=7)
    pipeline.hf_to_mcore(other, tmp_path / "mc", tp=2, quiet=True)
    pipeline.mcore_to_hf(tmp_path / "mc", tmp_path / "hf", quiet=True, max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1  # the sharded form, with its index
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    client = RolloutClient(vllm_server, vllm_server.cfg, progress=False)
    try:
        result = refresh_weights(vllm_server, tmp_path / "hf", client, allow_restart=False)
        assert result.method == "inplace" and result.max_abs_diff_before > 0.1  # other weights are live
        for prompt in ["Q:12+34;A:", "Q:905+7;A:", "Q:1+1;A:"]:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                want = model.generate(ids, max_new_tokens=8, do_sample=False, top_k=0, top_p=1.0,
                                      eos_token_id=None)[0, ids.shape[1]:].tolist()
            status, reply = http_json(f"{vllm_server.url}/v1/completions", {
                "model": vllm_server.model_name(), "prompt": ids[0].tolist(), "max_tokens": 8,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}, timeout=120)
            assert status == 200, reply
            assert reply["choices"][0]["token_ids"] == want, (prompt, reply["choices"][0], want)
    finally:
        refresh_weights(vllm_server, original, client, allow_restart=False)
