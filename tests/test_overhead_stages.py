"""benchmarks/overhead.py: trainers with stages are timed per stage, and the BCP targets are computed and reported.

benchmarks/ is not a package: its scripts put their own folder on sys.path and import ``_common``; so does this test.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import overhead as O  # noqa: E402
from nnunet_ssl.trainers.nnUNetTrainerBCP import nnUNetTrainerBCP  # noqa: E402


def test_one_entry_per_stage():
    labels = [e["label"] for e in O.entries_for(["nnUNetTrainerBCP", "nnUNetTrainerACTION",
                                                 "nnUNetTrainerMeanTeacher"])]
    assert labels == ["nnUNetTrainerBCP [stage i]", "nnUNetTrainerBCP [stage ii]",
                      "nnUNetTrainerACTION [stage i]", "nnUNetTrainerACTION [stage ii]",
                      "nnUNetTrainerACTION [stage iii]", "nnUNetTrainerMeanTeacher"]


def test_bcp_stage_span_matches_stage_of_epoch():
    t = SimpleNamespace(pretrain_epochs=5, num_epochs=20)
    assert nnUNetTrainerBCP.stage_span(t, 1) == (0, 5) and nnUNetTrainerBCP.stage_span(t, 2) == (5, 20)
    t.stage_of_epoch = lambda e: nnUNetTrainerBCP.stage_of_epoch(t, e)
    assert [t.stage_of_epoch(e) for e in (0, 4, 5, 19)] == [1, 1, 2, 2]


def _entry(name, label, median, flops, peak):
    return {"name": name, "label": label, "median_s": median, "p25_s": median, "p75_s": median, "min_s": median,
            "flops": flops, "peak_mb": peak}


def test_bcp_targets_worst_stage():
    entries = [_entry("nnUNetTrainer", "nnUNetTrainer", 1.0, 10.0, 100.0),
               _entry("nnUNetTrainerMeanTeacher", "nnUNetTrainerMeanTeacher", 2.4, 23.0, 200.0),
               _entry("nnUNetTrainerBCP", "nnUNetTrainerBCP [stage i]", 1.2, 10.0, 120.0),     # 1.2 / 1.0 = 1.20
               _entry("nnUNetTrainerBCP", "nnUNetTrainerBCP [stage ii]", 2.5, 25.0, 220.0)]    # 2.5 / 2.5 = 1.00
    result = {"configs": {"2d": {"entries": entries}}}
    O.analyse(result)
    t = result["configs"]["2d"]["targets"]
    assert abs(t["bcp_time_over_flop_bound"] - 1.2) < 1e-9 and t["bcp_time_stage"] == "nnUNetTrainerBCP [stage i]"
    assert abs(t["bcp_peak_over_mean_teacher"] - 1.1) < 1e-9 and t["bcp_peak_stage"] == "nnUNetTrainerBCP [stage ii]"
