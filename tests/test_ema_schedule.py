"""EMA decay schedules (ditkit.train.ema): the default rules unchanged, and the power-function
profile of EDM2 (Karras et al. 2024, arXiv 2312.02696, Sec. 3.1)."""

import math

import pytest
import torch
from torch import nn

from ditkit.train.ema import EMA, power_from_sigma_rel, sigma_rel_of_power


def _scalar_model(value=0.0):
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def _decays(ema, n):
    out = []
    for _ in range(n):
        out.append(ema.current_decay())
        ema.num_updates += 1
    return out


def test_default_rules_are_unchanged():
    assert _decays(EMA(_scalar_model()), 4) == [min(0.9999, (1 + n) / (10 + n)) for n in range(4)] == [0.1, 2 / 11, 0.25, 4 / 13]
    assert _decays(EMA(_scalar_model(), 0.99, warmup=False), 3) == [0.99] * 3
    assert EMA(_scalar_model()).power is None


def test_power_decay_hand_values_and_cap():
    # gamma = 1: beta(t) = (1 - 1/t)^2 at t = n + 1: 0, 1/4, 4/9, 9/16
    assert _decays(EMA(_scalar_model(), 0.9999, power=1.0), 4) == pytest.approx([0.0, 0.25, 4 / 9, 9 / 16], abs=1e-15)
    assert _decays(EMA(_scalar_model(), 0.3, power=1.0), 4) == pytest.approx([0.0, 0.25, 0.3, 0.3])
    with pytest.raises(ValueError, match="power"):
        EMA(_scalar_model(), power=-1.0)


def _average(power, values):
    model = _scalar_model()
    ema = EMA(model, decay=1.0 - 1e-12, power=power)
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
    return ema.model.weight.item()


def test_power_zero_is_the_mean_of_every_iterate_from_the_first_update():
    values = [3.0, -1.0, 4.0, 1.5, -5.0, 9.0]
    assert math.isclose(_average(0.0, values), sum(values) / len(values), rel_tol=1e-6)


def test_power_profile_weighs_step_s_by_about_s_to_the_gamma():
    # weights t^gamma (EDM2, eq. 2): for theta_t = t over N steps the average is about
    # sum t^(gamma+1) / sum t^gamma ~ N (gamma + 1) / (gamma + 2)
    n, gamma = 2000, 6.94
    got = _average(gamma, [float(t) for t in range(1, n + 1)])
    weights = torch.arange(1, n + 1, dtype=torch.float64) ** gamma
    expected = (weights * torch.arange(1, n + 1, dtype=torch.float64)).sum().item() / weights.sum().item()
    assert abs(got - expected) / expected < 2e-3
    # the DiT rule at 0.9999 has barely left the start after 2000 steps; the power EMA tracks the run
    plain = _scalar_model()
    ema = EMA(plain, 0.9999, warmup=False)
    for t in range(1, n + 1):
        with torch.no_grad():
            plain.weight.fill_(float(t))
        ema.update(plain)
    assert ema.model.weight.item() < 0.2 * got


def test_sigma_rel_and_power():
    # EDM2's pairs: gamma 6.94 <-> sigma_rel 0.10, gamma 16.97 <-> 0.05; gamma 0 <-> 1/sqrt(12)
    assert sigma_rel_of_power(6.94) == pytest.approx(0.10, abs=5e-5)
    assert sigma_rel_of_power(16.97) == pytest.approx(0.05, abs=5e-5)
    assert power_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    assert power_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_from_sigma_rel(1 / math.sqrt(12)) == pytest.approx(0.0, abs=1e-6)
    for g in (0.5, 3.0, 40.0):
        assert power_from_sigma_rel(sigma_rel_of_power(g)) == pytest.approx(g, rel=1e-9)
    for bad in (0.0, 0.3):
        with pytest.raises(ValueError, match="sigma_rel"):
            power_from_sigma_rel(bad)


def test_state_dict_round_trip_keeps_the_schedule_position():
    ema = EMA(_scalar_model(), power=2.0)
    ema.num_updates = 7
    other = EMA(_scalar_model(), power=2.0)
    other.load_state_dict(ema.state_dict())
    assert other.current_decay() == ema.current_decay() == (7 / 8) ** 3
