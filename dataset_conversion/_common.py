"""Helpers shared by every converter: output location, atomic writing, split record, images, CLI plumbing.

Every converter builds its dataset in a hidden temporary folder beside the target
(``<root>/.DatasetXXX_Name.partial-*``) and renames it into place only when everything was written, so an
interrupted or failed conversion never leaves a half-written ``DatasetXXX_Name`` folder that nnU-Net would pick up
(nnU-Net finds datasets by the ``DatasetXXX_`` prefix, which hidden folders do not have).

Beside ``dataset.json`` each converter writes ``ssl_split.json`` (:data:`SPLIT_RECORD_FILENAME`): which cases are
labeled, unlabeled and test, how they were chosen (rule, seed, source lists) and the command that made them, so a
result can always be traced back to its labeled cases.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

SPLIT_RECORD_FILENAME = "ssl_split.json"
UNLABELED_IMAGES = "imagesUnlabeled"
HIDDEN_UNLABELED_LABELS = "labelsUnlabeledHidden"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class ConversionError(Exception):
    """Bad user input or refused operation. The message names the file or value and says what to do.

    ``main`` functions turn it into ``nnunet_ssl: error: <message>`` on stderr and a non-zero exit code, never a
    traceback.
    """


# --------------------------------------------------------------------------------------------------------------
# CLI plumbing
# --------------------------------------------------------------------------------------------------------------

def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    from nnunet_ssl.cli_common import Parser

    return Parser(prog=f"nnunet_ssl convert {name}", description=description)


def add_output_arguments(parser: argparse.ArgumentParser, default_id: int, default_name: str) -> None:
    """``-d/--dataset-id``, ``--name``, ``-o/--output-root``, ``--overwrite``: the same in every converter."""
    parser.add_argument("-d", "--dataset-id", type=int, default=default_id,
                        help="nnU-Net dataset id of the new dataset (1..999)")
    parser.add_argument("--name", default=default_name,
                        help="dataset name; the folder is Dataset{id:03d}_{name}")
    parser.add_argument("-o", "--output-root", default=None,
                        help="folder that receives Dataset{id:03d}_{name}/ (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset folder of the same id and name")


def add_selection_arguments(parser: argparse.ArgumentParser, default_n: Optional[int], unit: str = "cases") -> None:
    """``-n/--num-labeled``, ``--fraction``, ``--seed`` for converters that choose labeled cases at random."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-n", "--num-labeled", type=int, default=default_n, help=f"number of labeled {unit}")
    group.add_argument("--fraction", type=float, default=None,
                       help=f"fraction of labeled {unit} in (0, 1]; rounded, at least 1")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the random choice of labeled cases")


def add_hidden_label_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-unlabeled-labels", action="store_true",
                        help=f"keep the labels of unlabeled cases in {HIDDEN_UNLABELED_LABELS}/ (never used for "
                             f"training; only to evaluate pseudo-labels)")


def add_subset_arguments(parser: argparse.ArgumentParser) -> None:
    """Limits for quick trials and tests; recorded in the split file so a subset is never mistaken for the benchmark."""
    parser.add_argument("--max-unlabeled", type=int, default=None,
                        help="convert only the first K unlabeled cases (quick trials; recorded in ssl_split.json)")
    parser.add_argument("--max-test", type=int, default=None,
                        help="convert only the first K test cases (quick trials; recorded in ssl_split.json)")


def run_main(run: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
             argv: Optional[Sequence[str]]) -> int:
    """Parse ``argv``, call ``run(args)``; user errors become one ``nnunet_ssl: error:`` line and exit code 2."""
    from nnunet_ssl.cli_common import print_error

    args = parser.parse_args(None if argv is None else list(argv))
    try:
        run(args)
    except ConversionError as e:
        print_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


# --------------------------------------------------------------------------------------------------------------
# Output location and atomic writing
# --------------------------------------------------------------------------------------------------------------

def resolve_output_root(output_root: Optional[Union[str, os.PathLike]]) -> Path:
    if output_root is None:
        from nnunetv2.paths import nnUNet_raw
        if not nnUNet_raw.is_set():
            raise ConversionError("no output folder: set the nnUNet_raw environment variable or pass -o/--output-root")
        output_root = nnUNet_raw.get()
    root = Path(output_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset id {dataset_id} is out of range: nnU-Net ids are 1..999 (-d/--dataset-id)")
    if not _NAME_RE.match(name):
        raise ConversionError(f"dataset name '{name}' is not allowed: use letters, digits, '_' and '-' (--name)")
    return f"Dataset{int(dataset_id):03d}_{name}"


def check_target(root: Path, folder_name: str, overwrite: bool) -> Path:
    """Refuse to overwrite, and refuse an id that another dataset already uses (nnU-Net resolves ids by prefix).

    Raises:
        ConversionError: the target exists and ``overwrite`` is False, or another ``DatasetXXX_*`` with the same id
            exists in ``root`` or in ``$nnUNet_preprocessed`` / ``$nnUNet_results``.
    """
    target = root / folder_name
    prefix = folder_name[: len("Dataset000_")]
    search = [root] + [Path(os.environ[v]) for v in ("nnUNet_preprocessed", "nnUNet_results")
                       if os.environ.get(v) and os.path.isdir(os.environ[v])]
    for folder in search:
        for other in sorted(folder.glob(prefix + "*")):
            if other.is_dir() and other.name != folder_name:
                raise ConversionError(
                    f"dataset id {folder_name[7:10]} is already used by {other}: nnU-Net needs unique ids, "
                    f"choose another -d/--dataset-id")
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} already exists: pass --overwrite to replace it, or choose another "
                              f"-d/--dataset-id or --name")
    if target.exists():
        stale = [str(Path(os.environ[v]) / folder_name) for v in ("nnUNet_preprocessed", "nnUNet_results")
                 if os.environ.get(v) and (Path(os.environ[v]) / folder_name).exists()]
        if stale:
            print(f"warning: replacing {target}; these were made from the old version and are now stale: "
                  f"{', '.join(stale)}", file=sys.stderr)
    return target


@contextmanager
def atomic_dataset_folder(root: Path, folder_name: str, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden temporary folder in ``root``; on success it becomes ``root/folder_name``.

    On any exception (including KeyboardInterrupt) the temporary folder is deleted and the target is untouched.
    With ``overwrite`` an existing target is replaced only after the new one is complete.
    """
    check_target(root, folder_name, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.partial-", dir=root))
    try:
        yield tmp
        target = root / folder_name
        if target.exists():
            if not overwrite:  # appeared while we were converting
                raise ConversionError(f"{target} appeared during the conversion: pass --overwrite to replace it")
            trash = root / f".{folder_name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(obj, path: Path) -> None:
    """Write JSON through a temporary file and ``os.replace`` so readers never see a truncated file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_layout(folder: Path, with_labels_ts: bool, with_unlabeled: bool, with_hidden_labels: bool) -> Dict[str, Path]:
    names = ["imagesTr", "labelsTr", "imagesTs"]
    if with_labels_ts:
        names.append("labelsTs")
    if with_unlabeled:
        names.append(UNLABELED_IMAGES)
    if with_hidden_labels:
        names.append(HIDDEN_UNLABELED_LABELS)
    out = {}
    for n in names:
        out[n] = folder / n
        out[n].mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# dataset.json and the split record
# --------------------------------------------------------------------------------------------------------------

def write_dataset_json(folder: Path, *, channel_names: Mapping, labels: Mapping, num_training: int,
                       file_ending: str, num_unlabeled: int, dataset_name: str, description: str = None,
                       reference: str = None, release: str = None, licence: str = None,
                       converted_by: str = "nnunet_ssl convert", **extra) -> dict:
    """nnU-Net's own ``generate_dataset_json`` plus ``numUnlabeled`` and a pointer to the split record."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    kwargs = {}
    if licence is not None:
        kwargs["license"] = licence
    generate_dataset_json(str(folder), channel_names=dict(channel_names), labels=dict(labels),
                          num_training_cases=int(num_training), file_ending=file_ending, dataset_name=dataset_name,
                          description=description, reference=reference, release=release,
                          converted_by=converted_by, numUnlabeled=int(num_unlabeled),
                          ssl_split=SPLIT_RECORD_FILENAME, **kwargs, **extra)
    with open(folder / "dataset.json") as f:
        return json.load(f)


def make_split_record(*, converter: str, source: Union[str, Path, None], dataset: str, selection: dict,
                      options: Optional[Mapping] = None, **extra) -> dict:
    """The traceability record written beside dataset.json (see module docstring).

    ``options`` are the converter's resolved options (e.g. ``vars(args)``). :func:`build_dataset` adds the
    ``labeled`` / ``unlabeled`` / ``test`` case lists from what it actually wrote.
    """
    from nnunet_ssl import __version__

    rec = {
        "converter": converter,
        "nnunet_ssl_version": __version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(options or {}).items()},
        "source": None if source is None else str(Path(source).resolve()),
        "dataset": dataset,
        "selection": selection,
    }
    rec.update(extra)
    return rec


def write_split_record(folder: Path, record: dict) -> Path:
    path = Path(folder) / SPLIT_RECORD_FILENAME
    atomic_write_json(record, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Choosing labeled cases
# --------------------------------------------------------------------------------------------------------------

def resolve_num_labeled(num_labeled: Optional[int], fraction: Optional[float], total: int, unit: str = "cases") -> int:
    """Number of labeled items from ``-n`` or ``--fraction``; 1 <= n <= total.

    Raises:
        ConversionError: neither or an out-of-range value was given.
    """
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConversionError(f"--fraction {fraction} must be in (0, 1]")
        num_labeled = max(1, int(round(fraction * total)))
    if num_labeled is None:
        raise ConversionError("say how many labeled cases to keep: -n/--num-labeled N or --fraction F")
    if not 1 <= num_labeled <= total:
        raise ConversionError(f"-n/--num-labeled {num_labeled} is out of range: there are {total} {unit}, "
                              f"choose 1..{total}")
    return int(num_labeled)


def seeded_choice(items: Sequence[str], n: int, seed: int) -> List[str]:
    """``n`` items chosen with ``np.random.RandomState(seed)`` (stable across numpy versions), returned sorted."""
    pool = sorted(items)
    idx = np.random.RandomState(seed).permutation(len(pool))[:n]
    return sorted(pool[i] for i in idx)


def read_list_file(path: Union[str, Path]) -> List[str]:
    """Non-empty stripped lines of a split list (``train.list`` ...)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"split list {path} is missing: the source folder must contain it")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def apply_limit(items: Sequence[str], limit: Optional[int], option: str) -> List[str]:
    if limit is None:
        return list(items)
    if limit < 0:
        raise ConversionError(f"{option} {limit} must be >= 0")
    return list(items)[:limit]


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------

def write_image(array: np.ndarray, path: Union[str, Path], spacing: Sequence[float],
                origin: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None) -> None:
    """Write a numpy array with SimpleITK, geometry given in the array's own axis order.

    Args:
        array: (z, y, x) for 3D or (y, x) for 2D, i.e. numpy order; SimpleITK's (x, y, z) is its reverse.
        spacing: mm per voxel along the array axes, e.g. (z, y, x). Reversed for SimpleITK here, once.
        origin: physical origin in SimpleITK (x, y, z) order; default zeros.
        direction: flattened direction cosines in SimpleITK order; default identity.
    """
    import SimpleITK as sitk

    if len(spacing) != array.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match array shape {array.shape}")
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing[::-1]])
    if origin is not None:
        img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    sitk.WriteImage(img, str(path), True)


def image_info(path: Union[str, Path]) -> dict:
    """Header-only geometry in SimpleITK (x, y, z) order: size, spacing, origin, direction, dimension."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ConversionError(f"cannot read image header of {path}: {str(e).strip().splitlines()[-1]}") from None
    return {"size": tuple(reader.GetSize()), "spacing": tuple(reader.GetSpacing()), "origin": tuple(reader.GetOrigin()),
            "direction": tuple(reader.GetDirection()), "dimension": reader.GetDimension()}


def check_same_geometry(image_path: Path, label_path: Path, atol: float = 1e-3) -> None:
    """Image and label must share size and spacing; origin/direction differences only warn (as nnU-Net does)."""
    a, b = image_info(image_path), image_info(label_path)
    if a["size"] != b["size"]:
        raise ConversionError(f"shape mismatch: image {image_path} has size {a['size']} but label {label_path} has "
                              f"{b['size']} (x, y, z); fix or remove this case")
    if not np.allclose(a["spacing"], b["spacing"], atol=atol, rtol=1e-4):
        raise ConversionError(f"spacing mismatch: image {image_path} has {a['spacing']} but label {label_path} has "
                              f"{b['spacing']}; fix or remove this case")
    for key in ("origin", "direction"):
        if not np.allclose(a[key], b[key], atol=atol, rtol=1e-4):
            note(f"{key} of {label_path} ({b[key]}) differs from its image's ({a[key]}); check the overlay")


def note(message: str) -> None:
    """Information for the user that is not an error; on stderr so stdout stays clean."""
    print(f"note: {message}", file=sys.stderr)


def check_label_values(label: np.ndarray, allowed: Iterable[int], where: Union[str, Path]) -> None:
    allowed = set(int(a) for a in allowed)
    present = set(np.unique(label).astype(int).tolist())
    bad = sorted(present - allowed)
    if bad:
        raise ConversionError(f"label file {where} contains values {bad}; allowed are {sorted(allowed)}")


def check_shapes_match(image_shape: Tuple[int, ...], label_shape: Tuple[int, ...], where: str) -> None:
    if tuple(image_shape) != tuple(label_shape):
        raise ConversionError(f"shape mismatch in {where}: image {tuple(image_shape)} vs label {tuple(label_shape)}")


def copy_file(src: Union[str, Path], dst: Union[str, Path]) -> None:
    if not os.path.isfile(src):
        raise ConversionError(f"missing file: {src}")
    shutil.copyfile(src, dst)


def copy_nnunet_file(src: Path, dst: Path, file_ending: str, is_channel: bool) -> None:
    """Copy an image channel (``{case}_XXXX``) or label (``{case}``) file and, for Tiff, its spacing side file.

    nnU-Net's Tiff reader takes the spacing from ``{case}.json`` beside the files; without it spacing is (1, 1, 1).
    """
    copy_file(src, dst)
    if file_ending.lower() in (".tif", ".tiff"):
        cut = len(file_ending) + (5 if is_channel else 0)
        side = src.parent / (src.name[:-cut] + ".json")
        if side.is_file():
            shutil.copyfile(side, dst.parent / (dst.name[:-cut] + ".json"))


def group_channel_files(folder: Union[str, Path], file_ending: str, num_channels: int) -> Dict[str, List[Path]]:
    """``{case}_{channel:04d}{file_ending}`` files of ``folder`` as case -> channel files (sorted by channel).

    Hidden files and files with another ending are ignored (nnU-Net does the same).

    Raises:
        ConversionError: a name lacks the channel suffix or a case lacks a channel.
    """
    folder = Path(folder)
    cases: Dict[str, Dict[int, Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(file_ending):
            continue
        m = CHANNEL_RE.match(f.name[: -len(file_ending)])
        if m is None:
            raise ConversionError(f"{f}: name lacks the 4-digit channel suffix; expected "
                                  f"{{case}}_{{channel:04d}}{file_ending}")
        cases.setdefault(m["case"], {})[int(m["channel"])] = f
    out = {}
    for case, chans in sorted(cases.items()):
        if sorted(chans) != list(range(num_channels)):
            raise ConversionError(f"case '{case}' in {folder} has channels {sorted(chans)}, expected "
                                  f"{list(range(num_channels))} (dataset.json declares {num_channels})")
        out[case] = [chans[c] for c in range(num_channels)]
    return out


def progress(iterable: Iterable, desc: str, total: Optional[int] = None):
    """A tqdm progress bar on stderr (never on stdout, which may be piped)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="case", file=sys.stderr, dynamic_ncols=True)


def check_files_exist(paths: Iterable[Union[str, Path]], what: str, hint: str) -> None:
    """Fail before any work when required inputs are missing, listing the first few."""
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:5]) + (f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConversionError(f"{len(missing)} {what} missing:\n  {shown}\n{hint}")


# --------------------------------------------------------------------------------------------------------------
# The one conversion loop
# --------------------------------------------------------------------------------------------------------------

ROLES = ("labeled", "unlabeled", "test")


class CaseJob:
    """One output case. ``write(image_paths, label_path)`` writes its channel files and (if given a path) its label.

    Args:
        case: nnU-Net case identifier.
        role: ``labeled`` -> imagesTr/labelsTr, ``unlabeled`` -> imagesUnlabeled/ (label to labelsUnlabeledHidden/
            only when hidden labels are kept), ``test`` -> imagesTs/ (+ labelsTs/ when the dataset has test labels).
        write: callable doing the actual reading/conversion; it runs inside the temporary dataset folder.
        has_label: whether ``write`` can produce a label for this case.
    """

    def __init__(self, case: str, role: str, write: Callable[[List[Path], Optional[Path]], None],
                 has_label: bool = True):
        if role not in ROLES:
            raise ValueError(role)
        self.case, self.role, self.write, self.has_label = case, role, write, has_label


def build_dataset(*, root: Path, folder_name: str, overwrite: bool, jobs: Sequence[CaseJob], num_channels: int,
                  file_ending: str, keep_unlabeled_labels: bool, dataset_json: dict, record: dict) -> Path:
    """Write all ``jobs`` into a temporary folder, then dataset.json and ssl_split.json, then rename into place.

    Args:
        dataset_json: keyword arguments of :func:`write_dataset_json` except the counts, which are derived here.
        record: output of :func:`make_split_record`.

    Returns:
        The final dataset folder ``root/folder_name``.
    """
    cases = [j.case for j in jobs]
    dupes = sorted({c for c in cases if cases.count(c) > 1})
    if dupes:
        raise ConversionError(f"case identifiers occur more than once: {dupes[:5]}; they must be unique")
    test_jobs = [j for j in jobs if j.role == "test"]
    test_labels = bool(test_jobs) and all(j.has_label for j in test_jobs)
    n = {r: sum(j.role == r for j in jobs) for r in ROLES}
    if n["labeled"] == 0:
        raise ConversionError("no labeled case: nnU-Net needs at least one case in imagesTr/labelsTr")
    with atomic_dataset_folder(root, folder_name, overwrite) as tmp:
        layout = make_layout(tmp, with_labels_ts=test_labels, with_unlabeled=n["unlabeled"] > 0,
                             with_hidden_labels=keep_unlabeled_labels and n["unlabeled"] > 0)
        for job in progress(jobs, desc=f"{folder_name}"):
            images_dir = {"labeled": "imagesTr", "unlabeled": UNLABELED_IMAGES, "test": "imagesTs"}[job.role]
            image_paths = [layout[images_dir] / f"{job.case}_{c:04d}{file_ending}" for c in range(num_channels)]
            label_path = None
            if job.role == "labeled":
                label_path = layout["labelsTr"] / f"{job.case}{file_ending}"
            elif job.role == "test" and test_labels:
                label_path = layout["labelsTs"] / f"{job.case}{file_ending}"
            elif job.role == "unlabeled" and keep_unlabeled_labels and job.has_label:
                label_path = layout[HIDDEN_UNLABELED_LABELS] / f"{job.case}{file_ending}"
            job.write(image_paths, label_path)
            missing = [p for p in image_paths + ([label_path] if label_path else []) if not p.is_file()]
            if missing:
                raise ConversionError(f"case {job.case}: expected output {missing[0].name} was not produced "
                                      f"(does the source have {num_channels} channel(s)?)")
        write_dataset_json(tmp, num_training=n["labeled"], num_unlabeled=n["unlabeled"], file_ending=file_ending,
                           **dataset_json)
        # the lists always describe what was written, whatever the caller put in the record
        for role in ROLES:
            record[role] = [j.case for j in jobs if j.role == role]
            record[f"num_{role}"] = n[role]
        record = dict(record, test_labels=test_labels, hidden_unlabeled_labels=keep_unlabeled_labels)
        write_split_record(tmp, record)
    final = root / folder_name
    print(f"wrote {final}: {n['labeled']} labeled, {n['unlabeled']} unlabeled, {n['test']} test cases "
          f"({'with' if test_labels else 'without'} labelsTs); split recorded in {SPLIT_RECORD_FILENAME}",
          file=sys.stderr)
    return final


_READERS: Dict[Tuple[str, str], type] = {}


def nnunet_reader(file_ending: str, example_file: Union[str, Path], dataset_json: Optional[dict] = None):
    """nnU-Net's reader/writer class for these files (the one nnU-Net itself will use), cached per ending."""
    key = (file_ending, str((dataset_json or {}).get("overwrite_image_reader_writer")))
    if key not in _READERS:
        from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                              determine_reader_writer_from_file_ending)
        try:
            if dataset_json is not None:
                _READERS[key] = determine_reader_writer_from_dataset_json(dataset_json, str(example_file),
                                                                          verbose=False)
            else:
                _READERS[key] = determine_reader_writer_from_file_ending(file_ending, str(example_file), verbose=False)
        except RuntimeError:
            raise ConversionError(f"nnU-Net has no reader for '{file_ending}' files that can open {example_file}")
    return _READERS[key]


def read_case(reader_class, image_paths: Sequence[Path]) -> Tuple[np.ndarray, dict]:
    """Read all channel files of one case as nnU-Net does: (c, z, y, x) array and properties with ``spacing``."""
    try:
        return reader_class().read_images([str(p) for p in image_paths])
    except (RuntimeError, AssertionError, OSError, ValueError) as e:
        detail = str(e) or "details printed above"
        raise ConversionError(f"cannot read case {[str(p) for p in image_paths]} with {reader_class.__name__}: the "
                              f"files are unreadable or their channels differ in shape or spacing ({detail})")


def check_case_with_reader(reader_class, image_paths: Sequence[Path], label_path: Path,
                           allowed_labels: Iterable[int]) -> None:
    """nnU-Net's view of one labeled case: image and label shapes and spacings must agree; label values allowed."""
    image, props = read_case(reader_class, image_paths)
    try:
        seg, seg_props = reader_class().read_seg(str(label_path))
    except (RuntimeError, AssertionError, OSError, ValueError) as e:
        raise ConversionError(f"cannot read label {label_path}: {e}")
    if image.shape[1:] != seg.shape[1:]:
        raise ConversionError(f"shape mismatch: images {[p.name for p in image_paths]} have shape {image.shape[1:]} "
                              f"but label {label_path.name} has {seg.shape[1:]}; fix or remove this case")
    if not np.allclose(props["spacing"], seg_props["spacing"], rtol=1e-4, atol=1e-3):
        raise ConversionError(f"spacing mismatch: images {[p.name for p in image_paths]} have {props['spacing']} but "
                              f"label {label_path.name} has {seg_props['spacing']}; fix or remove this case")
    check_label_values(seg, allowed_labels, label_path)


def label_values(labels: Mapping[str, Union[int, Sequence[int]]]) -> List[int]:
    """All integer values of a dataset.json ``labels`` dict, regions included."""
    out = set()
    for v in labels.values():
        out.update([int(i) for i in v] if isinstance(v, (list, tuple)) else [int(v)])
    return sorted(out)
