"""``nnunet_ssl demo``: the whole workflow on a synthetic dataset, with the stock nnU-Net commands.

1. generate a dataset with labeled, unlabeled and test cases (known ground truth)
2. ``nnUNetv2_plan_and_preprocess`` and ``nnunet_ssl preprocess-unlabeled``
3. ``nnUNetv2_train`` a labeled-only ``nnUNetTrainer`` and ``nnUNetTrainerMeanTeacher`` with one budget
4. ``nnUNetv2_predict`` the test cases with each, then a Dice table (per class and mean)

Every step runs the literal console command a user would type, so the demo also checks the installation.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

DATASET_ID = 979
TRAINERS = (("labeled only", "nnUNetTrainer_{budget}"), ("Mean Teacher", "nnUNetTrainerMeanTeacher_{budget}"))


class DemoError(RuntimeError):
    pass


def _run(cmd: List[str], env: Dict[str, str], log: str, what: str) -> None:
    """Run one console command, its output into ``log``; raise with the log's tail on failure."""
    exe = shutil.which(cmd[0], path=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call([exe or cmd[0], *cmd[1:]], stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise DemoError(f"{what} failed (exit code {rc}); full log: {log}\n{tail}")


def run_demo(output: Optional[str] = None, configuration: str = "2d", device: Optional[str] = None,
             keep: bool = False, budget: str = "sslDemo", n_labeled: int = 5, n_unlabeled: int = 20,
             n_test: int = 6) -> int:
    """Run the demo; returns 0 on success, 1 if any step failed (the error says which and where its log is)."""
    import torch

    from nnunet_ssl.synthetic import make_synthetic_dataset

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = output or tempfile.mkdtemp(prefix="nnunet_ssl_demo_")
    os.makedirs(work, exist_ok=True)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ)
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        env[k] = os.path.join(work, sub)
        os.makedirs(env[k], exist_ok=True)
    from nnunet_ssl.nnunet_ext import TRAINER_DIR

    env["nnUNet_extTrainer"] = TRAINER_DIR
    cores = os.cpu_count() or 1
    env.setdefault("nnUNet_n_proc_DA", "0" if device == "cpu" and cores <= 2 else str(min(cores, 8)))
    env.setdefault("nnUNet_def_n_proc", str(min(cores, 4)))
    if device == "cpu":
        env.setdefault("nnUNet_compile", "0")
    t_start = time.time()
    n_steps = 5 + 2 * len(TRAINERS)
    step = [0]

    def say(msg: str) -> None:
        step[0] += 1
        print(f"[{step[0]}/{n_steps}] {msg} ({time.time() - t_start:.0f} s elapsed)", flush=True)

    try:
        say(f"Generating a synthetic dataset in {env['nnUNet_raw']}: {n_labeled} labeled, {n_unlabeled} "
            f"unlabeled, {n_test} test cases")
        raw = make_synthetic_dataset(env["nnUNet_raw"], DATASET_ID, name="SSLDemo", dim=3, n_labeled=n_labeled,
                                     n_unlabeled=n_unlabeled, n_test=n_test, seed=0)
        ds = str(DATASET_ID)
        say("nnUNetv2_plan_and_preprocess (nnU-Net's planning on the labeled cases)")
        plan_env = dict(env, nnUNet_n_proc_DA=str(max(1, int(env["nnUNet_n_proc_DA"]))))
        _run(["nnUNetv2_plan_and_preprocess", "-d", ds, "-c", configuration, "-np", "1", "--verify_dataset_integrity"],
             plan_env, os.path.join(logs, "plan_and_preprocess.log"), "planning and preprocessing")
        say("nnunet_ssl preprocess-unlabeled (the plans' own preprocessor on imagesUnlabeled/)")
        _run(["nnunet_ssl", "preprocess-unlabeled", "-d", ds, "-c", configuration, "-np", "1"], env,
             os.path.join(logs, "preprocess_unlabeled.log"), "unlabeled preprocessing")
        results = {}
        for label, pattern in TRAINERS:
            trainer = pattern.format(budget=budget)
            say(f"nnUNetv2_train {ds} {configuration} 0 -tr {trainer} -device {device}")
            t0 = time.time()
            _run(["nnUNetv2_train", ds, configuration, "0", "-tr", trainer, "-device", device], env,
                 os.path.join(logs, f"train_{trainer}.log"), f"training {trainer}")
            t_train = time.time() - t0
            say(f"nnUNetv2_predict ... -tr {trainer} (test cases)")
            pred = os.path.join(work, "predictions", trainer)
            _run(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", pred, "-d", ds, "-c", configuration,
                  "-tr", trainer, "-f", "0", "-device", device, "--disable_tta", "-npp", "1", "-nps", "1"], env,
                 os.path.join(logs, f"predict_{trainer}.log"), f"prediction with {trainer}")
            from nnunet_ssl.evaluation import evaluate_folder

            summary = evaluate_folder(pred, os.path.join(raw, "labelsTs"),
                                      dataset_json=os.path.join(raw, "dataset.json"))
            results[label] = (summary, t_train)
        say("Dice on the test cases")
        _print_table(results)
        print(f"\nDemo finished in {time.time() - t_start:.0f} s. Work folder: {work}"
              + ("" if (output or keep) else " (temporary; removed)"), flush=True)
        return 0
    except Exception as e:  # one clear line for the user, the log path for the details
        print(f"\nnnunet_ssl demo: error: {e}", file=sys.stderr, flush=True)
        if not (output or keep):
            print(f"(work folder kept for inspection: {work})", file=sys.stderr)
            keep = True
        return 1
    finally:
        if not (output or keep):
            shutil.rmtree(work, ignore_errors=True)


def _print_table(results: Dict[str, tuple]) -> None:
    first = next(iter(results.values()))[0]
    classes = list(first["mean"]["per_class"])
    head = f"{'trainer':<16}" + "".join(f"{c[:10]:>12}" for c in classes) + f"{'mean':>10}{'train s':>10}"
    print(head)
    print("-" * len(head))
    for label, (summary, t_train) in results.items():
        per = summary["mean"]["per_class"]
        row = "".join(f"{100 * per[c]['Dice']:>12.2f}" for c in classes)
        print(f"{label:<16}{row}{100 * summary['mean']['mean_over_classes']['Dice']:>10.2f}{t_train:>10.0f}")
    print("(Dice in %, mean over test cases; nnU-Net's stock prediction without TTA)")
