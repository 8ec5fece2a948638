"""ACDC in the HDF5 layout of the semi-supervised literature (HiLab-git/SSL4MIS) -> nnU-Net raw dataset + unlabeled.

Source layout (``../shared/data/ACDC``, see its README)::

    train_slices.list            1312 slice names of the 70 training patients (140 frames), in SSL4MIS order
    test.list, val.list          frame names (patientXXX_frameYY) of the 20 test / 10 validation patients
    data/slices/{slice}.h5       training slices: image (y, x) float32 in [0, 1], label (y, x) uint8
                                 (BCP/ABD-style copies keep the slices in data/ directly; both are accepted)
    data/{frame}.h5              val/test volumes: image (z, y, x) float32, label (z, y, x) uint8

Output (``DatasetXXX_ACDC_H5``), one case per frame, named ``patientXXX_frameYY`` as in the h5 files:

- labeled (imagesTr/labelsTr): every frame of the first N patients of ``train_slices.list``. The literature's
  labeled subsets are the first 68 / 136 lines of that list, which are exactly all slices of 3 / 7 patients
  (patients 099, 038, 050 for N = 3). ``-n`` counts patients; ``--num-labeled-slices`` takes the line count.
- unlabeled (imagesUnlabeled/): every frame of the other training patients.
- test (imagesTs/labelsTs): the volumes of ``test.list``. ``val.list`` is skipped by default (the literature uses it
  for model selection; nnU-Net does its own cross-validation) or added to the unlabeled pool with ``--val unlabeled``.

Training volumes are rebuilt by stacking ``slice_1..slice_K`` of a frame along a new first axis (numeric order;
the list itself is not sorted numerically), giving the same (z, y, x) axis order as the stored volumes.

Spacing: the h5 files carry none. We write the nominal (z, y, x) = (10.0, 1.5, 1.5) mm of
``specs/benchmark-protocol.md``: native ACDC slices are 5-10 mm apart (mostly 10 mm) and in-plane spacing is
1.37-1.68 mm, and the SSL4MIS preprocessing did not resample. Override with ``--spacing Z Y X``. Origin is 0 and
direction identity: orientation is that of the arrays, which is all the literature's pipelines see.

Labels: 0 background, 1 RV, 2 Myo, 3 LV. Channel: one cine-MRI channel, already min-max normalised to [0, 1]
(nnU-Net's z-score normalisation is applied on top, as for any MRI channel).
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ssl.dataset_conversion import _common as C

DEFAULT_ID = 802
DEFAULT_NAME = "ACDC_H5"
NOMINAL_SPACING_ZYX = (10.0, 1.5, 1.5)
LABELS = {"background": 0, "RV": 1, "Myo": 2, "LV": 3}
CHANNEL_NAMES = {0: "cineMRI"}
FILE_ENDING = ".nii.gz"
REFERENCE = ("O. Bernard et al., Deep Learning Techniques for Automatic MRI Cardiac Multi-structures Segmentation "
             "and Diagnosis: Is the Problem Solved? IEEE TMI 37(11), 2018; h5 preprocessing of HiLab-git/SSL4MIS")

_SLICE_RE = re.compile(r"^(?P<frame>(?P<patient>patient\d+)_frame\d+)_slice_(?P<index>\d+)$")


def parse_slice_list(slice_names: Sequence[str]) -> Tuple[List[str], "OrderedDict[str, List[str]]",
                                                          "OrderedDict[str, Dict[int, str]]"]:
    """Patients in order of first appearance, their frames, and each frame's slice index -> slice name.

    Raises:
        ConversionError: a line is not ``patientXXX_frameYY_slice_K``.
    """
    patients: "OrderedDict[str, List[str]]" = OrderedDict()
    frames: "OrderedDict[str, Dict[int, str]]" = OrderedDict()
    for name in slice_names:
        m = _SLICE_RE.match(name)
        if m is None:
            raise C.ConversionError(f"train_slices.list: line '{name}' is not of the form patientXXX_frameYY_slice_K")
        pf = patients.setdefault(m["patient"], [])
        if m["frame"] not in pf:
            pf.append(m["frame"])
        frames.setdefault(m["frame"], {})[int(m["index"])] = name
    return list(patients), patients, frames


def slices_per_patient_prefix(slice_names: Sequence[str]) -> Dict[int, int]:
    """Number of labeled patients -> number of leading ``train_slices.list`` lines that cover exactly them.

    For the real list: {1: 32, 3: 68, 7: 136, 14: 256, ..., 70: 1312}, the SSL4MIS ``patients_to_slices`` table.
    Only prefixes ending at a patient boundary are returned (a 3D case needs all slices of its frames).
    """
    out, seen, last = {}, set(), None
    for i, name in enumerate(slice_names):
        m = _SLICE_RE.match(name)
        patient = m["patient"] if m else name
        if patient != last:
            if patient in seen:
                return {}  # slices of a patient are not contiguous: no prefix selects whole patients
            if seen:
                out[len(seen)] = i
            seen.add(patient)
            last = patient
    out[len(seen)] = len(slice_names)
    return out


def _slice_path(data_dir: Path, slice_name: str) -> Path:
    canonical = data_dir / "slices" / f"{slice_name}.h5"
    return canonical if canonical.is_file() or not (data_dir / f"{slice_name}.h5").is_file() else \
        data_dir / f"{slice_name}.h5"


def _read_h5(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise C.ConversionError(f"{path} lacks dataset(s) {missing}: expected 'image' and 'label'")
            return np.asarray(f["image"][...], dtype=np.float32), np.asarray(f["label"][...])
    except OSError as e:
        raise C.ConversionError(f"cannot read {path}: {e}") from None


def load_frame_from_slices(data_dir: Path, frame: str, slices: Dict[int, str]) -> Tuple[np.ndarray, np.ndarray]:
    """Stack ``slice_1..slice_K`` of ``frame`` into (z, y, x) image and label volumes.

    Raises:
        ConversionError: slice indices are not 1..K, a slice file is missing, or shapes differ.
    """
    indices = sorted(slices)
    if indices != list(range(1, len(indices) + 1)):
        raise C.ConversionError(f"frame {frame}: slice indices {indices} in train_slices.list are not 1..{len(indices)}"
                                f"; a 3D volume cannot be rebuilt")
    images, labels = [], []
    for k in indices:
        path = _slice_path(data_dir, slices[k])
        image, label = _read_h5(path)
        C.check_shapes_match(image.shape, label.shape, str(path))
        if image.ndim != 2 or (images and image.shape != images[0].shape):
            raise C.ConversionError(f"{path}: slice shape {image.shape} differs from slice_1's "
                                    f"{images[0].shape if images else '(2D expected)'}")
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


def load_volume(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    image, label = _read_h5(path)
    C.check_shapes_match(image.shape, label.shape, str(path))
    if image.ndim != 3:
        raise C.ConversionError(f"{path}: expected a (z, y, x) volume, got shape {image.shape}")
    return image, label


def _writer(load, where: str, spacing_zyx: Sequence[float]):
    def write(image_paths: List[Path], label_path: Optional[Path]) -> None:
        image, label = load()
        C.check_label_values(label, LABELS.values(), where)
        C.write_image(image.astype(np.float32, copy=False), image_paths[0], spacing_zyx)
        if label_path is not None:
            C.write_image(label.astype(np.uint8), label_path, spacing_zyx)
    return write


def convert(source: Path, output_root: Optional[Path] = None, dataset_id: int = DEFAULT_ID, name: str = DEFAULT_NAME,
            num_labeled: Optional[int] = 3, num_labeled_slices: Optional[int] = None,
            spacing: Sequence[float] = NOMINAL_SPACING_ZYX, val: str = "skip", keep_unlabeled_labels: bool = False,
            max_unlabeled: Optional[int] = None, max_test: Optional[int] = None, overwrite: bool = False,
            options: Optional[dict] = None) -> Path:
    """Convert the SSL4MIS ACDC h5 folder ``source``; returns the written dataset folder. See module docstring."""
    source = Path(source)
    data_dir = source / "data"
    if not data_dir.is_dir():
        raise C.ConversionError(f"{source} has no data/ folder: give the ACDC h5 folder (with train_slices.list, "
                                f"test.list and data/)")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise C.ConversionError(f"--spacing {tuple(spacing)} must be three positive numbers (z, y, x) in mm")
    slice_names = C.read_list_file(source / "train_slices.list")
    patients, frames_of_patient, slices_of_frame = parse_slice_list(slice_names)
    prefix = slices_per_patient_prefix(slice_names)
    if not prefix:
        raise C.ConversionError(f"{source / 'train_slices.list'}: a patient's slices are not contiguous, so no line "
                                f"prefix selects whole patients")

    if num_labeled_slices is not None:
        by_lines = {v: k for k, v in prefix.items()}
        if num_labeled_slices not in by_lines:
            valid = ", ".join(str(v) for v in list(prefix.values())[:8])
            raise C.ConversionError(f"--num-labeled-slices {num_labeled_slices} does not end at a patient boundary in "
                                    f"train_slices.list; valid values start {valid}, ...")
        num_labeled = by_lines[num_labeled_slices]
    if num_labeled is None or not 1 <= num_labeled <= len(patients):
        raise C.ConversionError(f"-n/--num-labeled {num_labeled} is out of range: train_slices.list has "
                                f"{len(patients)} patients, choose 1..{len(patients)} (literature: 3 or 7)")
    labeled_patients = patients[:num_labeled]
    labeled = [f for p in labeled_patients for f in frames_of_patient[p]]
    unlabeled = sorted(f for p in patients[num_labeled:] for f in frames_of_patient[p])
    if val not in ("skip", "unlabeled"):
        raise C.ConversionError(f"--val {val}: choose 'skip' or 'unlabeled'")
    val_frames = C.read_list_file(source / "val.list") if val == "unlabeled" else []
    unlabeled_all = unlabeled + sorted(val_frames)
    unlabeled_sel = C.apply_limit(unlabeled_all, max_unlabeled, "--max-unlabeled")
    test_all = C.read_list_file(source / "test.list")
    test = C.apply_limit(test_all, max_test, "--max-test")

    from_slices = set(unlabeled) | set(labeled)
    needed = [_slice_path(data_dir, s) for f in labeled + [u for u in unlabeled_sel if u in from_slices]
              for s in slices_of_frame[f].values()]
    needed += [data_dir / f"{f}.h5" for f in test + [u for u in unlabeled_sel if u not in from_slices]]
    C.check_files_exist(needed, "h5 file(s)", f"the ACDC h5 folder {source} is incomplete; see its README")

    spacing = tuple(float(s) for s in spacing)
    jobs = []
    for role, frames in (("labeled", labeled), ("unlabeled", unlabeled_sel), ("test", test)):
        for f in frames:
            if f in from_slices:
                load = (lambda f=f: load_frame_from_slices(data_dir, f, slices_of_frame[f]))
                where = str(_slice_path(data_dir, f"{f}_slice_1").with_name(f"{f}_slice_*.h5"))
            else:
                load = (lambda f=f: load_volume(data_dir / f"{f}.h5"))
                where = str(data_dir / f"{f}.h5")
            jobs.append(C.CaseJob(f, role, _writer(load, where, spacing)))

    root = C.resolve_output_root(output_root)
    folder_name = C.dataset_folder_name(dataset_id, name)
    selection = {
        "rule": "first N patients of train_slices.list (SSL4MIS labeled subsets)",
        "num_labeled_patients": num_labeled,
        "train_slices_list_prefix_lines": prefix[num_labeled],
        "labeled_patients": labeled_patients,
        "seed": None,
        "val_list": val,
        "subset": {"max_unlabeled": max_unlabeled, "max_test": max_test,
                   "unlabeled_available": len(unlabeled_all), "test_available": len(test_all)},
    }
    record = C.make_split_record(
        converter="acdc-h5", source=source, dataset=folder_name, selection=selection, options=options,
        spacing_zyx_mm=list(spacing),
        spacing_note="nominal: the h5 files store no spacing (native ACDC: 5-10 mm slices, 1.37-1.68 mm in-plane)",
        axis_order="numpy (z, y, x) = SimpleITK (x, y, z); training volumes stack slice_1..slice_K along z",
        groups={f: f.split("_")[0] for f in labeled + unlabeled_sel + test},
    )
    return C.build_dataset(
        root=root, folder_name=folder_name, overwrite=overwrite, jobs=jobs, num_channels=1, file_ending=FILE_ENDING,
        keep_unlabeled_labels=keep_unlabeled_labels, record=record,
        dataset_json=dict(channel_names=CHANNEL_NAMES, labels=LABELS, dataset_name=folder_name,
                          reference=REFERENCE, licence="research use; CC BY-NC-SA 4.0 (Human Heart Project)",
                          description=f"ACDC, SSL4MIS h5 layout, {num_labeled} labeled patients "
                                      f"(first {prefix[num_labeled]} lines of train_slices.list)"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.make_parser("acdc-h5", "ACDC in the SSL4MIS HDF5 layout -> nnU-Net raw dataset with imagesUnlabeled/.")
    default_src = os.path.join(os.environ["NNUNET_SSL_DATA"], "ACDC") if os.environ.get("NNUNET_SSL_DATA") else None
    parser.add_argument("input", nargs="?", default=default_src,
                        help="ACDC h5 folder (train_slices.list, test.list, data/); default $NNUNET_SSL_DATA/ACDC")
    C.add_output_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-n", "--num-labeled", type=int, default=3,
                       help="labeled patients = the first N patients of train_slices.list (literature: 3 or 7)")
    group.add_argument("--num-labeled-slices", type=int, default=None,
                       help="alternatively the number of train_slices.list lines (literature: 68 or 136)")
    parser.add_argument("--spacing", type=float, nargs=3, default=NOMINAL_SPACING_ZYX, metavar=("Z", "Y", "X"),
                        help="voxel spacing to write, mm (the h5 files have none)")
    parser.add_argument("--val", choices=("skip", "unlabeled"), default="skip",
                        help="what to do with the val.list volumes")
    C.add_hidden_label_argument(parser)
    C.add_subset_arguments(parser)

    def run(args):
        if args.input is None:
            raise C.ConversionError("give the ACDC h5 folder (or set NNUNET_SSL_DATA)")
        convert(Path(args.input), args.output_root, args.dataset_id, args.name, args.num_labeled,
                args.num_labeled_slices, args.spacing, args.val, args.keep_unlabeled_labels, args.max_unlabeled,
                args.max_test, args.overwrite, options=vars(args))

    return C.run_main(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
