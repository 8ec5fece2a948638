"""step_seed: per-(seed, rank, epoch, step) seeds, so a resumed step repeats its draws without stored RNG state."""
import itertools

import torch

from nnunet_ssl.algorithms.seeding import step_seed

P = 1_000_003


def test_step_seed_values():
    assert step_seed(0, 0, 0, 0) == 0
    assert step_seed(0, 0, 0, 5) == 5
    assert step_seed(0, 0, 7, 0) == 7 * P
    assert step_seed(0, 1, 0, 0) == 1000006000009           # P ** 2
    assert step_seed(1, 0, 0, 0) == 1000009000027000027     # P ** 3, below 2 ** 63
    assert step_seed(10, 0, 0, 0) == (10 * P ** 3) % 2 ** 63  # wraps into [0, 2 ** 63)


def test_distinct_per_rank_epoch_step_and_reproducible_draws():
    grid = list(itertools.product(range(3), range(4), range(5)))
    assert len({step_seed(12345, r, e, s) for r, e, s in grid}) == len(grid)
    g = torch.Generator()
    first = torch.rand(4, generator=g.manual_seed(step_seed(12345, 0, 3, 2)))
    torch.rand(10, generator=g)  # the generator moved on, as during training
    again = torch.rand(4, generator=g.manual_seed(step_seed(12345, 0, 3, 2)))
    assert torch.equal(first, again)
