"""Left Atrium (2018 Atrial Segmentation Challenge) in the UA-MT HDF5 layout -> nnU-Net raw dataset + unlabeled.

Source layout (``../shared/data/LA``, see its README)::

    train.list, test.list                          case ids (80 / 20), one per line
    2018LA_Seg_Training Set/<ID>/mri_norm2.h5      image (x, y, z) float32, z-scored; label (x, y, z) uint8 {0, 1}

Output (``DatasetXXX_LA_H5``), cases named by their challenge id:

- labeled (imagesTr/labelsTr): the first N lines of ``train.list`` (the literature's N = 4, 8, 16, i.e. 5/10/20 %).
  Every labeled file must be present.
- unlabeled (imagesUnlabeled/): the rest of ``train.list`` whose files are present (the shared copy holds only the
  first 8 training cases); absent ones are listed in ssl_split.json under ``unlabeled_missing``.
- test (imagesTs/labelsTs): ``test.list``; every file must be present.

Axis order: the h5 arrays are (x, y, z) (z = 88 slices, the through-plane axis of the acquisition). They are
transposed to numpy (z, y, x) before writing, so the NIfTI's SimpleITK index (i, j, k) is exactly the h5 index
[i, j, k], and nnU-Net reads the volumes as (1, z, y, x) = (1, 88, y, x).

Spacing: 0.625 mm isotropic, the native LA-challenge voxel size (the h5 files store none). Origin 0, direction
identity. Labels: 0 background, 1 left atrium. Channel: one LGE-MRI channel, already z-scored per volume.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from nnunet_ssl.dataset_conversion import _common as C

DEFAULT_ID = 803
DEFAULT_NAME = "LA_H5"
SPACING_MM = 0.625
LABELS = {"background": 0, "left_atrium": 1}
CHANNEL_NAMES = {0: "LGE-MRI"}
FILE_ENDING = ".nii.gz"
CASES_FOLDER = "2018LA_Seg_Training Set"
H5_NAME = "mri_norm2.h5"
LITERATURE_N = (4, 8, 16)
REFERENCE = ("Xiong et al., A Global Benchmark of Algorithms for Segmenting Late Gadolinium-Enhanced Cardiac MRI, "
             "MedIA 2021; h5 preprocessing of Yu et al., UA-MT, MICCAI 2019")


def case_path(source: Path, case: str) -> Path:
    return source / CASES_FOLDER / case / H5_NAME


def load_case(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read one case and return image, label as numpy (z, y, x), i.e. the h5 (x, y, z) arrays transposed."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise C.ConversionError(f"{path} lacks dataset(s) {missing}: expected 'image' and 'label'")
            image = np.asarray(f["image"][...], dtype=np.float32)
            label = np.asarray(f["label"][...])
    except OSError as e:
        raise C.ConversionError(f"cannot read {path}: {e}") from None
    C.check_shapes_match(image.shape, label.shape, str(path))
    if image.ndim != 3:
        raise C.ConversionError(f"{path}: expected an (x, y, z) volume, got shape {image.shape}")
    return image.transpose(2, 1, 0), label.transpose(2, 1, 0)


def _writer(path: Path):
    def write(image_paths: List[Path], label_path: Optional[Path]) -> None:
        image, label = load_case(path)
        C.check_label_values(label, LABELS.values(), path)
        spacing = (SPACING_MM,) * 3
        C.write_image(np.ascontiguousarray(image), image_paths[0], spacing)
        if label_path is not None:
            C.write_image(np.ascontiguousarray(label.astype(np.uint8)), label_path, spacing)
    return write


def convert(source: Path, output_root: Optional[Path] = None, dataset_id: int = DEFAULT_ID, name: str = DEFAULT_NAME,
            num_labeled: int = 8, keep_unlabeled_labels: bool = False, max_unlabeled: Optional[int] = None,
            max_test: Optional[int] = None, overwrite: bool = False, options: Optional[dict] = None) -> Path:
    """Convert the UA-MT LA h5 folder ``source``; returns the written dataset folder. See module docstring."""
    source = Path(source)
    if not (source / CASES_FOLDER).is_dir():
        raise C.ConversionError(f"{source} has no '{CASES_FOLDER}/' folder: give the LA h5 folder (with train.list, "
                                f"test.list and '{CASES_FOLDER}/<ID>/{H5_NAME}')")
    train = C.read_list_file(source / "train.list")
    test_all = C.read_list_file(source / "test.list")
    if not 1 <= num_labeled <= len(train):
        raise C.ConversionError(f"-n/--num-labeled {num_labeled} is out of range: train.list has {len(train)} cases, "
                                f"choose 1..{len(train)} (literature: 4, 8 or 16)")
    if num_labeled not in LITERATURE_N:
        C.note(f"N = {num_labeled} is not one of the literature's settings {LITERATURE_N}")
    labeled = train[:num_labeled]
    C.check_files_exist([case_path(source, c) for c in labeled], "labeled case file(s)",
                        f"the first {num_labeled} lines of train.list must all be present; choose a smaller "
                        f"-n/--num-labeled or add the missing cases")
    rest = train[num_labeled:]
    unlabeled_present = [c for c in rest if case_path(source, c).is_file()]
    unlabeled_missing = [c for c in rest if c not in unlabeled_present]
    unlabeled = C.apply_limit(unlabeled_present, max_unlabeled, "--max-unlabeled")
    test = C.apply_limit(test_all, max_test, "--max-test")
    C.check_files_exist([case_path(source, c) for c in test], "test case file(s)",
                        "every case of test.list must be present (or limit with --max-test)")
    if unlabeled_missing:
        C.note(f"{len(unlabeled_missing)} of {len(rest)} unlabeled cases of train.list are not present in "
              f"{source / CASES_FOLDER}; using the {len(unlabeled_present)} present")

    jobs = [C.CaseJob(c, role, _writer(case_path(source, c)))
            for role, cases in (("labeled", labeled), ("unlabeled", unlabeled), ("test", test)) for c in cases]
    root = C.resolve_output_root(output_root)
    folder_name = C.dataset_folder_name(dataset_id, name)
    selection = {
        "rule": "first N lines of train.list (UA-MT / SASSNet / DTC / BCP labeled subsets)",
        "num_labeled": num_labeled,
        "seed": None,
        "subset": {"max_unlabeled": max_unlabeled, "max_test": max_test,
                   "unlabeled_available": len(unlabeled_present), "test_available": len(test_all)},
    }
    record = C.make_split_record(
        converter="la-h5", source=source, dataset=folder_name, selection=selection, options=options,
        unlabeled_missing=unlabeled_missing, spacing_zyx_mm=[SPACING_MM] * 3,
        spacing_note="native LA-challenge spacing; the h5 files store none",
        axis_order="h5 (x, y, z) transposed to numpy (z, y, x); SimpleITK index (i, j, k) == h5 index [i, j, k]")
    return C.build_dataset(
        root=root, folder_name=folder_name, overwrite=overwrite, jobs=jobs, num_channels=1, file_ending=FILE_ENDING,
        keep_unlabeled_labels=keep_unlabeled_labels, record=record,
        dataset_json=dict(channel_names=CHANNEL_NAMES, labels=LABELS, dataset_name=folder_name, reference=REFERENCE,
                          licence="research use (University of Utah CARMA); cite Xiong et al. 2021",
                          description=f"Left Atrium 2018, UA-MT h5 layout, first {num_labeled} lines of train.list "
                                      f"labeled"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.make_parser("la-h5", "Left Atrium in the UA-MT HDF5 layout -> nnU-Net raw dataset with "
                                    "imagesUnlabeled/.")
    default_src = os.path.join(os.environ["NNUNET_SSL_DATA"], "LA") if os.environ.get("NNUNET_SSL_DATA") else None
    parser.add_argument("input", nargs="?", default=default_src,
                        help=f"LA h5 folder (train.list, test.list, '{CASES_FOLDER}/'); default $NNUNET_SSL_DATA/LA")
    C.add_output_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    parser.add_argument("-n", "--num-labeled", type=int, default=8,
                        help="labeled cases = the first N lines of train.list (literature: 4, 8, 16)")
    C.add_hidden_label_argument(parser)
    C.add_subset_arguments(parser)

    def run(args):
        if args.input is None:
            raise C.ConversionError("give the LA h5 folder (or set NNUNET_SSL_DATA)")
        convert(Path(args.input), args.output_root, args.dataset_id, args.name, args.num_labeled,
                args.keep_unlabeled_labels, args.max_unlabeled, args.max_test, args.overwrite, options=vars(args))

    return C.run_main(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
