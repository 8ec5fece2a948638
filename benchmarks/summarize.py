#!/usr/bin/env python
"""Summary over training seeds of the real-data benchmarks (``ssl_acdc.py``, ``ssl_la.py``).

    python benchmarks/summarize.py                                  # every benchmark / budget / labeled set found
    python benchmarks/summarize.py ssl_acdc_cpu ssl_la_cpu_n4_seed1 # some of them (the per-seed files' stem)
    python benchmarks/summarize.py --results-dir benchmarks/results/smoke

Input: the per-seed tables of one benchmark, budget and labeled set, ``<results>/<stem>.json`` (seed 0) and
``<results>/seed<S>/<stem>.json`` (seed S), where stem = ``<name>_<budget>[_<selection>]``. The benchmark scripts call
this after every run; ``--summary-only`` of a benchmark script does the same for its labeled set.

Output, beside the seed-0 table: ``<stem>_summary.md`` + ``.json`` + ``.png``. Per trainer: the number of seeds, mean
+- SD of the mean Dice, the Dice difference to labeled-only nnU-Net **of the same seed** (paired: mean, min, max,
wins / n), mean HD95, the pooled predicted / true volume per class (mean over seeds), mean train time. The plot: one
dot per seed and trainer (Dice), labeled-only's mean and the upper bound's as lines, and the paired differences below.

Only like is paired with like: each row carries (or, for rows older than that record, inherits from its file's
setting) the data it was made with: plans, schedule, device, labeled cases, the sizes of the labeled / unlabeled /
test / upper-bound sets. Rows whose data differ are summarised in separate tables, and every set other than the
current one is marked stale (†) with the reason; so is a set whose data no longer match the data folder on disk
(e.g. after the shared LA folder grew from 8 to 28 training cases).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

#: fewer seeds than this: a row is marked (single draws, no evidence of a gain or a loss)
MIN_SEEDS = 3
SUMMARY = "_summary"
STALE = "†"
FEW = "*"


# ----------------------------------------------------------------------------------------------------------------
# statistics (fractions in, fractions out)
# ----------------------------------------------------------------------------------------------------------------

def mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def sample_sd(xs: Sequence[float]) -> Optional[float]:
    """Standard deviation with n - 1 (undefined, None, for fewer than two values)."""
    return statistics.stdev(xs) if len(xs) >= 2 else None


def paired(values: Dict[int, float], base: Dict[int, float]) -> dict:
    """Differences ``values[s] - base[s]`` over the seeds both have: per seed, mean, min, max, wins (> 0) of n."""
    seeds = sorted(set(values) & set(base))
    deltas = {s: values[s] - base[s] for s in seeds}
    d = list(deltas.values())
    return {"seeds": seeds, "per_seed": deltas, "n": len(d), "mean": mean(d), "min": min(d) if d else None,
            "max": max(d) if d else None, "wins": sum(x > 0 for x in d)}


# ----------------------------------------------------------------------------------------------------------------
# reading the per-seed tables
# ----------------------------------------------------------------------------------------------------------------

def seed_files(root: Path, stem: str) -> List[Path]:
    """``root/<stem>.json`` then ``root/seed<S>/<stem>.json`` by S (those that exist)."""
    out = [root / f"{stem}.json"] if (root / f"{stem}.json").is_file() else []
    dirs = sorted((int(d.name[4:]), d) for d in root.glob("seed*") if d.is_dir() and d.name[4:].isdigit())
    return out + [d / f"{stem}.json" for _, d in dirs if (d / f"{stem}.json").is_file()]


def row_seed(row: dict, data: dict) -> Optional[int]:
    """The row's training seed: its own record, else its budget variant's (rows older than ``seed`` in the row),
    else the file's setting."""
    if row.get("seed") is not None:
        return int(row["seed"])
    st = row.get("train_stats") or {}
    for part in (st, st.get("teacher") or {}, st.get("student") or {}):
        s = (part.get("budget") or {}).get("seed") if isinstance(part, dict) else None
        if s is not None:
            return int(s)
    s = (data.get("setting") or {}).get("seed")
    return None if s is None else int(s)


def row_context(row: dict, data: dict) -> dict:
    """The data the row was made with: its own record, else its file's setting when the plans agree (rows recorded
    before rows carried it were made under that setting), else unknown."""
    if row.get("data"):
        return row["data"]
    setting = data.get("setting") or {}
    if setting and row.get("plans_sha256") == setting.get("plans_sha256"):
        return C.data_context(setting)
    return {"plans_sha256": row.get("plans_sha256"),
            "description": f"unknown data: made with plans {str(row.get('plans_sha256'))[:8]}, which are not those "
                           f"of its file's setting"}


def collect(files: Sequence[Tuple[str, dict]]) -> Dict[str, dict]:
    """Finished rows of the per-seed tables, grouped by data context: ``{context id: {"context", "rows": {key:
    {seed: (row, source)}}, "newest"}}``. A (context, key, seed) found twice keeps the later start."""
    groups: Dict[str, dict] = {}
    for source, data in files:
        for key, row in (data.get("runs") or {}).items():
            if row.get("status") != "ok" or not (row.get("metrics") or {}).get("mean"):
                continue
            seed = row_seed(row, data)
            if seed is None:  # cannot be paired; every table written since `--seed` exists records it
                continue
            ctx = row_context(row, data)
            g = groups.setdefault(C.context_key(ctx), {"context": ctx, "rows": {}, "newest": ""})
            old = g["rows"].setdefault(key, {}).get(seed)
            if old is None or (row.get("started") or "") >= (old[0].get("started") or ""):
                g["rows"][key][seed] = (row, source)
            g["newest"] = max(g["newest"], row.get("started") or "")
    return groups


# ----------------------------------------------------------------------------------------------------------------
# one summary row per trainer
# ----------------------------------------------------------------------------------------------------------------

#: rows that are no semi-supervised method, so the compute control says nothing about them
CONTROL_EXEMPT = (C.LABELED_ONLY, C.CONTROL_2X, C.UPPER)


def trainer_summary(key: str, by_seed: Dict[int, Tuple[dict, str]], base: Dict[int, float],
                    classes: Sequence[str], control: Optional[Dict[int, float]] = None) -> dict:
    dice = {s: r["metrics"]["mean"]["Dice"] for s, (r, _) in sorted(by_seed.items())}
    d = list(dice.values())
    per_class = {s: r["metrics"].get("per_class") or {} for s, (r, _) in by_seed.items()}
    out = {"key": key, "name": short_name(key), "role": next(iter(by_seed.values()))[0].get("role"),
           "seeds": sorted(dice), "n": len(d), "few_seeds": len(d) < MIN_SEEDS, "dice": dice,
           "dice_mean": mean(d), "dice_sd": sample_sd(d),
           "hd95_mm_mean": mean([r["metrics"]["mean"].get("HD95_mm") for r, _ in by_seed.values()]),
           "volume_ratio_mean": {c: mean([(pc.get(c) or {}).get("volume_ratio") for pc in per_class.values()])
                                 for c in classes},
           "train_wall_s_mean": mean([r.get("train_wall_s") for r, _ in by_seed.values()]),
           "total_iterations": sorted({r.get("total_iterations") for r, _ in by_seed.values()} - {None}),
           "sources": {s: src for s, (_, src) in sorted(by_seed.items())}}
    pool = {s: r["unlabeled_pool"] for s, (r, _) in sorted(by_seed.items())
            if (r.get("unlabeled_pool") or {}).get("n_cases")}
    if pool:  # the final network on the unlabeled pool vs its true labels (benchmarks/_common.py: diagnose_pool)
        pcs = [p.get("per_class") or {} for p in pool.values()]
        out["pool"] = {"seeds": sorted(pool), "dice": {s: p["mean"]["Dice"] for s, p in pool.items()},
                       "dice_mean": mean([p["mean"]["Dice"] for p in pool.values()]),
                       "n_cases": sorted({p["n_cases"] for p in pool.values()}),
                       **{f"{m}_mean": {c: mean([(pc.get(c) or {}).get(m) for pc in pcs]) for c in classes}
                          for m in ("volume_ratio", "precision")}}
    if key != C.LABELED_ONLY:
        out["delta"] = paired(dice, base)
    if control and key not in CONTROL_EXEMPT and set(dice) & set(control):
        out["vs_control"] = paired(dice, control)
    return out


def short_name(key: str) -> str:
    special = {C.LABELED_ONLY: "labeled-only", C.CONTROL_2X: "labeled-only 2x", C.UPPER: "upper bound",
               C.SELFTRAIN: "SelfTraining (half)", C.SELFTRAIN_FULL: "SelfTraining (full teacher)"}
    name = special.get(key) or (key[len("nnUNetTrainer"):] if key.startswith("nnUNetTrainer") else key)
    return name.replace("PlusPlus", "++")


def summarize_group(group: dict, classes: Sequence[str]) -> List[dict]:
    def dice(key: str) -> Dict[int, float]:
        return {s: r["metrics"]["mean"]["Dice"] for s, (r, _) in group["rows"].get(key, {}).items()}

    base, control = dice(C.LABELED_ONLY), dice(C.CONTROL_2X)
    return [trainer_summary(k, group["rows"][k], base, classes, control) for k in C._row_order(group["rows"])]


# ----------------------------------------------------------------------------------------------------------------
# which data set is current
# ----------------------------------------------------------------------------------------------------------------

_COMPARED = {"plans_sha256": "plans", "configuration": "configuration", "total_iterations": "iterations",
             "tta": "TTA", "device": "device", "labeled": "labeled cases", "n_available": "training cases available",
             "n_present": "training cases present", "num_labeled": "labeled nnU-Net cases",
             "num_unlabeled": "unlabeled cases", "num_test": "test cases", "upper_num_labeled": "upper-bound cases"}


def differences(ctx: dict, ref: dict) -> List[str]:
    return [f"{what} {_short(ctx.get(k))} (current: {_short(ref.get(k))})" for k, what in _COMPARED.items()
            if ctx.get(k) != ref.get(k)]


def _short(v) -> str:
    if isinstance(v, list):
        return f"{len(v)} ({', '.join(map(str, v[:4]))}{', ...' if len(v) > 4 else ''})"
    return str(v)[:8] if isinstance(v, str) and len(v) == 16 else str(v)


def on_disk(spec, ctx: dict, data_dir: Optional[str]) -> Tuple[Optional[dict], str]:
    """The labeled selection that the data folder gives now for ``ctx``'s labeled set, and a note when it cannot
    be checked (no spec, no data folder, a failing selection)."""
    if spec is None or not ctx.get("labeled"):
        return None, "not checked against the data folder (no labeled set recorded)"
    source = C.find_data(spec.data_subfolder, data_dir)
    if source is None:
        return None, f"not checked against the data folder ({spec.data_subfolder} not found)"
    n = len(ctx["labeled"])
    try:
        with tempfile.TemporaryDirectory() as scratch:  # a seeded / explicit choice writes a symlink mirror there
            sel = spec.make_selection(source, n, ctx.get("selection_seed"), None, Path(scratch) / "s")[1]
            if sorted(sel["labeled"]) != ctx["labeled"] and ctx.get("selection_seed") is None:
                sel = spec.make_selection(source, n, None, list(ctx["labeled"]), Path(scratch) / "e")[1]
    except Exception as e:  # noqa: BLE001 - e.g. labeled cases that are gone: the rows cannot be current
        return {"error": f"{type(e).__name__}: {e}"}, ""
    return sel, ""


def disk_reasons(ctx: dict, sel: Optional[dict], folder: str) -> List[str]:
    if sel is None:
        return []
    if "error" in sel:
        return [f"its labeled set cannot be selected from {folder} now ({sel['error']})"]
    out = []
    for k in ("n_present", "n_available"):  # LA records both, usually equal: say it once
        was, now = ctx.get(k), sel.get(k)
        line = f"made when {folder} held {was} training cases ({ctx.get('num_unlabeled')} unlabeled); it holds " \
               f"{now} now"
        if was is not None and now is not None and was != now and line not in out:
            out.append(line)
    if sorted(sel.get("labeled") or []) != (ctx.get("labeled") or []):
        out.append(f"its labeled cases are not what {folder} selects now")
    return out


def rank_groups(groups: Dict[str, dict], spec, data_dir: Optional[str]) -> List[dict]:
    """Groups newest first, each with ``status`` (current / stale) and ``stale_reasons``. Current: the newest group
    that matches the data folder (the newest one when the folder cannot be checked); none when no group matches."""
    ordered = sorted(groups.values(), key=lambda g: g["newest"], reverse=True)
    folder = spec.data_subfolder if spec is not None else "the data folder"
    for g in ordered:
        sel, g["disk_note"] = on_disk(spec, g["context"], data_dir)
        g["stale_reasons"] = disk_reasons(g["context"], sel, folder)
    current = next((g for g in ordered if not g["stale_reasons"]), None)
    for g in ordered:
        g["status"] = "current" if g is current else "stale"
        if g is not current and current is not None:
            g["stale_reasons"] += differences(g["context"], current["context"]) or ["another data context"]
    return ordered


# ----------------------------------------------------------------------------------------------------------------
# the summary
# ----------------------------------------------------------------------------------------------------------------

def build_summary(files: Sequence[Tuple[str, dict]], spec=None, data_dir: Optional[str] = None,
                  stem: str = "") -> dict:
    """The summary of the per-seed tables ``files`` (``[(source name, loaded JSON)]``, seed-0 file first)."""
    first = files[0][1] if files else {}
    classes = list(spec.classes) if spec is not None else \
        next((list((r.get("metrics") or {}).get("per_class") or {}) for _, d in files
              for r in (d.get("runs") or {}).values() if (r.get("metrics") or {}).get("per_class")), [])
    groups = rank_groups(collect(files), spec, data_dir)
    folder = spec.data_subfolder if spec is not None else "the data folder"
    return {
        "benchmark": first.get("benchmark"), "budget": first.get("budget"), "stem": stem,
        "title": first.get("title") or (spec.title if spec is not None else stem), "classes": classes,
        "min_seeds": MIN_SEEDS,
        "sources": [{"file": src, "seeds": sorted({s for s in (row_seed(r, d) for r in (d.get("runs") or {}).values())
                                                   if s is not None})} for src, d in files],
        "contexts": [{"status": g["status"], "stale_reasons": g["stale_reasons"],
                      "disk_check": g["disk_note"] or (f"the labeled set and the number of training cases match "
                                                        f"{folder} now" if g["status"] == "current" else ""),
                      "newest_row": g["newest"], "context": g["context"],
                      "trainers": summarize_group(g, classes)} for g in groups],
    }


def _pct(v, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _seeds_text(seeds: Sequence[int]) -> str:
    if not seeds:
        return "no run recorded yet"
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def render_table(ctx: dict, classes: Sequence[str], mark: str = "") -> List[str]:
    lines = ["| trainer | seeds | n | mean Dice (mean ± SD) | Δ vs labeled-only, paired by seed: mean [min, max] | "
             "wins | HD95 mm | volume " + " / ".join(classes) + " | train time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in ctx["trainers"]:
        sd = f" ± {_pct(t['dice_sd'])}" if t["dice_sd"] is not None else ""
        dl = t.get("delta")
        delta = "" if dl is None else _range(dl)
        wins = "" if dl is None else f"{dl['wins']}/{dl['n']}" if dl["n"] else "-"
        vol = " / ".join(C.fmt_num(t["volume_ratio_mean"].get(c), nd=2) for c in classes)
        few = FEW if t["few_seeds"] else ""
        lines.append(f"| {t['name']}{mark} | {', '.join(map(str, t['seeds']))} | {t['n']}{few} | "
                     f"**{_pct(t['dice_mean'])}**{sd} | {delta} | {wins} | {C.fmt_num(t['hd95_mm_mean'])} | {vol} | "
                     f"{C.fmt_s(t['train_wall_s_mean'])} |")
    return lines


def render_per_seed(ctx: dict) -> List[str]:
    seeds = sorted({s for t in ctx["trainers"] for s in t["seeds"]})
    lines = ["| trainer | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for t in ctx["trainers"]:
        per = (t.get("delta") or {}).get("per_seed", {})
        cells = [("-" if s not in t["dice"] else _pct(t["dice"][s]) +
                  (f" ({_pct(per[s], True)})" if s in per else "")) for s in seeds]
        lines.append(f"| {t['name']} | " + " | ".join(cells) + " |")
    return lines


def render_pool(ctx: dict, classes: Sequence[str]) -> List[str]:
    """The unlabeled-pool diagnostic, for the trainers that have it (empty when none has)."""
    rows = [t for t in ctx["trainers"] if t.get("pool")]
    if not rows:
        return []
    lines = ["Unlabeled pool: each run's final network on the unlabeled training images it was given, scored against "
             "their true labels (which the training never saw): what pseudo-labels from such a teacher are worth, "
             "and whether the model over-segments the images it learned from without labels. Mean over the seeds "
             "that have it.", "",
             "| trainer | seeds | cases | pool Dice (mean; per seed) | volume " + " / ".join(classes) +
             " | precision " + " / ".join(classes) + " |", "|---|---|---|---|---|---|"]
    for t in rows:
        p = t["pool"]
        per = ", ".join(_pct(p["dice"][s]) for s in p["seeds"])
        lines.append(f"| {t['name']} | {', '.join(map(str, p['seeds']))} | {', '.join(map(str, p['n_cases']))} | "
                     f"**{_pct(p['dice_mean'])}**; {per} | "
                     + " / ".join(C.fmt_num(p["volume_ratio_mean"].get(c), nd=2) for c in classes) + " | "
                     + " / ".join(C.fmt_num(p["precision_mean"].get(c), nd=2) for c in classes) + " |")
    return lines + [""]


def render_control(ctx: dict) -> List[str]:
    """Each SSL row against labeled-only at twice the iterations, paired by seed (empty without such a row)."""
    rows = [t for t in ctx["trainers"] if t.get("vs_control")]
    if not rows:
        return []
    lines = ["Against the compute control: the trainer's Dice minus that of labeled-only nnU-Net trained for twice the "
             "iterations *with the same seed* (an SSL step costs more than a labeled-only one: results/overhead.md), "
             "over the seeds both have, beside its Δ vs labeled-only on those same seeds. A gain over labeled-only "
             "that the control matches is more optimisation, not the unlabeled images.", "",
             "| trainer | seeds | Δ vs labeled-only 2x: mean [min, max] | wins | Δ vs labeled-only, same seeds |",
             "|---|---|---|---|---|"]
    for t in rows:
        v = t["vs_control"]
        d = {s: t["delta"]["per_seed"][s] for s in v["seeds"] if s in t["delta"]["per_seed"]}
        lo = paired(d, dict.fromkeys(d, 0.0))
        few = FEW if v["n"] < MIN_SEEDS else ""
        lines.append(f"| {t['name']} | {', '.join(map(str, v['seeds']))}{few} | {_range(v)} | {v['wins']}/{v['n']} | "
                     f"{_range(lo)} |")
    return lines + [""]


def _range(p: dict) -> str:
    """A paired difference as ``mean [min, max]`` in points (the mean alone for one seed, ``-`` for none)."""
    if not p["n"]:
        return "-"
    if p["n"] == 1:
        return _pct(p["mean"], True)
    return f"{_pct(p['mean'], True)} [{_pct(p['min'], True)}, {_pct(p['max'], True)}]"


def render_markdown(summary: dict, png_name: Optional[str]) -> str:
    classes = summary["classes"]
    lines = [f"# {summary['title']}: budget `{summary['budget']}`, summary over training seeds", "",
             "Generated by `benchmarks/summarize.py` from the per-seed tables " +
             ", ".join(f"`{s['file']}` ({_seeds_text(s['seeds'])})" for s in summary["sources"]) +
             "; regenerated after every benchmark run. Do not edit by hand.", "",
             "One row per trainer over the training seeds it was run with; every run: the same data, plans and "
             "budget, the final checkpoint, no model selection on the test set. Dice in % (mean over the test "
             "volumes and the foreground classes), mean ± sample SD over seeds. **Δ**: the trainer's Dice minus "
             "labeled-only nnU-Net's *of the same seed* (paired), mean [min, max] over the seeds both have; **wins**: "
             "seeds with Δ > 0. HD95: mean over seeds. Volume: predicted / true volume per class (voxels pooled over "
             "the test volumes), mean over seeds: > 1 over-, < 1 under-segmentation. Train time: mean wall time of "
             "the training (self-training: teacher, pseudo-labels and student). "
             f"{FEW} fewer than {summary['min_seeds']} seeds: single draws, no evidence of a gain or a loss "
             "(changing only the seed moved labeled-only ACDC by 5.3 points).", ""]
    if not summary["contexts"]:
        lines += ["No finished runs yet.", ""]
    if summary["contexts"] and summary["contexts"][0]["status"] != "current":
        lines += [f"**No current rows**: every row below was made with data that differ from the data folder now "
                  f"({STALE}); rerun labeled-only, the upper bound and the trainers to get current numbers.", ""]
    for ctx in summary["contexts"]:
        stale = ctx["status"] != "current"
        c = ctx["context"]
        head = f"## {STALE} Stale: " if stale else "## Current: "
        lines += [head + c.get("description", "?"), ""]
        if stale:
            lines += [f"{STALE} Not paired with any other set. Why stale: " + "; ".join(ctx["stale_reasons"]) + ".",
                      ""]
        elif ctx.get("disk_check"):
            lines += [f"Data folder: {ctx['disk_check']}.", ""]
        lines += render_table(ctx, classes, STALE if stale else "")
        lines += ["", "Per seed: mean Dice % (Δ vs that seed's labeled-only):", ""] + render_per_seed(ctx) + [""]
        lines += render_control(ctx)
        lines += render_pool(ctx, classes)
        if ctx is summary["contexts"][0] and png_name:
            lines += [f"Plot: [`{png_name}`]({png_name}) (this set).", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------
# the plot
# ----------------------------------------------------------------------------------------------------------------

def plot(summary: dict, path: Path) -> bool:
    """Dice per seed and trainer (top), paired Δ per seed (bottom) of the first (current, else newest) set; False
    when there is nothing to plot."""
    if not summary["contexts"]:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ctx = summary["contexts"][0]
    trainers = ctx["trainers"]
    seeds = sorted({s for t in trainers for s in t["seeds"]})
    colors = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    offset = {s: (i - (len(seeds) - 1) / 2) * 0.12 for i, s in enumerate(seeds)}
    n = len(trainers)
    fig = Figure(figsize=(max(10.0, 0.85 * n + 5.0), 9.0), layout="constrained")  # + the legend on the right
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    by_key = {t["key"]: t for t in trainers}
    for i, t in enumerate(trainers):
        for s, d in t["dice"].items():
            top.scatter(i + offset[s], 100 * d, color=colors[s], s=46, zorder=3, edgecolor="black", linewidth=0.4)
        if t["dice_mean"] is not None:
            top.hlines(100 * t["dice_mean"], i - 0.3, i + 0.3, color="black", linewidth=1.6, zorder=2)
        dl = t.get("delta")
        if dl and dl["n"] and t["key"] != C.UPPER:
            for s, d in dl["per_seed"].items():
                bottom.scatter(i + offset[s], 100 * d, color=colors[s], s=46, zorder=3, edgecolor="black",
                               linewidth=0.4)
            bottom.hlines(100 * dl["mean"], i - 0.3, i + 0.3, color="black", linewidth=1.6, zorder=2)
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[s], markeredgecolor="black",
                      label=f"seed {s}") for s in seeds]
    handles.append(Line2D([], [], color="black", linewidth=1.6, label="mean over seeds"))
    for key, style, label in ((C.LABELED_ONLY, "--", "labeled-only mean"), (C.UPPER, "-.", "upper bound mean "
                                                                                            "(all labeled)")):
        m = (by_key.get(key) or {}).get("dice_mean")
        if m is not None:
            line = top.axhline(100 * m, color="tab:gray" if key == C.LABELED_ONLY else "tab:green", linestyle=style,
                               linewidth=1.3, zorder=1, label=f"{label}: {100 * m:.1f}")
            handles.append(line)
    bottom.axhline(0, color="tab:gray", linestyle="--", linewidth=1.3, zorder=1)
    top.set_ylabel("mean Dice (%)", fontsize=12)
    bottom.set_ylabel("Δ Dice vs labeled-only\nof the same seed (points)", fontsize=12)
    labels = [t["name"] + (f"\n(n={t['n']})" if t["few_seeds"] else "") for t in trainers]
    bottom.set_xticks(range(n), labels, rotation=40, ha="right", rotation_mode="anchor", fontsize=11)
    for ax in (top, bottom):
        ax.tick_params(axis="y", labelsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.6, n - 0.4)
    top.legend(handles=handles, fontsize=10, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over a dot
    c = ctx["context"]
    names = ", ".join(str(x).replace("patient", "") for x in (c.get("labeled") or []))
    labeled = f"{len(c.get('labeled') or [])} labeled" + (f" ({names})" if len(names) <= 40 else "")
    sub = (f"budget {summary['budget']}: {labeled}, {c.get('num_unlabeled')} "
           f"unlabeled / {c.get('num_test')} test cases, {c.get('configuration')}, {c.get('total_iterations')} "
           f"iterations, final checkpoint")
    stale = "" if ctx["status"] == "current" else f"\n{STALE} STALE: " + "; ".join(ctx["stale_reasons"])[:150]
    fig.suptitle(f"{summary['title']}\n{sub}{stale}", fontsize=11)
    bottom.set_title(f"paired differences (upper bound left out); (n=k): fewer than {summary['min_seeds']} seeds",
                     fontsize=10)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return True


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------

def load_spec(name: Optional[str]):
    """The benchmark script's ``SPEC`` (classes, data folder, labeled selection), or None for an unknown name."""
    if not name:
        return None
    try:
        return importlib.import_module(name).SPEC
    except (ImportError, AttributeError):
        return None


def write_summary(spec, root: Path, stem: str, data_dir: Optional[str] = None) -> Optional[Path]:
    """Write ``root/<stem>_summary.md`` / ``.json`` / ``.png`` from the per-seed tables of ``stem``; the Markdown's
    path (None when no per-seed table exists)."""
    root = Path(root)
    paths = seed_files(root, stem)
    if not paths:
        return None
    files = [(str(p.relative_to(root)), json.loads(p.read_text())) for p in paths]
    if spec is None:
        spec = load_spec(files[0][1].get("benchmark"))
    summary = build_summary(files, spec, data_dir, stem)
    base = root / f"{stem}{SUMMARY}"
    png = base.with_suffix(".png")
    drawn = plot(summary, png)
    summary["plot"] = png.name if drawn else None
    C.write_json_atomic(base.with_suffix(".json"), summary)
    C.write_text_atomic(base.with_suffix(".md"), render_markdown(summary, png.name if drawn else None))
    return base.with_suffix(".md")


def benchmark_names() -> List[str]:
    """The real-data benchmark scripts (``ssl_*.py``), longest first so that a stem finds its own."""
    return sorted((p.stem for p in C.BENCH_DIR.glob("ssl_*.py")), key=len, reverse=True)


def find_stems(root: Path) -> List[str]:
    """Stems of the benchmark tables (``<name>_<budget>[_<selection>]``) in ``root`` and its ``seed<S>`` folders."""
    pat = re.compile(rf"^({'|'.join(map(re.escape, benchmark_names()))})_[a-z]+(_.+)?$")
    stems = {p.stem for d in [root, *root.glob("seed*")] for p in d.glob("*.json")}
    return sorted(s for s in stems if pat.match(s) and not s.endswith(SUMMARY))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stems", nargs="*", help="tables to summarise, e.g. ssl_acdc_cpu (default: every one found)")
    p.add_argument("--results-dir", default=str(C.RESULTS_DIR),
                   help=f"the seed-0 folder, with seed<S>/ below it (default {C.RESULTS_DIR})")
    p.add_argument("--data", default=None,
                   help="data root holding ACDC/ and LA/ for the freshness check (default: $NNUNET_SSL_DATA or "
                        "<repo>/../shared/data)")
    args = p.parse_args(argv)
    root = Path(args.results_dir)
    stems = args.stems or find_stems(root)
    if not stems:
        print(f"summarize: no benchmark tables in {root}", file=sys.stderr)
        return 1
    rc = 0
    for stem in stems:
        spec = load_spec(next((n for n in benchmark_names() if stem.startswith(n + "_")), None))
        data_dir = str(Path(args.data) / spec.data_subfolder) if args.data and spec is not None else None
        out = write_summary(spec, root, stem, data_dir)
        if out is None:
            print(f"summarize: no table {stem}.json in {root} or its seed<S>/ folders", file=sys.stderr)
            rc = 1
            continue
        print(f"wrote {out} (+ .json, .png)", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
