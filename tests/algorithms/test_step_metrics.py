"""StepMetrics and epoch_values: per-step diagnostics summed over steps (and ranks), then one value per metric."""
import math

import torch

from nnunet_ssl.algorithms.step_metrics import StepMetrics, epoch_values


def _sum(steps):
    """What the SSL base trainer does with the per-step dicts: plain sums per key."""
    sums = {}
    for step in steps:
        for k, v in step.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums


def _two_steps():
    a, b = StepMetrics(), StepMetrics()
    a.mean("loss", torch.tensor(2.0))
    b.mean("loss", 4.0)
    a.ratio("frac", torch.tensor(3.0), torch.tensor(4.0))
    b.ratio("frac", 1.0, 12.0)
    a.finite_mean("cos", torch.tensor([0.5, float("nan"), 1.0]))
    b.finite_mean("cos", torch.tensor([0.25, float("nan"), float("inf")]))
    a.finite_mean("entropy", torch.tensor(float("nan")))
    b.finite_mean("entropy", torch.tensor(0.75))
    a.total("changes", 1.0)
    b.total("changes", torch.tensor(0.0))
    return [{"sup_loss": 1.0, **a.floats()}, {"sup_loss": 3.0, **b.floats()}]


def test_epoch_values_of_means_ratios_finite_means_and_totals():
    v = epoch_values(_sum(_two_steps()), steps=2)
    assert v["sup_loss"] == 2.0 and v["loss"] == 3.0  # per-step means; unsuffixed keys are means
    assert v["frac"] == 0.25                           # (3 + 1) / (4 + 12), not the mean of 3/4 and 1/12
    assert v["cos_c0"] == 0.375                        # both steps finite
    assert math.isnan(v["cos_c1"])                     # never finite: 0 / 0
    assert v["cos_c2"] == 1.0                          # the inf step does not count
    assert v["entropy"] == 0.75                        # the nan step does not count
    assert v["changes"] == 1.0                         # an epoch sum
    assert list(v) == ["sup_loss", "loss", "frac", "cos_c0", "cos_c1", "cos_c2", "entropy", "changes"]


def test_epoch_values_over_two_ranks_equal_one_rank():
    steps = _two_steps()
    one = epoch_values(_sum(steps), steps=2)
    two = epoch_values(_sum(steps + steps), steps=4, world_size=2)  # the all-reduce sums identical ranks
    assert one.keys() == two.keys()
    for k in one:
        assert (math.isnan(one[k]) and math.isnan(two[k])) or one[k] == two[k], k


def test_floats_carry_the_kind_suffix_and_keep_constants_exact():
    m = StepMetrics()
    m.mean("w", 0.01)
    m.mean("loss", torch.tensor(0.5, dtype=torch.float16))
    m.ratio("r", torch.tensor(1.0), 2)
    m.total("t", 3)
    assert m.floats() == {"w": 0.01, "loss": 0.5, "r#num": 1.0, "r#den": 2.0, "t#total": 3.0}
    plain = StepMetrics()
    plain.mean("w", 0.01)
    assert plain.floats() == {"w": 0.01}
    assert epoch_values({}, steps=0) == {}
