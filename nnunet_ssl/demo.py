"""``nnunet_ssl demo``: the whole workflow on a synthetic dataset, with the stock nnU-Net commands.

1. generate a dataset with labeled, unlabeled and test cases (known ground truth)
2. ``nnUNetv2_plan_and_preprocess`` and ``nnunet_ssl preprocess-unlabeled``
3. ``nnUNetv2_train`` a labeled-only ``nnUNetTrainer`` and ``nnUNetTrainerMeanTeacher`` with one budget
4. ``nnUNetv2_predict`` the test cases with each, then a Dice table (per class and mean)

Every step runs the literal console command a user would type, so the demo also checks the installation.
The work folder (default ``./nnunet_ssl_demo``) is kept, so its logs and training curves can be read afterwards:
``logs/`` (console output of every step), ``results/`` (nnU-Net's model folders with ``progress.png``,
``progress_ssl.png`` and ``ssl_progress.jsonl``), ``predictions/``, ``raw/`` and ``preprocessed/``. A rerun
replaces a folder an earlier demo made (it carries the marker file ``.nnunet_ssl_demo``) and refuses any other
non-empty folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

DATASET_ID = 979
TRAINERS = (("labeled only", "nnUNetTrainer_{budget}"), ("Mean Teacher", "nnUNetTrainerMeanTeacher_{budget}"))
DEFAULT_FOLDER = "nnunet_ssl_demo"
MARKER = ".nnunet_ssl_demo"
_SUBFOLDERS = ("raw", "preprocessed", "results", "predictions", "logs")


class DemoError(RuntimeError):
    pass


def prepare_work_folder(work: str) -> None:
    """Create ``work``, or empty one an earlier demo made; never touch a non-empty folder the demo did not make."""
    if os.path.isdir(work) and os.listdir(work):
        if not os.path.isfile(os.path.join(work, MARKER)):
            raise DemoError(f"{work} exists and is not empty, and no earlier demo made it (no {MARKER} file): "
                            f"choose another folder with -o, or remove it")
        for sub in _SUBFOLDERS:  # an earlier demo's dataset 979 and models would clash with the new ones
            shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
    elif os.path.exists(work) and not os.path.isdir(work):
        raise DemoError(f"{work} exists and is not a folder: choose another folder with -o")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, MARKER), "w") as f:
        f.write("made by `nnunet_ssl demo`; a rerun with this folder replaces its contents\n")


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


def run_demo(output: str = DEFAULT_FOLDER, configuration: str = "2d", device: Optional[str] = None,
             budget: str = "sslDemo", n_labeled: int = 5, n_unlabeled: int = 20, n_test: int = 6) -> int:
    """Run the demo in ``output`` (kept); 0 on success, 1 if a step failed (the error names it and its log),
    2 if ``output`` cannot be used."""
    import torch

    from nnunet_ssl.cli_common import print_error
    from nnunet_ssl.synthetic import make_synthetic_dataset

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = os.path.abspath(output)
    try:
        prepare_work_folder(work)
    except DemoError as e:
        print_error(str(e))
        return 2
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
    n_steps = 4 + 2 * len(TRAINERS)
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
        print(f"\nDemo finished in {time.time() - t_start:.0f} s. Everything is kept in {work}:")
        print(f"  {logs}{os.sep}  console output of every step")
        for _, pattern in TRAINERS:
            trainer = pattern.format(budget=budget)
            fold = os.path.join(env["nnUNet_results"], os.path.basename(raw),
                                f"{trainer}__nnUNetPlans__{configuration}", "fold_0")
            curves = [f for f in ("progress.png", "progress_ssl.png") if os.path.isfile(os.path.join(fold, f))]
            print(f"  {fold}{os.sep}  {trainer}: {', '.join(curves)}, training log, checkpoint")
        print(f"  {os.path.join(work, 'predictions')}{os.sep}  test-case predictions", flush=True)
        return 0
    except Exception as e:  # one clear line for the user, the log path for the details
        print(file=sys.stderr)
        print_error(f"demo: {e}")
        print(f"(logs and what was made so far are in {work})", file=sys.stderr)
        return 1


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
