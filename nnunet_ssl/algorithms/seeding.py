"""Random draws that a resume reproduces without storing any RNG state.

A sampler seeded once per run continues from wherever its generator stood, which a checkpoint would have to
save and every DDP rank would share. Seeding a generator afresh at every step from ``(seed, rank, epoch, step)``
makes each step's draws a pure function of where training is: ``--c`` repeats them exactly, and ranks differ.
"""
from __future__ import annotations

_PRIME = 1_000_003


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A seed in ``[0, 2**63)`` for ``torch.Generator.manual_seed``.

    For a given ``seed`` it differs for every ``(rank, epoch, step)`` with each entry below ``P = 1,000,003``: they
    are the digits of a base-``P`` number below ``P**3 < 2**63``, so the final modulo cannot merge two of them.
    """
    return (((seed * _PRIME + rank) * _PRIME + epoch) * _PRIME + step) % (2 ** 63)
