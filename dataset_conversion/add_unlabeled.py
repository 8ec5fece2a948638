"""Add a folder of unlabeled images to an existing nnU-Net raw dataset (``imagesUnlabeled/``).

The input folder may hold

- nnU-Net-named files ``{case}_{channel:04d}{ending}`` (any number of channels), or
- for single-channel datasets, one file per case with any name (``scan17.nrrd`` -> case ``scan17``).

``--naming auto`` (default) takes the first form when every name has a 4-digit channel suffix (and then every case
must have exactly the dataset's channels), else the second when the dataset has one channel. ``--naming single``
forces the second form (for names like ``scan_2019.nii.gz``).

Files in the dataset's ``file_ending`` are copied byte for byte (any format nnU-Net reads, Tiff spacing side files
included). Files in another volumetric format that SimpleITK reads and writes (.nii.gz, .nii, .nrrd, .mha, .gipl)
are converted to the dataset's ending with their spacing, origin and direction; other mismatches are refused.
Every new case is read back with the dataset's own nnU-Net reader: unreadable files, a wrong channel count,
channels that differ in shape or spacing, or 2D images in a 3D dataset (and vice versa) stop the command with the
file named. Case ids must not clash with imagesTr/imagesTs (use ``--prefix``) or with existing unlabeled cases
(unless ``--overwrite``).

Atomicity: the new ``imagesUnlabeled/`` is assembled in a hidden folder beside it (existing files hard-linked), and
swapped in by renaming only when every case passed; then ``numUnlabeled`` in dataset.json and the ``unlabeled``
list in ssl_split.json (created if absent, with an ``additions`` history) are rewritten atomically.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nnunet_ssl.dataset_conversion import _common as C

SITK_CONVERTIBLE = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")


def nnunet_file_endings() -> List[str]:
    """Every file ending one of nnU-Net's readers accepts, longest first (so .nii.gz wins over .gz-less .nii)."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    return sorted({e for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}, key=len, reverse=True)


def find_dataset(dataset: str, raw_root: Optional[str]) -> Path:
    """A dataset given as a path, ``DatasetXXX_Name`` or an id, looked up in ``raw_root`` / ``$nnUNet_raw``."""
    p = Path(dataset)
    if p.is_dir() and (p / "dataset.json").is_file():
        return p.resolve()
    root = C.resolve_output_root(raw_root)
    if dataset.isdigit():
        hits = sorted(d for d in root.glob(f"Dataset{int(dataset):03d}_*") if d.is_dir())
        if len(hits) != 1:
            raise C.ConversionError(f"dataset id {dataset}: found {len(hits)} matching folders in {root} "
                                    f"({[h.name for h in hits]}); give the dataset folder instead")
        p = hits[0]
    else:
        p = root / dataset
    if not (p / "dataset.json").is_file():
        raise C.ConversionError(f"{p} is not an nnU-Net raw dataset (no dataset.json)")
    return p


def _ending_of(name: str) -> Optional[str]:
    for e in nnunet_file_endings():
        if name.lower().endswith(e):
            return name[-len(e):]
    return None


def scan_input(folder: Path, num_channels: int, naming: str) -> Tuple[str, str, Dict[str, List[Path]]]:
    """(ending, naming used, case -> channel files) of the input folder.

    Raises:
        ConversionError: unknown or mixed file endings, names that fit neither naming, missing channels.
    """
    if not folder.is_dir():
        raise C.ConversionError(f"input folder {folder} does not exist")
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if not f.name.endswith(".json")]  # .json: Tiff spacing side files
    if not images:
        raise C.ConversionError(f"{folder} holds no image files")
    endings = {}
    for f in images:
        e = _ending_of(f.name)
        if e is None:
            raise C.ConversionError(f"{f}: not a format nnU-Net reads (expected one of {', '.join(nnunet_file_endings())})")
        endings.setdefault(e.lower(), []).append(f)
    if len(endings) > 1:
        raise C.ConversionError(f"{folder} mixes file endings {sorted(endings)}; put one format per folder")
    ending = next(iter(endings))
    if naming == "single" and num_channels > 1:
        raise C.ConversionError(f"--naming single needs a 1-channel dataset; this one has {num_channels} channels, "
                                f"name the files {{case}}_{{channel:04d}}{ending}")
    stems = {f: f.name[: -len(ending)] for f in images}
    if naming in ("auto", "nnunet"):
        grouped: Dict[str, Dict[int, Path]] = {}
        ok = True
        for f, s in stems.items():
            m = C.CHANNEL_RE.match(s)
            if m is None:
                ok = False
                break
            grouped.setdefault(m["case"], {})[int(m["channel"])] = f
        bad = [c for c, ch in grouped.items() if sorted(ch) != list(range(num_channels))] if ok else []
        if ok and not bad:
            return ending, "nnunet", {c: [ch[i] for i in range(num_channels)] for c, ch in sorted(grouped.items())}
        # names that all carry a channel suffix but the wrong channels are an error, never single-channel cases:
        # that would turn each channel of a multi-channel image into a case of its own
        if naming == "nnunet" or num_channels > 1 or ok:
            detail = (f"case '{bad[0]}' has channels {sorted(grouped[bad[0]])}" if bad else
                      "some names lack the _XXXX channel suffix")
            raise C.ConversionError(f"{folder}: expected {{case}}_{{channel:04d}}{ending} with channels "
                                    f"{list(range(num_channels))} for every case; {detail}")
    return ending, "single", {s: [f] for f, s in sorted(stems.items(), key=lambda x: x[1])}


def existing_case_ids(folder: Path, ending: str, with_channel: bool) -> set:
    if not folder.is_dir():
        return set()
    out = set()
    for f in folder.iterdir():
        if f.name.endswith(ending) and not f.name.startswith("."):
            s = f.name[: -len(ending)]
            out.add(s[:-5] if with_channel and C.CHANNEL_RE.match(s) else s)
    return out


def _write_channel(src: Path, dst: Path, in_ending: str, out_ending: str) -> None:
    if in_ending == out_ending:
        C.copy_nnunet_file(src, dst, in_ending, is_channel=True)
        return
    import SimpleITK as sitk

    try:
        sitk.WriteImage(sitk.ReadImage(str(src)), str(dst), True)
    except RuntimeError as e:
        raise C.ConversionError(f"cannot convert {src} to {out_ending}: {str(e).strip().splitlines()[-1]}")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def add_unlabeled(dataset: str, input_folder: Path, raw_root: Optional[str] = None, naming: str = "auto",
                  prefix: str = "", overwrite: bool = False, options: Optional[dict] = None) -> List[str]:
    """Add the images of ``input_folder`` to ``imagesUnlabeled/`` of ``dataset``; returns the new case ids."""
    ds = find_dataset(dataset, raw_root)
    dj = json.loads((ds / "dataset.json").read_text())
    ending = dj["file_ending"]
    n_ch = len(dj.get("channel_names", dj.get("modality", {})))
    in_ending, naming_used, cases = scan_input(Path(input_folder), n_ch, naming)
    if in_ending != ending and not (in_ending in SITK_CONVERTIBLE and ending in SITK_CONVERTIBLE):
        raise C.ConversionError(f"the input files are '{in_ending}' but the dataset uses '{ending}' (dataset.json "
                                f"file_ending); convert them to {ending} first")
    cases = {f"{prefix}{c}": files for c, files in cases.items()}
    labeled_ids = existing_case_ids(ds / "imagesTr", ending, True) | existing_case_ids(ds / "imagesTs", ending, True)
    clash = sorted(set(cases) & labeled_ids)
    if clash:
        raise C.ConversionError(f"case ids {clash[:5]} already exist in imagesTr/ or imagesTs/ of {ds.name}; "
                                f"choose a --prefix")
    unl_dir = ds / C.UNLABELED_IMAGES
    old_ids = existing_case_ids(unl_dir, ending, True)
    clash = sorted(set(cases) & old_ids)
    if clash and not overwrite:
        raise C.ConversionError(f"unlabeled cases {clash[:5]} already exist in {unl_dir}; pass --overwrite to "
                                f"replace them or choose a --prefix")
    example = sorted((ds / "imagesTr").glob(f"*_0000{ending}"))
    if not example:
        raise C.ConversionError(f"{ds / 'imagesTr'} has no images to compare the new ones with")
    example_case = [example[0].parent / (example[0].name[: -len(ending) - 5] + f"_{c:04d}{ending}")
                    for c in range(n_ch)]
    reader = C.nnunet_reader(ending, example[0], dj)
    ref_image, ref_props = C.read_case(reader, example_case)
    ref_is_2d = ref_image.shape[1] == 1

    staging = Path(tempfile.mkdtemp(prefix=f".{C.UNLABELED_IMAGES}.partial-", dir=ds))
    try:
        if unl_dir.is_dir():
            for f in unl_dir.iterdir():
                s = f.name[: -len(ending)] if f.name.endswith(ending) else f.name[: -len(".json")]
                if (s[:-5] if C.CHANNEL_RE.match(s) else s) not in cases:
                    _link_or_copy(f, staging / f.name)
        for case, files in C.progress(cases.items(), desc=f"add to {ds.name}/{C.UNLABELED_IMAGES}", total=len(cases)):
            outs = [staging / f"{case}_{c:04d}{ending}" for c in range(n_ch)]
            for src, dst in zip(files, outs):
                _write_channel(src, dst, in_ending, ending)
            data, props = C.read_case(reader, outs)
            if data.shape[0] != n_ch:
                raise C.ConversionError(f"case {case} ({files[0]}) has {data.shape[0]} channel(s) per file set; "
                                        f"dataset.json declares {n_ch}")
            if (data.shape[1] == 1) != ref_is_2d:
                raise C.ConversionError(f"case {case} ({files[0]}) is {'2D' if data.shape[1] == 1 else '3D'} but "
                                        f"the dataset's images are {'2D' if ref_is_2d else '3D'}")
        trash = ds / f".{C.UNLABELED_IMAGES}.old-{uuid.uuid4().hex[:8]}"
        if unl_dir.exists():
            os.rename(unl_dir, trash)
        os.rename(staging, unl_dir)
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    all_unlabeled = sorted(existing_case_ids(unl_dir, ending, True))
    dj["numUnlabeled"] = len(all_unlabeled)
    dj.setdefault("ssl_split", C.SPLIT_RECORD_FILENAME)
    C.atomic_write_json(dj, ds / "dataset.json")
    split_path = ds / C.SPLIT_RECORD_FILENAME
    if split_path.is_file():
        record = json.loads(split_path.read_text())
    else:
        record = C.make_split_record(converter="add-unlabeled", source=None, dataset=ds.name, options=None,
                                     selection={"rule": "existing dataset: labeled = imagesTr"})
        record["labeled"] = sorted(existing_case_ids(ds / "imagesTr", ending, True))
        record["test"] = sorted(existing_case_ids(ds / "imagesTs", ending, True))
        record["num_labeled"], record["num_test"] = len(record["labeled"]), len(record["test"])
    record["unlabeled"] = all_unlabeled
    record["num_unlabeled"] = len(all_unlabeled)
    record.setdefault("additions", []).append({
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "source": str(Path(input_folder).resolve()), "naming": naming_used, "input_ending": in_ending,
        "cases": sorted(cases), "replaced": clash, "options": options})
    C.atomic_write_json(record, split_path)
    print(f"added {len(cases)} unlabeled case(s) to {unl_dir} ({len(all_unlabeled)} in total)",
          file=sys.stderr)
    return sorted(cases)


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.make_parser("add-unlabeled", "Add a folder of unlabeled images to an existing nnU-Net raw dataset.")
    parser.add_argument("dataset", help="dataset id, DatasetXXX_Name, or path to the dataset folder")
    parser.add_argument("input", help="folder of unlabeled images")
    parser.add_argument("-o", "--output-root", default=None,
                        help="nnU-Net raw folder holding the dataset (default: $nnUNet_raw)")
    parser.add_argument("--naming", choices=("auto", "nnunet", "single"), default="auto",
                        help="nnunet: {case}_{channel:04d}{ending}; single: one file per case (1-channel datasets)")
    parser.add_argument("--prefix", default="", help="prepended to every new case id")
    parser.add_argument("--overwrite", action="store_true", help="replace unlabeled cases with the same id")

    def run(args):
        add_unlabeled(args.dataset, Path(args.input), args.output_root, args.naming, args.prefix, args.overwrite,
                      options=vars(args))

    return C.run_main(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
