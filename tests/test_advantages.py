"""GRPO group advantages against hand computations, and the [grpo] config."""
import math

import pytest

from megatron_rasft.methods.advantages import group_advantages, verdict_rewards
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
    path.write_text('[loss]\nmethod = "grpo"\n[rollout]\nbatches_per_round = 1\n'
                    '[train.data]\npath = "p.jsonl"\ntokenizer = "tok"\n[grpo]\nscale_by_std = false\n')
    cfg = load_config(path, ["grpo.eps_high=0.28", "grpo.loss_aggregation=seq_mean"])
    assert (cfg.grpo.scale_by_std, cfg.grpo.eps_high, cfg.grpo.loss_aggregation) == (False, 0.28, "seq_mean")
    assert cfg.to_dict()["grpo"]["eps_low"] == 0.2
    with pytest.raises(ValueError, match="loss.method = 'grpo' needs rollout rounds"):
        load_config(path, ["rollout.batches_per_round=0"])
    with pytest.raises(ValueError, match=r"unknown key grpo.clip"):
        load_config(path, ["grpo.clip=0.2"])


def _round_inputs():
    from megatron_rasft.records import Rollout, Verdict

    correct = {("a", 0): True, ("a", 1): False, ("a", 2): True, ("b", 0): True, ("b", 1): True, ("b", 2): True}
    verdicts = [Verdict(pid, 0, j, ok, "correct" if ok else "wrong") for (pid, j), ok in correct.items()]
    rollouts = {(pid, j): Rollout(pid, 0, j, "x", [5 + j, 6], [-0.5, -0.25], finish_reason="stop" if j else "length")
                for pid, j in correct}
    return verdicts, rollouts


def test_grpo_round_sequences_every_rollout_with_its_advantage_and_aligned_logprobs():
    """Every rollout of each group trains (correct or not) with A_j; an all-correct group has A = 0
    and is dropped only under filter_zero_variance; vLLM's log-probs land on tokens[prompt_len:]."""
    import math

    from megatron_rasft.methods.sequences import aligned_rollout_logp, grpo_sequences
    from megatron_rasft.records import QueueItem
    from megatron_rasft.train.state import grpo_window_groups

    verdicts, rollouts = _round_inputs()
    prompts = {"a": [1, 2, 3], "b": [1, 4]}
    seqs, items, stats = grpo_sequences(0, ["a", "b"], verdicts, rollouts, prompts, eos_id=9, max_len=64,
                                        gcfg=GRPOConfig())
    by_key = {s.key: s for s in seqs}
    assert sorted(by_key) == ["r0/a/0", "r0/a/1", "r0/a/2", "r0/b/0", "r0/b/1", "r0/b/2"]
    # A = (R − 2/3) / (std + eps), std = sqrt(1/3) (Bessel), written out here
    std = math.sqrt(((1 - 2 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    assert by_key["r0/a/1"].advantage == pytest.approx((0 - 2 / 3) / (std + 1e-6), abs=1e-12)
    assert by_key["r0/a/0"].advantage == pytest.approx((1 - 2 / 3) / (std + 1e-6), abs=1e-12)
    assert [by_key[f"r0/b/{j}"].advantage for j in range(3)] == [0.0, 0.0, 0.0]
    assert all(it.weight == 1.0 for it in items) and stats["zero_variance_frac"] == 0.5
    # "stop" appends EOS (not sampled: NaN), "length" does not; prompt positions are NaN.
    assert by_key["r0/a/1"].tokens == [1, 2, 3, 6, 6, 9] and by_key["r0/a/0"].tokens == [1, 2, 3, 5, 6]
    lp = aligned_rollout_logp(by_key["r0/a/1"])
    assert len(lp) == 5 and all(math.isnan(x) for x in lp[:2] + lp[4:]) and lp[2:4] == [-0.5, -0.25]
    assert aligned_rollout_logp(by_key["r0/a/0"])[2:] == [-0.5, -0.25]
    seqs, items, stats = grpo_sequences(0, ["a", "b"], verdicts, rollouts, prompts, eos_id=9, max_len=64,
                                        gcfg=GRPOConfig(filter_zero_variance=True))
    assert [s.key for s in seqs] == ["r0/a/0", "r0/a/1", "r0/a/2"] and stats["groups_trained"] == 1
    groups = grpo_window_groups(0, [QueueItem("r0/b/0", 1.0), QueueItem("r0/a/0", 1.0), QueueItem("r0/a/1", 1.0)],
                                seed=0)
    assert sorted(map(len, groups)) == [1, 2] and all(len({it.key.split("/")[1] for it in g}) == 1 for g in groups)
