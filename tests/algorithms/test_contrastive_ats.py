"""ATS, the anatomy-aware temperature schedule of ACTION++ (spec 5.2, 9.12)."""
import pytest

from nnunet_ssl.algorithms.schedules import cosine_cycle


def test_ats_one_cycle():
    t_total, low, high = 1000, 0.1, 1.0
    assert cosine_cycle(0, t_total, low, high) == pytest.approx(high)
    assert cosine_cycle(t_total / 2, t_total, low, high) == pytest.approx(low)
    assert cosine_cycle(t_total, t_total, low, high) == pytest.approx(high)
    assert cosine_cycle(t_total / 4, t_total, low, high) == pytest.approx(0.55)


def test_ats_ten_cycles():
    t_total, low, high = 1000, 0.1, 1.0
    assert cosine_cycle(t_total / 20, t_total, low, high, cycles=10) == pytest.approx(low)
    assert cosine_cycle(t_total / 10, t_total, low, high, cycles=10) == pytest.approx(high)
    assert cosine_cycle(t_total, t_total, low, high, cycles=10) == pytest.approx(high)
