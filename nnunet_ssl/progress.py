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
        """Write ``progress_ssl.png`` (atomically): see :func:`build_figure`."""
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        tmp = path + ".tmp.png"
        with figure_style():  # ticks are laid out when saving: the style must still hold then
            fig = build_figure(self.values, groups)
            if fig is None:
                return
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)


#: SSL keys worth keeping in a benchmark row: the loss terms, the weight, and the signals that explained past failures
#: (MetaSSL's foreground weight and L_l share, FixMatch's confident fraction and class thresholds)
HISTORY_KEYS = ("sup_loss", "unsup_loss", "lambda", "mask_ratio", "conf_fg_share", "metassl_lamLl_over_sup")
HISTORY_PREFIXES = ("u_fg_weight", "metassl_L_u", "metassl_L_l", "fixmatch_tau_")


def epoch_history(nnunet_log: Dict[str, list], ssl_values: Dict[str, List[float]],
                  max_points: int = 100) -> Dict[str, list]:
    """A compact per-epoch record of a finished training, for benchmark tables that outlive the work folder.

    ``nnunet_log``: nnU-Net's ``logger.get_checkpoint()`` (``train_losses``, ``mean_fg_dice`` = the pseudo Dice
    on the validation batches); ``ssl_values``: :attr:`SSLProgressLog.values` (empty for plain nnU-Net). Returns
    ``{"epoch": [...], "train_loss": [...], "pseudo_dice": [...], <ssl key>: [...]}`` with the SSL keys of
    :data:`HISTORY_KEYS` / :data:`HISTORY_PREFIXES`, every ``k``-th epoch (``k`` = ceil(epochs / max_points)) and the
    last one, 4 significant digits, NaN as None.
    """
    series = {"train_loss": list(nnunet_log.get("train_losses") or []),
              "pseudo_dice": list(nnunet_log.get("mean_fg_dice") or [])}
    series.update({k: list(v) for k, v in ssl_values.items()
                   if k in HISTORY_KEYS or k.startswith(HISTORY_PREFIXES)})
    n = max((len(v) for v in series.values()), default=0)
    if n == 0:
        return {}
    step = math.ceil(n / max_points)
    epochs = list(range(0, n, step))
    if epochs[-1] != n - 1:
        epochs.append(n - 1)

    def compact(v: List[float], e: int):
        x = float(v[e]) if e < len(v) and v[e] is not None else float("nan")
        return float(f"{x:.4g}") if math.isfinite(x) else None

    out: Dict[str, list] = {"epoch": epochs}
    for k, v in series.items():
        if v:
            out[k] = [compact(v, e) for e in epochs]
    return out


# ------------------------------------------------------------------------------------------------------------------
# The figure
# ------------------------------------------------------------------------------------------------------------------

#: readable names of the keys every trainer logs; other keys are shown as logged
LABELS = {
    "sup_loss": "supervised loss",
    "unsup_loss": "unsupervised loss",
    "lambda": "λ(t)",
    "nonfinite_steps_total": "non-finite steps skipped (total)",
    "lr": "learning rate",
    "gpu_mem_peak_gb": "peak GPU memory (GiB)",
}
OTHER_GROUP = "other logged metrics"
#: sorted by magnitude, a series more than GAP times smaller than the previous one, or SPREAD times smaller than the
#: largest on its axis, starts a new axis (an unsupervised loss of 0.01 beside a supervised one of 0.8 is a flat line)
GAP = 4.0
SPREAD = 25.0
#: a positive loss spanning more than this max/min ratio gets a log axis (schedules and fractions stay linear)
LOG_RATIO = 30.0
_FONTS = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
          "legend.fontsize": 8}


def figure_style():
    """matplotlib's defaults plus one font scheme, whatever the process set globally before.

    nnU-Net's own progress.png switches seaborn on globally (font_scale 2.5) in the training process.
    """
    import matplotlib.pyplot as plt

    return plt.style.context(["default", _FONTS])


def _finite(values: List[float]) -> List[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _magnitude(values: List[float]) -> float:
    return max((abs(v) for v in _finite(values)), default=0.0)


def split_by_scale(values: Dict[str, List[float]], keys: List[str]) -> List[List[str]]:
    """Groups of ``keys`` that can share a y axis (see :data:`GAP`, :data:`SPREAD`).

    All-zero series join the first group (they fit any scale). Within a group the order of ``keys`` is kept;
    groups come largest magnitude first.
    """
    sized = sorted(((k, _magnitude(values[k])) for k in keys), key=lambda km: -km[1])
    clusters: List[List[str]] = []
    top = prev = 0.0
    zeros = []
    for k, m in sized:
        if m == 0:
            zeros.append(k)
            continue
        if not clusters or prev / m > GAP or top / m > SPREAD:
            clusters.append([])
            top = m
        clusters[-1].append(k)
        prev = m
    if zeros:
        clusters = clusters or [[]]
        clusters[0].extend(zeros)
    return [sorted(c, key=keys.index) for c in clusters]


def wants_log_scale(values: Dict[str, List[float]], keys: List[str]) -> bool:
    """Losses, all positive, spanning more than :data:`LOG_RATIO` (about one and a half decades)."""
    finite = [v for k in keys for v in _finite(values[k])]
    return (all("loss" in k for k in keys) and bool(finite) and min(finite) > 0
            and max(finite) / min(finite) > LOG_RATIO)


def axis_label(keys: List[str]) -> str:
    """Y label: the quantity's name for one series; for several, what their names have in common."""
    if len(keys) == 1:
        return LABELS.get(keys[0], keys[0])
    for words, label in ((("loss",), "loss"), (("frac", "ratio", "acc", "agreement"), "fraction"),
                         (("tau",), "temperature"), (("w_", "weight", "lambda"), "weight"),
                         (("cos",), "cosine similarity"), (("entropy",), "entropy")):
        if all(any(w in k for w in words) for k in keys):
            return label
    return "value"


def build_figure(values: Dict[str, List[float]], groups: Dict[str, List[str]]):
    """One panel per group of keys and scale (see :func:`split_by_scale`); keys logged in no group get panels
    of their own under :data:`OTHER_GROUP`. Every panel has a title, an epoch axis and a y label; a log y axis
    where a series spans decades. Returns the matplotlib figure, or None when nothing was logged.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    present = {k for k, v in values.items() if _finite(v)}
    grouped = [(title, [k for k in keys if k in present]) for title, keys in groups.items()]
    covered = {k for _, keys in grouped for k in keys}
    grouped.append((OTHER_GROUP, sorted(present - covered)))
    panels = [(title, part) for title, keys in grouped if keys for part in split_by_scale(values, keys)]
    if not panels:
        return None
    ncols = 1 if len(panels) <= 3 else 2
    nrows = math.ceil(len(panels) / ncols)
    with figure_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 2.6 * nrows + 0.4), squeeze=False)
        for ax, (title, keys) in zip(axes.ravel(), panels):
            for k in keys:
                n = len(values[k])
                ax.plot(range(n), values[k], label=LABELS.get(k, k), linewidth=1.5,
                        marker="o" if n <= 30 else None, markersize=3)
            log = wants_log_scale(values, keys)
            if log:
                ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(axis_label(keys) + (" (log)" if log else ""))
            ax.grid(True, alpha=0.3)
            if len(keys) > 1:
                ax.legend(loc="best", ncol=1 + len(keys) // 6)
        for ax in axes.ravel()[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
    return fig
