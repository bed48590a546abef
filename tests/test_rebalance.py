"""The re-planning rule (pure): shares that equalise, never a worse plan, no switch on noise, hysteresis."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import UsageError
from runtime.rebalance import RebalanceRule, Rebalancer, imbalance, predicted_time, shares_from_busy

positive = st.floats(min_value=0.05, max_value=20.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.lists(positive, min_size=n, max_size=n),
                                                     st.lists(positive, min_size=n, max_size=n))))
def test_new_shares_sum_to_one_equalise_and_never_predict_worse(case):
    weights, busy = case
    shares = shares_from_busy(weights, busy)
    assert abs(sum(shares) - 1) < 1e-9 and all(s > 0 for s in shares)
    w = np.asarray(weights) / sum(weights)
    cost = np.asarray(busy) / w  # seconds per unit of share, held fixed
    after = np.asarray(shares) * cost  # each rank's busy time under the new shares
    assert np.allclose(after, after[0], rtol=1e-9)  # every rank finishes together
    assert after[0] == pytest.approx(predicted_time(weights, busy), rel=1e-9)
    assert predicted_time(weights, busy) <= max(busy) * (1 + 1e-12)  # never worse than now


def test_a_rank_at_half_speed_gets_half_the_share():
    # equal shares, rank 2 twice as slow: speeds 1, 1, 0.5 -> shares 0.4, 0.4, 0.2
    assert shares_from_busy([1, 1, 1], [10, 10, 20]) == pytest.approx([0.4, 0.4, 0.2])
    assert predicted_time([1, 1, 1], [10, 10, 20]) == pytest.approx(12.0)  # 1 / (1/30 + 1/30 + 1/60), from 20


def feed(rebalancer, rows):
    """Index of each image at which a switch was proposed (and taken)."""
    switches = []
    for k, busy in enumerate(rows):
        new = rebalancer.observe(busy)
        if new is not None:
            switches.append(k)
            rebalancer.switched(new)
    return switches


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(5))
def test_no_switch_on_an_unchanged_rack_with_this_machines_noise(ranks, seed):
    """Equal ranks, each image's time off by up to +-25% (uniform, independent) and 5% of heavy outliers x3."""
    rng = np.random.default_rng(seed)
    rows = 30.0 * rng.uniform(0.75, 1.25, size=(500, ranks))
    rows[rng.random(rows.shape) < 0.05] *= 3.0
    assert feed(Rebalancer([1.0] * ranks), rows) == []


def test_a_lasting_slowdown_switches_once_after_settle_plus_window_then_holds():
    rule = RebalanceRule(window=20, settle=3)
    rng = np.random.default_rng(0)
    rows = 30.0 * rng.uniform(0.9, 1.1, size=(300, 3))
    rows[100:, 2] *= 2.0  # rank 2 at half speed from image 100, equal shares
    r = Rebalancer([1.0, 1.0, 1.0], rule)
    switches = []
    for k, busy in enumerate(rows):
        new = r.observe(busy)
        if new is not None:
            switches.append((k, new))
            r.switched(new)
            rows[k + 1:] = 30.0 * rng.uniform(0.9, 1.1, size=(len(rows) - k - 1, 3)) * 0.8  # balanced after it
    assert len(switches) == 1, switches
    k, shares = switches[0]
    assert 100 < k <= 100 + rule.window // 2 + rule.needed + 1  # the median turns once half the window is slow
    assert shares == pytest.approx([0.4, 0.4, 0.2], abs=0.03)


def test_two_switches_are_at_least_settle_plus_window_apart():
    rule = RebalanceRule(window=10, settle=3)
    r = Rebalancer([1.0, 1.0], rule)
    stuck = [[10.0, 40.0]] * 400  # imbalanced whatever the plan (a rule fooled for good): it must not flap
    switches = feed(r, stuck)
    assert switches and all(b - a >= rule.settle + rule.window + rule.needed - 1
                           for a, b in zip(switches, switches[1:]))


def test_imbalance_and_rule_checks():
    assert imbalance([1, 1, 1]) == 1.0 and imbalance([1, 3]) == 1.5
    with pytest.raises(UsageError, match="threshold"):
        RebalanceRule(threshold=0.9).check()
    with pytest.raises(UsageError, match="gain"):
        RebalanceRule(min_gain=1.0).check()
    with pytest.raises(UsageError, match="window"):
        RebalanceRule(window=0).check()
