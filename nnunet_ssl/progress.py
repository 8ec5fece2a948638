"""Per-epoch SSL metrics: kept beside nnU-Net's logger, checkpointed, written as JSON lines and plotted.

nnU-Net's ``LocalLogger`` accepts only its own pre-registered keys and ``plot_progress_png`` draws only
those, so SSL metrics (supervised/unsupervised loss, lambda, mask ratios, thresholds...) live here and are
drawn into ``progress_ssl.png`` beside nnU-Net's ``progress.png``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List


class SSLProgressLog:
    """``key -> [value per epoch]``; missing epochs are NaN so keys can appear late (e.g. a later stage)."""

    def __init__(self):
        self.values: Dict[str, List[float]] = {}

    def log_epoch(self, epoch: int, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            series = self.values.setdefault(k, [])
            while len(series) < epoch:
                series.append(float("nan"))
            if len(series) == epoch:
                series.append(float(v))
            else:
                series[epoch] = float(v)  # re-logging an epoch (resume) overwrites, never duplicates

    def last(self, key: str) -> float:
        return self.values[key][-1]

    def state_dict(self) -> dict:
        return {"values": {k: list(v) for k, v in self.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.values = {k: list(v) for k, v in state.get("values", {}).items()}

    def truncate(self, num_epochs: int) -> None:
        """Drop values of epochs >= ``num_epochs`` (after resuming from an earlier checkpoint)."""
        for k in self.values:
            del self.values[k][num_epochs:]

    def write_jsonl(self, path: str) -> None:
        """Rewrite ``path`` with one JSON object per epoch (atomically)."""
        n = max((len(v) for v in self.values.values()), default=0)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for e in range(n):
                row = {"epoch": e}
                for k, v in sorted(self.values.items()):
                    x = v[e] if e < len(v) else float("nan")
                    row[k] = None if (isinstance(x, float) and math.isnan(x)) else x
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)

    def plot(self, path: str, groups: Dict[str, List[str]]) -> None:
        """Draw one panel per group of keys (keys absent from the log are skipped)."""
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        panels = [(title, [k for k in keys if k in self.values]) for title, keys in groups.items()]
        panels = [(t, ks) for t, ks in panels if ks]
        if not panels:
            return
        fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
        for ax, (title, keys) in zip(axes[:, 0], panels):
            for k in keys:
                ax.plot(range(len(self.values[k])), self.values[k], label=k, linewidth=2)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        tmp = path + ".tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
