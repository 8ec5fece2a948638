"""Shared fixtures: tiny synthetic nnU-Net datasets, planned and preprocessed once per test session.

The environment (nnUNet_raw / nnUNet_preprocessed / nnUNet_results, one data-augmentation process,
no compile) is set for the whole session before anything reads it; nnU-Net reads these variables lazily.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATASET_3D = 990
DATASET_2D = 991


def shared_data_root() -> Path | None:
    """``$NNUNET_SSL_DATA`` or ``<repo>/../shared/data`` when present (real ACDC / LA files)."""
    env = os.environ.get("NNUNET_SSL_DATA")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    return p if p.is_dir() else None


def shrink_plans(plans_file: Path) -> None:
    """Make every configuration's U-Net tiny (8..64 features) so CPU tests take seconds.

    Preprocessing entries are untouched, so the preprocessed data (and its unlabeled fingerprint) stay valid.
    """
    plans = json.loads(plans_file.read_text())
    for cfg in plans["configurations"].values():
        arch = cfg.get("architecture")
        if arch is None:
            continue
        n = arch["arch_kwargs"]["n_stages"]
        arch["arch_kwargs"]["features_per_stage"] = [min(8 * 2 ** i, 64) for i in range(n)]
    plans_file.write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nnunet")
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (root / sub).mkdir()
        os.environ[k] = str(root / sub)
    os.environ["nnUNet_compile"] = "0"
    os.environ["nnUNet_def_n_proc"] = "1"
    from nnunet_ssl.nnunet_ext import TRAINER_DIR

    os.environ["nnUNet_extTrainer"] = TRAINER_DIR
    torch.set_num_threads(2)
    return root


def _plan_and_preprocess(dataset_id: int, configurations) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=configurations, num_processes=[1] * len(configurations),
               verbose=False)


@pytest.fixture(scope="session")
def dataset3d(nnunet_root) -> dict:
    """Dataset990: 3D volumes (16x40x40), 5 labeled, 6 unlabeled, 3 test; 2d + 3d_fullres preprocessed."""
    from nnunet_ssl.data.unlabeled import preprocess_unlabeled
    from nnunet_ssl.synthetic import make_synthetic_dataset

    raw = make_synthetic_dataset(os.environ["nnUNet_raw"], DATASET_3D, dim=3, n_labeled=5, n_unlabeled=6,
                                 n_test=3, seed=0)
    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner calls torch.set_num_threads(n_proc_DA)
    _plan_and_preprocess(DATASET_3D, ["2d", "3d_fullres"])
    pre = Path(os.environ["nnUNet_preprocessed"]) / Path(raw).name
    shrink_plans(pre / "nnUNetPlans.json")
    for c in ("2d", "3d_fullres"):
        preprocess_unlabeled(DATASET_3D, c, "nnUNetPlans", 1, verbose=False)
    os.environ["nnUNet_n_proc_DA"] = "0"
    return {"id": DATASET_3D, "name": Path(raw).name, "raw": Path(raw), "pre": pre,
            "results": Path(os.environ["nnUNet_results"]) / Path(raw).name}


def make_trainer(cls, dataset: dict, configuration: str = "3d_fullres", fold=0, plans: str = "nnUNetPlans"):
    """Instantiate a trainer in-process exactly as ``nnUNetv2_train`` does (CPU)."""
    plans_dict = json.loads((dataset["pre"] / f"{plans}.json").read_text())
    plans_dict["continue_training"] = False
    dataset_json = json.loads((dataset["pre"] / "dataset.json").read_text())
    return cls(plans=plans_dict, configuration=configuration, fold=fold, dataset_json=dataset_json,
               device=torch.device("cpu"))


def run_cli(args, timeout=600, env=None, check=True) -> subprocess.CompletedProcess:
    """Run a console command with the session's nnU-Net environment; fail with its output on error."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    exe = shutil.which(args[0], path=str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", ""))
    r = subprocess.run([exe or args[0], *args[1:]], capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n"
                             f"{r.stderr[-4000:]}")
    return r
