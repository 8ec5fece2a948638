"""ACDC in its original challenge layout -> nnU-Net raw dataset with N labeled patients and an unlabeled pool.

Source layout (the challenge download; ``database/`` around it is optional)::

    training/patientXXX/Info.cfg                     ED: 1 / ES: 12 / Group: DCM / ...
    training/patientXXX/patientXXX_frameYY.nii.gz    3D ED and ES frames, (x, y, z) with real spacing
    training/patientXXX/patientXXX_frameYY_gt.nii.gz labels 0 bg, 1 RV, 2 Myo, 3 LV
    testing/patientXXX/...                           the same for the 50 official test patients

Output (``DatasetXXX_ACDC_SSL``), cases named ``patientXXX_frameYY`` as in nnU-Net's own Dataset027_ACDC:

- labeled (imagesTr/labelsTr): ED and ES frames of N training patients. Default N = 3. For the literature's
  settings (N in 1, 3, 7, 14, 21, 28, 35, 70) the patients are the SSL4MIS ones (the first N patients of its
  ``train_slices.list``: 099, 038, 050 for N = 3); otherwise, or with ``--selection random``, a seeded choice.
- unlabeled (imagesUnlabeled/): ED and ES frames of every other training patient.
- test (imagesTs/labelsTs): ED and ES frames of the official test patients (labelsTs when their ``_gt`` files exist).

Files are copied byte for byte, so real spacing, origin and direction are kept; each label's header is checked
against its image and its values against {0, 1, 2, 3}. Frames are taken from Info.cfg (ED, ES).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nnunet_ssl.dataset_conversion import _common as C

DEFAULT_ID = 801
DEFAULT_NAME = "ACDC_SSL"
LABELS = {"background": 0, "RV": 1, "Myo": 2, "LV": 3}
CHANNEL_NAMES = {0: "cineMRI"}
FILE_ENDING = ".nii.gz"

# HiLab-git/SSL4MIS data/ACDC/train_slices.list: its 70 training patients in order of first appearance. The
# literature's labeled sets are prefixes of it; LITERATURE_SETTINGS maps N patients to the slice-line count that
# SSL4MIS' ``patients_to_slices`` uses for them.
SSL4MIS_PATIENT_ORDER = (
    "patient099", "patient038", "patient050", "patient100", "patient058", "patient021", "patient049", "patient020",
    "patient072", "patient040", "patient060", "patient089", "patient004", "patient056", "patient098", "patient096",
    "patient031", "patient018", "patient094", "patient047", "patient048", "patient055", "patient097", "patient074",
    "patient043", "patient041", "patient063", "patient037", "patient095", "patient054", "patient026", "patient088",
    "patient032", "patient069", "patient006", "patient071", "patient012", "patient073", "patient061", "patient017",
    "patient025", "patient010", "patient057", "patient029", "patient051", "patient005", "patient036", "patient046",
    "patient062", "patient034", "patient076", "patient092", "patient070", "patient077", "patient067", "patient003",
    "patient091", "patient016", "patient014", "patient044", "patient042", "patient090", "patient053", "patient027",
    "patient035", "patient086", "patient023", "patient009", "patient079", "patient015",
)
LITERATURE_SETTINGS = {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}

_PATIENT_RE = re.compile(r"^patient\d{3}$")


def find_split_folders(source: Path) -> Tuple[Path, Path]:
    for base in (source, source / "database"):
        if (base / "training").is_dir():
            return base / "training", base / "testing"
    raise C.ConversionError(f"{source} has no training/ folder: give the extracted ACDC folder (with training/ and "
                            f"testing/, optionally inside database/)")


def parse_info_cfg(path: Path) -> Dict[str, str]:
    """``Info.cfg`` as a dict (``ED``, ``ES``, ``Group``, ``Height``, ``NbFrame``, ``Weight``)."""
    if not path.is_file():
        raise C.ConversionError(f"missing {path}: every ACDC patient folder needs Info.cfg (it names the ED/ES frames)")
    out = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    for key in ("ED", "ES"):
        if key not in out or not out[key].isdigit():
            raise C.ConversionError(f"{path}: no integer '{key}:' line; cannot tell which frames to use")
    return out


def patient_frames(patient_dir: Path, need_label: Optional[bool]) -> Tuple[List[Tuple[str, Path, Optional[Path]]],
                                                                           Dict[str, str]]:
    """(case, image, label-or-None) for the ED and ES frames of one patient, plus its Info.cfg.

    Args:
        need_label: True: a missing ``_gt`` is an error; None: use it if present; False: ignore labels.
    """
    info = parse_info_cfg(patient_dir / "Info.cfg")
    frames = []
    for t in sorted({int(info["ED"]), int(info["ES"])}):
        case = f"{patient_dir.name}_frame{t:02d}"
        image = patient_dir / f"{case}{FILE_ENDING}"
        label = patient_dir / f"{case}_gt{FILE_ENDING}"
        C.check_files_exist([image], "image file", f"Info.cfg of {patient_dir.name} names frame {t}")
        if need_label:
            C.check_files_exist([label], "label file", "labeled patients need their _gt files")
        has_label = need_label is not False and label.is_file()
        frames.append((case, image, label if has_label else None))
    return frames, info


def list_patients(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _PATIENT_RE.match(p.name))


def choose_labeled(patients: List[str], n: int, selection: str, seed: int) -> Tuple[List[str], dict]:
    if not 1 <= n <= len(patients):
        raise C.ConversionError(f"-n/--num-labeled {n} is out of range: there are {len(patients)} training "
                                f"patients, choose 1..{len(patients)}")
    literature = n in LITERATURE_SETTINGS
    if selection == "literature" and not literature:
        raise C.ConversionError(f"--selection literature: no literature list for N = {n}; the SSL4MIS settings are "
                                f"N in {sorted(LITERATURE_SETTINGS)}")
    if selection in ("auto", "literature") and literature:
        chosen = list(SSL4MIS_PATIENT_ORDER[:n])
        missing = [p for p in chosen if p not in patients]
        if missing:
            raise C.ConversionError(f"the literature's labeled patients {missing} are not in training/; use "
                                    f"--selection random for a seeded choice")
        return chosen, {"rule": "literature: first N patients of SSL4MIS train_slices.list", "seed": None,
                        "train_slices_list_prefix_lines": LITERATURE_SETTINGS[n]}
    return C.seeded_choice(patients, n, seed), {"rule": "seeded random choice of training patients", "seed": seed}


def _copier(image: Path, label: Optional[Path]):
    def write(image_paths: List[Path], label_path: Optional[Path]) -> None:
        C.copy_file(image, image_paths[0])
        if label_path is not None:
            import SimpleITK as sitk

            C.check_same_geometry(image, label)
            C.check_label_values(sitk.GetArrayFromImage(sitk.ReadImage(str(label))), LABELS.values(), label)
            C.copy_file(label, label_path)
    return write


def convert(source: Path, output_root: Optional[Path] = None, dataset_id: int = DEFAULT_ID, name: str = DEFAULT_NAME,
            num_labeled: int = 3, selection: str = "auto", seed: int = 12345, keep_unlabeled_labels: bool = False,
            overwrite: bool = False, options: Optional[dict] = None) -> Path:
    """Convert the ACDC challenge folder ``source``; returns the written dataset folder. See module docstring."""
    training, testing = find_split_folders(Path(source))
    train_dirs = list_patients(training)
    if not train_dirs:
        raise C.ConversionError(f"{training} contains no patientXXX folders")
    test_dirs = list_patients(testing)
    if not test_dirs:
        C.note(f"no test patients in {testing}; imagesTs/ stays empty")
    labeled_patients, sel = choose_labeled([p.name for p in train_dirs], num_labeled, selection, seed)
    jobs, groups, pathology = [], {}, {}
    for p in train_dirs:
        is_labeled = p.name in labeled_patients
        frames, info = patient_frames(p, need_label=True if is_labeled else (None if keep_unlabeled_labels else False))
        pathology[p.name] = info.get("Group")
        for case, image, label in frames:
            jobs.append(C.CaseJob(case, "labeled" if is_labeled else "unlabeled", _copier(image, label),
                                  has_label=label is not None))
            groups[case] = p.name
    test_frames = [(p, f) for p in test_dirs for f in patient_frames(p, need_label=None)[0]]
    with_gt = [case for _, (case, _, label) in test_frames if label is not None]
    if with_gt and len(with_gt) != len(test_frames):
        missing = [case for _, (case, _, label) in test_frames if label is None]
        raise C.ConversionError(f"{len(missing)} test frames lack their _gt file (e.g. {missing[0]}) while others "
                                f"have one; labelsTs/ must be complete or absent")
    for p, (case, image, label) in test_frames:
        jobs.append(C.CaseJob(case, "test", _copier(image, label), has_label=label is not None))
        groups[case] = p.name
    # labeled cases first so the progress bar reaches the important ones early
    jobs.sort(key=lambda j: C.ROLES.index(j.role))

    root = C.resolve_output_root(output_root)
    folder_name = C.dataset_folder_name(dataset_id, name)
    record = C.make_split_record(
        converter="acdc", source=source, dataset=folder_name, options=options,
        selection=dict(sel, num_labeled_patients=num_labeled, labeled_patients=labeled_patients),
        groups=groups, pathology=pathology, spacing_note="files copied unchanged: real per-case spacing")
    return C.build_dataset(
        root=root, folder_name=folder_name, overwrite=overwrite, jobs=jobs, num_channels=1, file_ending=FILE_ENDING,
        keep_unlabeled_labels=keep_unlabeled_labels, record=record,
        dataset_json=dict(channel_names=CHANNEL_NAMES, labels=LABELS, dataset_name=folder_name,
                          reference="O. Bernard et al., IEEE TMI 37(11), 2018 (ACDC)",
                          licence="research use; CC BY-NC-SA 4.0 (Human Heart Project)",
                          description=f"ACDC, {num_labeled} labeled patients ({sel['rule']})"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.make_parser("acdc", "ACDC challenge layout -> nnU-Net raw dataset with N labeled patients and "
                                   "imagesUnlabeled/.")
    parser.add_argument("input", help="extracted ACDC folder with training/ and testing/ (or database/ around them)")
    C.add_output_arguments(parser, DEFAULT_ID, DEFAULT_NAME)
    parser.add_argument("-n", "--num-labeled", type=int, default=3, help="number of labeled training patients")
    parser.add_argument("--selection", choices=("auto", "literature", "random"), default="auto",
                        help="auto: the SSL4MIS patients when N is a literature setting, else seeded random")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the random choice")
    C.add_hidden_label_argument(parser)

    def run(args):
        convert(Path(args.input), args.output_root, args.dataset_id, args.name, args.num_labeled, args.selection,
                args.seed, args.keep_unlabeled_labels, args.overwrite, options=vars(args))

    return C.run_main(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
