"""A Medical Segmentation Decathlon task folder (or an nnU-Net v2 raw dataset) -> N labeled + unlabeled dataset.

Accepted sources:

- MSD task folder ``TaskXX_Name/`` with ``dataset.json`` (``modality``, ``labels``), ``imagesTr/{case}.nii.gz``
  (3D, or 4D with one volume per modality), ``labelsTr/{case}.nii.gz``, ``imagesTs/``. 4D images are split into
  nnU-Net channel files with nnU-Net's own ``split_4d_nifti``; macOS ``._*`` files are ignored (as nnU-Net does).
- nnU-Net v2 raw dataset ``DatasetXXX_Name/`` (``channel_names``, ``file_ending``): any file format nnU-Net reads;
  ``labelsTs/`` and an existing ``imagesUnlabeled/`` are carried over; Tiff spacing side files (``{case}.json``)
  travel with their images.

The source is only read. The new dataset keeps N labeled training cases (``-n``, ``--fraction`` or an explicit
``--labeled-cases``; random choices are seeded and recorded), moves the other training cases' images to
``imagesUnlabeled/`` (their labels to ``labelsUnlabeledHidden/`` with ``--keep-unlabeled-labels``, for evaluating
pseudo-labels) and keeps the test images. Labeled cases are read back with nnU-Net's reader and checked: image and
label shape and spacing agree, label values are declared in dataset.json.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ssl.dataset_conversion import _common as C

DEFAULT_ID = 900
_SOURCE_NAME_RE = re.compile(r"^(?:Task\d+|Dataset\d+)_(?P<name>.+)$")
_CARRIED_KEYS = ("regions_class_order", "overwrite_image_reader_writer")


def _visible(folder: Path, ending: str) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir()
                  if f.name.endswith(ending) and not f.name.startswith(".") and not f.name.startswith("_"))


class Source:
    """Training/test cases of the source, whatever its flavour: case -> channel files (or one 4D file)."""

    def __init__(self, folder: Path):
        self.folder = folder
        js = folder / "dataset.json"
        if not js.is_file():
            raise C.ConversionError(f"{js} is missing: the source must be an MSD task folder or an nnU-Net raw "
                                    f"dataset with a dataset.json")
        try:
            self.json = json.loads(js.read_text())
        except json.JSONDecodeError as e:
            raise C.ConversionError(f"{js} is not valid JSON: {e}")
        if not (folder / "imagesTr").is_dir() or not (folder / "labelsTr").is_dir():
            raise C.ConversionError(f"{folder} needs imagesTr/ and labelsTr/ folders")
        if "channel_names" in self.json and "file_ending" in self.json:
            self.flavour = "nnunet"
            if "dataset" in self.json:
                raise C.ConversionError(f"{js} lists files explicitly ('dataset' key); only the imagesTr/labelsTr "
                                        f"folder layout is supported")
            self.file_ending = self.json["file_ending"]
            self.channel_names = dict(self.json["channel_names"])
            self.labels = dict(self.json["labels"])
        elif "modality" in self.json and "labels" in self.json:
            self.flavour = "msd"
            self.file_ending = ".nii.gz"
            self.channel_names = dict(self.json["modality"])
            self.labels = {name: int(value) for value, name in self.json["labels"].items()}
        else:
            raise C.ConversionError(f"{js} has neither nnU-Net v2 keys (channel_names, file_ending) nor MSD keys "
                                    f"(modality, labels)")
        self.num_channels = len(self.channel_names)
        self.train = self._images("imagesTr")
        self.test = self._images("imagesTs")
        self.unlabeled = self._images(C.UNLABELED_IMAGES) if self.flavour == "nnunet" else {}
        if not self.train:
            raise C.ConversionError(f"{folder / 'imagesTr'} has no '{self.file_ending}' images")
        C.check_files_exist([self.label("labelsTr", c) for c in self.train], "training label(s)",
                            f"every image in imagesTr needs labelsTr/{{case}}{self.file_ending}")
        self.test_labels = bool(self.test) and all(self.label("labelsTs", c).is_file() for c in self.test)

    def _images(self, sub: str) -> Dict[str, List[Path]]:
        if self.flavour == "nnunet":
            return C.group_channel_files(self.folder / sub, self.file_ending, self.num_channels) \
                if (self.folder / sub).is_dir() else {}
        return {f.name[: -len(self.file_ending)]: [f] for f in _visible(self.folder / sub, self.file_ending)}

    def label(self, sub: str, case: str) -> Path:
        return self.folder / sub / f"{case}{self.file_ending}"

    def base_name(self) -> str:
        m = _SOURCE_NAME_RE.match(self.folder.name)
        return m["name"] if m else self.folder.name


def _writer(src: Source, files: List[Path], label: Optional[Path], check: bool):
    def write(image_paths: List[Path], label_path: Optional[Path]) -> None:
        if src.flavour == "msd":
            from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti

            info = C.image_info(files[0])
            n = info["size"][3] if info["dimension"] == 4 else 1
            if n != src.num_channels:
                raise C.ConversionError(f"{files[0]} holds {n} volume(s) but dataset.json declares "
                                        f"{src.num_channels} modalities")
            # nnU-Net's splitter names outputs {case}_{i:04d}.nii.gz after the source file, as we need
            split_4d_nifti(str(files[0]), str(image_paths[0].parent))
        else:
            for f, dst in zip(files, image_paths):
                C.copy_nnunet_file(f, dst, src.file_ending, is_channel=True)
        if label_path is not None:
            C.copy_nnunet_file(label, label_path, src.file_ending, is_channel=False)
            if check:
                reader = C.nnunet_reader(src.file_ending, image_paths[0],
                                         src.json if src.flavour == "nnunet" else None)
                C.check_case_with_reader(reader, image_paths, label_path, C.label_values(src.labels))
    return write


def choose_labeled(cases: Sequence[str], num_labeled: Optional[int], fraction: Optional[float], seed: int,
                   explicit: Optional[Sequence[str]]) -> Tuple[List[str], dict]:
    if explicit:
        unknown = [c for c in explicit if c not in cases]
        if unknown:
            raise C.ConversionError(f"--labeled-cases {unknown} are not training cases of the source "
                                    f"(e.g. {list(cases)[:3]})")
        return sorted(set(explicit)), {"rule": "explicit list (--labeled-cases)", "seed": None}
    n = C.resolve_num_labeled(num_labeled, fraction, len(cases), "training cases")
    rule = f"seeded random choice of {n} of {len(cases)} training cases"
    return C.seeded_choice(cases, n, seed), {"rule": rule, "seed": seed, "fraction": fraction}


def convert(source: Path, output_root: Optional[Path] = None, dataset_id: int = DEFAULT_ID, name: Optional[str] = None,
            num_labeled: Optional[int] = None, fraction: Optional[float] = None, seed: int = 12345,
            labeled_cases: Optional[Sequence[str]] = None, keep_unlabeled_labels: bool = False,
            overwrite: bool = False, options: Optional[dict] = None) -> Path:
    """Split the training set of ``source`` into N labeled + unlabeled; returns the written dataset folder."""
    src = Source(Path(source))
    labeled, selection = choose_labeled(sorted(src.train), num_labeled, fraction, seed, labeled_cases)
    jobs = []
    for case in sorted(src.train):
        role = "labeled" if case in labeled else "unlabeled"
        jobs.append(C.CaseJob(case, role, _writer(src, src.train[case], src.label("labelsTr", case),
                                                  check=role == "labeled")))
    carried = sorted(set(src.unlabeled) - set(src.train))
    for case in carried:
        jobs.append(C.CaseJob(case, "unlabeled", _writer(src, src.unlabeled[case], None, False), has_label=False))
    for case in sorted(src.test):
        jobs.append(C.CaseJob(case, "test", _writer(src, src.test[case], src.label("labelsTs", case), False),
                              has_label=src.test_labels))
    jobs.sort(key=lambda j: C.ROLES.index(j.role))

    name = name or f"{src.base_name()}_SSL"
    root = C.resolve_output_root(output_root)
    folder_name = C.dataset_folder_name(dataset_id, name)
    if root / folder_name == Path(source).resolve():
        raise C.ConversionError(f"the output {root / folder_name} is the source itself; choose another -d or --name")
    extra = {k: src.json[k] for k in _CARRIED_KEYS if src.json.get(k) is not None}
    record = C.make_split_record(converter="msd", source=source, dataset=folder_name, options=options,
                                 selection=dict(selection, num_training_cases_in_source=len(src.train)),
                                 source_flavour=src.flavour, carried_unlabeled=carried)
    return C.build_dataset(
        root=root, folder_name=folder_name, overwrite=overwrite, jobs=jobs, num_channels=src.num_channels,
        file_ending=src.file_ending, keep_unlabeled_labels=keep_unlabeled_labels, record=record,
        dataset_json=dict(channel_names=src.channel_names, labels=src.labels, dataset_name=folder_name,
                          description=f"{src.json.get('description') or src.json.get('name') or src.base_name()}; "
                                      f"{len(labeled)} labeled ({selection['rule']})",
                          reference=src.json.get("reference"), release=src.json.get("release"),
                          licence=src.json.get("licence", src.json.get("license")), **extra))


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.make_parser("msd", "MSD task folder or nnU-Net raw dataset -> N labeled cases + imagesUnlabeled/.")
    parser.add_argument("input", help="MSD task folder (TaskXX_Name) or nnU-Net raw dataset folder")
    C.add_output_arguments(parser, DEFAULT_ID, None)
    parser.set_defaults(name=None)
    parser.description += " The default --name is <source name>_SSL."
    C.add_selection_arguments(parser, default_n=None)
    parser.add_argument("--labeled-cases", nargs="+", default=None, metavar="CASE",
                        help="explicit labeled case identifiers (instead of -n/--fraction)")
    C.add_hidden_label_argument(parser)

    def run(args):
        if args.labeled_cases and (args.num_labeled is not None or args.fraction is not None):
            raise C.ConversionError("give either --labeled-cases or -n/--num-labeled / --fraction, not both")
        convert(Path(args.input), args.output_root, args.dataset_id, args.name, args.num_labeled, args.fraction,
                args.seed, args.labeled_cases, args.keep_unlabeled_labels, args.overwrite, options=vars(args))

    return C.run_main(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
