"""The `released` selection (released code's expert-NLL band) and the training stream."""
import numpy as np
import pytest

from megatron_rasft.config import SelectionConfig
from megatron_rasft.methods.selection import Band, mean_nll, select
from megatron_rasft.records import QueueItem
from megatron_rasft.train.state import LoopState, expert_items, next_window_ids, window_groups

# The default fractions are the released code's: 35 % of the band's candidates, 3 % of the hard pool.
RELEASED = {"rollout_fraction": SelectionConfig().rollout_fraction, "probe_fraction": SelectionConfig().probe_fraction}


def test_band_quantiles_match_numpy_and_move_with_training():
    vals = list(np.random.default_rng(0).gamma(2.0, 1.0, size=257))
    band = Band.calibrate(vals)
    for name, q in (("easy_floor", 0.1), ("start_low", 0.2), ("end_high", 0.75), ("hard_ceiling", 0.95)):
        assert abs(getattr(band, name) - np.quantile(vals, q)) < 1e-12
    assert band.window(0, 100) == (band.start_low, band.start_high)
    assert band.window(100, 100) == (band.end_low, band.end_high)
    lo, hi = band.window(50, 100)
    assert abs(lo - (band.start_low + band.end_low) / 2) < 1e-12 and abs(hi - (band.start_high + band.end_high) / 2) < 1e-12


def test_mean_nll_covers_the_response_only():
    assert mean_nll([-9.0, -9.0, -1.0, -3.0], prompt_len=3) == 2.0


def test_select_routes_by_band_and_probes_the_hard_pool():
    band = Band(easy_floor=0.5, start_low=1.0, start_high=2.0, end_low=1.0, end_high=2.0, hard_ceiling=4.0)
    nll = {f"m{i}": 1.5 for i in range(20)}  # 20 candidates in the band -> ceil(35 %) = 7 rolled out
    nll.update({"easy": 0.1, "hard": 3.0, "never": 9.0, "old_easy": 0.8, "old_mid": 3.5, "old_never": 8.0})
    ids = sorted(k for k in nll if not k.startswith("old"))
    scored = []

    def score(which):
        scored.append(list(which))
        return {i: nll[i] for i in which}

    # One pool entry per case, so the probe (3 % of the pool rounds down to 0 -> at least one) is known.
    pool = {"old_easy": 0}
    out = select(ids, score, band, 0, 10, pool, seed="s", **RELEASED)
    assert len(out["rollout"]) == 7 and set(out["rollout"]) < {f"m{i}" for i in range(20)}
    # "old_easy" fell below the band: trained again, out of the pool; "hard" (above the band, within
    # the ceiling) joins it, "never" (above the ceiling) does not.
    assert out["probes_retrain"] == ["old_easy"] and out["probes_rollout"] == []
    assert pool == {"hard": 0} and set(scored[-1]) == set(ids) | {"old_easy"}
    pool = {"old_mid": 2}
    out = select(ids, score, band, 0, 10, pool, seed="s", **RELEASED)
    assert out["probes_rollout"] == ["old_mid"] and "old_mid" in out["rollout"] and pool == {"old_mid": 2, "hard": 0}
    assert len(out["rollout"]) == 8 and out["probes_retrain"] == []
    pool = {"old_never": 1}
    out = select(ids, score, band, 0, 10, pool, seed="s", **RELEASED)
    assert out["probes_retrain"] == out["probes_rollout"] == [] and pool == {"old_never": 2, "hard": 0}
    # 3 % of a pool of 100 -> 3 probes.
    pool = {f"x{i}": 0 for i in range(100)}
    nll.update({f"x{i}": 3.0 for i in range(100)})
    assert len(select(ids, score, band, 0, 10, pool, seed="s", **RELEASED)["probes_rollout"]) == 3

    # The draw is a function of the seed: the same seed repeats it, other seeds give other draws.
    draws = [tuple(select(ids, score, band, 0, 10, {}, seed=f"s{j}", **RELEASED)["rollout"]) for j in range(10)]
    assert draws == [tuple(select(ids, score, band, 0, 10, {}, seed=f"s{j}", **RELEASED)["rollout"]) for j in range(10)]
    assert len(set(draws)) >= 8  # C(20, 7) = 77520 possible subsets

    # Other fractions (`[rollout.selection]`): half of the 20 candidates, 10 % of the pool of 100.
    pool = {f"x{i}": 0 for i in range(100)}
    out = select(ids, score, band, 0, 10, pool, seed="s", rollout_fraction=0.5, probe_fraction=0.1)
    assert len(out["probes_rollout"]) == 10 and len(set(out["rollout"]) - set(out["probes_rollout"])) == 10
    assert RELEASED == {"rollout_fraction": 0.35, "probe_fraction": 0.03}


def test_stream_windows_are_deterministic_and_expert_order_ignores_rollouts():
    ids = [str(i) for i in range(10)]
    s1, s2 = LoopState(), LoopState()
    w1 = [next_window_ids(s1, ids, 4, seed=1) for _ in range(3)]
    w2 = [next_window_ids(s2, ids, 4, seed=1) for _ in range(3)]
    assert w1 == w2 and sorted(w1[0] + w1[1] + w1[2][:2]) == ids  # one epoch, then the next
    assert (s1.epoch, s1.cursor) == (1, 2)
    p0 = w1[0][0]
    plain = window_groups(0, w1[0], expert_items(w1[0]), seed=1)
    # A round's items: each window problem's demonstration (A_E), its rollouts after it, then probes.
    items = [QueueItem(f"e/{p}", 0.3 if p == p0 else 1.0) for p in w1[0]]
    items[1:1] = [QueueItem(f"r0/{p0}/0", 0.1), QueueItem(f"r0/{p0}/1", 0.1)]
    items.append(QueueItem("e/old", 1.0))
    mixed = window_groups(0, w1[0], items, seed=1)
    assert [g[0] for g in mixed[:4]] == [QueueItem(g.key, 0.3 if g.key == f"e/{p0}" else 1.0) for g, in plain]
    assert mixed[4] == [QueueItem("e/old", 1.0)]  # a re-trained probe: a group of its own, after the window
    group = next(g for g in mixed if g[0].key == f"e/{p0}")
    assert [it.key for it in group] == [f"e/{p0}", f"r0/{p0}/0", f"r0/{p0}/1"]  # rollouts ride with their problem
    # A window problem probed again in the same window: its second demonstration is a group of its own.
    again = window_groups(0, w1[0], items + [QueueItem(f"e/{p0}", 0.7)], seed=1)
    assert again[:5] == mixed and again[5] == [QueueItem(f"e/{p0}", 0.7)]
    with pytest.raises(ValueError, match="no demonstration"):
        window_groups(0, w1[0], items[3:], seed=1)


def test_round_items_put_rollouts_with_their_demonstration_and_probes_after_the_window():
    """A round's queue items, written out here: the window's demonstrations (A_E, 1 when not
    rolled out) each with its trained rollouts (A_s > 0 and a response left after the cut), then
    re-trained probes (A = 1), then rolled-out probes (their A_E) with their own rollouts; the
    queue's groups keep a probe's rollouts in the probe's group."""
    from megatron_rasft.methods.sequences import rasft_sequences
    from megatron_rasft.records import Rollout, Weight

    W = lambda pid, kind, j, a: Weight(pid, 0, kind, j, a, 0.5, 1, 2)  # noqa: E731
    weights = [W("a", "expert", None, 0.4), W("a", "rollout", 1, 0.3), W("a", "rollout", 0, 0.1),
               W("d", "expert", None, 0.6), W("d", "rollout", 0, 0.2)]
    rollouts = {(p, j): Rollout(p, 0, j, "x", [7, 8] if (p, j) != ("a", 0) else [], finish_reason="length")
                for p, j in (("a", 0), ("a", 1), ("d", 0))}
    prompts = {"a": [1, 2], "b": [1, 3], "c": [1, 4], "d": [1, 5]}
    seqs, items = rasft_sequences(0, ["a", "b"], weights, rollouts, prompts, eos_id=9, max_len=16,
                                  probes_retrain=["c"], probes_rollout=["d"])
    assert [s.key for s in seqs] == ["r0/a/1", "r0/d/0"] and seqs[0].tokens == [1, 2, 7, 8]  # r0/a/0: empty
    assert items == [QueueItem("e/a", 0.4), QueueItem("r0/a/1", 0.3), QueueItem("e/b", 1.0),
                     QueueItem("e/c", 1.0), QueueItem("e/d", 0.6), QueueItem("r0/d/0", 0.2)]
    groups = window_groups(0, ["a", "b"], items, seed=3)
    assert sorted(groups[:2], key=len) == [[QueueItem("e/b", 1.0)], [QueueItem("e/a", 0.4), QueueItem("r0/a/1", 0.3)]]
    assert groups[2:] == [[QueueItem("e/c", 1.0)], [QueueItem("e/d", 0.6), QueueItem("r0/d/0", 0.2)]]
