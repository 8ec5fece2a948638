#!/usr/bin/env python
"""Issue 18's rule for the default of the ``nnUNetTrainerMetaSSL*`` trainers, applied to the seed summaries.

    python benchmarks/metassl_default.py                       # ssl_acdc_cpu + ssl_la_cpu summaries in results/
    python benchmarks/metassl_default.py --min-seeds 2 --results-dir benchmarks/results/smoke

Input: ``<results>/<stem>_summary.json`` of each benchmark (written by ``summarize.py`` after every run); only the
current data set of each (the stale ones are other data). A MetaSSL candidate (``nnUNetTrainerMetaSSL<Base>[_mode]``)
meets the bar when, on **every** benchmark:

- it has at least ``--min-seeds`` training seeds (3: the project's evidence rule);
- its pooled predicted / true test volume of every class, mean over seeds, is within [0.8, 1.25];
- its mean paired Dice difference to labeled-only nnU-Net of the same seed is >= 0;
- that mean is not below its base method's (Mean Teacher, FixMatch, CPS, BCP) by more than 1 Dice point, both
  paired over the seeds the candidate, the base and labeled-only all have.

Per family (the base method), the chosen default is the candidate that meets the bar with the highest mean Δ over the
benchmarks; when none does, the best by that mean among the candidates with enough seeds on every benchmark is named
(issue 18: "keep the best"), and every failed check is listed. Labeled-only's own
volume check is printed beside it: at 3 labeled ACDC patients and the CPU budget labeled-only nnU-Net under-segments
the RV (0.58), so a candidate can fail the volume bar on a class the baseline fails too.

Output: ``<results>/metassl_default.md`` + ``.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import summarize as S  # noqa: E402

VOLUME_BAND = (0.8, 1.25)
MAX_BELOW_BASE = 0.01  # Dice as a fraction: 1 point
PREFIX = "nnUNetTrainerMetaSSL"
#: MetaSSL on <suffix> -> the base method's trainer
BASES = {"": "nnUNetTrainerMeanTeacher", "FixMatch": "nnUNetTrainerFixMatch", "CPS": "nnUNetTrainerCPS",
         "BCP": "nnUNetTrainerBCP"}
DEFAULT_STEMS = ("ssl_acdc_cpu", "ssl_la_cpu")


def family(key: str) -> Optional[str]:
    """The base-method suffix of a MetaSSL trainer (``""`` for Mean Teacher), None for any other trainer."""
    if not key.startswith(PREFIX):
        return None
    fam = key[len(PREFIX):].split("_", 1)[0]
    return fam if fam in BASES else None


def current_rows(summary: dict) -> Dict[str, dict]:
    """The trainers of the summary's current data set by key (empty when every set is stale)."""
    ctx = next((c for c in summary["contexts"] if c["status"] == "current"), None)
    return {t["key"]: t for t in ctx["trainers"]} if ctx else {}


def volume_failures(row: dict) -> List[str]:
    lo, hi = VOLUME_BAND
    return [f"{c} volume {v:.2f}" for c, v in (row.get("volume_ratio_mean") or {}).items()
            if v is not None and not lo <= v <= hi]


def _by_seed(row: Optional[dict]) -> Dict[int, float]:
    """A summary row's per-seed mean Dice with int seeds (the JSON keys are strings); {} for a missing row."""
    return {int(s): v for s, v in ((row or {}).get("dice") or {}).items()}


def check(key: str, rows: Dict[str, dict], min_seeds: int) -> dict:
    """One benchmark's verdict on one candidate: its paired Δ, its base method's over the same seeds, and the
    reasons it fails (empty: it meets the bar here)."""
    base_key = BASES[family(key)]
    cand, base, lab = rows.get(key), rows.get(base_key), rows.get(C.LABELED_ONLY)
    if cand is None:
        return {"n": 0, "fails": ["no run on the current data"]}
    lab_dice, cand_dice, base_dice = _by_seed(lab), _by_seed(cand), _by_seed(base)
    delta = S.paired(cand_dice, lab_dice)
    out = {"n": delta["n"], "delta": delta, "volume": cand.get("volume_ratio_mean"), "fails": []}
    if delta["n"] < min_seeds:
        out["fails"].append(f"{delta['n']} paired seed(s) < {min_seeds}")
    out["fails"] += volume_failures(cand)
    if delta["mean"] is not None and delta["mean"] < 0:
        out["fails"].append(f"mean Δ {100 * delta['mean']:+.1f} < 0")
    common = sorted(set(cand_dice) & set(base_dice) & set(lab_dice))
    if not common:
        out["fails"].append(f"no seed shared with {S.short_name(base_key)}")
        return out
    d_c = S.paired({s: cand_dice[s] for s in common}, lab_dice)["mean"]
    d_b = S.paired({s: base_dice[s] for s in common}, lab_dice)["mean"]
    out["vs_base"] = {"base": base_key, "seeds": common, "delta": d_c, "base_delta": d_b}
    if d_c < d_b - MAX_BELOW_BASE:
        out["fails"].append(f"Δ {100 * d_c:+.1f} below {S.short_name(base_key)}'s {100 * d_b:+.1f} "
                            f"by more than 1 (seeds {', '.join(map(str, common))})")
    return out


def decide(summaries: Dict[str, dict], min_seeds: int = S.MIN_SEEDS) -> dict:
    """Verdicts of every MetaSSL candidate found in any summary, and per family the chosen default."""
    rows = {stem: current_rows(s) for stem, s in summaries.items()}
    keys = sorted({k for r in rows.values() for k in r if family(k) is not None})
    cands = {}
    for k in keys:
        per = {stem: check(k, r, min_seeds) for stem, r in rows.items()}
        means = [v["delta"]["mean"] for v in per.values() if v.get("delta") and v["delta"]["mean"] is not None]
        cands[k] = {"family": family(k), "per_benchmark": per, "meets_bar": not any(v["fails"] for v in per.values()),
                    "mean_delta_over_benchmarks": S.mean(means) if len(means) == len(per) else None}
    choice = {}
    for fam in sorted({c["family"] for c in cands.values()}):
        members = {k: c for k, c in cands.items() if c["family"] == fam}
        # a default is never picked from fewer seeds than the bar asks for, even as the best of the failing ones
        seeded = [k for k, c in members.items() if c["mean_delta_over_benchmarks"] is not None
                  and all(v["n"] >= min_seeds for v in c["per_benchmark"].values())]
        ranked = sorted(seeded, key=lambda k: -members[k]["mean_delta_over_benchmarks"])
        passing = [k for k in ranked if members[k]["meets_bar"]]
        choice[fam or "MeanTeacher"] = {"default": passing[0] if passing else None,
                                        "best_if_none_passes": None if passing else (ranked[0] if ranked else None)}
    baseline = {stem: volume_failures(r[C.LABELED_ONLY]) if C.LABELED_ONLY in r else ["no run"]
                for stem, r in rows.items()}
    return {"min_seeds": min_seeds, "volume_band": VOLUME_BAND, "benchmarks": list(summaries),
            "candidates": cands, "choice": choice, "labeled_only_volume_failures": baseline}


def render(dec: dict) -> str:
    stems = dec["benchmarks"]
    lo, hi = dec["volume_band"]
    lines = ["# Default of the MetaSSL trainers: issue 18's rule on the seed summaries", "",
             f"Generated by `benchmarks/metassl_default.py` from {', '.join(f'`{s}_summary.json`' for s in stems)} "
             f"(current data sets). Do not edit by hand. A candidate meets the bar when on every benchmark it has "
             f">= {dec['min_seeds']} seeds, every class's test volume ratio is within [{lo}, {hi}], its mean paired "
             "Δ vs labeled-only is >= 0, and that Δ is not more than 1 point below its base method's on the same "
             "seeds.", "",
             "| candidate | " + " | ".join(f"{s}: n, Δ mean [min, max], volume" for s in stems) + " | verdict |",
             "|---|" + "---|" * len(stems) + "---|"]
    for k, c in dec["candidates"].items():
        cells = []
        for s in stems:
            v = c["per_benchmark"][s]
            if not v.get("delta"):
                cells.append("no run")
                continue
            d = v["delta"]
            vol = " / ".join(f"{x:.2f}" for x in (v["volume"] or {}).values())
            cells.append(f"{v['n']}, {S._pct(d['mean'], True)} [{S._pct(d['min'], True)}, "
                         f"{S._pct(d['max'], True)}], {vol}")
        fails = [f"{s}: {', '.join(c['per_benchmark'][s]['fails'])}" for s in stems if c["per_benchmark"][s]["fails"]]
        verdict = "**meets the bar**" if c["meets_bar"] else "fails. " + "; ".join(fails)
        lines.append(f"| `{S.short_name(k)}` | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "Chosen default per base method:", ""]
    for fam, ch in dec["choice"].items():
        if ch["default"]:
            lines.append(f"- {fam}: `{ch['default']}` meets the bar.")
        elif ch["best_if_none_passes"]:
            lines.append(f"- {fam}: no candidate meets the bar; the best by mean Δ over the benchmarks, of those "
                         f"with >= {dec['min_seeds']} seeds on every benchmark: `{ch['best_if_none_passes']}`.")
        else:
            lines.append(f"- {fam}: no candidate meets the bar, and none has >= {dec['min_seeds']} seeds on every "
                         "benchmark: nothing to choose from yet.")
    lines += ["", "Labeled-only nnU-Net against the same volume band (the baseline's own bias at this budget): "
              + "; ".join(f"{s}: {', '.join(f) or 'within the band'}"
                          for s, f in dec["labeled_only_volume_failures"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stems", nargs="*", default=list(DEFAULT_STEMS), help="benchmark stems (default: %(default)s)")
    p.add_argument("--results-dir", default=str(C.RESULTS_DIR))
    p.add_argument("--min-seeds", type=int, default=S.MIN_SEEDS)
    args = p.parse_args(argv)
    root = Path(args.results_dir)
    summaries = {}
    for stem in args.stems:
        path = root / f"{stem}{S.SUMMARY}.json"
        if not path.is_file():
            print(f"metassl_default: {path} not found; run benchmarks/summarize.py {stem} first", file=sys.stderr)
            return 1
        summaries[stem] = json.loads(path.read_text())
    dec = decide(summaries, args.min_seeds)
    C.write_json_atomic(root / "metassl_default.json", dec)
    text = render(dec)
    C.write_text_atomic(root / "metassl_default.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
