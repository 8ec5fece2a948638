"""Offline pseudo-labels: nnU-Net's own predictor on ``imagesUnlabeled/``, plus confidence and entropy maps.

Every case of ``nnUNet_raw/<Dataset>/imagesUnlabeled/`` is predicted with :class:`nnUNetPredictor` (fold ensemble:
logits averaged over the folds; mirroring TTA on or off; sliding window with Gaussian weighting), resampled back
to the image's own geometry exactly as ``nnUNetv2_predict`` does, and written in the dataset's image format.

Output folder (default ``nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>/pseudolabels_<folds>[_noTTA]
[_<checkpoint>]/`` beside the model's ``fold_X/`` folders, so the pseudo-labels sit with the model that made them;
``-o`` chooses another)::

    labels/{case}{file_ending}       hard pseudo-label (what nnUNetv2_predict would write), the dataset's labels
    confidence/{case}{file_ending}   per-voxel confidence: maximum class probability, float32 in [1/K, 1]
                                     (region-based datasets: the least certain region, min_r max(p_r, 1 - p_r))
    entropy/{case}{file_ending}      per-voxel Shannon entropy of the class probabilities divided by log(K),
                                     float32 in [0, 1] (regions: mean binary entropy / log 2)
    summaries/{case}.json            per-case statistics (mean confidence, fraction of voxels >= threshold,
                                     foreground confidence, predicted volume per class); written last, so a case
                                     is finished exactly when its summary exists
    pseudolabel_settings.json        the model, folds, checkpoint, TTA and step size; a resumed run must match
    pseudolabel_summary.json         every case's statistics and their means, rewritten at the end of each run
    dataset.json, plans.json         the model's, so the folder describes itself

Formats that cannot hold float voxels (nnU-Net's ``NaturalImage2DIO``: png/bmp) store the two maps as 16-bit
integers in thousandths (``map_encoding: "uint16_per_mille"`` in the settings); :func:`read_map` decodes both.

Resumable: each case is written into a hidden ``.partial-*`` folder and moved into place, summary last; a rerun
skips the cases with a summary and removes its own stale partial folders.

Parts (``-num_parts N -part_id K``, as ``nnUNetv2_predict``): part K labels the cases ``sorted(cases)[K::N]``, a
disjoint, deterministic share, so N machines or GPUs can label one pool into one folder at the same time (the
folder must be shared, e.g. on a network file system). Parts write identical settings and touch only their own
cases; whichever run finds every case of the pool finished writes ``pseudolabel_summary.json``, so the folder ends
up exactly as one run would have left it. A part that is interrupted resumes like a whole run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import shutil
import sys
import uuid
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssl.selftrain.common import (DEFAULT_THRESHOLD, ModelSpec, SelfTrainingError, atomic_write_json,
                                         check_fraction, default_device, ensure_ext_trainer_env, folds_tag,
                                         load_json, nnunet_env_path, parse_folds)

SETTINGS_FILE = "pseudolabel_settings.json"
SUMMARY_FILE = "pseudolabel_summary.json"
LABELS, CONFIDENCE, ENTROPY, SUMMARIES = "labels", "confidence", "entropy", "summaries"
MAP_FOLDERS = (LABELS, CONFIDENCE, ENTROPY)
#: settings that must agree for a run to resume into an existing folder
_IDENTITY_KEYS = ("dataset", "model_folder", "trainer", "plans", "configuration", "folds", "checkpoint",
                  "checkpoint_files", "use_tta", "step_size")


# ----------------------------------------------------------------------------------------------------------------
# Per-voxel maps and per-case statistics (pure numpy)
# ----------------------------------------------------------------------------------------------------------------

def confidence_and_entropy(probabilities: np.ndarray, has_regions: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Confidence and normalised entropy of class probabilities.

    Args:
        probabilities: ``(K, *S)`` float, softmax over K classes (or K independent sigmoid regions).
        has_regions: sigmoid regions instead of softmax classes.

    Returns:
        ``confidence (*S)`` float32: max_k p_k (regions: min_r max(p_r, 1 - p_r)), in [1/K, 1] ([0.5, 1]);
        ``entropy (*S)`` float32: -sum_k p_k log p_k / log K (regions: mean binary entropy / log 2), in [0, 1].
    """
    p = np.asarray(probabilities, dtype=np.float32)
    k = p.shape[0]
    entropy = np.zeros(p.shape[1:], np.float32)
    if not has_regions:
        confidence = p.max(0)
        for c in range(k):  # one class at a time: no (K, *S) temporary beside the probabilities
            pc = p[c]
            entropy -= pc * np.log(np.clip(pc, 1e-12, 1.0))
        if k > 1:
            entropy /= np.float32(np.log(k))
    else:
        confidence = np.ones(p.shape[1:], np.float32)
        for c in range(k):
            pc = np.clip(p[c], 0.0, 1.0)
            np.minimum(confidence, np.maximum(pc, 1 - pc), out=confidence)
            entropy -= pc * np.log(np.clip(pc, 1e-12, 1.0)) + (1 - pc) * np.log(np.clip(1 - pc, 1e-12, 1.0))
        entropy /= np.float32(np.log(2) * max(k, 1))
    return np.clip(confidence, 0.0, 1.0), np.clip(entropy, 0.0, 1.0)


def voxel_volume_mm3(spacing: Sequence[float]) -> float:
    """mm^3 of one voxel; nnU-Net's dummy through-plane spacing 999 of 2D images is left out (area in mm^2)."""
    return float(np.prod([s for s in spacing if s != 999]))


def summarize_case(segmentation: np.ndarray, confidence: np.ndarray, entropy: np.ndarray, threshold: float,
                   class_names: Dict[int, str], spacing: Sequence[float]) -> dict:
    """Per-case statistics of a pseudo-label.

    Args:
        segmentation, confidence, entropy: same shape ``(*S)``; hard label, max probability, normalised entropy.
        threshold: voxels with ``confidence >= threshold`` count as confident (the others become ignore).
        class_names: foreground label value -> name.
        spacing: voxel spacing in mm along the array axes.

    Returns:
        JSON-ready dict; ``foreground_confidence`` / ``foreground_fraction_confident`` are None without foreground.
    """
    n = int(segmentation.size)
    confident = confidence >= threshold
    fg = segmentation > 0
    n_fg = int(fg.sum())
    vv = voxel_volume_mm3(spacing)
    volumes = {}
    for value, name in sorted(class_names.items()):
        count = int((segmentation == value).sum())
        volumes[name] = {"label": int(value), "voxels": count, "volume_mm3": round(count * vv, 3)}
    return {
        "threshold": float(threshold),
        "num_voxels": n,
        "mean_confidence": float(confidence.mean(dtype=np.float64)),
        "min_confidence": float(confidence.min()),
        "fraction_confident": float(confident.mean(dtype=np.float64)),
        "mean_entropy": float(entropy.mean(dtype=np.float64)),
        "foreground_voxels": n_fg,
        "foreground_confidence": float(confidence[fg].mean(dtype=np.float64)) if n_fg else None,
        "foreground_fraction_confident": float(confident[fg].mean(dtype=np.float64)) if n_fg else None,
        "volume_per_class": volumes,
        "voxel_volume_mm3": vv,
        "spacing": [float(s) for s in spacing],
        "shape": [int(s) for s in segmentation.shape],
    }


def apply_confidence_threshold(segmentation: np.ndarray, confidence: np.ndarray, threshold: float,
                               ignore_label: Optional[int]) -> np.ndarray:
    """The pseudo-label the student trains on: every voxel with ``confidence < threshold`` becomes ``ignore_label``.

    Args:
        segmentation: ``(*S)`` integer hard pseudo-label.
        confidence: ``(*S)`` float, same shape.
        threshold: in [0, 1]; 0 returns an unchanged copy (nothing is below 0).
        ignore_label: nnU-Net's ignore label (highest label value); required when ``threshold > 0``.

    Returns:
        ``(*S)`` uint8 (uint16 when the labels need it).
    """
    if segmentation.shape != confidence.shape:
        raise SelfTrainingError(f"pseudo-label shape {segmentation.shape} differs from its confidence map's "
                                f"{confidence.shape}")
    top = max(int(segmentation.max(initial=0)), int(ignore_label or 0))
    out = segmentation.astype(np.uint8 if top < 255 else np.uint16, copy=True)
    if threshold > 0:
        if ignore_label is None:
            raise ValueError("an ignore label is needed to filter voxels")
        out[confidence < threshold] = ignore_label
    return out


def class_names_from_dataset_json(dataset_json: dict) -> Dict[int, str]:
    """Foreground value written in the hard label -> label name (regions: the ``regions_class_order`` value)."""
    labels = dataset_json["labels"]
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        names = [k for k, v in labels.items() if k not in ("background", "ignore")]
        order = dataset_json.get("regions_class_order", list(range(1, len(names) + 1)))
        return {int(o): n for o, n in zip(order, names)}
    return {int(v): k for k, v in labels.items() if k != "ignore" and int(v) != 0}


# ----------------------------------------------------------------------------------------------------------------
# Float maps in the dataset's image format
# ----------------------------------------------------------------------------------------------------------------

def map_encoding(rw_class) -> str:
    """How confidence/entropy maps are stored for this nnU-Net reader/writer class."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

    float_capable = (SimpleITKIO, NibabelIO, NibabelIOWithReorient, Tiff3DIO)
    return "float32" if issubclass(rw_class, float_capable) else "uint16_per_mille"


def write_map(rw_class, array: np.ndarray, filename: str, properties: dict) -> None:
    """Write a float map ``(*S)`` (nnU-Net axis order, like the segmentation) with the geometry nnU-Net's writer uses.

    nnU-Net's writers cast to uint8/uint16 (they write segmentations); this mirrors their geometry handling with
    float32 voxels, and falls back to the writer itself with 16-bit thousandths where the format holds no floats.
    """
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

    arr = np.asarray(array, dtype=np.float32)
    if issubclass(rw_class, SimpleITKIO):
        import SimpleITK as sitk

        st = properties["sitk_stuff"]
        if len(st["spacing"]) == 2:
            arr = arr[0]
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(st["spacing"])
        img.SetOrigin(st["origin"])
        img.SetDirection(st["direction"])
        if "original_orientation" in st:  # SimpleITKIOWithReorient: back to the file's own orientation
            img = sitk.DICOMOrient(img, st["original_orientation"])
        sitk.WriteImage(img, filename, True)
    elif issubclass(rw_class, NibabelIOWithReorient):
        import nibabel
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        nib = properties["nibabel_stuff"]
        img = nibabel.Nifti1Image(arr.transpose((2, 1, 0)), affine=nib["reoriented_affine"])
        img = img.as_reoriented(ornt_transform(axcodes2ornt("RAS"), io_orientation(nib["original_affine"])))
        nibabel.save(img, filename)
    elif issubclass(rw_class, NibabelIO):
        import nibabel

        nibabel.save(nibabel.Nifti1Image(arr.transpose((2, 1, 0)),
                                         affine=properties["nibabel_stuff"]["original_affine"]), filename)
    elif issubclass(rw_class, Tiff3DIO):
        import tifffile

        tifffile.imwrite(filename, data=arr, compression="zlib")
        side = filename[: -len(filename.split(".")[-1]) - 1] + ".json"
        atomic_write_json({"spacing": [float(s) for s in properties["spacing"]]}, side)
    else:
        rw_class().write_seg(np.round(np.clip(arr, 0, 1) * 1000).astype(np.uint16), filename, properties)


def read_map(rw_class, filename: str, encoding: str = "float32") -> Tuple[np.ndarray, dict]:
    """Read a map written by :func:`write_map`: ``(*S)`` float32 in nnU-Net axis order, and its properties."""
    arr, props = rw_class().read_seg(filename)
    arr = np.asarray(arr[0], dtype=np.float32)
    if encoding == "uint16_per_mille":
        arr = arr / 1000.0
    return arr, props


# ----------------------------------------------------------------------------------------------------------------
# Output folder bookkeeping
# ----------------------------------------------------------------------------------------------------------------

def default_output_folder(spec: ModelSpec, folds: Sequence, use_tta: bool) -> str:
    """``<model folder>/pseudolabels_<folds>[_noTTA][_<checkpoint>]`` (settings in the name: no accidental mixing)."""
    name = f"pseudolabels_{folds_tag(folds)}"
    if not use_tta:
        name += "_noTTA"
    if spec.checkpoint != "checkpoint_final.pth":
        name += "_" + os.path.splitext(spec.checkpoint)[0]
    return os.path.join(spec.model_folder, name)


def case_files(output_folder: str, case: str, file_ending: str) -> Dict[str, str]:
    """Paths of one case's outputs: ``labels``, ``confidence``, ``entropy``, ``summary``."""
    out = {sub: os.path.join(output_folder, sub, case + file_ending) for sub in MAP_FOLDERS}
    out["summary"] = os.path.join(output_folder, SUMMARIES, case + ".json")
    return out


def finished_cases(output_folder: str, cases: Sequence[str], file_ending: str) -> List[str]:
    """Cases whose summary (written last) and maps all exist."""
    done = []
    for c in cases:
        files = case_files(output_folder, c, file_ending)
        if all(os.path.isfile(p) and os.path.getsize(p) > 0 for p in files.values()):
            done.append(c)
    return done


def check_pseudolabel_folder(folder: str, teacher: ModelSpec, folds: Sequence, cases: Sequence[str],
                             file_ending: str) -> dict:
    """Pseudo-labels made elsewhere (``self-train --pseudolabels``): by this teacher, for every case, complete.

    Args:
        folder: the output folder of ``nnunet_ssl pseudolabel`` (all parts).
        teacher, folds: the model that must have made them (same model folder, folds, checkpoint and weights).
        cases: every case the student needs (the teacher dataset's unlabeled cases).
        file_ending: the dataset's.

    Returns:
        The folder's settings.

    Raises:
        SelfTrainingError: naming the folder and what is missing or different, and the command that fixes it.
    """
    command = (f"nnunet_ssl pseudolabel -d {teacher.dataset} -c {teacher.configuration} -tr {teacher.trainer} "
               f"-p {teacher.plans} -f {' '.join(map(str, folds))} -chk {teacher.checkpoint} -o {folder}")
    if not os.path.isdir(folder):
        raise SelfTrainingError(f"pseudo-label folder {folder} does not exist; make it with `{command}`")
    settings_file = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(settings_file):
        raise SelfTrainingError(f"{folder} holds no pseudo-labels of `nnunet_ssl pseudolabel` ({SETTINGS_FILE} "
                                f"missing); make them with `{command}`")
    settings = load_json(settings_file)
    made_by = {"model_folder": settings.get("model_folder"), "folds": [str(f) for f in settings.get("folds", [])],
               "checkpoint": settings.get("checkpoint")}
    expected = {"model_folder": teacher.model_folder, "folds": [str(f) for f in folds],
                "checkpoint": teacher.checkpoint}
    if made_by != expected:
        diff = ", ".join(f"{k} {made_by[k]!r} instead of {expected[k]!r}"
                         for k in expected if made_by[k] != expected[k])
        raise SelfTrainingError(f"the pseudo-labels in {folder} were made by another model ({diff}); pass the "
                                f"-tr/-p/-c/-f/-chk of the model that made them, or label again with `{command}`")
    if settings.get("checkpoint_files") != checkpoint_fingerprint(teacher.model_folder, folds, teacher.checkpoint):
        raise SelfTrainingError(f"the checkpoints in {teacher.model_folder} changed after the pseudo-labels in "
                                f"{folder} were made (retrained?); label again with `{command} --overwrite`")
    done = set(finished_cases(folder, cases, file_ending))
    unfinished = [c for c in cases if c not in done]
    if unfinished:
        def missing_files(case):
            return [os.path.relpath(p, folder) for p in case_files(folder, case, file_ending).values()
                    if not (os.path.isfile(p) and os.path.getsize(p) > 0)]

        shown = "; ".join(f"{c}: {', '.join(missing_files(c))} missing" for c in unfinished[:3])
        more = f"; and {len(unfinished) - 3} more" if len(unfinished) > 3 else ""
        raise SelfTrainingError(
            f"pseudo-labels in {folder} are incomplete: {len(unfinished)} case(s) of {len(cases)} not finished "
            f"({shown}{more}). Finish them with `{command}` (it resumes; with -num_parts N, rerun the unfinished "
            f"parts)")
    return settings


def checkpoint_fingerprint(model_folder: str, folds: Sequence, checkpoint: str) -> Dict[str, list]:
    """``fold_X/<checkpoint>`` -> ``[size, sha256]``: which weights made the pseudo-labels.

    The content, not the modification time, so parts running on machines with their own copy of the model agree.
    """
    out = {}
    for f in folds:
        p = os.path.join(model_folder, f"fold_{f}", checkpoint)
        digest = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        out[f"fold_{f}/{checkpoint}"] = [os.path.getsize(p), digest.hexdigest()]
    return out


def check_parts(num_parts: int, part_id: int) -> None:
    """One clear error for part numbers ``nnUNetv2_predict`` would refuse (parts are numbered 0..N-1)."""
    if int(num_parts) < 1:
        raise SelfTrainingError(f"-num_parts {num_parts} must be at least 1 (1: this run labels every case)")
    if not 0 <= int(part_id) < int(num_parts):
        raise SelfTrainingError(f"-part_id {part_id} is not in 0..{int(num_parts) - 1}: with -num_parts {num_parts} "
                                f"the parts are -part_id 0 to {int(num_parts) - 1}, one per machine or GPU")


def part_cases(cases: Sequence[str], num_parts: int = 1, part_id: int = 0) -> List[str]:
    """Part ``part_id`` of ``num_parts``: ``sorted(cases)[part_id::num_parts]``, nnUNetv2_predict's rule."""
    check_parts(num_parts, part_id)
    return sorted(cases)[int(part_id)::int(num_parts)]


def _partial_case(name: str) -> str:
    """``.partial-{case}-{8 hex}`` -> ``case`` (case names may contain '-')."""
    return name[len(".partial-"):].rsplit("-", 1)[0]


def _prepare_output_folder(output_folder: str, settings: dict, overwrite: bool, own_cases: Sequence[str]) -> None:
    """Check (or write) the settings and remove stale partial folders of ``own_cases`` (other parts may be running)."""
    settings_file = os.path.join(output_folder, SETTINGS_FILE)
    if overwrite and os.path.isdir(output_folder):
        for sub in (*MAP_FOLDERS, SUMMARIES):
            shutil.rmtree(os.path.join(output_folder, sub), ignore_errors=True)
        for f in (SETTINGS_FILE, SUMMARY_FILE):
            if os.path.isfile(os.path.join(output_folder, f)):
                os.remove(os.path.join(output_folder, f))
    if os.path.isfile(settings_file):
        old = load_json(settings_file)
        diff = [k for k in _IDENTITY_KEYS if old.get(k) != settings.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:3])
            raise SelfTrainingError(
                f"{output_folder} holds pseudo-labels made with other settings ({shown}); resuming would mix them. "
                f"Pass --overwrite to redo them, or choose another -o")
    elif os.path.isdir(os.path.join(output_folder, SUMMARIES)) and os.listdir(os.path.join(output_folder, SUMMARIES)):
        raise SelfTrainingError(f"{output_folder} holds pseudo-labels without {SETTINGS_FILE}: their origin is "
                                f"unknown. Pass --overwrite to redo them, or choose another -o")
    for sub in (*MAP_FOLDERS, SUMMARIES):
        os.makedirs(os.path.join(output_folder, sub), exist_ok=True)
    own = set(own_cases)
    for f in os.listdir(output_folder):  # left behind by an interrupted run of this part
        if f.startswith(".partial-") and _partial_case(f) in own:
            shutil.rmtree(os.path.join(output_folder, f), ignore_errors=True)
    atomic_write_json(settings, settings_file)


# ----------------------------------------------------------------------------------------------------------------
# Prediction and export
# ----------------------------------------------------------------------------------------------------------------

def _export_case(case: str, logits: np.ndarray, properties: dict, plans_manager, configuration_manager,
                 dataset_json: dict, output_folder: str, threshold: float) -> dict:
    """Resample logits to the image geometry, write label/confidence/entropy atomically, then the summary."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    label_manager = plans_manager.get_label_manager(dataset_json)
    seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, label_manager, properties, return_probabilities=True)
    confidence, entropy = confidence_and_entropy(probs, label_manager.has_regions)
    del probs
    rw_class = plans_manager.image_reader_writer_class
    fe = dataset_json["file_ending"]
    tmp = os.path.join(output_folder, f".partial-{case}-{uuid.uuid4().hex[:8]}")
    try:
        for sub in MAP_FOLDERS:
            os.makedirs(os.path.join(tmp, sub))
        rw_class().write_seg(seg, os.path.join(tmp, LABELS, case + fe), properties)
        write_map(rw_class, confidence, os.path.join(tmp, CONFIDENCE, case + fe), properties)
        write_map(rw_class, entropy, os.path.join(tmp, ENTROPY, case + fe), properties)
        for sub in MAP_FOLDERS:
            for f in os.listdir(os.path.join(tmp, sub)):
                os.replace(os.path.join(tmp, sub, f), os.path.join(output_folder, sub, f))
        summary = summarize_case(seg, confidence, entropy, threshold, class_names_from_dataset_json(dataset_json),
                                 properties["spacing"])
        summary = {"case": case, **summary}
        atomic_write_json(summary, case_files(output_folder, case, fe)["summary"])  # last: the case is finished
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _export_job(args):
    return _export_case(*args)


def refresh_summary(output_folder: str, case: str, settings: dict, threshold: float) -> dict:
    """Recompute a finished case's summary at another threshold from its saved maps (no prediction)."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    rw_class = recursive_find_reader_writer_by_name(settings["image_reader_writer"])
    files = case_files(output_folder, case, settings["file_ending"])
    seg, props = rw_class().read_seg(files[LABELS])
    conf, _ = read_map(rw_class, files[CONFIDENCE], settings["map_encoding"])
    ent, _ = read_map(rw_class, files[ENTROPY], settings["map_encoding"])
    summary = summarize_case(seg[0], conf, ent, threshold, class_names_from_dataset_json(settings["dataset_json"]),
                             props["spacing"])
    summary = {"case": case, **summary}
    atomic_write_json(summary, files["summary"])
    return summary


def _wait(result, workers, timeout: float = 0.5):
    """``result.get()`` that notices a dead export worker (killed for memory) instead of hanging forever."""
    while True:
        try:
            return result.get(timeout=timeout)
        except multiprocessing.TimeoutError:
            if not all(w.is_alive() for w in workers):
                raise SelfTrainingError("a pseudo-label export worker died (likely out of memory); rerun with fewer "
                                        "export processes (-nps); finished cases are kept") from None


def _preprocessed_cases(predictor, files: Dict[str, List[str]], num_processes: int):
    """Yield ``(case, data, properties)`` preprocessed exactly as nnUNetv2_predict does."""
    import torch

    cases = list(files)
    if num_processes > 0:
        it = predictor._internal_get_data_iterator_from_lists_of_filenames(
            [files[c] for c in cases], None, cases, num_processes)
        for item in it:
            data = item["data"]
            if isinstance(data, str):  # older nnU-Net iterators hand over a temporary .npy file
                path, data = data, torch.from_numpy(np.load(data))
                os.remove(path)
            yield item["ofile"], data, item["data_properties"]
        return
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    for c in cases:
        try:
            data, _, props = preprocessor.run_case(files[c], None, predictor.plans_manager,
                                                   predictor.configuration_manager, predictor.dataset_json)
        except Exception as e:
            raise SelfTrainingError(f"could not read/preprocess unlabeled case '{c}' ({', '.join(files[c])}): "
                                    f"{type(e).__name__}: {e}") from e
        yield c, torch.from_numpy(data).to(dtype=torch.float32), props


def predict_pseudolabels(dataset, configuration: str, trainer: str = "nnUNetTrainer", plans: str = "nnUNetPlans",
                         folds: Optional[Sequence] = None, checkpoint: str = "checkpoint_final.pth",
                         output_folder: Optional[str] = None, threshold: float = DEFAULT_THRESHOLD,
                         use_tta: bool = True, step_size: float = 0.5, device: Optional[str] = None,
                         num_processes_preprocessing: int = 2, num_processes_export: int = 2,
                         overwrite: bool = False, verbose: bool = True, num_parts: int = 1, part_id: int = 0) -> str:
    """Pseudo-label every case of the dataset's ``imagesUnlabeled/`` (or one part of them) with a trained nnU-Net model.

    Args:
        dataset: id or name; its raw ``imagesUnlabeled/`` is predicted and its results folder holds the model.
        configuration, trainer, plans, folds, checkpoint: the model, as for ``nnUNetv2_predict`` (folds None:
            every fold with ``checkpoint``).
        output_folder: default :func:`default_output_folder`.
        threshold: confidence threshold reported in the summaries (``fraction_confident``); in [0, 1].
        use_tta: nnU-Net's mirroring test-time augmentation.
        device: ``cuda`` / ``cpu`` / ``mps``; default cuda when available.
        num_processes_preprocessing: background preprocessing workers (0: in this process).
        num_processes_export: background resampling/writing workers (0: in this process).
        overwrite: discard existing outputs in the folder instead of resuming (not with ``num_parts > 1``).
        num_parts, part_id: label only the cases ``sorted(cases)[part_id::num_parts]`` (see the module docstring).

    Returns:
        The output folder. Already finished cases are skipped (resume). ``pseudolabel_summary.json`` is written
        once every case of the pool is finished (by this run or by other parts).

    Raises:
        SelfTrainingError / UnlabeledDataError: bad threshold or part numbers, unknown dataset, no unlabeled images,
            no trained model or fold, or an output folder made with other settings.
    """
    import torch
    from tqdm import tqdm

    from nnunet_ssl.data.unlabeled import find_unlabeled_cases, resolve_dataset_name

    threshold = check_fraction(threshold, "--threshold")
    if not 0 < step_size <= 1:
        raise SelfTrainingError(f"-step_size {step_size} must be in (0, 1]")
    check_parts(num_parts, part_id)
    if overwrite and int(num_parts) > 1:
        raise SelfTrainingError(
            "--overwrite cannot be combined with -num_parts > 1: the parts share one folder, and a part would delete "
            "the cases the others have written. Delete the output folder once, then start the parts without "
            "--overwrite")
    raw_root = nnunet_env_path("nnUNet_raw")
    nnunet_env_path("nnUNet_results")
    name = resolve_dataset_name(dataset)
    raw = os.path.join(raw_root, name)
    if not os.path.isfile(os.path.join(raw, "dataset.json")):
        raise SelfTrainingError(f"{os.path.join(raw, 'dataset.json')} is missing: the raw dataset is needed for its "
                                f"imagesUnlabeled/ folder")
    files = find_unlabeled_cases(raw, load_json(os.path.join(raw, "dataset.json")))

    spec = ModelSpec(name, configuration, trainer, plans, parse_folds(folds), checkpoint)
    used_folds = spec.resolve_folds()
    model_folder = spec.model_folder
    dataset_json = load_json(os.path.join(model_folder, "dataset.json"))
    model_plans = load_json(os.path.join(model_folder, "plans.json"))
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(model_plans)
    if pm.get_configuration(configuration).previous_stage_name is not None:
        raise SelfTrainingError(f"configuration '{configuration}' is a cascade stage; pseudo-labelling supports "
                                f"2d, 3d_fullres and 3d_lowres")
    fe = dataset_json["file_ending"]
    output_folder = os.path.abspath(output_folder or default_output_folder(spec, used_folds, use_tta))
    settings = {
        "tool": "nnunet_ssl pseudolabel",
        "dataset": name,
        "images": os.path.join(raw, "imagesUnlabeled"),
        "model_folder": model_folder, "trainer": trainer, "plans": plans, "configuration": configuration,
        "folds": list(used_folds), "checkpoint": checkpoint,
        "checkpoint_files": checkpoint_fingerprint(model_folder, used_folds, checkpoint),
        "use_tta": bool(use_tta), "step_size": float(step_size),
        "file_ending": fe, "image_reader_writer": pm.image_reader_writer_class.__name__,
        "map_encoding": map_encoding(pm.image_reader_writer_class),
        "labels": dataset_json["labels"], "dataset_json": dataset_json,
    }
    mine = part_cases(files, num_parts, part_id)
    _prepare_output_folder(output_folder, settings, overwrite, mine)
    atomic_write_json(dataset_json, os.path.join(output_folder, "dataset.json"))
    atomic_write_json(model_plans, os.path.join(output_folder, "plans.json"))

    done = set(finished_cases(output_folder, mine, fe))
    todo = {c: files[c] for c in mine if c not in done}
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    share = f", part {part_id} of -num_parts {num_parts} ({len(mine)} case(s))" if num_parts > 1 else ""
    log(f"Pseudo-labels for {len(files)} unlabeled case(s) of {name}{share} -> {output_folder}")
    if done:
        log(f"{len(done)} of {len(mine)} case(s) already finished: skipped (resume)")

    if todo:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        ensure_ext_trainer_env()
        dev = torch.device(device or default_device())
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_tta,
                                    perform_everything_on_device=dev.type == "cuda", device=dev,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        with contextlib.redirect_stdout(io.StringIO() if not verbose else sys.stdout):
            predictor.initialize_from_trained_model_folder(model_folder, used_folds, checkpoint)
        bar = tqdm(total=len(todo), desc="Pseudo-labels", unit="case", file=sys.stderr, disable=not verbose)
        pool = multiprocessing.get_context("spawn").Pool(num_processes_export) if num_processes_export > 0 else None
        try:
            workers = list(pool._pool) if pool is not None else []
            pending = deque()
            for case, data, props in _preprocessed_cases(predictor, todo, num_processes_preprocessing):
                logits = predictor.predict_logits_from_preprocessed_data(data).cpu().numpy()
                job = (case, logits, props, predictor.plans_manager, predictor.configuration_manager,
                       predictor.dataset_json, output_folder, threshold)
                if pool is None:
                    _export_case(*job)
                    bar.update()
                    continue
                pending.append(pool.apply_async(_export_job, (job,)))
                while pending and (pending[0].ready() or len(pending) > num_processes_export + 1):
                    _wait(pending.popleft(), workers)  # bounded queue: logits of waiting cases stay in memory
                    bar.update()
            while pending:
                _wait(pending.popleft(), workers)
                bar.update()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
    # the pool's summary needs every part; until then each part keeps its own cases' summaries current
    missing = [c for c in files if c not in mine] if num_parts > 1 else []
    missing = [c for c in missing if c not in set(finished_cases(output_folder, missing, fe))]
    _refresh_thresholds(output_folder, mine if missing else list(files), settings, threshold)
    if missing:
        log(f"Part {part_id} finished; {len(missing)} case(s) of other parts are not finished yet (e.g. "
            f"{missing[0]}). {SUMMARY_FILE} is written by the run that finds every case finished")
    else:
        write_run_summary(output_folder, list(files), settings, threshold)
    log(f"Pseudo-labels written to {output_folder}")
    return output_folder


def _refresh_thresholds(output_folder: str, cases: Sequence[str], settings: dict, threshold: float) -> None:
    """Summaries made at another threshold are recomputed from the saved maps, not predicted again."""
    for c in sorted(cases):
        s = load_json(case_files(output_folder, c, settings["file_ending"])["summary"])
        if abs(s.get("threshold", -1) - threshold) > 1e-12:
            refresh_summary(output_folder, c, settings, threshold)


def write_run_summary(output_folder: str, cases: Sequence[str], settings: dict, threshold: float) -> dict:
    """``pseudolabel_summary.json``: every case's statistics and their means over cases."""
    per_case = {c: load_json(case_files(output_folder, c, settings["file_ending"])["summary"]) for c in sorted(cases)}

    def mean(key):
        vals = [s[key] for s in per_case.values() if s.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    summary = {
        "output_folder": output_folder,
        "model_folder": settings["model_folder"], "folds": settings["folds"], "checkpoint": settings["checkpoint"],
        "use_tta": settings["use_tta"], "threshold": float(threshold), "num_cases": len(per_case),
        "mean": {k: mean(k) for k in ("mean_confidence", "fraction_confident", "mean_entropy",
                                      "foreground_confidence", "foreground_fraction_confident")},
        "cases": per_case,
    }
    atomic_write_json(summary, os.path.join(output_folder, SUMMARY_FILE))
    return summary
