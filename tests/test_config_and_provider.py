"""Config loading/validation, the model provider's spec choice and errors, and lazy imports."""
import dataclasses
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from megatron_rasft.config import (DEPRECATED_KEYS, LossConfig, ModelConfig, RunConfig, WeightingConfig,
                                   config_from_dict, load_config)

ROOT = Path(__file__).resolve().parents[1]


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[loss]\nmethod = "sft"\n[train]\nrun_dir = "x"\n[train.optim]\nlr = 1e-4\n')
    cfg = load_config(f, ["train.optim.lr=3e-5", "loss.ratio=none", "model.tie_embeddings=true",
                          "rollout.sampling.stop=[\"\\n\"]", "weighting.smoothing=[1, 1]"])
    assert cfg.loss.method == "sft" and cfg.loss.ratio == "none"
    assert cfg.train.optim.lr == 3e-5 and cfg.model.tie_embeddings is True
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
        got = load_config(None, ["weighting.scheme=reference", "rollout.selection.rule=reference",
                                 "train.data.prompt_template=reference", "rollout.verifier.kind=reference"])
    assert (got.weighting.scheme, got.rollout.selection.rule, got.train.data.prompt_template,
            got.rollout.verifier.kind) == ("released",) * 4
    # One source for the training dtype: the old train.bf16 becomes model.params_dtype.
    with pytest.warns(DeprecationWarning, match='train.bf16 is deprecated; use model.params_dtype = "bf16"'):
        assert load_config(None, ["train.bf16=true"]).model.params_dtype == "bf16"
    with pytest.raises(ValueError, match="contradicts model.params_dtype = 'fp16'"), pytest.warns(DeprecationWarning):
        load_config(None, ["train.bf16=true", "model.params_dtype=fp16"])


@pytest.mark.parametrize("bad, msg", [
    (["loss.method=foo"], "loss.method must be one of"),
    (["nope.x=1"], "unknown config section"),
    (["train.bogus=1"], "unknown key(s) in [train]: bogus"),
    (["train.optim.bogus=1"], "unknown key(s) in [train.optim]: bogus"),
    (["rollout.server.bogus=1"], "unknown key(s) in [rollout.server]: bogus"),
    (["rollout.verifier.timeout=1"], "unknown key(s) in [rollout.verifier]: timeout; known: kind, timeout_s, workers"),
    (["train.schedule.global_batch_size=7", "train.schedule.micro_batch_size=2"], "multiple of micro_batch_size"),
    (["model.num_attention_heads=6", "model.num_query_groups=4"], "multiple of"),
    (["train.data.path=p.jsonl"], "train.data.tokenizer"),
    (["rollout.verifier.kind=sympy"], "rollout.verifier.kind must be one of"),
    (["model.attention=flash"], "model.attention must be one of ('sdpa', 'local')"),
    (["rollout.selection.rule=some"], "rollout.selection.rule must be one of"),
    (["loss.ratio_min=2.0"], "ratio_min"),
    (["bad"], "section.key=value"),
])
def test_validation_errors(bad, msg):
    with pytest.raises(ValueError, match=None) as e:
        load_config(None, bad)
    assert msg in str(e.value)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, v in flat.items():
        *path, key = dotted.split(".")
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node[key] = v
    return out


# A value for every key that has an old spelling, none of them the default, so that a key landing
# in the wrong place shows.
NEW_VALUES = {
    "rollout.server.url": "http://h:1", "rollout.server.host": "0.0.0.0", "rollout.server.port": 5,
    "rollout.server.max_model_len": 77, "rollout.server.kv_cache_gib": 2.5, "rollout.server.dtype": "bfloat16",
    "rollout.server.startup_timeout_s": 9.0, "rollout.server.concurrency": 3, "rollout.server.request_timeout_s": 8.0,
    "rollout.server.max_retries": 1, "rollout.server.refresh_atol": 0.2,
    "rollout.selection.rule": "released",
    "rollout.verifier.kind": "code", "rollout.verifier.timeout_s": 3.0, "rollout.verifier.workers": 4,
    "rollout.sampling.n": 5, "rollout.sampling.temperature": 0.5, "rollout.sampling.top_p": 0.9,
    "rollout.sampling.top_k": 7, "rollout.sampling.max_tokens": 33, "rollout.sampling.repetition_penalty": 1.2,
    "rollout.sampling.stop": ["x"], "rollout.sampling.seed": 9,
    "train.data.path": "p.jsonl", "train.data.tokenizer": "tok", "train.data.prompt_field": "q",
    "train.data.response_field": "a", "train.data.answer_field": "g", "train.data.placeholder_answers": ["none"],
    "train.data.prompt_template": "plain", "train.data.overlong": "drop", "train.data.pack": True,
    "train.optim.lr": 0.5, "train.optim.min_lr": 0.1, "train.optim.lr_warmup_iters": 3,
    "train.optim.weight_decay": 0.01, "train.optim.adam_beta1": 0.8, "train.optim.adam_beta2": 0.95,
    "train.optim.adam_eps": 1e-6, "train.optim.clip_grad": 2.0,
    "train.schedule.train_iters": 11, "train.schedule.global_batch_size": 6, "train.schedule.micro_batch_size": 3,
    "train.schedule.refresh_interval": 2, "train.schedule.window_problems": 5,
    "train.logging.log_interval": 4, "train.logging.log_batch_keys": True, "train.logging.tensorboard": True,
    "train.logging.wandb_project": "w",
    "eval.sampling.n": 3, "eval.sampling.temperature": 0.7, "eval.sampling.top_p": 0.8, "eval.sampling.max_tokens": 99,
}


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


def test_every_old_key_maps_to_its_new_place():
    """A config written with every old flat spelling (`train.lr`, `rollout.server_url`,
    `rollout.verifier`, ...) loads to the same `RunConfig` as its new spelling, with one
    DeprecationWarning per old key naming the new one; as a TOML file and as `--set` overrides."""
    assert set(DEPRECATED_KEYS.values()) == set(NEW_VALUES)  # a new deprecated key needs a value here
    defaults = RunConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        expected = config_from_dict(_nest(NEW_VALUES))
    for k, v in NEW_VALUES.items():
        assert _get(expected, k) == v != _get(defaults, k), k
    inverse = {v: k for k, v in DEPRECATED_KEYS.items()}
    old_flat = {inverse[k]: v for k, v in NEW_VALUES.items()}
    old_toml = "".join(f"[{section}]\n" + "".join(f"{k.split('.', 1)[1]} = {_toml_literal(v)}\n"
                                                   for k, v in old_flat.items() if k.startswith(section + "."))
                       for section in ("rollout", "train", "eval"))
    assert '\nverifier = "code"\n' in old_toml and "[train]\ndata_path = " in old_toml  # flat, as they were
    for how in ("toml", "set"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if how == "toml":
                got = config_from_dict(tomllib.loads(old_toml))
            else:
                got = load_config(None, [f"{k}={_toml_literal(v)}" for k, v in old_flat.items()])
        assert got == expected, how
        said = {str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)}
        assert said == {f"config key {o} is deprecated; use {n}" for o, n in DEPRECATED_KEYS.items()}, how


def _toml_literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    return repr(v)


@pytest.mark.parametrize("sets", [
    ["train.lr=1", "train.optim.lr=2"],
    ["rollout.server_url=http://a:1", "rollout.server.url=http://b:1"],
    ["rollout.verifier=code", "rollout.verifier.kind=math"],  # a value that became a table, both orders
    ["rollout.verifier.kind=math", "rollout.verifier=code"],
    ["rollout.selection=all", "rollout.selection.rule=all"],
    ["train.refresh_interval=1", "train.schedule.refresh_interval=1"],
])
def test_both_spellings_are_an_error(sets):
    old, new = (sets[0], sets[1]) if len(sets[0].split("=")[0].split(".")) == 2 else (sets[1], sets[0])
    with pytest.raises(ValueError, match=f"both {old.split('=')[0]} .deprecated. and {new.split('=')[0]} are set; "
                                         f"keep only {new.split('=')[0]}"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        load_config(None, sets)


def test_old_value_spelling_beside_its_new_table(tmp_path):
    """`rollout.verifier` was a value and is now a table: the old value and the table's other
    keys, in either spelling and from the file or `--set`, meet in one table."""
    f = tmp_path / "run.toml"
    f.write_text('[rollout.verifier]\nworkers = 3\n')
    with pytest.warns(DeprecationWarning, match="rollout.verifier is deprecated; use rollout.verifier.kind"):
        cfg = load_config(f, ["rollout.verifier=code", "rollout.verifier_timeout_s=4"])
    assert dataclasses.astuple(cfg.rollout.verifier) == ("code", 4.0, 3)
    f.write_text('[rollout]\nverifier = "released"\nverifier_workers = 5\n')
    with pytest.warns(DeprecationWarning):
        cfg = load_config(f, ["rollout.verifier.timeout_s=6"])
    assert dataclasses.astuple(cfg.rollout.verifier) == ("released", 6.0, 5)


def test_examples_use_the_new_spelling():
    """Every example loads without a DeprecationWarning."""
    for path in sorted((ROOT / "examples").glob("*.toml")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            load_config(path)
        assert "data_path" not in tomllib.loads(path.read_text()).get("train", {}), path


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
    code = ("import sys, megatron_rasft, megatron_rasft.config, megatron_rasft.loss, megatron_rasft.methods.weighting, "
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
    args = build_parser().parse_args(["eval", "--config", str(f), "--out", "x", "--set", "eval.sampling.n=8"])
    _apply_config(args)
    s = args.sampling
    assert (s.n, s.temperature, args.benchmarks) == (8, 0.6, ["math500", "gsm8k"])  # --set wins
    args = build_parser().parse_args(["eval", "--set", "eval.benchmarks=math500, aime24=b/x.jsonl", "--out", "x"])
    _apply_config(args)
    assert args.benchmarks == ["math500", "aime24=b/x.jsonl"]  # one comma-separated string
    assert (s.max_tokens, s.top_k, s.seed, args.prompt_template) == (4096, 0, 1234, "qwen25-math-cot")  # defaults


def test_config_objects_refuse_unknown_attributes():
    """Config dataclasses have slots: a misspelt or removed setting assigned in code (such as the
    removed `train.bf16`) raises instead of being silently ignored."""
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.train.bf16 = True
    with pytest.raises(AttributeError):
        cfg.model.param_dtype = "bf16"
    cfg.model.params_dtype = "bf16"  # a real field still assigns
    assert cfg.model.params_dtype == "bf16"


GRPO_RUN = ["loss.method=grpo", "train.schedule.refresh_interval=1"]


@pytest.mark.parametrize("sets, msg", [
    # π_old must be the policy that sampled the round: an overlapped round's sampler is a window older.
    (GRPO_RUN + ["rollout.overlap=true"], "loss.method = 'grpo' with rollout.overlap = true is not supported"),
    (GRPO_RUN + ["rollout.selection.rule=released"],
     "loss.method = 'grpo' rolls out every problem of a window: set rollout.selection.rule = 'all' (got 'released')"),
    (GRPO_RUN + ["train.schedule.refresh_interval=0"], "loss.method = 'grpo' needs rollout rounds"),
    (["parallel.pipeline_model_parallel_size=2", "loss.method=sft_kl"],
     "loss.method = 'sft_kl' needs the reference logits inside the training step"),
    (["parallel.pipeline_model_parallel_size=2", "loss.method=asft"],
     "loss.method = 'asft' needs the reference logits inside the training step"),
    (["model.max_position_embeddings=2048", "model.seq_length=4096"],
     "model.seq_length (4096) exceeds model.max_position_embeddings (2048)"),
])
def test_cross_section_refusals(sets, msg):
    """Rules between sections are checked when the configuration is built (before any process
    starts), with a message naming the fields; the same configuration without its last setting
    is accepted (the rule, not a neighbouring one, refused it)."""
    with pytest.raises(ValueError) as e:
        load_config(None, sets)
    assert msg in str(e.value)
    load_config(None, sets[:-1])


def test_grpo_with_a_truncated_sampler_warns():
    """GRPO's ratios are of the full tempered softmax: a top-p / top-k sampler is accepted (as peers
    do) but named in a warning when the config is built; the untruncated sampler gives none."""
    base = ["loss.method=grpo", "train.schedule.refresh_interval=1"]
    with pytest.warns(UserWarning, match=r"rollout.sampling.top_p = 0.9"):
        load_config(None, base + ["rollout.sampling.top_p=0.9"])
    with pytest.warns(UserWarning, match=r"top_k = 20"):
        load_config(None, base + ["rollout.sampling.top_k=20"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, base)
        load_config(None, ["loss.method=rasft", "train.schedule.refresh_interval=1", "rollout.sampling.top_p=0.9"])
