"""Config loading/validation, the model provider's spec choice and errors, and lazy imports."""
import subprocess
import sys

import pytest

from megatron_rasft.config import LossConfig, ModelConfig, WeightingConfig, load_config


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[loss]\nmethod = "sft"\n[train]\nlr = 1e-4\nrun_dir = "x"\n')
    cfg = load_config(f, ["train.lr=3e-5", "loss.ratio=none", "model.tie_embeddings=true",
                          "rollout.sampling.stop=[\"\\n\"]", "weighting.smoothing=[1, 1]"])
    assert cfg.loss.method == "sft" and cfg.loss.ratio == "none"
    assert cfg.train.lr == 3e-5 and cfg.model.tie_embeddings is True
    assert cfg.rollout.sampling.stop == ["\n"] and cfg.weighting.smoothing == (1, 1)
    cfg.save(tmp_path / "out" / "config.json")
    assert '"method": "sft"' in (tmp_path / "out" / "config.json").read_text()
    assert "[loss]" in cfg.pretty()


def test_sampling_tables_and_deprecated_spellings(tmp_path):
    """[rollout.sampling] and [eval.sampling] are one SamplingConfig; the old flat keys still load,
    with a DeprecationWarning naming the new key; eval keeps its own defaults for unset fields."""
    f = tmp_path / "run.toml"
    f.write_text('[rollout.sampling]\nn = 3\ntemperature = 0.9\n[eval.sampling]\nn = 2\n')
    cfg = load_config(f)
    assert (cfg.rollout.sampling.n, cfg.rollout.sampling.temperature, cfg.rollout.sampling.max_tokens) == (3, 0.9, 256)
    assert (cfg.eval.sampling.n, cfg.eval.sampling.max_tokens) == (2, 4096)
    old = tmp_path / "old.toml"
    old.write_text('[rollout]\nnum_samples = 3\ntemperature = 0.9\n[eval]\nn = 2\n')
    with pytest.warns(DeprecationWarning, match=r"rollout.num_samples is deprecated; use rollout.sampling.n"):
        assert load_config(old) == cfg
    with pytest.warns(DeprecationWarning, match="eval.sampling.temperature"):
        assert load_config(None, ["eval.temperature=0.5"]).eval.sampling.temperature == 0.5
    with pytest.raises(ValueError, match="both rollout.seed .deprecated. and rollout.sampling.seed"):
        load_config(None, ["rollout.seed=1", "rollout.sampling.seed=2"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) in \[rollout.sampling\]: bogus"):
        load_config(None, ["rollout.sampling.bogus=1"])
    # The released code's presets are "released"; "reference" (the frozen reference model's name) still loads.
    with pytest.warns(DeprecationWarning, match='weighting.scheme = "reference" is deprecated; use "released"'):
        got = load_config(None, ["weighting.scheme=reference", "rollout.selection=reference",
                                 "train.prompt_template=reference"])
    assert (got.weighting.scheme, got.rollout.selection, got.train.prompt_template) == ("released",) * 3
    # One source for the training dtype: the old train.bf16 becomes model.params_dtype.
    with pytest.warns(DeprecationWarning, match='train.bf16 is deprecated; use model.params_dtype = "bf16"'):
        assert load_config(None, ["train.bf16=true"]).model.params_dtype == "bf16"
    with pytest.raises(ValueError, match="contradicts model.params_dtype = 'fp16'"), pytest.warns(DeprecationWarning):
        load_config(None, ["train.bf16=true", "model.params_dtype=fp16"])


@pytest.mark.parametrize("bad, msg", [
    (["loss.method=foo"], "loss.method must be one of"),
    (["nope.x=1"], "unknown config section"),
    (["train.bogus=1"], "unknown key(s) in [train]: bogus"),
    (["train.global_batch_size=7", "train.micro_batch_size=2"], "multiple of micro_batch_size"),
    (["model.num_attention_heads=6", "model.num_query_groups=4"], "multiple of"),
    (["train.data_path=p.jsonl"], "train.tokenizer"),
    (["loss.ratio_min=2.0"], "ratio_min"),
    (["bad"], "section.key=value"),
])
def test_validation_errors(bad, msg):
    with pytest.raises(ValueError, match=None) as e:
        load_config(None, bad)
    assert msg in str(e.value)


def test_dataclass_validation():
    with pytest.raises(ValueError, match="a_min must be ≤ a_max"):
        WeightingConfig(scheme="linear", a_min=1.5)
    with pytest.raises(ValueError, match="model.fp8"):
        ModelConfig(fp8="e5m2")
    assert LossConfig(method="rasft").needs_ref_logp and not LossConfig(method="sft").needs_ref_logp
    assert LossConfig(method="asft").needs_ref_logits
    with pytest.raises(FileNotFoundError):
        load_config("/nonexistent.toml")


def test_provider_spec_and_te_errors(monkeypatch):
    import torch

    from megatron_rasft.model import provider
    from megatron_rasft.model.provider import padded_vocab_size, resolve_impl

    # On this machine, whatever it has: `auto` takes TE exactly when CUDA and TE are both there.
    have_te = torch.cuda.is_available() and provider.te_available()
    assert resolve_impl(ModelConfig()) == ("te" if have_te else "local")
    # Each missing piece is named (simulated, so that the check runs the same on a GPU host).
    for cuda, te, missing in ((False, False, "needs a CUDA GPU .* and Transformer Engine"),
                              (False, True, r"needs a CUDA GPU \(torch.cuda.is_available\(\) is False\);"),
                              (True, False, "needs Transformer Engine")):
        monkeypatch.setattr(provider.torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(provider, "te_available", lambda: te)
        with pytest.raises(RuntimeError, match=missing):
            resolve_impl(ModelConfig(fp8="hybrid"))
        with pytest.raises(RuntimeError, match="transformer_impl = 'te' needs"):
            resolve_impl(ModelConfig(transformer_impl="te"))
        assert resolve_impl(ModelConfig()) == "local"
    monkeypatch.setattr(provider.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(provider, "te_available", lambda: True)
    assert resolve_impl(ModelConfig()) == "te" and resolve_impl(ModelConfig(fp8="hybrid")) == "te"
    with pytest.raises(ValueError, match="model.fp8 needs the Transformer Engine layer spec"):
        resolve_impl(ModelConfig(fp8="hybrid", transformer_impl="local"))
    monkeypatch.undo()
    def padded(v, div, tp):
        return padded_vocab_size(ModelConfig(vocab_size=v, make_vocab_size_divisible_by=div), tp)

    assert padded(250, 128, 1) == 256 and padded(250, 128, 2) == 256
    assert padded(257, 64, 2) == 384


def test_transformer_config_passes_architecture_through():
    from megatron_rasft.config import ParallelConfig
    from megatron_rasft.model.provider import transformer_config

    tc = transformer_config(ModelConfig(num_query_groups=2, qk_layernorm=True, add_qkv_bias=True,
                                        num_layers=2, hidden_size=64, num_attention_heads=4),
                            ParallelConfig(tensor_model_parallel_size=2))
    assert tc.num_query_groups == 2 and tc.qk_layernorm and tc.add_qkv_bias
    assert tc.gated_linear_unit and tc.normalization == "RMSNorm" and not tc.add_bias_linear
    assert tc.calculate_per_token_loss and tc.tensor_model_parallel_size == 2


def test_import_is_light():
    """Importing the package and its pure modules loads neither vLLM, TE nor Megatron's model code."""
    code = ("import sys, megatron_rasft, megatron_rasft.config, megatron_rasft.loss, megatron_rasft.weighting, "
            "megatron_rasft.records, megatron_rasft.cli; megatron_rasft.cli.build_parser(); "
            "bad = [m for m in ('vllm', 'transformer_engine', 'megatron.core.models') if m in sys.modules]; "
            "print(bad); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "megatron_rasft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "serve", "rollout", "verify", "weigh"):
        assert cmd in out.stdout


def test_eval_command_takes_defaults_from_the_eval_table(tmp_path):
    from megatron_rasft.cli import build_parser
    from megatron_rasft.commands.eval import _apply_config

    f = tmp_path / "run.toml"
    f.write_text('[eval]\nbenchmarks = ["math500", "gsm8k"]\n[eval.sampling]\nn = 4\ntemperature = 0.6\n')
    args = build_parser().parse_args(["eval", "--config", str(f), "--out", "x", "--n", "8"])
    _apply_config(args)
    s = args.sampling
    assert (s.n, s.temperature, args.benchmarks) == (8, 0.6, "math500,gsm8k")  # the flag wins
    assert (s.max_tokens, s.top_k, s.seed, args.prompt_template) == (4096, 0, 1234, "qwen25-math-cot")  # defaults
