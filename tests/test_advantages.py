"""GRPO group advantages against hand computations, and the [grpo] config."""
import math

import pytest

from megatron_rasft.advantages import group_advantages, verdict_rewards
from megatron_rasft.config import GRPOConfig, load_config
from megatron_rasft.records import Verdict


def test_scaled_advantages_by_hand():
    # [1, 0, 0, 1]: mean 0.5, sample std sqrt(4 · 0.25 / 3) = sqrt(1/3).
    # [1, 0, 0]: mean 1/3, deviations (2/3, −1/3, −1/3), sample std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3).
    # [2, 5]: mean 3.5, std sqrt(2 · 2.25 / 1) = 2.1213...
    out = group_advantages({"a": [1, 0, 0, 1], "b": [1.0, 0.0, 0.0], "c": [2.0, 5.0]}, GRPOConfig(eps=1e-6))
    s = math.sqrt(1 / 3) + 1e-6
    assert out.advantages["a"] == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-12)
    assert out.advantages["b"] == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s], rel=1e-12)
    assert out.advantages["c"] == pytest.approx([-1.5 / (math.sqrt(4.5) + 1e-6), 1.5 / (math.sqrt(4.5) + 1e-6)],
                                                rel=1e-12)
    assert out.zero_variance == set() and out.zero_variance_frac == 0.0


def test_dr_grpo_advantages_are_unscaled():
    out = group_advantages({"a": [1, 0, 0, 1], "b": [1.0, 0.0, 0.0], "c": [2.0, 5.0]}, GRPOConfig(scale_by_std=False))
    assert out.advantages["a"] == [0.5, -0.5, -0.5, 0.5]
    assert out.advantages["b"] == pytest.approx([2 / 3, -1 / 3, -1 / 3], rel=1e-15)
    assert out.advantages["c"] == [-1.5, 1.5]


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_equal_rewards_are_flagged_and_exactly_zero(scale_by_std):
    cfg = GRPOConfig(scale_by_std=scale_by_std)
    out = group_advantages({"all_right": [1, 1, 1, 1], "tenths": [0.1, 0.1, 0.1], "one": [0.7], "mixed": [0, 1]}, cfg)
    assert out.advantages["all_right"] == [0.0] * 4 and out.advantages["tenths"] == [0.0] * 3
    assert out.advantages["one"] == [0.0]
    assert out.zero_variance == {"all_right", "tenths", "one"} and out.zero_variance_frac == 0.75
    assert out.trained_groups(cfg) == ["all_right", "tenths", "one", "mixed"]
    assert out.trained_groups(GRPOConfig(filter_zero_variance=True)) == ["mixed"]


@pytest.mark.parametrize("rewards,match", [
    ({"p7": []}, "problem p7: no rewards"),
    ({"p7": [1.0, float("nan")]}, "problem p7: reward of rollout 1 is nan"),
    ({"p7": [float("inf"), 0.0]}, "problem p7: reward of rollout 0 is inf"),
])
def test_bad_rewards_name_the_problem(rewards, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, GRPOConfig())


def test_verdict_rewards_in_sample_order():
    vs = [Verdict("p", 0, 2, True, "correct"), Verdict("p", 0, 0, False, "wrong"), Verdict("q", 0, 0, True, "correct"),
          Verdict("p", 0, 1, True, "correct")]
    assert verdict_rewards(vs) == {"p": [0.0, 1.0, 1.0], "q": [1.0]}
    with pytest.raises(ValueError, match="problem q: two verdicts for sample 0"):
        verdict_rewards(vs + [Verdict("q", 0, 0, False, "wrong")])


@pytest.mark.parametrize("values,match", [
    (dict(eps=0), "grpo.eps must be > 0"),
    (dict(eps_low=1.0), r"grpo.eps_low must be in \[0, 1\)"),
    (dict(eps_high=-0.1), "grpo.eps_high must be >= 0"),
    (dict(kl_coef=-1), "grpo.kl_coef must be >= 0"),
    (dict(loss_aggregation="sum"), "grpo.loss_aggregation must be one of"),
])
def test_grpo_config_validation(values, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**values)


def test_grpo_config_from_toml_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[loss]\nmethod = "grpo"\n[train]\nrefresh_interval = 1\n[grpo]\nscale_by_std = false\n')
    cfg = load_config(path, ["grpo.eps_high=0.28", "grpo.loss_aggregation=seq_mean"])
    assert (cfg.grpo.scale_by_std, cfg.grpo.eps_high, cfg.grpo.loss_aggregation) == (False, 0.28, "seq_mean")
    assert cfg.to_dict()["grpo"]["eps_low"] == 0.2
    with pytest.raises(ValueError, match="loss.method = 'grpo' needs rollout rounds"):
        load_config(path, ["train.refresh_interval=0"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) in \[grpo\]: clip"):
        load_config(path, ["grpo.clip=0.2"])
