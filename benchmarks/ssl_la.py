#!/usr/bin/env python
"""Left Atrium semi-supervised benchmark (UA-MT HDF5 layout, 3D): 4 labeled cases, the other present training cases
unlabeled, the present ``test.list`` cases for testing.

    python benchmarks/ssl_la.py --budget cpu                        # all runs, reduced 3D plan on CPU
    python benchmarks/ssl_la.py --budget cpu --trainers nnUNetTrainer MeanTeacher --skip-existing
    python benchmarks/ssl_la.py --budget cpu --seeds 0 1 2 --skip-existing   # each seed in turn; summary over seeds
    python benchmarks/ssl_la.py --budget cpu --trainers nnUNetTrainer controls  # + the two controls
    python benchmarks/ssl_la.py --budget full --device cuda         # nnU-Net's own 3d_fullres plan and schedule
    python benchmarks/ssl_la.py --budget smoke                      # plumbing check

Data: ``$NNUNET_SSL_DATA/LA`` or ``<repo>/../shared/data/LA`` (skipped with a message when absent). Labeled: the
first N lines of ``train.list`` (N = 4, the literature's 5 % setting), or ``--labeled-seed S`` / ``--labeled-cases``
among the present training cases. Unlabeled: the other present training cases (the shared copy holds the first 28
of ``train.list``, so 24 unlabeled cases, 4 until it held only 8; with the full 80-case folder (``--data``) all 76
others). Test: the
``test.list`` cases (20, all present), evaluated once with the final checkpoint.

Runs: ``nnUNetTrainer`` on the labeled cases, ``nnUNetTrainer@all`` on all present training cases labeled (upper
bound at the same budget), and every SSL method trainer; identical plans, budget and seed; fold ``all``.

Budgets:
- ``cpu``: configuration ``3d_cpu`` inheriting nnU-Net's ``3d_fullres`` plan of the all-labeled dataset: 1.5 mm
  isotropic (the data is 0.625 mm), patch 32 x 48 x 64, batch 2 (+2 unlabeled), PlainConvUNet 5 stages 16..256;
  20 epochs x 50 iterations; no TTA. One step costs about 1.25 ACDC ``2d_cpu`` steps (67 vs 54 GFLOP), so
  labeled-only training takes about a quarter of an hour on 2 idle cores.
- ``full``: nnU-Net's own ``3d_fullres`` plan and 1000 x 250 schedule with TTA, for a GPU.
- ``smoke``: ``3d_cpu`` with 2 x 3 iterations and 3 test cases.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CASES = "2018LA_Seg_Training Set"


def _present(source: Path, case: str) -> bool:
    return (source / CASES / case / "mri_norm2.h5").is_file()


def la_selection(source: Path, n: int, seed: Optional[int], cases: Optional[List[str]], scratch: Path):
    """Labeled cases; for a seeded/explicit choice a scratch source whose ``train.list`` starts with them."""
    lines = [ln.strip() for ln in (source / "train.list").read_text().splitlines() if ln.strip()]
    present = [c for c in lines if _present(source, c)]
    prefix = 0
    while prefix < len(lines) and _present(source, lines[prefix]):
        prefix += 1
    record = {"n_available": prefix, "n_present": len(present), "seed": seed}
    if cases:
        chosen, rule = list(cases), "explicit --labeled-cases"
    elif seed is not None:
        import numpy as np

        if n > len(present):
            raise C.StepError(f"-n {n}: only {len(present)} training cases are present")
        chosen = sorted(np.random.default_rng(seed).choice(present, n, replace=False).tolist())
        rule = f"{n} present training cases drawn at random (numpy default_rng({seed}).choice)"
    else:
        chosen, rule = None, f"first {n} lines of train.list"
    if chosen is None:
        if n > prefix:
            raise C.StepError(f"-n {n}: only the first {prefix} cases of train.list are present")
        labeled, src = lines[:n], source
    else:
        missing = [c for c in chosen if c not in present]
        if missing:
            raise C.StepError(f"labeled case(s) {missing} are not present in {source / CASES}")
        labeled = chosen
        src = C.scratch_source(source, scratch, "train.list", C.reorder_list(lines, chosen, lambda s: s))
    record.update(rule=rule, labeled=labeled,
                  description=f"{len(labeled)} cases ({rule}); the other present training cases unlabeled")
    return src, record


CPU_PLAN = dict(spacing=(1.5, 1.5, 1.5), patch_size=(32, 48, 64), batch_size=2, features=(16, 32, 64, 128, 256))

BUDGETS = {
    "cpu": C.Budget("cpu", "3d_cpu", epochs=20, iterations=50, val_iterations=5, tta=False, device="cpu",
                    cpu_plan=CPU_PLAN,
                    note="3d_cpu (1.5 mm iso, 32x48x64, batch 2, 5-stage 16..256 U-Net), 20 x 50 iterations, no TTA"),
    "full": C.Budget("full", "3d_fullres", epochs=1000, iterations=250, val_iterations=50, tta=True, device="cuda",
                     note="nnU-Net's own 3d_fullres plan and 1000 x 250 schedule with TTA, for a GPU"),
    "smoke": C.Budget("smoke", "3d_cpu", epochs=2, iterations=3, val_iterations=1, tta=False, device="cpu",
                      selftrain_args=("--case-cut", "0"),
                      cpu_plan=CPU_PLAN, max_test=3,
                      note="plumbing check: 3d_cpu, 2 x 3 iterations, 3 test cases"),
}

SPEC = C.Spec(
    name="ssl_la",
    title="Left Atrium semi-supervised benchmark (UA-MT HDF5 layout, 3D)",
    data_subfolder="LA",
    converter="la-h5",
    dataset_ids=(821, 822),
    dataset_names=("LA_bench_subset", "LA_bench_all"),
    parent_configuration="3d_fullres",
    default_n=4,
    n_all_label="all present training cases",
    classes=["left_atrium"],
    budgets=BUDGETS,
    make_selection=la_selection,
    reference=None,
    protocol_note=(
        "Protocol: the literature's LA split (labeled = first N lines of train.list, test = test.list), native "
        "0.625 mm spacing in the raw data; the CPU budget trains a reduced 3D plan at 1.5 mm and predicts back at "
        "0.625 mm. The shared data copy holds fewer than the 80 training cases (the first 8 until 2026-12, 28 since), "
        "so the unlabeled pool is smaller than the literature's 76 (its size is in the setting above): SSL gains here "
        "are a lower bound of what the full pool gives. Plans = nnU-Net's planning on "
        "the all-labeled dataset plus the budget's configuration, copied unchanged to the labeled-subset dataset."),
)


if __name__ == "__main__":
    sys.exit(C.main(SPEC, __doc__))
