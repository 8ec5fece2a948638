"""The literal nnU-Net commands a user types, in subprocesses, on a tiny synthetic dataset."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from .conftest import run_cli

pytestmark = pytest.mark.slow
TR = "nnUNetTrainerMeanTeacher_sslTiny"


@pytest.fixture(scope="module")
def trained(dataset3d):
    run_cli(["nnUNetv2_train", str(dataset3d["id"]), "3d_fullres", "0", "-tr", TR, "-device", "cpu"])
    return dataset3d["results"] / f"{TR}__nnUNetPlans__3d_fullres" / "fold_0"


def test_train_writes_nnunet_outputs_plus_ssl_logs(trained):
    for f in ("checkpoint_final.pth", "progress.png", "progress_ssl.png", "ssl_progress.jsonl",
              "validation/summary.json"):
        assert (trained / f).is_file(), f
    assert not (trained / "checkpoint_latest.pth").exists()
    lines = [json.loads(x) for x in (trained / "ssl_progress.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert all(x["unsup_loss"] > 0 for x in lines)
    ckpt = torch.load(trained / "checkpoint_final.pth", weights_only=False)
    assert ckpt["trainer_name"] == TR and ckpt["current_epoch"] == 2
    assert ckpt["ssl_state"]["ssl_iteration"] == 6


def test_stock_predict_uses_the_checkpoint(trained, dataset3d, tmp_path):
    run_cli(["nnUNetv2_predict", "-i", str(dataset3d["raw"] / "imagesTs"), "-o", str(tmp_path), "-d",
             str(dataset3d["id"]), "-c", "3d_fullres", "-tr", TR, "-f", "0", "-device", "cpu", "--disable_tta",
             "-npp", "1", "-nps", "1"])
    preds = sorted(tmp_path.glob("*.nii.gz"))
    assert [p.name for p in preds] == ["test000.nii.gz", "test001.nii.gz", "test002.nii.gz"]
    ref = sitk.ReadImage(str(dataset3d["raw"] / "labelsTs" / "test000.nii.gz"))
    pred = sitk.ReadImage(str(preds[0]))
    assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def test_continue_and_validation_only(trained, dataset3d):
    before = (trained / "checkpoint_final.pth").stat().st_mtime
    r = run_cli(["nnUNetv2_train", str(dataset3d["id"]), "3d_fullres", "0", "-tr", TR, "-device", "cpu", "--c"])
    assert "Mean Validation Dice" in r.stdout
    ckpt = torch.load(trained / "checkpoint_final.pth", weights_only=False)
    assert ckpt["current_epoch"] == 2  # already finished: --c trains no further epoch
    assert (trained / "checkpoint_final.pth").stat().st_mtime >= before
    r = run_cli(["nnUNetv2_train", str(dataset3d["id"]), "3d_fullres", "0", "-tr", TR, "-device", "cpu", "--val"])
    assert "Mean Validation Dice" in r.stdout


def test_continue_an_interrupted_training(dataset3d):
    """Fold 1 is stopped after epoch 0 (checkpoint_latest only); --c finishes it with all SSL state."""
    from nnunet_ssl.trainers.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher_sslTiny
    from .conftest import make_trainer
    from .trainers.helpers import one_epoch, start

    tr = start(make_trainer(nnUNetTrainerMeanTeacher_sslTiny, dataset3d, "3d_fullres", fold=1))
    tr.save_every = 1
    one_epoch(tr)
    out = dataset3d["results"] / f"{TR}__nnUNetPlans__3d_fullres" / "fold_1"
    assert (out / "checkpoint_latest.pth").is_file() and not (out / "checkpoint_final.pth").exists()
    r = run_cli(["nnUNetv2_train", str(dataset3d["id"]), "3d_fullres", "1", "-tr", TR, "-device", "cpu", "--c"])
    assert "Epoch 1" in r.stdout and "Epoch 0\n" not in r.stdout
    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["ssl_state"]["ssl_iteration"] == 6
    assert len(ckpt["ssl_state"]["ssl_log"]["values"]["sup_loss"]) == 2
