"""AFLKD math: Eq. 17 at both ends and between, the KD loss by hand, T's gradient sign per rule,
and freezing that really stops updates and BatchNorm drift."""
import math

import pytest
import torch

from kd.freezing import freeze_first, frozen_count, shared_units
from kd.losses import aflkd_losses, kd_loss
from kd.temperature import LearnableTemperature, cosine_ramp
from models import edge_net


def test_eq17_ends_and_middle():
    assert frozen_count(1.0, 6) == 6            # T = Tmin: freeze all m
    assert frozen_count(10.0, 6) == 1           # T = Tmax: the formula gives 0, clamped to 1
    assert frozen_count(5.5, 6) == 3            # floor(6 * 0.5 + 0.5)
    assert frozen_count(4.0, 10) == math.floor(10 * (1 - 3 / 9) + 0.5) == 7
    counts = [frozen_count(t / 10, 8) for t in range(10, 101)]
    assert counts == sorted(counts, reverse=True)  # never more frozen at a higher T


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    T = 2.0
    ps = [math.exp(v / T) for v in (1.0, 2.0, 0.5)]
    pt = [math.exp(v / T) for v in (2.0, 0.0, 1.0)]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    expected = T * T * sum(q * math.log(q / p) for p, q in zip(ps, pt))
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_batch_mean_and_zero_for_equal_logits():
    s = torch.randn(4, 5)
    assert kd_loss(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    one = kd_loss(s[:1], s[1:2], 3.0)
    both = kd_loss(torch.cat([s[:1], s[:1]]), torch.cat([s[1:2], s[1:2]]), 3.0)
    assert both.item() == pytest.approx(one.item(), rel=1e-6)


@pytest.mark.parametrize("rule, sign", [("descent", 1.0), ("reversal", -1.0)])
def test_temperature_gradient_sign(rule, sign):
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), 3 * torch.randn(8, 10)
    temp = LearnableTemperature(4.0, rule=rule)
    aflkd_losses(s, t, torch.zeros(8, dtype=torch.long), temp(), weight=1.0)["kd"].backward()
    # the true derivative dL/dT by central differences
    h = 1e-3
    d = (kd_loss(s, t, 4.0 + h) - kd_loss(s, t, 4.0 - h)).item() / (2 * h)
    assert d != 0 and math.copysign(1, temp.value.grad.item()) == sign * math.copysign(1, d)
    assert temp.value.grad.item() == pytest.approx(sign * d, rel=1e-2)


def test_temperature_stays_in_range():
    temp = LearnableTemperature(9.9, rule="descent")
    with torch.no_grad():
        temp.value += 5
    temp.project()
    assert temp.item() == 10.0
    with pytest.raises(ValueError, match="outside"):
        LearnableTemperature(0.5)


def test_cosine_ramp_ends():
    assert cosine_ramp(0, 100) == 0.0 and cosine_ramp(100, 100) == 1.0
    assert cosine_ramp(50, 100) == pytest.approx(0.5)


def test_freezing_stops_updates_and_batchnorm_drift():
    torch.manual_seed(0)
    model = edge_net(2, 3, 32, 10)
    units = shared_units(model, 2, "conv")
    model.train()
    frozen = freeze_first(model, units, 2)
    names = [n for unit in units[:2] for n in unit]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for key in before:
        layer = key.split(".")[0]
        if layer in names:  # weights and BatchNorm running statistics unchanged
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["conv2_1.weight"], after["conv2_1.weight"])
    assert not torch.equal(before["bn2_1.running_mean"], after["bn2_1.running_mean"])
    assert all(not m.training for m in frozen)


def test_units_by_conv_and_by_block():
    model = edge_net(3)
    assert len(shared_units(model, 3, "conv")) == 3 + 2 + 5
    assert len(shared_units(model, 3, "block")) == 3
    assert shared_units(model, 1, "conv")[-1] == ["conv1_3", "bn1_3", "relu1_3", "pool1"]


def test_kd_term_can_fall_with_temperature():
    """Trap 1 is conditional: T^2*KL grows with T for a sharp teacher at small T, but for a soft
    teacher and a near-uniform student (a fresh head) it falls above T ~ 2 -- then the paper's
    descent rule raises T instead of collapsing it (measured on CIFAR-10, see README)."""
    teacher = torch.zeros(8, 10)
    teacher[torch.arange(8), torch.arange(8)] = 4.0
    student = torch.zeros(8, 10)
    slopes = []
    for t in (1.0, 4.0):
        temp = torch.tensor(t, requires_grad=True)
        kd_loss(student, teacher, temp).backward()
        slopes.append(temp.grad.item())
    assert slopes[0] > 0 > slopes[1]
