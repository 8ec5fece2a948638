import math

import pytest

from nnunet_ssl.algorithms.schedules import cosine_cycle, sigmoid_rampup


def test_sigmoid_rampup_start_middle_end():
    assert sigmoid_rampup(0, 1000, 0.6) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(300, 1000, 0.6) == pytest.approx(math.exp(-5 * 0.25))  # halfway through the ramp
    assert sigmoid_rampup(600, 1000, 0.6) == 1.0
    assert sigmoid_rampup(999, 1000, 0.6) == 1.0


def test_sigmoid_rampup_scales_with_budget():
    # the same fraction of two budgets gives the same weight
    assert sigmoid_rampup(150, 1000, 0.6) == pytest.approx(sigmoid_rampup(37_500, 250_000, 0.6))


def test_sigmoid_rampup_zero_fraction_and_errors():
    assert sigmoid_rampup(0, 10, 0.0) == 1.0
    with pytest.raises(ValueError):
        sigmoid_rampup(0, 0, 0.5)
    with pytest.raises(ValueError):
        sigmoid_rampup(0, 10, 1.5)


def test_cosine_cycle_endpoints():
    assert cosine_cycle(0, 100, 0.1, 1.0) == pytest.approx(1.0)
    assert cosine_cycle(50, 100, 0.1, 1.0) == pytest.approx(0.1)
    assert cosine_cycle(100, 100, 0.1, 1.0) == pytest.approx(1.0)
    assert cosine_cycle(25, 100, 0.1, 1.0) == pytest.approx(0.55)
    assert cosine_cycle(5, 100, 0.1, 1.0, cycles=10) == pytest.approx(0.1)
