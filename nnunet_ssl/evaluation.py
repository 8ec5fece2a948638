"""Dice, HD95 and ASD per class: per case and mean, for a folder of predictions against reference labels.

``nnunet_ssl evaluate PRED_FOLDER REF_FOLDER`` (REF_FOLDER is typically ``labelsTs/``) writes
``PRED_FOLDER/summary_ssl.json`` and prints a table. Distances are given in mm (with the reference image's spacing)
and in voxels (no spacing), because the semi-supervised literature's tables (SSL4MIS, UA-MT, SASSNet, DTC, BCP...)
call ``medpy.metric.binary.hd95(pred, gt)`` / ``asd(pred, gt)`` without spacing.

Definitions -- identical to ``medpy.metric.binary`` (0.5.x), computed with the same scipy.ndimage primitives
(``generate_binary_structure``, ``binary_erosion``, ``distance_transform_edt``), so no extra dependency:

- surface of a mask A: ``A XOR binary_erosion(A, generate_binary_structure(ndim, 1))``, i.e. erosion with the
  face-connected ("connectivity 1": 6-neighbourhood in 3D, 4 in 2D) structuring element and border value 0, so
  mask voxels on the array edge are surface voxels.
- directed surface distances d(A -> B): for every surface voxel of A, the Euclidean distance to the nearest
  surface voxel of B (``distance_transform_edt(~surface(B), sampling=spacing)``).
- ``hd95(A, B)``: the 95th percentile (numpy's default linear interpolation) of d(A -> B) and d(B -> A) pooled.
- ``asd(A, B)``: the mean of d(A -> B): directed, from the prediction (result) to the reference, like medpy.
- ``assd(A, B)``: the mean of the pooled distances of both directions (symmetric; medpy 0.5 ``assd``; medpy 0.4
  averaged the two directed means instead). Not used by the tables; provided for completeness.
- ``dice(A, B)`` = 2 |A and B| / (|A| + |B|).

Empty masks (medpy raises an exception for distances on an empty mask; SSL4MIS-style scripts then return
Dice 0 and HD95 0 for an empty prediction, which rewards a missed structure). Our convention, counted per class:

==========================  =========  ===============  ==========================
case                        Dice       HD95 / ASD       counted as
==========================  =========  ===============  ==========================
both empty                  NaN        NaN              ``n_both_empty``
prediction empty only       0.0        NaN              ``n_empty_prediction``
reference empty only        0.0        NaN              ``n_empty_reference``
==========================  =========  ===============  ==========================

Means skip NaN; the counts say how many cases a mean rests on (``n_valid_<metric>``). In the JSON file NaN is
written as ``null``.

Voxel counts pooled over all cases, per class (they tell *how* a Dice is lost: a model that over-segments has a
volume ratio above 1 and low precision, one that under-segments a ratio below 1 and low recall):

- ``volume_ratio`` = sum of predicted voxels / sum of reference voxels,
- ``precision`` = sum of true-positive voxels / sum of predicted voxels,
- ``recall`` = sum of true-positive voxels / sum of reference voxels,

NaN where the denominator is 0. Pooling weights each case by its size, like the volume a clinician reads off;
per-case ratios are in ``per_case`` (``n_pred``, ``n_ref``, ``n_tp``).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

LabelSpec = Union[int, Tuple[int, ...]]
METRICS = ("Dice", "HD95_mm", "ASD_mm", "HD95_vox", "ASD_vox")
POOLED = ("volume_ratio", "precision", "recall")
KNOWN_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".tiff", ".tif", ".png", ".bmp")


class EvaluationError(Exception):
    """Bad input to the evaluation (missing files, shape mismatch...); the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# Metrics on numpy masks
# --------------------------------------------------------------------------------------------------------------

def _crop_box(a: np.ndarray, b: np.ndarray) -> Tuple[slice, ...]:
    """Bounding box of ``a | b`` grown by one voxel (clipped to the array).

    Surface distances inside this box equal those on the full array: every surface voxel is inside it, and the
    one-voxel margin is background, so erosion with border value 0 sees the same neighbours as on the full array.
    """
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray, connectivity: int) -> np.ndarray:
    footprint = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def _check_spacing(spacing: Optional[Sequence[float]], ndim: int) -> Optional[Tuple[float, ...]]:
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)))
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    return spacing


def directed_surface_distances(result: np.ndarray, reference: np.ndarray, spacing: Optional[Sequence[float]] = None,
                               connectivity: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Surface distances result -> reference and reference -> result (medpy's ``__surface_distances``, both ways).

    Args:
        result, reference: boolean masks of the same shape, any number of axes (e.g. (z, y, x)).
        spacing: voxel size along each array axis in the array's own order (e.g. (z, y, x) mm); None = voxels.
        connectivity: of the erosion that defines the surface (1 = face neighbours, as medpy's default).

    Returns:
        (d_result_to_reference, d_reference_to_result): 1D float arrays, one entry per surface voxel.
        Both are empty when either mask is empty.
    """
    a = np.asarray(result, dtype=bool)
    b = np.asarray(reference, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: result {a.shape} vs reference {b.shape}")
    spacing = _check_spacing(spacing, a.ndim)
    if not a.any() or not b.any():
        return np.zeros(0), np.zeros(0)
    box = _crop_box(a, b)
    a, b = a[box], b[box]
    sa, sb = _surface(a, connectivity), _surface(b, connectivity)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return d_ab, d_ba


def dice(result: np.ndarray, reference: np.ndarray) -> float:
    """2 |A and B| / (|A| + |B|); NaN when both masks are empty (see module docstring)."""
    a = np.asarray(result, dtype=bool)
    b = np.asarray(reference, dtype=bool)
    denom = int(a.sum()) + int(b.sum())
    return float("nan") if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def hd95(result: np.ndarray, reference: np.ndarray, spacing: Optional[Sequence[float]] = None,
         connectivity: int = 1) -> float:
    """95th percentile of the pooled directed surface distances (medpy ``hd95``); NaN if either mask is empty."""
    d_ab, d_ba = directed_surface_distances(result, reference, spacing, connectivity)
    return float(np.percentile(np.hstack((d_ab, d_ba)), 95)) if d_ab.size else float("nan")


def asd(result: np.ndarray, reference: np.ndarray, spacing: Optional[Sequence[float]] = None,
        connectivity: int = 1) -> float:
    """Mean distance from the result's surface to the reference's (medpy ``asd``, directed); NaN if empty."""
    d_ab, _ = directed_surface_distances(result, reference, spacing, connectivity)
    return float(d_ab.mean()) if d_ab.size else float("nan")


def assd(result: np.ndarray, reference: np.ndarray, spacing: Optional[Sequence[float]] = None,
         connectivity: int = 1) -> float:
    """Mean of the pooled directed surface distances (medpy 0.5 ``assd``, symmetric); NaN if either is empty."""
    d_ab, d_ba = directed_surface_distances(result, reference, spacing, connectivity)
    return float(np.hstack((d_ab, d_ba)).mean()) if d_ab.size else float("nan")


def _mask(seg: np.ndarray, label: LabelSpec) -> np.ndarray:
    return np.isin(seg, label) if isinstance(label, (tuple, list)) else seg == label


def case_metrics(prediction: np.ndarray, reference: np.ndarray, labels: Mapping[str, LabelSpec],
                 spacing: Optional[Sequence[float]] = None) -> Dict[str, Dict[str, object]]:
    """All metrics of one case for every class.

    Args:
        prediction, reference: integer label maps of the same shape, e.g. (z, y, x).
        labels: class name -> label value (or tuple of values: a region, scored as their union).
        spacing: voxel size per array axis (mm); None gives mm columns equal to the voxel ones.

    Returns:
        class name -> {Dice, HD95_mm, ASD_mm, HD95_vox, ASD_vox, n_pred, n_ref, n_tp, empty}: voxel counts of the
        prediction, the reference and their overlap; ``empty`` one of ``none``, ``prediction``, ``reference``,
        ``both``.
    """
    if prediction.shape != reference.shape:
        raise EvaluationError(f"shape mismatch: prediction {prediction.shape} vs reference {reference.shape}")
    out = {}
    for name, label in labels.items():
        p, r = _mask(prediction, label), _mask(reference, label)
        n_p, n_r = int(p.sum()), int(r.sum())
        m = {"Dice": dice(p, r), "n_pred": n_p, "n_ref": n_r, "n_tp": int(np.count_nonzero(p & r)),
             "empty": "both" if n_p == n_r == 0 else "prediction" if n_p == 0 else "reference" if n_r == 0 else "none"}
        if n_p and n_r:
            for unit, sp in (("mm", spacing), ("vox", None)):
                d_ab, d_ba = directed_surface_distances(p, r, sp)
                m[f"HD95_{unit}"] = float(np.percentile(np.hstack((d_ab, d_ba)), 95))
                m[f"ASD_{unit}"] = float(d_ab.mean())
        else:
            m.update({k: float("nan") for k in METRICS[1:]})
        out[name] = {k: m[k] for k in METRICS + ("n_pred", "n_ref", "n_tp", "empty")}
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(per_case: Sequence[Mapping], labels: Mapping[str, LabelSpec]) -> Dict[str, dict]:
    """Mean (over cases, NaN skipped) of every metric per class, the counts, the pooled voxel ratios
    (``volume_ratio``, ``precision``, ``recall``; see the module docstring) and the mean over classes."""
    mean: Dict[str, dict] = {}
    for name in labels:
        rows = [c["metrics"][name] for c in per_case]
        entry = {}
        for k in METRICS:
            vals = np.array([r[k] for r in rows], dtype=float)
            ok = ~np.isnan(vals)
            entry[k] = float(vals[ok].mean()) if ok.any() else float("nan")
            entry[f"n_valid_{k}"] = int(ok.sum())
        entry["n_cases"] = len(rows)
        for e in ("prediction", "reference", "both"):
            entry[f"n_empty_{e}" if e != "both" else "n_both_empty"] = sum(r["empty"] == e for r in rows)
        n_pred, n_ref, n_tp = (sum(r[k] for r in rows) for k in ("n_pred", "n_ref", "n_tp"))
        entry.update(n_pred=n_pred, n_ref=n_ref, n_tp=n_tp, volume_ratio=_ratio(n_pred, n_ref),
                     precision=_ratio(n_tp, n_pred), recall=_ratio(n_tp, n_ref))
        mean[name] = entry
    over_classes = {}
    for k in METRICS:
        vals = np.array([mean[n][k] for n in labels], dtype=float)
        over_classes[k] = float(np.nanmean(vals)) if (~np.isnan(vals)).any() else float("nan")
    return {"per_class": mean, "mean_over_classes": over_classes}


# --------------------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------------------

def _find_dataset_json(dataset_json: Optional[Union[str, Path]], pred_folder: Path, ref_folder: Path):
    if dataset_json is not None:
        p = Path(dataset_json)
        if not p.is_file():
            raise EvaluationError(f"--dataset-json {p} does not exist")
        return json.loads(p.read_text()), p
    for p in (pred_folder / "dataset.json", ref_folder.parent / "dataset.json"):
        if p.is_file():
            return json.loads(p.read_text()), p
    return None, None


def _infer_ending(folder: Path) -> str:
    counts: Dict[str, int] = {}
    for f in folder.iterdir():
        for e in KNOWN_ENDINGS:
            if f.name.endswith(e) and not f.name.startswith("."):
                counts[e] = counts.get(e, 0) + 1
                break
    if not counts:
        raise EvaluationError(f"{folder} holds no image files; pass --file-ending or --dataset-json")
    return max(counts, key=counts.get)


def _resolve_labels(labels, dj: Optional[dict]) -> Optional[Dict[str, LabelSpec]]:
    """class name -> value(s). From ``labels`` (ints, tuples or a dict) else dataset.json's foreground labels."""
    names = {}
    if dj is not None:
        for name, v in dj.get("labels", {}).items():
            if name == "ignore":
                continue
            v = tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else int(v)
            if v not in (0, (0,)):
                names[v] = name
    if labels is None:
        return {n: v for v, n in names.items()} or None
    if isinstance(labels, Mapping):
        return dict(labels)
    out = {}
    for v in labels:
        v = tuple(int(i) for i in v) if isinstance(v, (list, tuple)) and len(v) > 1 else \
            int(v[0] if isinstance(v, (list, tuple)) else v)
        out[names.get(v, f"label_{'_'.join(map(str, v)) if isinstance(v, tuple) else v}")] = v
    return out


def _squeeze(seg: np.ndarray, spacing: Sequence[float]) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Drop nnU-Net's channel axis and any singleton axis (2D images come as (1, 1, y, x) with spacing 999)."""
    seg = seg[0]
    keep = [i for i, s in enumerate(seg.shape) if s > 1]
    return seg.reshape([seg.shape[i] for i in keep]), tuple(float(spacing[i]) for i in keep)


def _evaluate_case(args) -> dict:
    pred_file, ref_file, reader_class, labels = args
    try:
        ref, ref_props = reader_class().read_seg(str(ref_file))
        pred, pred_props = reader_class().read_seg(str(pred_file))
    except Exception as e:  # noqa: BLE001 - readers raise anything; the user needs the file name
        raise EvaluationError(f"cannot read {pred_file} or {ref_file}: {e}") from None
    if pred.shape != ref.shape:
        raise EvaluationError(f"shape mismatch: prediction {pred_file} {pred.shape[1:]} vs reference {ref_file} "
                              f"{ref.shape[1:]}")
    if not np.allclose(pred_props["spacing"], ref_props["spacing"], rtol=1e-3, atol=1e-4):
        print(f"warning: spacing of {pred_file} {pred_props['spacing']} differs from the reference's "
              f"{ref_props['spacing']}; using the reference's", file=sys.stderr)
    ref_arr, spacing = _squeeze(ref, ref_props["spacing"])
    pred_arr, _ = _squeeze(pred, ref_props["spacing"])
    return {"case": Path(ref_file).name, "prediction_file": str(pred_file), "reference_file": str(ref_file),
            "shape": list(ref_arr.shape), "spacing": list(spacing),
            "metrics": case_metrics(pred_arr.astype(np.int32), ref_arr.astype(np.int32), labels, spacing)}


def nan_to_none(obj):
    """NaN -> None recursively through dicts, lists and tuples (JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


def evaluate_folder(pred_folder: Union[str, Path], ref_folder: Union[str, Path],
                    labels: Optional[Union[Sequence, Mapping[str, LabelSpec]]] = None,
                    file_ending: Optional[str] = None, dataset_json: Optional[Union[str, Path]] = None,
                    output_file: Optional[Union[str, Path]] = None, num_processes: int = 1,
                    allow_missing: bool = False) -> dict:
    """Evaluate every prediction in ``pred_folder`` against the file of the same name in ``ref_folder``.

    Args:
        labels: class values (ints, or tuples for regions) or a name -> value dict; default: dataset.json's
            foreground labels (from ``dataset_json``, ``pred_folder/dataset.json`` or ``ref_folder/../dataset.json``),
            else every non-zero value found in the references.
        file_ending: default from dataset.json, else the most common image ending in ``pred_folder``.
        output_file: JSON path; default ``pred_folder/summary_ssl.json``; NaN is written as null.
        allow_missing: evaluate only the references that have a prediction instead of failing.

    Returns:
        The summary dict (also written to ``output_file``): ``per_case``, ``mean`` (per class and over classes),
        ``labels``, ``conventions``.

    Raises:
        EvaluationError: missing folders/files, predictions without reference, shape mismatches.
    """
    pred_folder, ref_folder = Path(pred_folder), Path(ref_folder)
    for f in (pred_folder, ref_folder):
        if not f.is_dir():
            raise EvaluationError(f"folder {f} does not exist")
    dj, dj_path = _find_dataset_json(dataset_json, pred_folder, ref_folder)
    file_ending = file_ending or (dj or {}).get("file_ending") or _infer_ending(ref_folder)
    preds = sorted(f.name for f in pred_folder.iterdir() if f.name.endswith(file_ending) and f.name[0] != ".")
    refs = sorted(f.name for f in ref_folder.iterdir() if f.name.endswith(file_ending) and f.name[0] != ".")
    if not refs:
        raise EvaluationError(f"{ref_folder} holds no '{file_ending}' files")
    extra = sorted(set(preds) - set(refs))
    if extra:
        raise EvaluationError(f"{len(extra)} prediction(s) have no reference in {ref_folder}, e.g. {extra[:3]}")
    missing = sorted(set(refs) - set(preds))
    if missing and not allow_missing:
        raise EvaluationError(f"{len(missing)} reference case(s) have no prediction in {pred_folder}, e.g. "
                              f"{missing[:3]}; pass --allow-missing to evaluate only the predicted ones")
    if not preds:
        raise EvaluationError(f"{pred_folder} holds no '{file_ending}' predictions")

    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                          determine_reader_writer_from_file_ending)
    example = str(ref_folder / refs[0])
    reader_class = determine_reader_writer_from_dataset_json(dj, example, verbose=False) if dj else \
        determine_reader_writer_from_file_ending(file_ending, example, verbose=False)
    label_map = _resolve_labels(labels, dj)
    if label_map is None:
        values = set()
        for r in refs:
            values |= set(np.unique(reader_class().read_seg(str(ref_folder / r))[0]).astype(int).tolist())
        label_map = {f"label_{v}": v for v in sorted(values - {0})}
    jobs = [(pred_folder / p, ref_folder / p, reader_class, label_map) for p in preds]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            per_case = pool.map(_evaluate_case, jobs)
    else:
        per_case = [_evaluate_case(j) for j in jobs]

    summary = {
        "prediction_folder": str(pred_folder.resolve()),
        "reference_folder": str(ref_folder.resolve()),
        "dataset_json": None if dj_path is None else str(dj_path.resolve()),
        "file_ending": file_ending,
        "labels": {n: (list(v) if isinstance(v, tuple) else v) for n, v in label_map.items()},
        "missing_predictions": missing,
        "conventions": {
            "definitions": "medpy.metric.binary: surface = mask XOR erosion (connectivity 1, border 0); "
                           "HD95 = 95th percentile of both directed surface distances pooled; "
                           "ASD = mean directed distance prediction -> reference",
            "units": "*_mm with the reference's spacing, *_vox in voxels (as the literature's tables)",
            "empty": "both empty: Dice NaN; one empty: Dice 0; distances NaN when either is empty; NaN is null "
                     "here and skipped in means",
        },
        "mean": summarize(per_case, label_map),
        "per_case": per_case,
    }
    out = Path(output_file) if output_file is not None else pred_folder / "summary_ssl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(nan_to_none(summary), f, indent=2)
    summary["output_file"] = str(out)
    return summary


def _fmt(v: float, scale: float = 1.0) -> str:
    return "   nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:6.2f}"


def format_table(summary: dict, per_case: bool = False) -> str:
    """Plain-text table of the mean metrics per class (Dice in %, distances in mm and voxels)."""
    head = f"{'class':<16}{'n':>4} {'Dice%':>6} {'HD95mm':>7} {'ASDmm':>6} {'HD95vx':>7} {'ASDvx':>6} " \
           f"{'vol':>6} {'prec':>6} {'recall':>6}  empty p/r/both"
    lines = [head, "-" * len(head)]
    per_class = summary["mean"]["per_class"]
    for name, m in per_class.items():
        lines.append(f"{name[:16]:<16}{m['n_cases']:>4} {_fmt(m['Dice'], 100)} {_fmt(m['HD95_mm']):>7} "
                     f"{_fmt(m['ASD_mm'])} {_fmt(m['HD95_vox']):>7} {_fmt(m['ASD_vox'])} "
                     f"{_fmt(m['volume_ratio'])} {_fmt(m['precision'])} {_fmt(m['recall'])}  "
                     f"{m['n_empty_prediction']}/{m['n_empty_reference']}/{m['n_both_empty']}")
    mo = summary["mean"]["mean_over_classes"]
    lines.append(f"{'mean (classes)':<16}{'':>4} {_fmt(mo['Dice'], 100)} {_fmt(mo['HD95_mm']):>7} "
                 f"{_fmt(mo['ASD_mm'])} {_fmt(mo['HD95_vox']):>7} {_fmt(mo['ASD_vox'])}")
    lines.append("(vol = predicted / reference voxels, prec / recall = overlap / predicted and / reference voxels, "
                 "pooled over cases)")
    if per_case:
        lines += ["", f"{'case':<32}{'class':<16} {'Dice%':>6} {'HD95mm':>7} {'ASDmm':>6}"]
        for c in summary["per_case"]:
            for name, m in c["metrics"].items():
                lines.append(f"{c['case'][:32]:<32}{name[:16]:<16} {_fmt(m['Dice'], 100)} {_fmt(m['HD95_mm']):>7} "
                             f"{_fmt(m['ASD_mm'])}")
    return "\n".join(lines)


def _parse_label(text: str) -> LabelSpec:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"label '{text}' must be an integer or comma-separated integers (region)")
    return values if len(values) > 1 else values[0]


def main(argv: Optional[List[str]] = None) -> int:
    from nnunet_ssl.cli_common import Parser, print_error

    parser = Parser(
        prog="nnunet_ssl evaluate",
        description="Per-case and mean Dice, HD95 and ASD per class (mm and voxels), medpy definitions.")
    parser.add_argument("pred", help="folder of predicted label files")
    parser.add_argument("ref", help="folder of reference label files (e.g. nnUNet_raw/DatasetXXX/labelsTs)")
    parser.add_argument("-l", "--labels", nargs="+", type=_parse_label, default=None,
                        help="label values to score (1,2 scores the region {1, 2}); default: dataset.json's "
                             "foreground labels, else every value in the references")
    parser.add_argument("-o", "--output", default=None, help="JSON output (default: <pred>/summary_ssl.json)")
    parser.add_argument("--dataset-json", default=None,
                        help="dataset.json for file_ending and label names (default: <pred>/dataset.json, then "
                             "<ref>/../dataset.json)")
    parser.add_argument("--file-ending", default=None, help="overrides dataset.json's file_ending")
    parser.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate only references that have a prediction")
    parser.add_argument("--per-case", action="store_true", help="also print per-case rows")
    args = parser.parse_args(argv)
    try:
        summary = evaluate_folder(args.pred, args.ref, args.labels, args.file_ending, args.dataset_json, args.output,
                                  args.num_processes, args.allow_missing)
    except EvaluationError as e:
        print_error(str(e))
        return 2
    print(format_table(summary, per_case=args.per_case))
    print(f"\nper-case results: {summary['output_file']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
