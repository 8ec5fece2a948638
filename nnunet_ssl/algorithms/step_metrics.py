"""Per-step training diagnostics, collected as tensors and summarised per epoch.

A method that logs dozens of values per step would stall the device dozens of times per step if it read each
with ``.item()``; :class:`StepMetrics` keeps them as tensors and reads them back with one sync. A step's values
are then summed over the epoch (and over DDP ranks) as plain floats, so every key must stay meaningful as a
sum; three kinds, told apart by a key suffix, cover what such sums can express:

* **mean** ``key``: the per-step mean over the epoch;
* **ratio** ``key#num`` / ``key#den``: (sum of numerators) / (sum of denominators), e.g. a per-class mean over
  only the steps where the class occurred, or a count-based fraction;
* **total** ``key#total``: the epoch sum of a value that is identical on every rank (e.g. how often a shared
  assignment changed), so the sum over ranks is divided by the world size again.

:func:`epoch_values` turns the summed dict back into one value per key.
"""
from __future__ import annotations

from typing import Dict, Union

import torch

Scalar = Union[torch.Tensor, float]

NUM, DEN, TOTAL = "#num", "#den", "#total"


class StepMetrics:
    """One training step's diagnostics; :meth:`floats` reads them all with a single device sync.

    Values are 0-dim tensors (on any device) or Python numbers.
    """

    def __init__(self):
        self.items: Dict[str, Scalar] = {}

    def mean(self, key: str, value: Scalar) -> None:
        """``key`` is logged as the mean over the epoch's steps."""
        self.items[key] = value

    def ratio(self, key: str, num: Scalar, den: Scalar) -> None:
        """``key`` is logged as ``sum(num) / sum(den)`` over the epoch (nan if the denominators sum to 0)."""
        self.items[key + NUM] = num
        self.items[key + DEN] = den

    def finite_mean(self, key: str, values: torch.Tensor) -> None:
        """Means over only the steps where the value is finite (a nan/inf step does not count).

        Args:
            key: metric name.
            values: ``()`` for one metric ``key``, or ``(C,)`` for one metric per class, ``f"{key}_c{c}"``.
        """
        values = values.detach().float()
        ok = torch.isfinite(values)
        num = torch.where(ok, values, torch.zeros_like(values))
        if values.dim() == 0:
            self.ratio(key, num, ok.float())
            return
        for c in range(values.numel()):
            self.ratio(f"{key}_c{c}", num[c], ok[c].float())

    def total(self, key: str, value: Scalar) -> None:
        """``key`` is logged as the epoch sum of ``value``, which must be the same on every DDP rank."""
        self.items[key + TOTAL] = value

    def floats(self) -> Dict[str, float]:
        """``{stored key: float}``, the keys carrying their kind's suffix; one device sync for all tensors."""
        keys = list(self.items)
        tensors = [v for v in self.items.values() if torch.is_tensor(v)]
        if not tensors:
            return {k: float(v) for k, v in self.items.items()}
        dev = tensors[0].device
        dtype = torch.float32 if dev.type == "mps" else torch.float64  # float64 keeps constants such as 0.01 exact
        flat = torch.stack([v.detach().to(dev, dtype).reshape(()) if torch.is_tensor(v)
                            else torch.tensor(float(v), device=dev, dtype=dtype)
                            for v in self.items.values()]).tolist()
        return dict(zip(keys, flat))


def epoch_values(sums: Dict[str, float], steps: int, world_size: int = 1) -> Dict[str, float]:
    """Epoch sums of :meth:`StepMetrics.floats` (over steps and ranks) -> one value per metric.

    Args:
        sums: ``{stored key: sum}``; keys without a suffix (e.g. a trainer's own per-step floats) are means.
        steps: number of steps summed (over all ranks).
        world_size: number of DDP ranks summed.

    Returns:
        ``{metric: value}`` in the order the metrics first appear in ``sums``; a ratio whose denominators sum
        to 0 is nan.
    """
    out: Dict[str, float] = {}
    for k, v in sums.items():
        if k.endswith(NUM):
            base = k[:-len(NUM)]
            den = sums.get(base + DEN, 0.0)
            out[base] = v / den if den > 0 else float("nan")
        elif k.endswith(DEN):
            continue
        elif k.endswith(TOTAL):
            out[k[:-len(TOTAL)]] = v / world_size
        else:
            out[k] = v / max(steps, 1)
    return out
