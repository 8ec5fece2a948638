import math

import pytest
import torch

from nnunet_ssl.algorithms.schedules import (StagewisePolyLR, cosine_cycle, epoch_stage, sigmoid_rampup,
                                             stage_boundaries)


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


# ---------------------------------------------------------------- stages
def test_stage_boundaries_round_halves_up_and_skip_empty_stages():
    assert stage_boundaries((0.25, 0.25, 0.5), 8) == (2, 4)
    assert stage_boundaries((0.25, 0.25, 0.5), 10) == (3, 5)   # 2.5 -> 3
    assert stage_boundaries((0.25, 0.25, 0.5), 2) == (1, 1)    # 0.5 -> 1 and 1.0 -> 1: stage 2 is empty
    assert stage_boundaries((0.25, 0.25, 0.5), 3) == (1, 2)    # 0.75 -> 1, 1.5 -> 2
    assert stage_boundaries((0.0, 0.0, 1.0), 10) == (0, 0)
    assert stage_boundaries((0.5, 0.5), 4) == (2,)
    assert [epoch_stage(e, (2, 4)) for e in range(6)] == [1, 1, 2, 2, 3, 3]
    assert [epoch_stage(e, (1, 1)) for e in range(2)] == [1, 3]
    assert [epoch_stage(e, (0, 0)) for e in range(2)] == [3, 3]


def test_stagewise_poly_lr_restarts_at_each_stage_and_sets_every_group():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 5.0}], lr=1.0)
    budget = {"bounds": (0, 2, 4, 8)}
    sched = StagewisePolyLR(opt, 0.01, lambda: budget["bounds"])
    expect = {0: 0.01, 1: 0.01 * 0.5358867312681466,        # 0.5 ** 0.9
              2: 0.01, 3: 0.01 * 0.5358867312681466,
              4: 0.01, 5: 0.01 * 0.7718895067235705,        # 0.75 ** 0.9
              8: 0.0}
    for epoch, lr in expect.items():
        sched.step(epoch)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, lr], rel=1e-12, abs=0)
        assert sched.get_last_lr() == pytest.approx([lr, lr], rel=1e-12, abs=0)
    budget["bounds"] = (0, 4, 8, 16)  # a budget changed after construction moves the stages
    assert sched.lr_at(2) == pytest.approx(0.01 * 0.5358867312681466, rel=1e-12)
