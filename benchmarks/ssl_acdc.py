#!/usr/bin/env python
"""ACDC semi-supervised benchmark: N labeled patients + the other training patients unlabeled, 20 test patients.

    python benchmarks/ssl_acdc.py --budget cpu                      # all runs, the CPU protocol (hours)
    python benchmarks/ssl_acdc.py --budget cpu --trainers nnUNetTrainer MeanTeacher --skip-existing
    python benchmarks/ssl_acdc.py --budget cpu --seeds 0 1 2 --skip-existing   # each seed in turn; summary over seeds
    python benchmarks/ssl_acdc.py --budget cpu --trainers nnUNetTrainer controls  # + the two controls
    python benchmarks/ssl_acdc.py --budget full --device cuda       # nnU-Net's own 2d plan and schedule
    python benchmarks/ssl_acdc.py --budget smoke                    # plumbing check, minutes

Data: the SSL4MIS HDF5 layout of ACDC in ``$NNUNET_SSL_DATA/ACDC`` or ``<repo>/../shared/data/ACDC`` (skipped with a
message when absent). Labeled: the patients of the first N patients of ``train_slices.list`` (N = 3: its first 68
lines, patients 099, 038, 050, the literature's setting), or ``--labeled-seed S`` (N patients drawn with seed S) or
``--labeled-cases 038 050 099``. Unlabeled: the other training patients (both frames). Test: ``test.list`` (20
patients, 40 volumes), evaluated once with the final checkpoint (no model selection on it).

Runs (identical plans file, iteration budget and seed; fold ``all`` = every labeled case, no validation split):
``nnUNetTrainer`` on the labeled patients; ``nnUNetTrainer@all`` on all 70 training patients labeled (the upper
bound at the same budget); every SSL method trainer the installed package defines (``--trainers`` to choose).

Budgets (see benchmarks/README.md and specs/benchmark-protocol.md):
- ``cpu``: configuration ``2d_cpu`` inheriting nnU-Net's ``2d`` plan of the 70-patient dataset: spacing 3.0 x 3.0 mm,
  patch 128 x 128, batch 12 (+12 unlabeled), PlainConvUNet 5 stages 16..256; 20 epochs x 100 iterations; no TTA.
- ``full``: nnU-Net's own ``2d`` plan (of the 70-patient dataset) and schedule (1000 x 250), TTA, for a GPU.
- ``smoke``: ``2d_cpu`` with batch 2, 2 x 4 iterations, 6 unlabeled frames, 4 test volumes, 5 patients for the
  upper bound: checks that everything runs, measures nothing.

Results: ``benchmarks/results/ssl_acdc_<budget>[_<selection>].json`` (merged run by run, keyed by trainer) and
the Markdown table beside it, regenerated after every run; seed S > 0 in ``results/seed<S>/``; the summary over
seeds ``ssl_acdc_<budget>[_<selection>]_summary.md`` / ``.json`` / ``.png`` beside the seed-0 table.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SLICE_LIST = "train_slices.list"
_PATIENT = re.compile(r"^(patient\d+)_frame\d+_slice_\d+$")


def _patient(line: str) -> str:
    m = _PATIENT.match(line)
    return m.group(1) if m else line


def _normalise(case: str) -> str:
    case = case.strip()
    return case if case.startswith("patient") else f"patient{int(case):03d}"


def acdc_selection(source: Path, n: int, seed: Optional[int], cases: Optional[List[str]], scratch: Path):
    """The labeled patients; for a seeded/explicit choice, a scratch source whose ``train_slices.list`` starts with
    them (symlinks to the real files), so that the converter's "first N patients" rule selects them."""
    lines = [ln.strip() for ln in (source / SLICE_LIST).read_text().splitlines() if ln.strip()]
    patients = list(dict.fromkeys(_patient(ln) for ln in lines))
    if not 1 <= n <= len(patients):
        raise C.StepError(f"-n {n}: {SLICE_LIST} has {len(patients)} training patients")
    record = {"n_available": len(patients), "seed": seed}
    if cases:
        chosen = [_normalise(c) for c in cases]
        rule = "explicit --labeled-cases"
    elif seed is not None:
        import numpy as np

        chosen = sorted(np.random.default_rng(seed).choice(patients, n, replace=False).tolist())
        rule = f"{n} patients drawn at random (numpy default_rng({seed}).choice without replacement)"
    else:
        chosen, rule = None, f"first {n} patients of {SLICE_LIST}"
    if chosen is None:
        labeled = patients[:n]
        src = source
        n_lines = sum(1 for ln in lines if _patient(ln) in set(labeled))
        rule += f" (its first {n_lines} lines)"
    else:
        unknown = [c for c in chosen if c not in patients]
        if unknown:
            raise C.StepError(f"--labeled-cases: {unknown} are not training patients of {SLICE_LIST}")
        labeled = chosen
        src = C.scratch_source(source, scratch, SLICE_LIST, C.reorder_list(lines, chosen, _patient))
    record.update(rule=rule, labeled=labeled,
                  description=f"{len(labeled)} patients ({', '.join(p.replace('patient', '') for p in labeled)}): "
                              f"{rule}; all other training patients unlabeled")
    return src, record


CPU_PLAN = dict(spacing=(3.0, 3.0), patch_size=(128, 128), batch_size=12, features=(16, 32, 64, 128, 256))

BUDGETS = {
    "cpu": C.Budget("cpu", "2d_cpu", epochs=20, iterations=100, val_iterations=10, tta=False, device="cpu",
                    cpu_plan=CPU_PLAN,
                    note="specs/benchmark-protocol.md: 2d_cpu (3.0 mm, 128x128, batch 12, 5-stage 16..256 U-Net), "
                         "20 x 100 iterations, no TTA, 2 CPU cores"),
    "full": C.Budget("full", "2d", epochs=1000, iterations=250, val_iterations=50, tta=True, device="cuda",
                     note="nnU-Net's own 2d plan and 1000 x 250 schedule with TTA, for a GPU"),
    "smoke": C.Budget("smoke", "2d_smoke", epochs=2, iterations=4, val_iterations=1, tta=False, device="cpu",
                      cpu_plan=dict(CPU_PLAN, batch_size=2), max_unlabeled=6, max_test=4, n_all=5,
                      selftrain_args=("--case-cut", "0"),
                      note="plumbing check: 2d_cpu with batch 2, 2 x 4 iterations, 6 unlabeled, 4 test volumes"),
}

REFERENCE = {
    "source": "specs/benchmark-protocol.md, stock nnUNetTrainer, this plan and schedule, 2 CPU cores, "
              "nnUNetv2_evaluate_folder",
    "rows": [
        {"run": "nnUNetTrainer", "labeled": "3 (038, 050, 099)", "RV": 41.0, "Myo": 48.7, "LV": 60.5, "mean": 50.1,
         "time": "~25 min"},
        {"run": "nnUNetTrainer@all", "labeled": "all 70", "RV": 82.5, "Myo": 79.4, "LV": 89.5, "mean": 83.8,
         "time": "~26 min"},
    ],
}

SPEC = C.Spec(
    name="ssl_acdc",
    title="ACDC semi-supervised benchmark (SSL4MIS HDF5 layout)",
    data_subfolder="ACDC",
    converter="acdc-h5",
    dataset_ids=(811, 812),
    dataset_names=("ACDC_bench_subset", "ACDC_bench_all"),
    parent_configuration="2d",
    default_n=3,
    n_all_label="all training patients",
    classes=["RV", "Myo", "LV"],
    unit="patients",
    budgets=BUDGETS,
    make_selection=acdc_selection,
    reference=REFERENCE,
    target_gain=5.0,
    protocol_note=(
        "Protocol: specs/benchmark-protocol.md (ACDC CPU protocol). Volumes rebuilt from the training slices with "
        "nominal spacing (10.0, 1.5, 1.5) mm; plans = nnU-Net's planning on the all-labeled dataset plus the budget's "
        "configuration, copied unchanged to the labeled-subset dataset. The reference row for labeled-only nnU-Net "
        "is the check that this run reproduces the protocol: a labeled-only Dice far below it means the protocol "
        "differs. Wall times depend on the machine's load (see the load average column)."),
)


if __name__ == "__main__":
    sys.exit(C.main(SPEC, __doc__))
