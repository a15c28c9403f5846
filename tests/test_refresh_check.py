"""A refresh cannot be stale or partial without being caught (rollout/refresh_check.py), against
real vLLM (CPU) servers: the session's untied tiny Llama, and a tied one started here.

Every stale case moves the policy far less than `refresh_atol` on the probe (the probe alone accepts
it; asserted), and is caught by the tensor check: a no-op reload, a reload of a subset of the
tensors, a tied LM head whose packed copy was not rebuilt. A normal refresh passes (no false alarm),
tied embeddings included.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megatron_rasft.config import ServerConfig
from megatron_rasft.rollout import refresh
from megatron_rasft.rollout.client import RolloutClient
from megatron_rasft.rollout.refresh import RefreshError, hf_prompt_logprobs, refresh_weights
from megatron_rasft.rollout.refresh_check import tensor_groups

PROBE = "Q:903+27;A:"


def _perturbed(src, dst, eps: float, seed: int = 1, only=None):
    """A copy of the HF checkpoint `src` with every tensor (or those `only` selects) moved by
    eps · std(tensor) · N(0, 1): a small optimizer step."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        sd = {k: (v + eps * v.std() * torch.randn(v.shape, generator=g) if only is None or only(k) else v)
              for k, v in sd.items()}
        save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def _max_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def _small_step(server, tmp_path, name="new"):
    """(new checkpoint, probe ids, expected log-probs of it) for a step the probe barely sees."""
    new = _perturbed(server.model_dir, tmp_path / name, eps=1e-4)
    client = RolloutClient(server, server.cfg, progress=False)
    ids = client.prompt_logprobs(PROBE)[0]
    expected = hf_prompt_logprobs(new, ids)
    drift = _max_diff(expected, hf_prompt_logprobs(server.model_dir, ids))
    assert 1e-4 < drift < server.cfg.refresh_atol / 4, drift  # far below refresh_atol, yet real
    return new, ids, expected, client


def test_groups_close_the_name_map():
    """Tensors are grouped by the name map (as a served Llama's `weight_name_map` answers: q/k/v ->
    qkv_proj, gate/up -> gate_up_proj), a tied embedding with the LM head; without ties the head is
    a group of its own with no trainer tensor (which the check fails); a name the server lacks is
    refused by name."""
    layer = "model.layers.0."
    name_map = {"model.embed_tokens.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
                **{f"{layer}self_attn.{x}_proj.weight": f"{layer}self_attn.qkv_proj.weight" for x in "qkv"},
                **{f"{layer}mlp.{x}_proj.weight": f"{layer}mlp.gate_up_proj.weight" for x in ("gate", "up")},
                "model.rotary_emb.inv_freq": None}
    server = ["model.embed_tokens.weight", f"{layer}self_attn.qkv_proj.weight", f"{layer}mlp.gate_up_proj.weight",
              "model.norm.weight", "lm_head.weight"]
    cfg = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}
    groups = {tuple(g.params): sorted(g.hf) for g in tensor_groups(name_map, cfg, server)}
    assert groups == {
        ("lm_head.weight", "model.embed_tokens.weight"): ["model.embed_tokens.weight"],
        (f"{layer}mlp.gate_up_proj.weight",): [f"{layer}mlp.gate_proj.weight", f"{layer}mlp.up_proj.weight"],
        (f"{layer}self_attn.qkv_proj.weight",): [f"{layer}self_attn.{x}_proj.weight" for x in "kqv"],
        ("model.norm.weight",): ["model.norm.weight"]}
    untied = {tuple(g.params): g.hf for g in tensor_groups(name_map, {**cfg, "tie_word_embeddings": False}, server)}
    assert untied[("lm_head.weight",)] == []
    with pytest.raises(RefreshError, match=r"model.layers.1.mlp.down_proj.weight"):
        tensor_groups({**name_map, "model.layers.1.mlp.down_proj.weight": "model.layers.1.mlp.down_proj.weight"},
                      cfg, server)


def test_noop_and_subset_reloads_are_caught(vllm_server, tmp_path, monkeypatch):
    """The in-place reload replaced by a no-op, then by a reload of layer 0's tensors only: the
    probe stays within refresh_atol of the new policy, and the tensor check names what is stale."""
    new, ids, expected, client = _small_step(vllm_server, tmp_path)
    real_reload = refresh.reload_in_place
    monkeypatch.setattr(refresh, "reload_in_place", lambda server, hf_dir, timeout_s=600.0: None)
    with pytest.raises(RefreshError) as err:
        refresh_weights(vllm_server, new, client, probe=ids, expected=expected, allow_restart=False)
    msg = str(err.value)
    # Every tensor the step moved (all but the norms, whose weights are all ones: std 0) is named.
    assert "12 of 17 server tensors did not change although the trainer changed them" in msg, msg
    assert "lm_head.weight#packed" in msg and "model.layers.0.mlp.down_proj.weight#packed" in msg, msg
    assert "probe |Δ log-prob| vs the trainer" in msg and "(refresh_atol 0.05)" in msg, msg
    assert _max_diff(client.prompt_logprobs(ids)[1], expected) < vllm_server.cfg.refresh_atol  # the probe alone passes

    # A reload that loads layer 0 only (a checkpoint holding a subset of the export's tensors).
    subset = tmp_path / "subset"
    subset.mkdir()
    shutil.copy(new / "config.json", subset / "config.json")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(new / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith("model.layers.0.")}, str(subset / "model.safetensors"),
              metadata={"format": "pt"})
    monkeypatch.setattr(refresh, "reload_in_place", lambda server, hf_dir, timeout_s=600.0: real_reload(server, subset))
    try:
        with pytest.raises(RefreshError) as err:
            refresh_weights(vllm_server, new, client, probe=ids, expected=expected, allow_restart=False)
        msg = str(err.value)
        # embed_tokens and lm_head (bytes and packed copies) and layer 1's four linears; not layer 0.
        assert "8 of 17 server tensors did not change although" in msg, msg
        assert "model.layers.1.mlp.down_proj.weight#packed" in msg and "model.layers.0." not in msg, msg
        assert _max_diff(client.prompt_logprobs(ids)[1], expected) < vllm_server.cfg.refresh_atol
    finally:
        monkeypatch.setattr(refresh, "reload_in_place", real_reload)
    # A normal refresh to the same step passes, every server tensor checked (untied: no false alarm).
    res = refresh_weights(vllm_server, new, client, probe=ids, expected=expected, allow_restart=False)
    assert res.method == "inplace" and res.check.ok and res.check.skipped == 0, res
    # embed and lm_head: bytes + packed copy; per layer 4 packed linears + 2 norms; the final norm.
    assert res.check.checked == 17 and res.max_abs_diff_expected < 1e-3


@pytest.fixture(scope="module")
def tied_server(tmp_path_factory):
    """A second server, on a tied-embedding tiny Llama (its in-place reload must rebuild the LM
    head's packed copy: rollout/vllm_ext.py)."""
    from megatron_rasft.demo.toy import make_tiny_model, train_tokenizer
    from megatron_rasft.rollout.server import RolloutServer

    root = tmp_path_factory.mktemp("tied")
    model = make_tiny_model(root / "model", train_tokenizer(root / "tok"), seed=0, tie_word_embeddings=True)
    server = RolloutServer(model, ServerConfig(kv_cache_gib=0.25, max_model_len=512, refresh_check="full"),
                           log_file=root / "vllm_server.log").start()
    try:
        yield server
    finally:
        server.stop()


def test_tied_head_not_rebuilt_is_caught_and_a_normal_refresh_passes(tied_server, tmp_path, monkeypatch):
    """vLLM's plain `reload_weights` (what an attached server without our extension gets) leaves the
    tied LM head computing with its old packed copy: caught by name; our `reload_weights_tied`
    passes, tied head included."""
    from megatron_rasft.rollout.server import http_json

    new, ids, expected, client = _small_step(tied_server, tmp_path)
    real_reload = refresh.reload_in_place

    def plain_reload(server, hf_dir, timeout_s=600.0):  # reload_in_place's legs, with the plain reload
        for path, payload in (("/pause?mode=wait", {}),
                              ("/collective_rpc", {"method": "reload_weights",
                                                   "kwargs": {"weights_path": str(Path(hf_dir).resolve())}}),
                              ("/reset_prefix_cache", {}), ("/resume", {})):
            status, body = http_json(f"{server.url}{path}", payload, timeout=timeout_s, method="POST")
            assert status == 200, (path, body)

    monkeypatch.setattr(refresh, "reload_in_place", plain_reload)
    with pytest.raises(RefreshError) as err:
        refresh_weights(tied_server, new, client, probe=ids, expected=expected, allow_restart=False)
    msg = str(err.value)
    assert "1 of 17 server tensors did not change" in msg and "lm_head.weight#packed" in msg, msg
    assert _max_diff(client.prompt_logprobs(ids)[1], expected) < tied_server.cfg.refresh_atol
    monkeypatch.setattr(refresh, "reload_in_place", real_reload)

    res = refresh_weights(tied_server, new, client, probe=ids, expected=expected, allow_restart=False)
    # The embedding/head group moved in part in the failed refresh: unknown, so left unchecked once.
    assert res.method == "inplace" and res.check.ok and (res.check.checked, res.check.skipped) == (13, 1)
    assert res.max_abs_diff_expected < 1e-3
    # Only the embedding (and with it the tied head) changes: the rest must stay as it is.
    emb = _perturbed(new, tmp_path / "emb", eps=1e-4, seed=2, only=lambda k: "embed_tokens" in k)
    res = refresh_weights(tied_server, emb, client, probe=ids, expected=hf_prompt_logprobs(emb, ids),
                          allow_restart=False)
    assert res.check.ok and (res.check.checked, res.check.skipped) == (17, 0)


@pytest.mark.slow
def test_stale_reload_falls_back_to_one_restart(vllm_server, tmp_path, monkeypatch):
    """A stale in-place reload restarts the server on the new checkpoint once (which then serves
    it); the reason names the stale tensors. One restart, so `slow`."""
    new, ids, expected, client = _small_step(vllm_server, tmp_path)
    monkeypatch.setattr(refresh, "reload_in_place", lambda server, hf_dir, timeout_s=600.0: None)
    res = refresh_weights(vllm_server, new, client, probe=ids, expected=expected)
    assert res.method == "restart" and "did not change although the trainer changed them" in res.fallback_reason
    assert res.max_abs_diff_expected < 1e-3
