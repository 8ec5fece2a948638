"""Unlabeled images: discovery in ``imagesUnlabeled/``, preprocessing with the plans' own preprocessor.

Convention (see README "Unlabeled data")::

    nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/{case}_{channel:04d}{file_ending}
    nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/   (same storage format as <data_identifier>/)

The preprocessed folder carries ``ssl_unlabeled.json``, a manifest with the plans name, configuration and a
fingerprint of every plans entry that changes preprocessing. Trainers compare it with their own plans, so data
preprocessed with other plans is detected instead of silently used.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
from tqdm import tqdm

UNLABELED_FOLDER = "imagesUnlabeled"
MANIFEST = "ssl_unlabeled.json"


class UnlabeledDataError(RuntimeError):
    """Bad unlabeled input: the message names the file or value and what to do."""


def unlabeled_identifier(data_identifier: str) -> str:
    """``nnUNetPlans_3d_fullres`` -> ``nnUNetPlans_3d_fullres_unlabeled``."""
    return f"{data_identifier}_unlabeled"


def num_channels(dataset_json: dict) -> int:
    key = "channel_names" if "channel_names" in dataset_json else "modality"
    return len(dataset_json[key])


_CASE_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def find_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Map case identifier -> channel files (sorted by channel) for every case in ``imagesUnlabeled/``.

    Raises:
        UnlabeledDataError: the folder is missing or empty, a file has another ending than the dataset's
            ``file_ending``, a name lacks the ``_XXXX`` channel suffix, or a case has the wrong channels.
    """
    folder = os.path.join(raw_dataset_folder, UNLABELED_FOLDER)
    file_ending = dataset_json["file_ending"]
    n_ch = num_channels(dataset_json)
    if not os.path.isdir(folder):
        raise UnlabeledDataError(
            f"No unlabeled folder: {folder} does not exist. Put unlabeled images there, named "
            f"{{case}}_{{channel:04d}}{file_ending} with the same channels as imagesTr.")
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    if file_ending.lower() in (".tif", ".tiff"):
        files = [f for f in files if not f.endswith(".json")]  # nnU-Net's Tiff reader keeps spacing in {case}.json
    if not files:
        raise UnlabeledDataError(f"The unlabeled folder {folder} is empty: add images or remove the folder.")
    cases: Dict[str, Dict[int, str]] = {}
    for f in files:
        if not f.endswith(file_ending):
            raise UnlabeledDataError(
                f"{os.path.join(folder, f)}: file ending does not match the dataset's file_ending "
                f"'{file_ending}' (dataset.json). Convert it to {file_ending} or move it out of {UNLABELED_FOLDER}/.")
        m = _CASE_RE.match(f[: -len(file_ending)])
        if m is None:
            raise UnlabeledDataError(
                f"{os.path.join(folder, f)}: name lacks the 4-digit channel suffix; expected "
                f"{{case}}_{{channel:04d}}{file_ending}, e.g. case001_0000{file_ending}.")
        cases.setdefault(m["case"], {})[int(m["channel"])] = os.path.join(folder, f)
    out = {}
    for case, chans in sorted(cases.items()):
        if sorted(chans) != list(range(n_ch)):
            raise UnlabeledDataError(
                f"Unlabeled case '{case}' in {folder} has channels {sorted(chans)}, but dataset.json declares "
                f"{n_ch} channel(s) {list(range(n_ch))}: every case needs exactly files _0000.._{n_ch - 1:04d}.")
        out[case] = [chans[c] for c in range(n_ch)]
    return out


def plans_fingerprint(plans: dict, configuration: str) -> str:
    """SHA-256 over everything in the plans that changes what preprocessing writes for ``configuration``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    relevant = {
        "configuration": cm.configuration,
        "transpose_forward": pm.transpose_forward,
        "foreground_intensity_properties_per_channel": pm.foreground_intensity_properties_per_channel,
        "image_reader_writer": pm.plans.get("image_reader_writer"),
    }
    for k in ("batch_size", "patch_size", "architecture", "network_arch_class_name",
              "network_arch_init_kwargs", "UNet_class_name", "n_conv_per_stage_encoder",
              "n_conv_per_stage_decoder", "pool_op_kernel_sizes", "conv_kernel_sizes", "batch_dice"):
        relevant["configuration"].pop(k, None)  # training-only entries: editing them must not force re-preprocessing
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class _Job:
    case: str
    files: List[str]
    out_trunc: str


def _preprocess_case(job: _Job, plans: dict, configuration: str, dataset_json: dict) -> str:
    """Preprocess one case exactly as nnU-Net's ``run_case_save`` does for a labeled case, minus the label."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    try:
        data, seg, properties = preprocessor.run_case(job.files, None, pm, cm, dataset_json)
    except Exception as e:  # reader errors are terse: name the files
        raise UnlabeledDataError(
            f"Could not read/preprocess unlabeled case '{job.case}' ({', '.join(job.files)}): "
            f"{type(e).__name__}: {e}. Check that the files are readable images with matching shape and spacing "
            f"across channels.") from e
    # Without a label, ``seg`` is the nonzero mask from cropping (-1 outside), which MaskImageTransform needs.
    # The loader reads 'class_locations'; unlabeled cases have none, so foreground oversampling never applies.
    properties["class_locations"] = {}
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, job.out_trunc, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    return job.case


def _run_job(args):
    return _preprocess_case(*args)


def resolve_dataset_name(dataset: str | int) -> str:
    """Dataset id or name -> ``DatasetXXX_Name``, with one clear error when it does not exist."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset if not str(dataset).isdigit() else int(dataset))
    except (RuntimeError, ValueError) as e:
        raise UnlabeledDataError(
            f"Dataset '{dataset}' not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results "
            f"(nnUNet_raw={os.environ.get('nnUNet_raw')}). Check the id and the environment variables.") from e


def preprocess_unlabeled(dataset: str | int, configuration: str, plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, verbose: bool = True) -> str:
    """Run the plans' preprocessor on every case of ``imagesUnlabeled/``; return the output folder.

    Writes into a temporary folder and renames it into place at the end, so an interrupted run never
    leaves a half-written ``<data_identifier>_unlabeled/`` behind (an existing one is replaced only then).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if nnUNet_raw is None or nnUNet_preprocessed is None or not nnUNet_raw.is_set() \
            or not nnUNet_preprocessed.is_set():
        raise UnlabeledDataError("nnUNet_raw and nnUNet_preprocessed must be set (nnU-Net's environment variables).")
    name = resolve_dataset_name(dataset)
    raw = os.path.join(str(nnUNet_raw), name)
    pre = os.path.join(str(nnUNet_preprocessed), name)
    plans_file = os.path.join(pre, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UnlabeledDataError(
            f"Plans file {plans_file} not found: run `nnUNetv2_plan_and_preprocess -d {dataset}` "
            f"(or `nnunet_ssl plan-and-preprocess`) first, or pass the right -p.")
    plans = load_json(plans_file)
    pm = PlansManager(plans)
    if configuration not in pm.available_configurations:
        raise UnlabeledDataError(
            f"Configuration '{configuration}' is not in {plans_file}; available: {pm.available_configurations}.")
    cm = pm.get_configuration(configuration)
    if cm.previous_stage_name is not None:
        raise UnlabeledDataError(
            f"Configuration '{configuration}' is a cascade stage; SSL trainers do not support the cascade. "
            f"Use 2d, 3d_fullres or 3d_lowres.")
    dj_file = os.path.join(pre, "dataset.json")
    dataset_json = load_json(dj_file if os.path.isfile(dj_file) else os.path.join(raw, "dataset.json"))
    cases = find_unlabeled_cases(raw, dataset_json)

    out_dir = os.path.join(pre, unlabeled_identifier(cm.data_identifier))
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    jobs = [(_Job(c, f, os.path.join(tmp_dir, c)), plans, configuration, dataset_json) for c, f in cases.items()]
    try:
        bar = tqdm(total=len(jobs), desc=f"Preprocessing unlabeled ({configuration})", disable=not verbose)
        if num_processes <= 1:
            for j in jobs:
                _run_job(j)
                bar.update()
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                for _ in pool.imap_unordered(_run_job, jobs):
                    bar.update()
        bar.close()
        manifest = {
            "dataset": name, "plans_identifier": plans_identifier, "configuration": configuration,
            "data_identifier": cm.data_identifier, "plans_fingerprint": plans_fingerprint(plans, configuration),
            "num_cases": len(cases), "cases": sorted(cases), "file_ending": dataset_json["file_ending"],
        }
        with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        if os.path.isdir(out_dir):
            old = f"{out_dir}.old-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def check_unlabeled_folder(folder: str, plans: dict, configuration: str, plans_identifier: str,
                           dataset_id_hint: str = "DATASET") -> dict:
    """Validate a preprocessed unlabeled folder against the trainer's plans; return its manifest.

    Raises:
        UnlabeledDataError: folder or manifest missing, other plans/configuration, no cases, or a listed
            case missing on disk.
    """
    fix = (f"run `nnunet_ssl preprocess-unlabeled -d {dataset_id_hint} -c {configuration} "
           f"-p {plans_identifier}`")
    mf = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder) or not os.path.isfile(mf):
        raise UnlabeledDataError(f"Unlabeled data not preprocessed: {folder} (or its {MANIFEST}) is missing; {fix}.")
    with open(mf) as f:
        manifest = json.load(f)
    if manifest.get("plans_fingerprint") != plans_fingerprint(plans, configuration):
        raise UnlabeledDataError(
            f"{folder} was preprocessed with other plans (plans '{manifest.get('plans_identifier')}', "
            f"configuration '{manifest.get('configuration')}') than this training uses "
            f"('{plans_identifier}', '{configuration}'); {fix} again.")
    if not manifest.get("cases"):
        raise UnlabeledDataError(f"The unlabeled pool in {folder} is empty; add images to imagesUnlabeled/ and {fix}.")
    import pickle

    import blosc2

    for c in manifest["cases"]:
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            p = os.path.join(folder, c + suffix)
            if not os.path.isfile(p) or os.path.getsize(p) == 0:
                raise UnlabeledDataError(f"Preprocessed unlabeled case file {p} is missing or empty; {fix} again.")
            try:  # header-only reads: a corrupt file must fail here, not later inside a loader worker
                if suffix == ".pkl":
                    with open(p, "rb") as f:
                        pickle.load(f)
                else:
                    _ = blosc2.open(p, mode="r").shape
            except Exception as e:
                raise UnlabeledDataError(f"Preprocessed unlabeled case file {p} is corrupt ({type(e).__name__}: "
                                         f"{e}); {fix} again.") from e
    return manifest
