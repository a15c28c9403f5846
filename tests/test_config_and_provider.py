"""Config loading/validation, the model provider's spec choice and errors, and lazy imports."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import tomli_w

from megatron_rasft.config import (RENAMED, ConfigError, LossConfig, ModelConfig, RunConfig, WeightingConfig,
                                   load_config)

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


def test_sampling_tables(tmp_path):
    """[rollout.sampling] and [eval.sampling] are one SamplingConfig; eval keeps its own defaults
    for unset fields."""
    f = tmp_path / "run.toml"
    f.write_text('[rollout.sampling]\nn = 3\ntemperature = 0.9\n[eval.sampling]\nn = 2\n')
    cfg = load_config(f)
    assert (cfg.rollout.sampling.n, cfg.rollout.sampling.temperature, cfg.rollout.sampling.max_tokens) == (3, 0.9, 256)
    assert (cfg.eval.sampling.n, cfg.eval.sampling.max_tokens) == (2, 4096)


@pytest.mark.parametrize("bad, msg", [
    (["loss.method=foo"], "--set: loss.method must be one of ('sft', 'dft', 'sft_kl', 'asft', 'profit', 'rasft', "
                          "'grpo'), got 'foo'"),
    (["nope.x=1"], "--set: unknown section [nope] (known: model, parallel, loss, grpo"),
    (["trian.seed=1"], "--set: unknown section [trian] (did you mean [train]?)"),
    (["train.bogus=1"], "--set: unknown key train.bogus (known: data, logging, optim, run_dir, schedule, seed)"),
    (["train.optim.lrr=1"], "--set: unknown key train.optim.lrr (did you mean train.optim.lr?)"),
    (["rollout.server.bogus=1"], "--set: unknown key rollout.server.bogus"),
    (["rollout.verifier.timeout=1"], "--set: unknown key rollout.verifier.timeout (did you mean rollout.verifier.timeout_s?)"),
    (["train.schedule.global_batch_size=7", "train.schedule.micro_batch_size=2"], "multiple of micro_batch_size"),
    (["model.num_attention_heads=6", "model.num_query_groups=4"], "multiple of"),
    (["train.data.path=p.jsonl"], "--set: train.data.tokenizer (an HF tokenizer folder) is required with train.data.path"),
    (["rollout.verifier.kind=sympy"], "rollout.verifier.kind must be one of"),
    (["model.attention=flash"], "model.attention must be one of ('sdpa', 'local')"),
    (["rollout.selection.rule=some"], "rollout.selection.rule must be one of"),
    (["loss.ratio_min=2.0"], "ratio_min"),
    (['train.schedule.train_iters="ten"'], "--set: train.schedule.train_iters must be an int, got 'ten'"),
    (["train.schedule.train_iters=2.5"], "--set: train.schedule.train_iters must be an int, got 2.5"),
    (["model.tie_embeddings=1"], "--set: model.tie_embeddings must be a bool, got 1"),
    (["checkpoint.load=3"], "--set: checkpoint.load must be a str or null, got 3"),
    (["rollout.sampling=3"], "--set: rollout.sampling must be a table ([rollout.sampling]), got 3"),
    (["rollout.batches_per_round=-1"], "--set: rollout.batches_per_round must be >= 0, got -1"),
    (["bad"], "--set: an override must be section.key=value, got 'bad'"),
])
def test_validation_errors(bad, msg):
    """Every refusal is a one-line ConfigError naming where the value came from and the key."""
    with pytest.raises(ConfigError) as e:
        load_config(None, bad)
    assert msg in str(e.value) and "\n" not in str(e.value)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, v in flat.items():
        *path, key = dotted.split(".")
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node[key] = v
    return out


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_every_old_key_is_refused_with_its_new_name(tmp_path, old):
    """A key of an earlier version is an error whose one line names the new place, from a TOML
    file (with the file's name) and from `--set`; a value that became a table
    (`rollout.verifier = "code"`) too, also beside its new table's keys."""
    value = "x" if old in ("rollout.selection", "rollout.verifier") else 1
    f = tmp_path / "run.toml"
    f.write_text(tomli_w.dumps(_nest({old: value})))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: {old} was renamed to {RENAMED[old]}"
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{old}={value}"])
    assert str(e.value) == f"--set: {old} was renamed to {RENAMED[old]}"
    if old == "rollout.verifier":
        with pytest.raises(ConfigError, match="rollout.verifier was renamed to rollout.verifier.kind"):
            load_config(None, ["rollout.verifier=code", "rollout.verifier.kind=math"])


def test_the_round_knob_replaced_two_settings():
    assert RENAMED["train.schedule.refresh_interval"] == RENAMED["train.schedule.window_problems"] == \
        "rollout.batches_per_round (a round covers that many global batches of problems)"
    with pytest.raises(ConfigError, match=r"^--set: train.schedule.refresh_interval was renamed to rollout.batches_per_round"):
        load_config(None, ["train.schedule.refresh_interval=2"])


def test_old_preset_value_is_refused_with_its_new_name():
    """The released code's presets are "released"; the old value "reference" (the frozen
    reference model's name) is refused wherever a preset is chosen, naming the new value."""
    for key in ("weighting.scheme", "rollout.selection.rule", "train.data.prompt_template", "rollout.verifier.kind"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}=reference"])
        assert str(e.value) == f'--set: {key} = "reference" was renamed to "released" (the released code\'s preset)'
        assert _get(load_config(None, [f"{key}=released"]), key) == "released"


def test_file_errors_name_the_file_and_the_key(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[loss]\nmethod = "rasftt"\n')
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == (f"{f}: loss.method must be one of ('sft', 'dft', 'sft_kl', 'asft', 'profit', 'rasft', "
                            f"'grpo'), got 'rasftt'")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["loss.ratio=none"])
    assert str(e.value).startswith(f"{f} (with --set): loss.method must be one of")
    f.write_text('[train.optim]\nlrr = 1e-5\n')
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: unknown key train.optim.lrr (did you mean train.optim.lr?)"
    f.write_text('[loss]\nmethod = "sft"\nratio = \n')
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: invalid TOML: ") and "line 3" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "missing.toml")
    assert str(e.value) == f"{tmp_path / 'missing.toml'}: config file not found"


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


def test_dataclass_validation():
    with pytest.raises(ValueError, match="a_min must be ≤ a_max"):
        WeightingConfig(scheme="linear", a_min=1.5)
    with pytest.raises(ValueError, match="model.fp8"):
        ModelConfig(fp8="e5m2")
    assert LossConfig(method="rasft").needs_ref_logp and not LossConfig(method="sft").needs_ref_logp
    assert LossConfig(method="asft").needs_ref_logits
    with pytest.raises(ConfigError, match="config file not found"):
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


# Rounds sample real problems: the round setting needs a data path (and its tokenizer).
DATA = ["train.data.path=p.jsonl", "train.data.tokenizer=tok"]
GRPO_RUN = DATA + ["loss.method=grpo", "rollout.batches_per_round=1"]


@pytest.mark.parametrize("sets, msg", [
    # π_old must be the policy that sampled the round: an overlapped round's sampler is a window older.
    (GRPO_RUN + ["rollout.overlap=true"], "loss.method = 'grpo' with rollout.overlap = true is not supported"),
    (GRPO_RUN + ["rollout.selection.rule=released"],
     "loss.method = 'grpo' rolls out every problem of a window: set rollout.selection.rule = 'all' (got 'released')"),
    (GRPO_RUN + ["rollout.batches_per_round=0"], "loss.method = 'grpo' needs rollout rounds: set "
                                                 "rollout.batches_per_round >= 1"),
    (["loss.method=rasft", "rollout.batches_per_round=2"],
     "rollout rounds (rollout.batches_per_round > 0) need real problems: set train.data.path and train.data.tokenizer"),
    (["parallel.pipeline_model_parallel_size=2", "loss.method=sft_kl"],
     "loss.method = 'sft_kl' needs the reference logits inside the training step"),
    (["parallel.pipeline_model_parallel_size=2", "loss.method=asft"],
     "loss.method = 'asft' needs the reference logits inside the training step"),
    (["parallel.virtual_pipeline_model_parallel_size=2", "loss.method=asft"],
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
    base = GRPO_RUN
    with pytest.warns(UserWarning, match=r"rollout.sampling.top_p = 0.9"):
        load_config(None, base + ["rollout.sampling.top_p=0.9"])
    with pytest.warns(UserWarning, match=r"top_k = 20"):
        load_config(None, base + ["rollout.sampling.top_k=20"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, base)
        load_config(None, DATA + ["loss.method=rasft", "rollout.batches_per_round=1", "rollout.sampling.top_p=0.9"])


@pytest.mark.parametrize("method", ["sft", "dft", "sft_kl", "asft", "profit"])
def test_round_setting_is_refused_for_methods_without_rounds(method):
    """Only rasft and grpo train on rollouts: a round setting for any other method is refused
    (it would be silently ignored), naming both settings; without it the method loads."""
    with pytest.raises(ConfigError) as e:
        load_config(None, DATA + [f"loss.method={method}", "rollout.batches_per_round=2"])
    assert str(e.value) == (f"--set: rollout.batches_per_round = 2 but loss.method = '{method}' has no rollout rounds "
                            f"(only rasft, grpo do): set rollout.batches_per_round = 0")
    assert load_config(None, DATA + [f"loss.method={method}"]).rollout.batches_per_round == 0


def test_rollout_command_names_a_missing_model_directory(tmp_path, capsys):
    """`rollout --model DIR` with no such folder: one line naming it, exit 2, before any server
    or tokenizer is loaded (was a traceback from `transformers`)."""
    from megatron_rasft.cli import main

    (tmp_path / "problems.jsonl").write_text("")
    missing = tmp_path / "no-model"
    assert main(["rollout", "--run-dir", str(tmp_path), "--round", "0", "--model", str(missing)]) == 2
    out = capsys.readouterr().err.splitlines()
    assert out == [f"error: --model {str(missing)!r}: no such directory"], out


@pytest.mark.parametrize("table", ["rollout.sampling", "eval.sampling"])
def test_a_sampling_rule_names_the_table_it_was_read_from(table):
    """`SamplingConfig` is both [rollout.sampling] and [eval.sampling]: a value its rules refuse is
    named with the table's full key."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{table}.n=0"])
    assert str(e.value) == f"--set: {table}.n must be >= 1, got 0"


@pytest.mark.parametrize("method", ["rasft", "grpo"])
def test_round_setting_is_accepted_for_methods_with_rounds(method):
    cfg = load_config(None, DATA + [f"loss.method={method}", "rollout.batches_per_round=3"])
    assert (cfg.loss.method, cfg.rollout.batches_per_round) == (method, 3)


CLI_CASES = {
    "bad value": ('[loss]\nmethod = "rasftt"\n',
                  "loss.method must be one of ('sft', 'dft', 'sft_kl', 'asft', 'profit', 'rasft', 'grpo'), got 'rasftt'"),
    "unknown key": ('[train.schedule]\ntrain_iter = 3\n',
                    "unknown key train.schedule.train_iter (did you mean train.schedule.train_iters?)"),
    "invalid TOML": ('[loss]\nmethod = "sft\n', "invalid TOML: "),
    "old key": ('[train.schedule]\nrefresh_interval = 2\n',
                "train.schedule.refresh_interval was renamed to rollout.batches_per_round"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_prints_a_config_error_in_one_line(tmp_path, case):
    """`train --config X` with a bad configuration prints one line, `error: X: <key and what is
    wrong>`, and exits 2 (no traceback); under torchrun only rank 0 says it, the others exit 2
    silently."""
    text, msg = CLI_CASES[case]
    f = tmp_path / "run.toml"
    f.write_text(text)
    cmd = [sys.executable, "-m", "megatron_rasft", "train", "--config", str(f)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stdout + out.stderr
    assert lines[0].startswith(f"error: {f}: {msg}"), lines
    quiet = subprocess.run(cmd, capture_output=True, text=True, env={**env, "RANK": "1", "LOCAL_RANK": "1"},
                           timeout=120)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (2, "", "")


def test_stage_commands_refuse_a_set_outside_the_table_they_read(tmp_path, capsys):
    """`verify` reads [rollout.verifier], `weigh` [weighting], `serve` [rollout.server], `rollout`
    [rollout]: a `--set` elsewhere would be ignored, so it is refused in one line (exit 2)."""
    from megatron_rasft.cli import main
    from megatron_rasft.config import ConfigError, load_section

    assert load_section(None, ["weighting.scheme=released"], "weighting").scheme == "released"
    assert load_section(None, ["rollout.verifier.workers=3"], "rollout.verifier").workers == 3
    with pytest.raises(ConfigError, match=r"reads only \[weighting\]"):
        load_section(None, ["rollout.verifier.kind=code"], "weighting")
    with pytest.raises(ConfigError, match=r"reads only \[rollout.verifier\]"):
        load_section(None, ["rollout.verifierx.kind=code"], "rollout.verifier")
    for argv in (["weigh", "--set", "rollout.verifier.kind=code"], ["verify", "--set", "weighting.scheme=released"]):
        assert main(argv + ["--run-dir", str(tmp_path), "--round", "0"]) == 2
        out = capsys.readouterr()
        text = (out.out + out.err).strip()
        assert "\n" not in text and "reads only [" in text, text


def test_resume_with_another_schedule_length_is_said(capsys):
    """Megatron keeps the checkpoint's LR schedule on load: a resume with a larger train_iters would
    train its extra steps at min_lr silently. The loader says so, from the real scheduler's state."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_rasft.engine.checkpoint import _say_if_schedule_differs

    def scheduler(steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return OptimizerParamScheduler(opt, init_lr=0.1, max_lr=0.1, min_lr=0.0, lr_warmup_steps=0,
                                       lr_decay_steps=steps, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                       wd_incr_steps=steps, wd_incr_style="constant")

    saved = scheduler(3).state_dict()
    _say_if_schedule_differs(saved, scheduler(3), Path("ckpt/iter_0000003"))
    assert capsys.readouterr().out == ""
    _say_if_schedule_differs(saved, scheduler(5), Path("ckpt/iter_0000003"))
    said = capsys.readouterr().out
    assert "cosine decay over 3 steps, not the 5" in said and "ckpt/iter_0000003/model" in said
