"""One round of ``nnunet_ssl self-train`` end to end on CPU (tiny teacher, tiny noisy student), then a resume."""
import pytest
import torch

from ..conftest import run_cli
from .conftest import CONFIG, STUDENT_ID_E2E, TEACHER, load

pytestmark = pytest.mark.slow
STUDENT = "nnUNetTrainerNoisyStudent_sslTiny"
LABELED = [f"train{i:03d}" for i in range(5)]


def test_one_round_end_to_end_then_resume(teacher, dataset3d):
    args = ["nnunet_ssl", "self-train", "-d", str(dataset3d["id"]), "-c", CONFIG, "-tr", TEACHER, "-f", "0",
            "--rounds", "1", "--student-trainer", STUDENT, "--student-id", str(STUDENT_ID_E2E), "--case-cut", "0",
            "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1", "-np", "1"]
    r = run_cli(args, timeout=900)
    name = f"Dataset{STUDENT_ID_E2E}_SSLSynthetic_ST1"
    model = dataset3d["results"].parent / name / f"{STUDENT}__nnUNetPlans__{CONFIG}"
    assert f"Final student: {model}" in r.stdout

    # the student dataset: labeled + pseudo-labeled cases, ignore label, pseudo-labeled cases never validated on
    raw = dataset3d["raw"].parent / name
    dj = load(raw / "dataset.json")
    assert dj["labels"]["ignore"] == 3 and dj["numTraining"] == 11
    rec = load(raw / "ssl_split.json")
    pseudo = rec["pseudo_labeled"]
    assert len(pseudo) == 6 and rec["self_training"]["threshold"] == 0.9
    splits = load(dataset3d["pre"].parent / name / "splits_final.json")
    assert all(set(s["val"]) <= set(LABELED) and set(pseudo) <= set(s["train"]) for s in splits)

    # the student was trained by stock nnUNetv2_train on fold 0 and validated on a truly labeled case only
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == STUDENT and ckpt["current_epoch"] == 2
    summary = load(model / "fold_0" / "validation" / "summary.json")
    validated = {c["reference_file"].split("/")[-1][: -len(".nii.gz")] for c in summary["metric_per_case"]}
    assert validated == set(splits[0]["val"]) and validated <= set(LABELED)
    log = "".join(p.read_text() for p in (model / "fold_0").glob("training_log*.txt"))
    assert "This split has 10 training and 1 validation cases" in log and "noisy student: rotation range" in log

    # a rerun resumes: pseudo-labels, dataset and student are all reused; the Python API reports the budget
    stamp = (model / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns
    from nnunet_ssl.selftrain import run_self_training

    result = run_self_training(dataset3d["id"], CONFIG, rounds=1, teacher_trainer=TEACHER, folds=[0],
                               student_trainer=STUDENT, case_cut=0.0, use_tta=False, device="cpu",
                               num_processes_preprocessing=0, num_processes_export=0, verbose=False)
    assert (model / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns == stamp
    assert result.final_dataset == name and result.final_model_folder == str(model)  # found again without --student-id
    assert result.teacher_iterations == [6] and result.rounds[0].student_iterations == [6]
    assert result.total_iterations == 12
    d = result.as_dict()
    assert d["rounds"][0]["pseudo_labeled"] == pseudo and d["final_model_folder"] == str(model)
