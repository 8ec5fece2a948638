"""nnU-Net's whole workflow with SSL trainers: cross-validation, best configuration, ensembling, every
configuration and plans preset, ignore labels, and a real SIGKILL in the middle of an epoch.

The per-trainer checks are parametrised over every method trainer the package defines, so trainers
added later are held to the same contract. Cross-validation and model selection live entirely in the
base class and nnU-Net, so they are exercised with one trainer (Mean Teacher).
"""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_ssl.trainers import all_trainers
from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL

from .conftest import make_trainer, run_cli, shrink_plans
from .trainers.helpers import assert_state_equal, start, steps

pytestmark = pytest.mark.slow
METHODS = sorted(n for n, c in all_trainers().items() if n.endswith("_sslTiny") and issubclass(c, nnUNetTrainerSSL))
MT = "nnUNetTrainerMeanTeacher_sslTiny"


# ---------------------------------------------------------------- cross-validation and model selection
@pytest.fixture(scope="module")
def cv(dataset3d):
    for config in ("2d", "3d_fullres"):
        for fold in ("0", "1"):
            run_cli(["nnUNetv2_train", str(dataset3d["id"]), config, fold, "-tr", MT, "-device", "cpu", "--npz"])
    return dataset3d


def test_folds_hold_only_labeled_cases_and_write_validation(cv):
    splits = json.loads((cv["pre"] / "splits_final.json").read_text())
    unlabeled = set(json.loads((cv["pre"] / "nnUNetPlans_3d_fullres_unlabeled" / "ssl_unlabeled.json")
                               .read_text())["cases"])
    assert len(splits) == 5
    for s in splits:
        assert not (set(s["train"]) | set(s["val"])) & unlabeled
        assert all(k.startswith("train") for k in s["train"] + s["val"])
    for config in ("2d", "3d_fullres"):
        for fold in (0, 1):
            val = cv["results"] / f"{MT}__nnUNetPlans__{config}" / f"fold_{fold}" / "validation"
            cases = sorted(p.name for p in val.glob("*.nii.gz"))
            assert cases == [f"{k}.nii.gz" for k in sorted(splits[fold]["val"])]
            assert (val / "summary.json").is_file()


def test_find_best_configuration_and_ensemble(cv, tmp_path):
    r = run_cli(["nnUNetv2_find_best_configuration", str(cv["id"]), "-c", "2d", "3d_fullres", "-tr", MT,
                 "-f", "0", "1", "-np", "1"])
    info = json.loads((cv["results"] / "inference_information.json").read_text())
    assert info["best_model_or_ensemble"]["selected_model_or_models"]
    assert (cv["results"] / "inference_instructions.txt").is_file(), r.stdout[-2000:]
    preds = {}
    for config in ("2d", "3d_fullres"):
        out = tmp_path / config
        run_cli(["nnUNetv2_predict", "-i", str(cv["raw"] / "imagesTs"), "-o", str(out), "-d", str(cv["id"]),
                 "-c", config, "-tr", MT, "-f", "0", "1", "-device", "cpu", "--disable_tta", "--save_probabilities",
                 "-npp", "1", "-nps", "1"])
        preds[config] = out
        assert len(list(out.glob("*.npz"))) == 3
    ens = tmp_path / "ensemble"
    run_cli(["nnUNetv2_ensemble", "-i", str(preds["2d"]), str(preds["3d_fullres"]), "-o", str(ens), "-np", "1"])
    assert sorted(p.name for p in ens.glob("*.nii.gz")) == ["test000.nii.gz", "test001.nii.gz", "test002.nii.gz"]


# ---------------------------------------------------------------- configurations and plans presets
@pytest.fixture(scope="module")
def extra_plans(dataset3d):
    """A hand-made 3d_lowres configuration and nnU-Net's ResEnc-M preset, both preprocessed incl. unlabeled."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments, preprocess

    from nnunet_ssl.data.unlabeled import preprocess_unlabeled

    plans_file = dataset3d["pre"] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    if "3d_lowres" not in plans["configurations"]:
        plans["configurations"]["3d_lowres"] = {
            "inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
            "spacing": [4.0, 2.0, 2.0], "patch_size": [8, 24, 24], "batch_size": 2}
        plans_file.write_text(json.dumps(plans, indent=2))
    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner calls torch.set_num_threads(n_proc_DA)
    try:
        preprocess([dataset3d["id"]], "nnUNetPlans", ["3d_lowres"], [1], verbose=False)
        plan_experiments([dataset3d["id"]], "nnUNetPlannerResEncM")
        shrink_plans(dataset3d["pre"] / "nnUNetResEncUNetMPlans.json")
        preprocess([dataset3d["id"]], "nnUNetResEncUNetMPlans", ["3d_fullres"], [1], verbose=False)
    finally:
        os.environ["nnUNet_n_proc_DA"] = "0"
    preprocess_unlabeled(dataset3d["id"], "3d_lowres", "nnUNetPlans", 1, verbose=False)
    preprocess_unlabeled(dataset3d["id"], "3d_fullres", "nnUNetResEncUNetMPlans", 1, verbose=False)
    return dataset3d


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("config,plans", [("2d", "nnUNetPlans"), ("3d_lowres", "nnUNetPlans"),
                                          ("3d_fullres", "nnUNetResEncUNetMPlans")])
def test_every_trainer_on_every_configuration(name, config, plans, extra_plans):
    tr = start(make_trainer(all_trainers()[name], extra_plans, config, fold=3, plans=plans))
    before = {k: v.clone() for k, v in tr.student.state_dict().items()}
    out = steps(tr, 2)
    assert all(np.isfinite(o["loss"]) for o in out)
    assert tr.ssl_iteration == 2
    assert any(not torch.equal(before[k], v) for k, v in tr.student.state_dict().items())


# ---------------------------------------------------------------- ignore label
@pytest.fixture(scope="module")
def dataset_ignore(dataset3d, tmp_path_factory):
    """Dataset992: the synthetic volumes with a band of every label map set to the ignore label (3)."""
    import SimpleITK as sitk
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)

    from nnunet_ssl.data.unlabeled import preprocess_unlabeled

    src, name = dataset3d["raw"], "Dataset992_SSLIgnore"
    dst = Path(os.environ["nnUNet_raw"]) / name
    if not dst.exists():
        shutil.copytree(src, dst)
        for f in list((dst / "labelsTr").glob("*.nii.gz")):
            img = sitk.ReadImage(str(f))
            arr = sitk.GetArrayFromImage(img)
            arr[:, ::3] = 3  # sparse annotation: every third row unannotated
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(img)
            sitk.WriteImage(out, str(f))
        dj = json.loads((dst / "dataset.json").read_text())
        dj["labels"]["ignore"] = 3
        (dst / "dataset.json").write_text(json.dumps(dj))
    os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        extract_fingerprints([992], num_processes=1, check_dataset_integrity=True, verbose=False)
        plan_experiments([992])
        shrink_plans(Path(os.environ["nnUNet_preprocessed"]) / name / "nnUNetPlans.json")
        preprocess([992], "nnUNetPlans", ["3d_fullres"], [1], verbose=False)
    finally:
        os.environ["nnUNet_n_proc_DA"] = "0"
    preprocess_unlabeled(992, "3d_fullres", "nnUNetPlans", 1, verbose=False)
    return {"id": 992, "name": name, "raw": dst, "pre": Path(os.environ["nnUNet_preprocessed"]) / name}


@pytest.mark.parametrize("name", METHODS)
def test_every_trainer_with_an_ignore_label(name, dataset_ignore):
    tr = start(make_trainer(all_trainers()[name], dataset_ignore, "3d_fullres", fold=0))
    assert tr.label_manager.has_ignore_label and tr.label_manager.ignore_label == 3
    out = steps(tr, 2)
    assert all(np.isfinite(o["loss"]) for o in out)
    # the network predicts only the real classes: the ignore label is no output channel
    assert tr.label_manager.num_segmentation_heads == 3


# ---------------------------------------------------------------- interruption with SIGKILL
EXT_TRAINERS = Path(__file__).parent / "ext_trainers"  # the test-only *_sslKill trainers (see its module)


@pytest.fixture(scope="module")
def kill_ext():
    from nnunet_ssl.nnunet_ext import TRAINER_DIR

    return os.pathsep.join([str(EXT_TRAINERS), TRAINER_DIR])


KILL_METHODS = ["nnUNetTrainerMeanTeacher_sslTiny", "nnUNetTrainerMetaSSLCPS_sslTiny", "nnUNetTrainerACTION_sslTiny"]


@pytest.mark.parametrize("tiny", [m for m in KILL_METHODS if m in METHODS])
def test_sigkill_mid_epoch_then_resume(tiny, dataset3d, kill_ext, tmp_path):
    name = tiny.replace("_sslTiny", "_sslKill")  # 4 epochs x 4 iterations, a checkpoint after every epoch
    out = dataset3d["results"] / f"{name}__nnUNetPlans__3d_fullres" / "fold_0"
    train = ["nnUNetv2_train", str(dataset3d["id"]), "3d_fullres", "0", "-tr", name, "-device", "cpu"]
    # the run kills itself with SIGKILL before step 2 of epoch 2 (two steps of epoch 2 done, only in memory), so the
    # outcome does not depend on the machine's speed
    killed = run_cli(train, env={"nnUNet_extTrainer": kill_ext, "NNUNET_SSL_TEST_SIGKILL_AT": "2:2"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "Epoch 2" in killed.stdout and "Epoch 3" not in killed.stdout
    assert not (out / "checkpoint_final.pth").exists()
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=False)  # epoch 1's, intact
    assert latest["current_epoch"] == 2
    assert latest["ssl_state"]["ssl_iteration"] == 2 * 4
    assert len(latest["ssl_state"]["ssl_log"]["values"]["sup_loss"]) == 2

    dump = tmp_path / "resumed_from.pt"
    r = run_cli(train + ["--c"], env={"nnUNet_extTrainer": kill_ext, "NNUNET_SSL_TEST_RESUME_DUMP": str(dump)})
    assert "Epoch 2" in r.stdout and "Epoch 1\n" not in r.stdout
    # --c resumed from exactly that checkpoint: epoch, iteration counter, student, teacher, heads/thresholds/queues
    resumed = torch.load(dump, weights_only=False)
    assert (resumed["current_epoch"], resumed["ssl_iteration"]) == (2, 2 * 4)
    ssl = latest["ssl_state"]
    assert_state_equal(resumed["student"], ssl.get("student_weights", latest["network_weights"]))
    if resumed["teacher"] is None:  # CPS: a second network (in ssl_modules) instead of a teacher
        assert "teacher_weights" not in ssl
    else:
        assert_state_equal(resumed["teacher"], ssl["teacher_weights"])
    assert_state_equal(resumed["ssl_modules"], ssl["ssl_modules"])
    final = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 4
    state = final["ssl_state"]
    assert state["ssl_iteration"] == 4 * 4
    assert len(state["ssl_log"]["values"]["sup_loss"]) == 4
