#!/usr/bin/env python
"""Where a model's extra foreground is: in slices that hold no foreground at all, or beside the true structures.

    python benchmarks/error_slices.py PRED_DIR REF_DIR [PRED_DIR2 ...] [--labels RV=1 Myo=2 LV=3]

For every class, summed over the cases (slices = the first array axis, nnU-Net's z), as fractions of the class's true
volume: ``outside`` = predicted voxels in slices whose reference has no foreground of any class (a 2D model's
stray blobs above or below the organ, which a per-slice largest-component filter cannot remove), ``fp_inside`` =
false positives in slices that do hold foreground, split into ``on background`` (voxels that are background in the
truth) and ``on other classes`` (confusion with another structure), and ``recall``. An over-segmenting model with
``fp_inside`` >> ``outside`` puts its extra foreground into the slices of the organ, not into empty ones. Prints a
Markdown table; writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List


def class_labels(ref_dir: Path, given: List[str]) -> Dict[str, int]:
    if given:
        try:
            return {k: int(v) for k, v in (g.split("=", 1) for g in given)}
        except ValueError:
            sys.exit(f"error: --labels takes NAME=VALUE pairs (e.g. LV=3), got {given}")
    dj = ref_dir.parent / "dataset.json"
    if not dj.is_file():
        sys.exit(f"error: no {dj} to read the labels from; pass --labels NAME=VALUE ...")
    labels = json.loads(dj.read_text())["labels"]
    return {k: int(v) for k, v in labels.items() if k != "background" and not isinstance(v, list) and int(v) > 0}


def error_slices(pred_dir: Path, ref_dir: Path, labels: Dict[str, int]) -> Dict[str, Dict[str, float]]:
    import numpy as np
    import SimpleITK as sitk

    preds = sorted(p for p in pred_dir.glob("*.nii.gz"))
    if not preds:
        sys.exit(f"error: no .nii.gz predictions in {pred_dir}")
    sums = {k: np.zeros(5) for k in labels}  # outside, inside, true volume, true positives, on other classes
    for p in preds:
        r_file = ref_dir / p.name
        if not r_file.is_file():
            sys.exit(f"error: {p.name} has no reference in {ref_dir}")
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(r_file)))
        if pred.shape != ref.shape:
            sys.exit(f"error: {p.name}: prediction shape {pred.shape} != reference shape {ref.shape}")
        heart = (ref > 0).reshape(ref.shape[0], -1).any(1)
        for k, v in labels.items():
            pk, rk = pred == v, ref == v
            sums[k] += [pk[~heart].sum(), pk[heart].sum(), rk.sum(), (pk & rk).sum(), (pk & (ref > 0) & ~rk).sum()]
    out = {}
    for k, (outside, inside, true, tp, other) in sums.items():
        t = max(true, 1)
        out[k] = {"outside": outside / t, "fp_inside": (inside - tp) / t, "fp_background": (inside - tp - other) / t,
                  "fp_other_classes": other / t, "recall": tp / t, "volume": (outside + inside) / t}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="PRED_DIR ... REF_DIR (the last folder holds the references)")
    p.add_argument("--labels", nargs="*", default=None, help="NAME=VALUE pairs (default: REF_DIR/../dataset.json)")
    a = p.parse_args(argv)
    if len(a.folders) < 2:
        p.error("give at least one prediction folder and the reference folder")
    ref = Path(a.folders[-1])
    labels = class_labels(ref, a.labels or [])
    print("| predictions | class | volume | outside (empty slices) | fp_inside | on background | on other classes | "
          "recall |\n|---|---|---|---|---|---|---|---|")
    for d in a.folders[:-1]:
        for k, m in error_slices(Path(d), ref, labels).items():
            print(f"| {d} | {k} | {m['volume']:.2f} | {m['outside']:.3f} | {m['fp_inside']:.3f} | "
                  f"{m['fp_background']:.3f} | {m['fp_other_classes']:.3f} | {m['recall']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
