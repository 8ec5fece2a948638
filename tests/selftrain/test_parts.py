"""Pseudo-labelling in parts (``-num_parts N -part_id K``) and self-training from an already labelled folder."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from nnunet_ssl.selftrain import SelfTrainingError, predict_pseudolabels
from nnunet_ssl.selftrain import pseudolabel as pl_module
from nnunet_ssl.selftrain import selftrain as st_module
from nnunet_ssl.selftrain.pseudolabel import part_cases

from .conftest import CONFIG, TEACHER, load

CASES = [f"unl{i:03d}" for i in range(6)]
KWARGS = dict(folds=[0], use_tta=False, device="cpu", num_processes_preprocessing=0, num_processes_export=0,
              verbose=False)


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _label(teacher, out, **kw):
    return predict_pseudolabels(teacher["dataset"]["id"], CONFIG, TEACHER, output_folder=str(out), **{**KWARGS, **kw})


def test_parts_are_disjoint_deterministic_shares_as_in_nnunet():
    cases = ["c", "a", "e", "b", "d"]
    parts = [part_cases(cases, 2, k) for k in range(2)]
    assert parts == [["a", "c", "e"], ["b", "d"]]  # sorted(cases)[part_id::num_parts], nnUNetv2_predict's rule
    assert part_cases(cases, 7, 6) == [] and part_cases(cases) == sorted(cases)


@pytest.mark.parametrize("num_parts,part_id,message", [
    (2, 2, "-part_id 2 is not in 0..1"),
    (2, -1, "-part_id -1 is not in 0..1"),
    (0, 0, "-num_parts 0 must be at least 1"),
])
def test_bad_part_numbers_are_one_clear_error(num_parts, part_id, message):
    with pytest.raises(SelfTrainingError, match=message):
        part_cases(CASES, num_parts, part_id)


def test_two_parts_equal_one_run_file_for_file(teacher, tmp_path):
    out = tmp_path / "pl"
    _label(teacher, out)
    whole = _files(out)
    shutil.rmtree(out)  # the same folder name: pseudolabel_summary.json records it

    _label(teacher, out, num_parts=2, part_id=1)
    assert sorted(p.stem for p in (out / "summaries").glob("*.json")) == CASES[1::2]
    assert not (out / "pseudolabel_summary.json").exists()  # part 0 is not finished yet
    _label(teacher, out, num_parts=2, part_id=0)
    parts = _files(out)

    assert sorted(parts) == sorted(whole)
    assert len([f for f in whole if f.startswith("labels/")]) == 6
    different = [f for f in whole if parts[f] != whole[f]]
    assert not different, different  # label/confidence/entropy maps and every JSON, byte for byte


def test_an_interrupted_part_resumes_and_leaves_no_half_written_case(teacher, tmp_path, monkeypatch):
    out = tmp_path / "pl"
    mine = CASES[1::2]  # part 1 of 2: unl001, unl003, unl005
    real_summarize = pl_module.summarize_case
    calls = []

    def die_before_the_second_summary(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # its maps are already in place: only the summary marks a case finished
            raise KeyboardInterrupt
        return real_summarize(*args, **kw)

    monkeypatch.setattr(pl_module, "summarize_case", die_before_the_second_summary)
    with pytest.raises(KeyboardInterrupt):
        _label(teacher, out, num_parts=2, part_id=1)
    assert sorted(p.stem for p in (out / "summaries").glob("*.json")) == [mine[0]]
    assert (out / "labels" / f"{mine[1]}.nii.gz").is_file()  # written, yet not taken for finished:
    assert pl_module.finished_cases(str(out), CASES, ".nii.gz") == [mine[0]]
    stamp = (out / "labels" / f"{mine[0]}.nii.gz").stat().st_mtime_ns
    (out / f".partial-{mine[2]}-deadbeef" / "labels").mkdir(parents=True)  # this part's leftover
    (out / f".partial-{CASES[0]}-cafebabe" / "labels").mkdir(parents=True)  # part 0, still running elsewhere

    monkeypatch.setattr(pl_module, "summarize_case", real_summarize)
    exported = []
    real_export = pl_module._export_case
    monkeypatch.setattr(pl_module, "_export_case", lambda case, *a: exported.append(case) or real_export(case, *a))
    _label(teacher, out, num_parts=2, part_id=1)
    assert exported == mine[1:]  # the finished case is not predicted again
    assert (out / "labels" / f"{mine[0]}.nii.gz").stat().st_mtime_ns == stamp
    assert sorted(p.stem for p in (out / "summaries").glob("*.json")) == mine
    partials = sorted(p for p in os.listdir(out) if p.startswith(".partial-"))
    assert partials == [f".partial-{CASES[0]}-cafebabe"]  # another part's work in progress is left alone

    _label(teacher, out, num_parts=2, part_id=0)
    assert load(out / "pseudolabel_summary.json")["num_cases"] == 6
    assert not [p for p in os.listdir(out) if p.startswith(".partial-")]


def test_overwrite_with_parts_is_refused(teacher, tmp_path):
    with pytest.raises(SelfTrainingError, match="--overwrite cannot be combined with -num_parts > 1"):
        _label(teacher, tmp_path / "pl", num_parts=2, part_id=0, overwrite=True)


# ---------------------------------------------------------------------------------------------------------------
# self-train --pseudolabels DIR
# ---------------------------------------------------------------------------------------------------------------

def _self_train(teacher, pseudolabels, **kw):
    from nnunet_ssl.selftrain import run_self_training

    return run_self_training(teacher["dataset"]["id"], CONFIG, rounds=1, teacher_trainer=TEACHER,
                             student_trainer="nnUNetTrainerNoisyStudent_sslTiny", student_dataset_id=977,
                             case_cut=0.0, use_tta=False, device="cpu", verbose=False,
                             pseudolabels=str(pseudolabels), **kw)


def test_self_train_uses_the_given_folder_instead_of_labelling(teacher, pseudolabels, monkeypatch):
    used = {}

    def prepare(teacher_spec, pl_folder, student_id, folds, *args):
        used.update(folder=pl_folder, folds=list(folds))
        return st_module.StudentDataset(student_id, "Dataset977_X_ST1", 1, [], [], {}, None, "", "")

    monkeypatch.setattr(st_module, "predict_pseudolabels", lambda *a, **k: pytest.fail("labelled again"))
    monkeypatch.setattr(st_module, "prepare_student_dataset", prepare)
    monkeypatch.setattr(st_module, "train_model", lambda *a, **k: "/student/model")
    result = _self_train(teacher, pseudolabels)  # no -f: the folder's folds
    assert used == {"folder": str(pseudolabels), "folds": [0]}
    assert result.rounds[0].pseudolabel_folder == str(pseudolabels)


def test_self_train_refuses_a_missing_or_incomplete_folder(teacher, pseudolabels, tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(SelfTrainingError, match=f"pseudo-label folder {missing} does not exist.*nnunet_ssl "
                                                f"pseudolabel -d .* -o {missing}"):
        _self_train(teacher, missing)

    partial = tmp_path / "pl"
    shutil.copytree(pseudolabels, partial)
    (partial / "summaries" / "unl002.json").unlink()
    (partial / "confidence" / "unl004.nii.gz").unlink()
    with pytest.raises(SelfTrainingError) as e:
        _self_train(teacher, partial)
    msg = str(e.value)
    assert f"pseudo-labels in {partial} are incomplete: 2 case(s) of 6 not finished" in msg
    assert "unl002: summaries/unl002.json missing" in msg and "unl004: confidence/unl004.nii.gz missing" in msg
    assert "rerun the unfinished parts" in msg


@pytest.mark.parametrize("change,message", [
    ({"checkpoint": "checkpoint_best.pth"},
     "made by another model (checkpoint 'checkpoint_best.pth' instead of 'checkpoint_final.pth')"),
    ({"checkpoint_files": {"fold_0/checkpoint_final.pth": [1, "0" * 64]}},
     "the checkpoints in .* changed after the pseudo-labels"),
])
def test_self_train_refuses_pseudolabels_of_another_model(teacher, pseudolabels, tmp_path, change, message):
    other = tmp_path / "pl"
    shutil.copytree(pseudolabels, other)
    settings = load(other / "pseudolabel_settings.json")
    (other / "pseudolabel_settings.json").write_text(json.dumps({**settings, **change}))
    with pytest.raises(SelfTrainingError, match=re.escape(message) if "(" in message else message):
        _self_train(teacher, other)
