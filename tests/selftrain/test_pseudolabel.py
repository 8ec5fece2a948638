"""``predict_pseudolabels`` / ``nnunet_ssl pseudolabel`` on the tiny synthetic dataset with a tiny teacher."""
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl.selftrain import SelfTrainingError, predict_pseudolabels
from nnunet_ssl.selftrain import pseudolabel as pl_module

from ..conftest import run_cli
from .conftest import CONFIG, TEACHER, load

CASES = [f"unl{i:03d}" for i in range(6)]


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_maps_have_the_image_geometry_and_valid_values(pseudolabels, dataset3d):
    for case in CASES:
        ref = sitk.ReadImage(str(dataset3d["raw"] / "imagesUnlabeled" / f"{case}_0000.nii.gz"))
        maps = {}
        for sub in ("labels", "confidence", "entropy"):
            img = sitk.ReadImage(str(pseudolabels / sub / f"{case}.nii.gz"))
            assert img.GetSize() == ref.GetSize(), (sub, case)
            assert np.allclose(img.GetSpacing(), ref.GetSpacing()) and np.allclose(img.GetOrigin(), ref.GetOrigin())
            assert np.allclose(img.GetDirection(), ref.GetDirection())
            maps[sub] = sitk.GetArrayFromImage(img)
        assert maps["confidence"].dtype == maps["entropy"].dtype == np.float32
        assert set(np.unique(maps["labels"]).tolist()) <= {0, 1, 2}
        conf, ent = maps["confidence"], maps["entropy"]
        assert conf.min() >= 1 / 3 - 1e-6 and conf.max() <= 1 + 1e-6
        assert ent.min() >= 0 and ent.max() <= 1 + 1e-6
        assert np.corrcoef(conf.ravel(), ent.ravel())[0, 1] < -0.5  # confident voxels have low entropy


def test_summaries_describe_the_maps(pseudolabels):
    settings = load(pseudolabels / "pseudolabel_settings.json")
    assert settings["folds"] == [0] and settings["use_tta"] is False and settings["trainer"] == TEACHER
    run = load(pseudolabels / "pseudolabel_summary.json")
    assert sorted(run["cases"]) == CASES and run["num_cases"] == 6
    for case in CASES:
        s = load(pseudolabels / "summaries" / f"{case}.json")
        assert s == run["cases"][case]
        seg = _array(pseudolabels / "labels" / f"{case}.nii.gz")
        conf = _array(pseudolabels / "confidence" / f"{case}.nii.gz")
        assert s["threshold"] == 0.9 and s["shape"] == list(seg.shape) == [16, 40, 40]
        assert s["mean_confidence"] == pytest.approx(conf.mean(), abs=1e-5)
        assert s["fraction_confident"] == pytest.approx((conf >= 0.9).mean(), abs=1e-9)
        for name, value in (("organ", 1), ("lesion", 2)):
            n = int((seg == value).sum())
            assert s["volume_per_class"][name] == {"label": value, "voxels": n, "volume_mm3": 2.0 * n}
        fg = seg > 0
        if fg.any():
            assert s["foreground_confidence"] == pytest.approx(conf[fg].mean(), abs=1e-5)
    assert run["mean"]["mean_confidence"] == pytest.approx(np.mean([run["cases"][c]["mean_confidence"]
                                                                    for c in CASES]))


def test_interrupted_run_resumes_without_redoing_finished_cases(teacher, tmp_path, monkeypatch):
    out = tmp_path / "pl"
    real = pl_module._export_case
    calls = []

    def crash_on_third(case, *args):
        calls.append(case)
        if len(calls) == 3:  # die in the middle of writing the third case
            (out / f".partial-{case}-deadbeef" / "labels").mkdir(parents=True)
            raise KeyboardInterrupt
        return real(case, *args)

    monkeypatch.setattr(pl_module, "_export_case", crash_on_third)
    kwargs = dict(folds=[0], output_folder=str(out), use_tta=False, device="cpu", num_processes_preprocessing=0,
                  num_processes_export=0, verbose=False)
    with pytest.raises(KeyboardInterrupt):
        predict_pseudolabels(teacher["dataset"]["id"], CONFIG, TEACHER, **kwargs)
    finished = sorted(p.stem for p in (out / "summaries").glob("*.json"))
    assert finished == CASES[:2]
    stamps = {c: (out / "labels" / f"{c}.nii.gz").stat().st_mtime_ns for c in finished}

    calls.clear()
    monkeypatch.setattr(pl_module, "_export_case", lambda case, *a: calls.append(case) or real(case, *a))
    predict_pseudolabels(teacher["dataset"]["id"], CONFIG, TEACHER, **kwargs)
    assert calls == CASES[2:]  # the finished cases were not predicted again
    assert {c: (out / "labels" / f"{c}.nii.gz").stat().st_mtime_ns for c in finished} == stamps
    assert sorted(p.stem for p in (out / "summaries").glob("*.json")) == CASES
    assert not [p for p in os.listdir(out) if p.startswith(".partial-")]
    assert load(out / "pseudolabel_summary.json")["num_cases"] == 6


def test_other_threshold_refreshes_summaries_from_the_maps(pseudolabels, teacher, tmp_path, monkeypatch):
    out = tmp_path / "pl"
    shutil.copytree(pseudolabels, out)
    monkeypatch.setattr(pl_module, "_export_case", lambda *a: pytest.fail("nothing should be predicted"))
    predict_pseudolabels(teacher["dataset"]["id"], CONFIG, TEACHER, folds=[0], output_folder=str(out),
                         threshold=0.5, use_tta=False, device="cpu", verbose=False)
    for case in CASES:
        s = load(out / "summaries" / f"{case}.json")
        conf = _array(out / "confidence" / f"{case}.nii.gz")
        assert s["threshold"] == 0.5 and s["fraction_confident"] == pytest.approx((conf >= 0.5).mean())
    assert load(out / "pseudolabel_summary.json")["threshold"] == 0.5


def test_resuming_with_other_settings_is_refused(pseudolabels, teacher, tmp_path):
    out = tmp_path / "pl"
    shutil.copytree(pseudolabels, out)
    with pytest.raises(SelfTrainingError, match="other settings .*use_tta"):
        predict_pseudolabels(teacher["dataset"]["id"], CONFIG, TEACHER, folds=[0], output_folder=str(out),
                             use_tta=True, device="cpu", verbose=False)


def test_cli_writes_beside_the_model_and_a_rerun_skips_everything(teacher, capsys):
    from nnunet_ssl.cli import main

    args = ["nnunet_ssl", "pseudolabel", "-d", str(teacher["dataset"]["id"]), "-c", CONFIG, "-tr", TEACHER, "-f", "0",
            "--disable_tta", "-device", "cpu"]
    r = run_cli(args + ["-npp", "1", "-nps", "1"])  # nnU-Net's background preprocessing and export workers
    out = teacher["model_folder"] / "pseudolabels_f0_noTTA"
    assert str(out) in r.stdout
    for case in CASES:
        for sub in ("labels", "confidence", "entropy"):
            assert (out / sub / f"{case}.nii.gz").is_file()
        assert (out / "summaries" / f"{case}.json").is_file()
    assert (out / "dataset.json").is_file() and (out / "plans.json").is_file()
    stamps = sorted(p.stat().st_mtime_ns for p in (out / "labels").iterdir())
    assert main(args[1:] + ["-npp", "0", "-nps", "0"]) == 0  # the rerun in this process: nothing to start
    assert "6 of 6 case(s) already finished" in capsys.readouterr().err
    assert sorted(p.stat().st_mtime_ns for p in (out / "labels").iterdir()) == stamps
