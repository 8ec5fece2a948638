"""benchmarks/gpu_check.py: trainer discovery, the checkpoint comparison, and its CPU dry run end to end.

benchmarks/ is not a package: its scripts put their own folder on sys.path and import ``_common``; so does this test.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import gpu_check as G  # noqa: E402


def test_every_method_trainer_is_checked_and_new_ones_are_found(monkeypatch):
    assert G.check_trainers() == ["nnUNetTrainer"] + C.method_trainers()
    import nnunet_ssl.trainers as trainers
    from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL

    real = trainers.all_trainers()
    new = type("nnUNetTrainerBrandNew", (nnUNetTrainerSSL,), {})
    monkeypatch.setattr(trainers, "all_trainers", lambda: {**real, "nnUNetTrainerBrandNew": new})
    assert "nnUNetTrainerBrandNew" in G.check_trainers()
    assert G.check_trainers(["MeanTeacher"]) == ["nnUNetTrainer", "nnUNetTrainerMeanTeacher"]


def test_tiny_variant_of_the_package_or_built_here():
    cls, note = G.tiny_class("nnUNetTrainerMeanTeacher")
    assert cls.__name__ == "nnUNetTrainerMeanTeacher_sslTiny" and note == ""
    cls, note = G.tiny_class("nnUNetTrainerMeanTeacher_ema0999")   # a variant without its own tiny budget
    assert cls.__name__ == "nnUNetTrainerMeanTeacher_ema0999_sslTiny" and "built here" in note
    assert cls.__module__ == G.__name__ and getattr(G, cls.__name__) is cls


def test_checkpoint_comparison():
    a = {"w": torch.tensor([1.0, math.nan]), "epoch": 2, "log": {"loss": [0.5, math.nan]}, "opt": [torch.ones(2)]}
    b = {"w": torch.tensor([1.0, math.nan]), "epoch": 2, "log": {"loss": [0.5, math.nan]}, "opt": [torch.ones(2)]}
    assert G.same(a, b) == []                                       # NaN where both have NaN is equal
    b["w"] = torch.tensor([1.0, 2.0])
    b["epoch"] = 3
    b["opt"] = [torch.ones(2), torch.ones(1)]
    b["extra"] = None
    assert sorted(G.same(a, b)) == ["/epoch: 2 != 3", "/extra: only in one of them", "/opt: lengths 1 != 2",
                                    "/w: tensors differ"]
    assert G.same({"i": torch.tensor([1, 2])}, {"i": torch.tensor([1, 3])}) == ["/i: tensors differ"]


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
    """The CPU dry run of the GPU command on nnUNetTrainer + Mean Teacher (every method's CPU training is
    tests/test_workflow.py's job; the GPU command checks them all): tiny runs, round trips, the cost table."""
    committed = BENCH / "results" / "gpu_check.json"
    before = committed.stat().st_mtime if committed.is_file() else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--dry-run", "--trainers",
                        "MeanTeacher", "--work", str(tmp_path / "work"), "--results-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=1100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["passed"] and report["dry_run"] and report["device"] == "cpu"
    assert report["trainers"] == ["nnUNetTrainer", "nnUNetTrainerMeanTeacher"]
    for t in report["tiny"]:
        assert t["ok"], t
        assert t["roundtrip_differences"] == [] and t["losses_finite"] and t["amp"] is False   # no AMP on CPU
        assert t["epochs"] == 2 and t["iterations_per_epoch"] == 3 and len(t["train_losses"]) == 2
    entries = report["overhead"]["configs"]["3d_fullres"]["entries"]
    assert [e["name"] for e in entries] == ["nnUNetTrainer", "nnUNetTrainerMeanTeacher"]
    assert all("median_s" in e and "peak_mb" in e for e in entries)
    assert entries[0]["time_ratio"] == 1.0
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "Device: **CPU" in md and "**PASSED**" in md
    assert "| `nnUNetTrainerMeanTeacher` | `nnUNetTrainerMeanTeacher_sslTiny` | off |" in md
    assert (committed.stat().st_mtime if committed.is_file() else None) == before
