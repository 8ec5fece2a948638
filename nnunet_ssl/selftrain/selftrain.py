"""Offline self-training with stock nnU-Net: train, pseudo-label the unlabeled scans, retrain on the union, repeat.

One round (``run_self_training`` / ``nnunet_ssl self-train``):

1. **Pseudo-label** ``imagesUnlabeled/`` of the teacher's dataset with the teacher (fold ensemble, see
   :mod:`nnunet_ssl.selftrain.pseudolabel`; resumable, kept beside the teacher model). Round 1 can instead use a
   folder labelled beforehand (``--pseudolabels DIR``, e.g. by ``nnunet_ssl pseudolabel -num_parts N`` on N
   machines); it is checked to come from the teacher and to be complete.
2. **Build the student dataset** ``nnUNet_raw/DatasetYYY_<Root>_ST<r>/`` (written in a hidden temporary folder and
   renamed into place): ``imagesTr/labelsTr`` = the truly labeled cases + the pseudo-labeled cases kept by the case
   cut, their low-confidence voxels set to nnU-Net's ignore label (``dataset.json`` gains ``"ignore"`` = highest
   label + 1 when it has none); ``imagesTs/labelsTs`` and ``imagesUnlabeled/`` as in the teacher dataset (hard links
   where the file system allows, else copies), so the next round and evaluation work on the student dataset too.
   ``ssl_split.json`` records which cases are pseudo-labeled, from which model (folder, folds, checkpoint, TTA), at
   which threshold and case cut, and why cases were dropped.
3. **Plan and preprocess with the teacher's plans**: nnU-Net's ``move_plans_between_datasets`` copies the teacher's
   plans file (same identifier), so spacing, patch size, normalisation and network are identical; then nnU-Net's
   own preprocessing runs for the one configuration. If the teacher's preprocessed plans were edited after the
   teacher was trained, the plans saved in the teacher's model folder (the ones it really used) win.
4. **Splits**: ``splits_final.json`` (written last, after preprocessing) keeps the teacher's folds over the truly
   labeled cases; every pseudo-labeled case is added to the *training* set of every fold and is never validated on.
5. **Train the student** with stock ``nnUNetv2_train`` (default trainer ``nnUNetTrainerNoisyStudent``: nnU-Net with
   stronger augmentation) on the teacher's folds. Round r+1's teacher is round r's student (same folds).

Every step is resumable: finished pseudo-labels are skipped, a student dataset built from the same teacher with the
same settings is reused, finished folds are skipped and interrupted ones continue (``--c``).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssl.selftrain.common import (DEFAULT_CASE_CUT, DEFAULT_STUDENT_TRAINER, DEFAULT_THRESHOLD, ModelSpec,
                                         SelfTrainingError, atomic_write_json, check_fraction, check_trainer_exists,
                                         default_device, ensure_ext_trainer_env, load_json, nnunet_env_path,
                                         parse_folds, trained_iterations)
from nnunet_ssl.selftrain.pseudolabel import (CONFIDENCE, LABELS, SETTINGS_FILE, apply_confidence_threshold,
                                              case_files, check_pseudolabel_folder, predict_pseudolabels, read_map)

SELFTRAIN_CONVERTER = "nnunet_ssl self-train"
RECORD_FILE = "ssl_split.json"  # the project's split record name (dataset_conversion/_common.SPLIT_RECORD_FILENAME)
SPLITS_FILE = "splits_final.json"
_DATASET_DIR_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


def _log(*args) -> None:
    print("[self-train]", *args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Case selection
# ----------------------------------------------------------------------------------------------------------------

def select_cases(summaries: Dict[str, dict], case_cut: float) -> Tuple[List[str], Dict[str, str]]:
    """Split pseudo-labeled cases into kept and dropped by the mean confidence over their predicted foreground.

    Args:
        summaries: case -> per-case summary (``foreground_confidence`` is None without predicted foreground).
        case_cut: in [0, 1]; 0 keeps every case.

    Returns:
        ``(kept cases, {dropped case: reason})``, both sorted by case.
    """
    kept, dropped = [], {}
    for case in sorted(summaries):
        score = summaries[case].get("foreground_confidence")
        if case_cut <= 0:
            kept.append(case)
        elif score is None:
            dropped[case] = "no foreground predicted"
        elif score < case_cut:
            dropped[case] = f"foreground confidence {score:.4f} < case cut {case_cut}"
        else:
            kept.append(case)
    return kept, dropped


def _label_values(labels: dict) -> List[int]:
    out = set()
    for v in labels.values():
        out.update(int(i) for i in v) if isinstance(v, (list, tuple)) else out.add(int(v))
    return sorted(out)


def ignore_label_for(labels: dict, threshold: float) -> Optional[int]:
    """The dataset's ignore label, or highest label + 1 when voxel filtering is on and it has none."""
    if "ignore" in labels:
        return int(labels["ignore"])
    if threshold <= 0:
        return None
    return max(_label_values(labels)) + 1


# ----------------------------------------------------------------------------------------------------------------
# Dataset ids, names, lineage
# ----------------------------------------------------------------------------------------------------------------

def _dataset_dirs() -> Dict[int, set]:
    """id -> folder names ``DatasetXXX_Name`` in nnUNet_raw, nnUNet_preprocessed and nnUNet_results."""
    out: Dict[int, set] = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(var)
        if not root or not os.path.isdir(root):
            continue
        for d in os.listdir(root):
            m = _DATASET_DIR_RE.match(d)
            if m and os.path.isdir(os.path.join(root, d)):
                out.setdefault(int(m[1]), set()).add(d)
    return out


def _dataset_id(name: str) -> int:
    return int(name[len("Dataset"):len("Dataset") + 3])


@dataclass
class Lineage:
    """Where a teacher dataset comes from: its truly labeled cases, the original dataset, the next round's number."""
    labeled: List[str]
    root_dataset: str
    next_round: int


def teacher_lineage(teacher_dataset: str) -> Lineage:
    """Truly labeled cases of the teacher's dataset: its self-training record's list, else all of ``imagesTr``."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw = os.path.join(nnunet_env_path("nnUNet_raw"), teacher_dataset)
    record = os.path.join(raw, RECORD_FILE)
    if os.path.isfile(record):
        rec = load_json(record)
        if rec.get("converter") == SELFTRAIN_CONVERTER:
            st = rec["self_training"]
            return Lineage(sorted(rec["labeled"]), st["root_dataset"], int(st["round"]) + 1)
    cases = get_filenames_of_train_images_and_targets(raw, load_json(os.path.join(raw, "dataset.json")))
    return Lineage(sorted(cases), teacher_dataset, 1)


def student_folder_name(dataset_id: int, root_dataset: str, round_index: int) -> str:
    short = root_dataset.split("_", 1)[1] if _DATASET_DIR_RE.match(root_dataset) else root_dataset
    return f"Dataset{int(dataset_id):03d}_{short}_ST{round_index}"


# ----------------------------------------------------------------------------------------------------------------
# Building the student dataset
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class StudentDataset:
    """A built (and, after :func:`prepare_student_dataset`, preprocessed) student dataset."""
    dataset_id: int
    name: str
    round: int
    labeled: List[str]
    pseudo_labeled: List[str]
    dropped: Dict[str, str]
    ignore_label: Optional[int]
    raw_folder: str
    preprocessed_folder: str
    reused: bool = False


def _link_or_copy(src: str, dst: str) -> None:
    """Hard link (no extra disk space for the copied images), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _copy_case(images: Sequence[str], label: Optional[str], case: str, images_dir: Path,
               labels_dir: Optional[Path], file_ending: str) -> None:
    """Channel files as ``{case}_{c:04d}{fe}`` (and the label as ``{case}{fe}``), Tiff spacing side files included."""
    tif = file_ending.lower() in (".tif", ".tiff")
    for c, src in enumerate(images):
        _link_or_copy(src, str(images_dir / f"{case}_{c:04d}{file_ending}"))
    if tif:
        side = os.path.join(os.path.dirname(images[0]), f"{case}.json")
        if os.path.isfile(side):
            shutil.copyfile(side, images_dir / f"{case}.json")
    if label is not None and labels_dir is not None:
        _link_or_copy(label, str(labels_dir / f"{case}{file_ending}"))
        side = os.path.join(os.path.dirname(label), f"{case}.json")
        if tif and os.path.isfile(side):
            shutil.copyfile(side, labels_dir / f"{case}.json")


def _expected_identity(teacher: ModelSpec, folds: Sequence, pseudolabel_folder: str, threshold: float,
                       case_cut: float) -> dict:
    return {"teacher_model_folder": teacher.model_folder, "teacher_folds": [str(f) for f in folds],
            "teacher_checkpoint": teacher.checkpoint, "pseudolabel_folder": os.path.abspath(pseudolabel_folder),
            "threshold": float(threshold), "case_cut": float(case_cut)}


def _record_identity(record: dict) -> Optional[dict]:
    st = record.get("self_training") if record.get("converter") == SELFTRAIN_CONVERTER else None
    if not st:
        return None
    return {"teacher_model_folder": st["teacher"]["model_folder"],
            "teacher_folds": [str(f) for f in st["teacher"]["folds"]],
            "teacher_checkpoint": st["teacher"]["checkpoint"], "pseudolabel_folder": st["pseudolabel_folder"],
            "threshold": float(st["threshold"]), "case_cut": float(st["case_cut"])}


def build_student_dataset(teacher: ModelSpec, pseudolabel_folder: str, student_id: int,
                          threshold: float = DEFAULT_THRESHOLD, case_cut: float = DEFAULT_CASE_CUT,
                          overwrite: bool = False, verbose: bool = True) -> StudentDataset:
    """Write the raw student dataset (labeled + filtered pseudo-labeled cases); see the module docstring, step 2.

    Args:
        teacher: the model that made the pseudo-labels (its dataset provides labeled and unlabeled images).
        pseudolabel_folder: output of :func:`predict_pseudolabels` for every unlabeled case of the teacher dataset.
        student_id: nnU-Net id of the new dataset.
        threshold: voxels with confidence < threshold become the ignore label (0: none).
        case_cut: cases whose mean foreground confidence is < case_cut are left out (0: none).
        overwrite: replace an existing dataset of that id and name.

    Raises:
        SelfTrainingError: incomplete pseudo-labels, every case dropped, id taken, case names shared by labeled and
            unlabeled images.
    """
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_ssl.data.unlabeled import find_unlabeled_cases
    from nnunet_ssl.dataset_conversion._common import (ConversionError, atomic_dataset_folder, make_split_record,
                                                       progress)

    threshold = check_fraction(threshold, "--threshold")
    case_cut = check_fraction(case_cut, "--case-cut")
    raw_root = Path(nnunet_env_path("nnUNet_raw"))
    teacher_raw = raw_root / teacher.dataset
    dataset_json = load_json(teacher_raw / "dataset.json")
    fe = dataset_json["file_ending"]
    lineage = teacher_lineage(teacher.dataset)
    train_files = get_filenames_of_train_images_and_targets(str(teacher_raw), dataset_json)
    missing = [c for c in lineage.labeled if c not in train_files]
    if missing:
        raise SelfTrainingError(f"labeled case(s) {missing[:5]} of {teacher_raw / RECORD_FILE} are not in "
                                f"{teacher_raw / 'imagesTr'}; the teacher dataset was changed after it was built")
    unlabeled = find_unlabeled_cases(str(teacher_raw), dataset_json)
    shared = sorted(set(lineage.labeled) & set(unlabeled))
    if shared:
        raise SelfTrainingError(f"case name(s) {shared[:5]} occur in both imagesTr and imagesUnlabeled of "
                                f"{teacher_raw}; rename the unlabeled ones (pseudo-labeled cases join imagesTr)")

    settings = check_pseudolabel_folder(pseudolabel_folder, teacher, teacher.resolve_folds(), list(unlabeled), fe)
    summaries = {c: load_json(case_files(pseudolabel_folder, c, fe)["summary"]) for c in unlabeled}
    kept, dropped = select_cases(summaries, case_cut)
    if not kept:
        best = max((s["foreground_confidence"] for s in summaries.values()
                    if s.get("foreground_confidence") is not None), default=None)
        raise SelfTrainingError(
            f"every one of the {len(summaries)} pseudo-labeled case(s) was dropped by --case-cut {case_cut} (highest "
            f"foreground confidence: {best if best is None else round(best, 4)}); the teacher is too weak or the cut "
            f"too strict: lower --case-cut (0 keeps every case) or train the teacher longer")

    ignore_label = ignore_label_for(dataset_json["labels"], threshold)
    round_index = lineage.next_round
    folder_name = student_folder_name(student_id, lineage.root_dataset, round_index)
    rw_class = recursive_find_reader_writer_by_name(settings["image_reader_writer"])
    ignored_fraction: Dict[str, float] = {}

    labels = dict(dataset_json["labels"])
    if ignore_label is not None:
        labels["ignore"] = ignore_label
    test_dir = teacher_raw / "imagesTs"
    test_cases = sorted({f[: -len(fe) - 5] for f in os.listdir(test_dir) if f.endswith(fe)}) \
        if test_dir.is_dir() else []
    try:
        with atomic_dataset_folder(raw_root, folder_name, overwrite) as tmp:
            for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
                (tmp / sub).mkdir()
            for case in lineage.labeled:
                _copy_case(train_files[case]["images"], train_files[case]["label"], case, tmp / "imagesTr",
                           tmp / "labelsTr", fe)
            bar = progress(kept, desc=f"{folder_name}: pseudo-labels") if verbose else kept
            for case in bar:
                _copy_case(unlabeled[case], None, case, tmp / "imagesTr", None, fe)
                files = case_files(pseudolabel_folder, case, fe)
                seg, props = rw_class().read_seg(files[LABELS])
                conf, _ = read_map(rw_class, files[CONFIDENCE], settings["map_encoding"])
                filtered = apply_confidence_threshold(np.rint(seg[0]).astype(np.int32), conf, threshold,
                                                      ignore_label)
                ignored_fraction[case] = float((conf < threshold).mean()) if threshold > 0 else 0.0
                rw_class().write_seg(filtered, str(tmp / "labelsTr" / f"{case}{fe}"), props)
            for case, images in unlabeled.items():
                _copy_case(images, None, case, tmp / "imagesUnlabeled", None, fe)
            if test_cases:
                (tmp / "imagesTs").mkdir()
                labels_ts = teacher_raw / "labelsTs"
                if labels_ts.is_dir():
                    (tmp / "labelsTs").mkdir()
                for case in test_cases:
                    images = sorted(str(test_dir / f) for f in os.listdir(test_dir) if f.endswith(fe)
                                    and f.startswith(case + "_") and len(f) == len(case) + 5 + len(fe))
                    lab = labels_ts / f"{case}{fe}"
                    _copy_case(images, str(lab) if lab.is_file() else None, case, tmp / "imagesTs",
                               tmp / "labelsTs" if lab.is_file() else None, fe)

            teacher_info = {**teacher.as_dict(), "folds": list(settings["folds"]),
                            "use_tta": settings["use_tta"], "step_size": settings["step_size"]}
            st = {
                "round": round_index, "root_dataset": lineage.root_dataset, "teacher": teacher_info,
                "pseudolabel_folder": os.path.abspath(pseudolabel_folder), "threshold": threshold,
                "case_cut": case_cut, "case_score": "mean confidence over predicted foreground",
                "ignore_label": ignore_label, "dropped": dropped, "ignored_voxel_fraction": ignored_fraction,
                "foreground_confidence": {c: summaries[c].get("foreground_confidence") for c in sorted(summaries)},
            }
            student_json = {k: v for k, v in dataset_json.items() if k not in ("dataset", "ssl_split")}
            student_json.update(
                labels=labels, numTraining=len(lineage.labeled) + len(kept), numUnlabeled=len(unlabeled),
                name=folder_name, ssl_split=RECORD_FILE,
                description=(f"Self-training round {round_index} of {lineage.root_dataset}: {len(lineage.labeled)} "
                             f"labeled + {len(kept)} pseudo-labeled cases (threshold {threshold}, case cut "
                             f"{case_cut}) from {teacher.model_folder}"),
                self_training={"round": round_index, "root_dataset": lineage.root_dataset,
                               "teacher_model_folder": teacher.model_folder, "num_pseudo_labeled": len(kept),
                               "threshold": threshold, "case_cut": case_cut})
            atomic_write_json(student_json, tmp / "dataset.json")
            record = make_split_record(
                converter=SELFTRAIN_CONVERTER, source=teacher_raw, dataset=folder_name,
                selection={"rule": "the teacher dataset's truly labeled cases + its unlabeled cases pseudo-labeled "
                                   "by the teacher and kept by the case cut; low-confidence voxels -> ignore label"},
                options={"student_id": int(student_id), "threshold": threshold, "case_cut": case_cut})
            record.update(labeled=lineage.labeled, pseudo_labeled=kept, unlabeled=sorted(unlabeled), test=test_cases,
                          num_labeled=len(lineage.labeled), num_pseudo_labeled=len(kept),
                          num_unlabeled=len(unlabeled), num_test=len(test_cases), self_training=st)
            atomic_write_json(record, tmp / RECORD_FILE)
    except ConversionError as e:
        raise SelfTrainingError(str(e).replace("-d/--dataset-id", "--student-id")) from None
    if verbose:
        _log(f"wrote {raw_root / folder_name}: {len(lineage.labeled)} labeled + {len(kept)} pseudo-labeled case(s)"
             f", {len(dropped)} dropped; ignore label {ignore_label}")
    return StudentDataset(int(student_id), folder_name, round_index, lineage.labeled, kept, dropped, ignore_label,
                          str(raw_root / folder_name),
                          os.path.join(nnunet_env_path("nnUNet_preprocessed"), folder_name))


# ----------------------------------------------------------------------------------------------------------------
# Plans, preprocessing, splits
# ----------------------------------------------------------------------------------------------------------------

def _configuration_view(plans: dict, configuration: str) -> dict:
    """Everything of the plans that fixes shapes, spacing, normalisation and network for ``configuration``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    return {"configuration": pm.get_configuration(configuration).configuration,
            "transpose_forward": pm.transpose_forward,
            "foreground_intensity_properties_per_channel": pm.foreground_intensity_properties_per_channel}


def copy_teacher_plans(teacher: ModelSpec, student_name: str) -> str:
    """The teacher's plans as the student's (same identifier); returns the student's plans file.

    Uses nnU-Net's ``move_plans_between_datasets``; when the teacher's preprocessed plans are missing or differ
    from the plans in the teacher's model folder (edited after training), the model folder's plans are used.
    """
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets

    pre_root = nnunet_env_path("nnUNet_preprocessed")
    target = os.path.join(pre_root, student_name, teacher.plans + ".json")
    model_plans = load_json(os.path.join(teacher.model_folder, "plans.json"))
    moved = False
    if os.path.isfile(os.path.join(pre_root, teacher.dataset, teacher.plans + ".json")):
        with contextlib.redirect_stdout(io.StringIO()):
            move_plans_between_datasets(teacher.dataset, student_name, teacher.plans, teacher.plans)
        moved = _configuration_view(load_json(target), teacher.configuration) == \
            _configuration_view(model_plans, teacher.configuration)
        if not moved:
            _log(f"note: {teacher.plans}.json of {teacher.dataset} differs from the plans the teacher was trained "
                 f"with; using {os.path.join(teacher.model_folder, 'plans.json')}")
    if not moved:
        plans = dict(model_plans, dataset_name=student_name, plans_name=teacher.plans)
        atomic_write_json(plans, target)
    return target


def student_splits(teacher: ModelSpec, labeled: Sequence[str], pseudo_labeled: Sequence[str],
                   folds: Sequence) -> List[dict]:
    """The teacher's folds over the truly labeled cases; pseudo-labeled cases join every fold's training set.

    The teacher's ``splits_final.json`` is used when present (the folds the teacher was validated on); otherwise
    nnU-Net's own default (5-fold KFold, seed 12345, over the sorted labeled cases; fewer folds if fewer cases).
    """
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    labeled_set = set(labeled)
    teacher_splits = os.path.join(nnunet_env_path("nnUNet_preprocessed"), teacher.dataset, SPLITS_FILE)
    if os.path.isfile(teacher_splits):
        splits = load_json(teacher_splits)
    elif len(labeled) >= 2:
        splits = generate_crossval_split(sorted(labeled), seed=12345, n_splits=min(5, len(labeled)))
    else:
        splits = []
    out = []
    for s in splits:
        val = [c for c in s["val"] if c in labeled_set]
        train = [c for c in s["train"] if c in labeled_set] + sorted(pseudo_labeled)
        out.append({"train": train, "val": val})
    numbered = [f for f in folds if f != "all"]
    if numbered and max(numbered) >= len(out):
        raise SelfTrainingError(
            f"fold {max(numbered)} is not in the teacher's splits ({len(out)} fold(s) in "
            f"{teacher_splits if os.path.isfile(teacher_splits) else 'the default split'}); nnU-Net would make a "
            f"random split that validates on pseudo-labeled cases. Use folds 0..{len(out) - 1} or 'all'")
    return out


def prepare_student_dataset(teacher: ModelSpec, pseudolabel_folder: str, student_id: int, folds: Sequence,
                            threshold: float = DEFAULT_THRESHOLD, case_cut: float = DEFAULT_CASE_CUT,
                            num_processes: int = 2, overwrite: bool = False, verbose: bool = True) -> StudentDataset:
    """Build (or reuse), plan with the teacher's plans, preprocess and split the student dataset of one round."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    raw_root = nnunet_env_path("nnUNet_raw")
    pre_root = nnunet_env_path("nnUNet_preprocessed")
    expected = _expected_identity(teacher, folds, pseudolabel_folder, threshold, case_cut)
    lineage = teacher_lineage(teacher.dataset)
    name = student_folder_name(student_id, lineage.root_dataset, lineage.next_round)
    taken = _dataset_dirs().get(int(student_id), set()) - {name}
    if taken:
        raise SelfTrainingError(f"dataset id {student_id} is already used by {sorted(taken)[0]}: nnU-Net needs unique "
                                f"ids; choose another --student-id")
    raw = os.path.join(raw_root, name)
    pre = os.path.join(pre_root, name)
    record_file = os.path.join(raw, RECORD_FILE)
    reuse = False
    if os.path.isdir(raw) and not overwrite:
        identity = _record_identity(load_json(record_file)) if os.path.isfile(record_file) else None
        if identity != expected:
            diff = [k for k in expected if (identity or {}).get(k) != expected[k]]
            raise SelfTrainingError(
                f"{raw} exists but was not built from this teacher with these settings (differs in: "
                f"{', '.join(diff)}); pass --overwrite to rebuild it (its preprocessed data and student models are "
                f"discarded) or choose another --student-id")
        reuse = True
    if not reuse:
        results = os.path.join(nnunet_env_path("nnUNet_results"), name)
        if os.path.isdir(results):
            if not overwrite:
                raise SelfTrainingError(
                    f"{results} holds models of a student dataset {name} whose raw folder {raw} is missing, so they "
                    f"cannot be matched to this teacher; pass --overwrite to rebuild (discarding them) or choose "
                    f"another --student-id")
            _log(f"removing student models trained on the previous version of {name}: {results}")
            shutil.rmtree(results)
        shutil.rmtree(pre, ignore_errors=True)  # derived from the old dataset: stale once it is rebuilt
        student = build_student_dataset(teacher, pseudolabel_folder, student_id, threshold, case_cut, overwrite,
                                        verbose)
    else:
        rec = load_json(record_file)
        st = rec["self_training"]
        student = StudentDataset(int(student_id), name, int(st["round"]), rec["labeled"], rec["pseudo_labeled"],
                                 st["dropped"], st["ignore_label"], raw, pre, reused=True)
        if verbose:
            _log(f"reusing {raw} (built from the same teacher with the same settings)")

    if os.path.isfile(os.path.join(pre, SPLITS_FILE)) and os.path.isfile(os.path.join(pre, teacher.plans + ".json")):
        return student  # splits are written last: preprocessing finished
    shutil.rmtree(pre, ignore_errors=True)
    os.makedirs(pre)
    shutil.copyfile(os.path.join(raw, "dataset.json"), os.path.join(pre, "dataset.json"))
    fingerprint = os.path.join(pre_root, teacher.dataset, "dataset_fingerprint.json")
    if os.path.isfile(fingerprint):  # the fingerprint the shared plans were made from
        shutil.copyfile(fingerprint, os.path.join(pre, "dataset_fingerprint.json"))
    copy_teacher_plans(teacher, name)
    if verbose:
        _log(f"preprocessing {name} ({teacher.configuration}) with the teacher's plans {teacher.plans}")
    out = sys.stdout if verbose else io.StringIO()
    with contextlib.redirect_stdout(out):
        preprocess_dataset(int(student_id), teacher.plans, [teacher.configuration], [max(1, int(num_processes))],
                           verbose=False, show_progress_bar=verbose)
    shutil.copyfile(os.path.join(raw, RECORD_FILE), os.path.join(pre, RECORD_FILE))
    splits = student_splits(teacher, student.labeled, student.pseudo_labeled, folds)
    atomic_write_json(splits, os.path.join(pre, SPLITS_FILE))
    return student


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

def _train_command() -> List[str]:
    exe = shutil.which("nnUNetv2_train", path=os.path.dirname(sys.executable) + os.pathsep +
                       os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "nnunetv2.run.run_training"]


def train_model(dataset: str, configuration: str, trainer: str, plans: str, folds: Sequence,
                device: Optional[str] = None, verbose: bool = True) -> str:
    """Train ``folds`` with stock ``nnUNetv2_train`` (subprocesses); skip finished folds, continue interrupted ones.

    Returns:
        The model folder.
    """
    ensure_ext_trainer_env()
    spec = ModelSpec(dataset, configuration, trainer, plans)
    for f in folds:
        fold_dir = os.path.join(spec.model_folder, f"fold_{f}")
        if os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
            if verbose:
                _log(f"{fold_dir} is trained already: skipped")
            continue
        cmd = _train_command() + [dataset, configuration, str(f), "-tr", trainer, "-p", plans,
                                  "-device", device or default_device()]
        if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")):
            cmd.append("--c")  # an interrupted run: continue it
        if verbose:
            _log("running: " + " ".join(["nnUNetv2_train"] + cmd[len(_train_command()):]))
        rc = subprocess.call(cmd, env=dict(os.environ),
                             stdout=None if verbose else subprocess.DEVNULL,
                             stderr=None if verbose else subprocess.DEVNULL)
        if rc != 0:
            raise SelfTrainingError(f"nnUNetv2_train {dataset} {configuration} {f} -tr {trainer} -p {plans} failed "
                                    f"(exit code {rc}); its output is above. Rerun to continue where it stopped")
    return spec.model_folder


# ----------------------------------------------------------------------------------------------------------------
# The whole loop
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RoundResult:
    round: int
    teacher: dict
    pseudolabel_folder: str
    student_dataset: str
    student_dataset_id: int
    student_model_folder: str
    pseudo_labeled: List[str]
    dropped: Dict[str, str]
    ignore_label: Optional[int]
    student_iterations: List[Optional[int]]


@dataclass
class SelfTrainingResult:
    """What :func:`run_self_training` did; ``final_model_folder`` is the last student (predict with it)."""
    dataset: str
    configuration: str
    plans: str
    folds: List
    student_trainer: str
    teacher_iterations: List[Optional[int]]
    rounds: List[RoundResult] = field(default_factory=list)

    @property
    def final_dataset(self) -> str:
        return self.rounds[-1].student_dataset

    @property
    def final_model_folder(self) -> str:
        return self.rounds[-1].student_model_folder

    @property
    def total_iterations(self) -> Optional[int]:
        """Training iterations behind one final fold model: teacher + every round's student (first fold)."""
        its = [self.teacher_iterations[0]] + [r.student_iterations[0] for r in self.rounds]
        return None if any(i is None for i in its) else int(sum(its))

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(final_dataset=self.final_dataset, final_model_folder=self.final_model_folder,
                 total_iterations=self.total_iterations)
        return d


def _pick_student_id(teacher: ModelSpec, expected: dict, name_for) -> int:
    """An existing student dataset built from this teacher with these settings (resume), else the lowest free id
    above the teacher's id (then below it)."""
    dirs = _dataset_dirs()
    raw_root = nnunet_env_path("nnUNet_raw")
    for i in sorted(dirs):
        if name_for(i) in dirs[i] and len(dirs[i]) == 1:
            rec = os.path.join(raw_root, name_for(i), RECORD_FILE)
            if os.path.isfile(rec) and _record_identity(load_json(rec)) == expected:
                return i
    tid = _dataset_id(teacher.dataset)
    for i in list(range(tid + 1, 1000)) + list(range(tid - 1, 0, -1)):
        if i not in dirs:
            return i
    raise SelfTrainingError("no free nnU-Net dataset id (1..999) left for the student; pass --student-id")


def run_self_training(dataset, configuration: str, rounds: int = 1, teacher_trainer: str = "nnUNetTrainer",
                      plans: str = "nnUNetPlans", folds: Optional[Sequence] = None,
                      checkpoint: str = "checkpoint_final.pth", student_trainer: str = DEFAULT_STUDENT_TRAINER,
                      student_dataset_id: Optional[int] = None, threshold: float = DEFAULT_THRESHOLD,
                      case_cut: float = DEFAULT_CASE_CUT, train_teacher: bool = False, use_tta: bool = True,
                      step_size: float = 0.5, device: Optional[str] = None, num_processes_preprocessing: int = 2,
                      num_processes_export: int = 2, num_processes: int = 2, overwrite: bool = False,
                      verbose: bool = True, pseudolabels: Optional[str] = None) -> SelfTrainingResult:
    """Offline self-training (noisy student) for ``rounds`` rounds; see the module docstring.

    Args:
        dataset: the teacher's dataset (id or name); needs ``imagesUnlabeled/``.
        configuration, teacher_trainer, plans, folds, checkpoint: the teacher model (folds None: every trained fold;
            with ``train_teacher`` and folds None: nnU-Net's 5 folds). The student uses the same folds and plans.
        student_trainer: nnU-Net trainer of every student (a budget variant, e.g. ``..._sslDemo``, sets its budget).
        student_dataset_id: id of round 1's student dataset; round r uses ``student_dataset_id + r - 1``. Default:
            reuse a matching existing student dataset, else the lowest free id above the teacher's.
        threshold, case_cut: filtering (see :mod:`nnunet_ssl.selftrain.common` for the defaults' reasoning).
        train_teacher: train missing teacher folds first (stock nnUNetv2_train), making this one command.
        use_tta, step_size, num_processes_preprocessing, num_processes_export: pseudo-labelling (nnUNetv2_predict's
            --disable_tta, -step_size, -npp, -nps).
        num_processes: preprocessing workers for the student dataset (nnUNetv2_preprocess -np).
        overwrite: redo pseudo-labels and rebuild student datasets (discarding their preprocessed data and models).
        pseudolabels: round 1 uses this folder of ``nnunet_ssl pseudolabel`` output (e.g. labelled in parts on several
            machines) instead of labelling again; it must come from the teacher (folds None: its folds) and be
            complete. Later rounds label with their own teacher (the previous student).

    Returns:
        :class:`SelfTrainingResult` (``final_model_folder``, per-round datasets and cases, iteration counts).
    """
    from nnunet_ssl.data.unlabeled import find_unlabeled_cases, resolve_dataset_name

    if int(rounds) < 1:
        raise SelfTrainingError(f"--rounds {rounds} must be at least 1")
    threshold = check_fraction(threshold, "--threshold")
    case_cut = check_fraction(case_cut, "--case-cut")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        nnunet_env_path(var)
    if student_dataset_id is not None and not 1 <= int(student_dataset_id) <= 1000 - int(rounds):
        raise SelfTrainingError(f"--student-id {student_dataset_id} is out of range: nnU-Net ids are 1..999 and "
                                f"{rounds} round(s) need {rounds} consecutive ids")
    name = resolve_dataset_name(dataset)
    raw = os.path.join(nnunet_env_path("nnUNet_raw"), name)
    if not os.path.isfile(os.path.join(raw, "dataset.json")):
        raise SelfTrainingError(f"{os.path.join(raw, 'dataset.json')} is missing: self-training needs the raw dataset "
                                f"(imagesTr, labelsTr, imagesUnlabeled)")
    ds_json = load_json(os.path.join(raw, "dataset.json"))
    unlabeled = find_unlabeled_cases(raw, ds_json)  # fail before any training
    check_trainer_exists(teacher_trainer, "-tr")
    check_trainer_exists(student_trainer, "--student-trainer")
    teacher = ModelSpec(name, configuration, teacher_trainer, plans, parse_folds(folds), checkpoint)
    if pseudolabels is not None:  # fail before any training; the folder's folds are the teacher's unless -f says
        pseudolabels = os.path.abspath(pseudolabels)
        if teacher.folds is None:
            made_with = os.path.join(pseudolabels, SETTINGS_FILE)
            if os.path.isfile(made_with):
                teacher.folds = parse_folds(load_json(made_with).get("folds"))
        check_pseudolabel_folder(pseudolabels, teacher, teacher.resolve_folds(), list(unlabeled),
                                 ds_json["file_ending"])
    if student_dataset_id is not None:  # fail before any prediction or training
        lineage, dirs = teacher_lineage(name), _dataset_dirs()
        for r in range(int(rounds)):
            sid = int(student_dataset_id) + r
            taken = dirs.get(sid, set()) - {student_folder_name(sid, lineage.root_dataset, lineage.next_round + r)}
            if taken:
                raise SelfTrainingError(f"dataset id {sid} (round {r + 1}) is already used by {sorted(taken)[0]}: "
                                        f"nnU-Net needs unique ids; choose another --student-id")
    if train_teacher:
        train_model(name, configuration, teacher_trainer, plans, teacher.folds or (0, 1, 2, 3, 4), device, verbose)
    used_folds = teacher.resolve_folds()
    result = SelfTrainingResult(name, configuration, plans, list(used_folds), student_trainer,
                                trained_iterations(teacher.model_folder, used_folds))
    for r in range(int(rounds)):
        if verbose:
            _log(f"round {r + 1}/{rounds}: teacher {teacher.model_folder} (folds {list(used_folds)})")
        if r == 0 and pseudolabels is not None:
            pl_folder = pseudolabels
            if verbose:
                _log(f"using the pseudo-labels in {pl_folder} (--pseudolabels)")
        else:
            pl_folder = predict_pseudolabels(teacher.dataset, configuration, teacher.trainer, plans, used_folds,
                                             teacher.checkpoint, None, threshold, use_tta, step_size, device,
                                             num_processes_preprocessing, num_processes_export, overwrite, verbose)
        lineage = teacher_lineage(teacher.dataset)
        expected = _expected_identity(teacher, used_folds, pl_folder, threshold, case_cut)
        if student_dataset_id is not None:
            sid = int(student_dataset_id) + r
        else:
            sid = _pick_student_id(teacher, expected,
                                   lambda i: student_folder_name(i, lineage.root_dataset, lineage.next_round))
        student = prepare_student_dataset(teacher, pl_folder, sid, used_folds, threshold, case_cut, num_processes,
                                          overwrite, verbose)
        model_folder = train_model(student.name, configuration, student_trainer, plans, used_folds, device, verbose)
        result.rounds.append(RoundResult(
            r + 1, teacher.as_dict(), pl_folder, student.name, student.dataset_id, model_folder,
            student.pseudo_labeled, student.dropped, student.ignore_label,
            trained_iterations(model_folder, used_folds)))
        teacher = ModelSpec(student.name, configuration, student_trainer, plans, used_folds, "checkpoint_final.pth")
    if verbose:
        _log(f"done: final student {result.final_model_folder} (dataset {result.final_dataset})")
    return result
