"""benchmarks/metassl_default.py: issue 18's rule for the MetaSSL default, on hand-made seed summaries whose
verdicts are worked out by hand in each test's comments."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import metassl_default as M  # noqa: E402


def trainer(key: str, dice: dict, vol: dict) -> dict:
    return {"key": key, "dice": {str(s): v for s, v in dice.items()}, "volume_ratio_mean": vol}


def summary(*trainers: dict, stale: tuple = ()) -> dict:
    ctxs = [{"status": "current", "trainers": list(trainers)}]
    ctxs += [{"status": "stale", "trainers": list(stale)}]
    return {"contexts": ctxs}


LAB = {0: 0.50, 1: 0.54, 2: 0.46}


def bench_a() -> dict:
    """labeled-only 50 / 54 / 46; FixMatch 52 / 55 / 49 (Δ +2, +1, +3: mean +2);
    MetaSSLFixMatch_good 53 / 56 / 48 (Δ +3, +2, +2: mean +2.33), volumes in the band;
    MetaSSLFixMatch_big 56 / 58 / 52 (Δ +6, +4, +6), LV volume 1.30: over-segments;
    MetaSSLFixMatch_weak 51 / 54.5 / 46.5 (Δ +1, +0.5, +0.5: mean +0.67 >= 0, but 1.33 below FixMatch's +2)."""
    return summary(
        trainer("nnUNetTrainer", LAB, {"A": 0.7, "B": 1.0}),
        trainer("nnUNetTrainerFixMatch", {0: 0.52, 1: 0.55, 2: 0.49}, {"A": 0.9, "B": 1.0}),
        trainer("nnUNetTrainerMetaSSLFixMatch_good", {0: 0.53, 1: 0.56, 2: 0.48}, {"A": 0.8, "B": 1.25}),
        trainer("nnUNetTrainerMetaSSLFixMatch_big", {0: 0.56, 1: 0.58, 2: 0.52}, {"A": 1.0, "LV": 1.30}),
        trainer("nnUNetTrainerMetaSSLFixMatch_weak", {0: 0.51, 1: 0.545, 2: 0.465}, {"A": 1.0, "B": 1.0}),
        trainer("nnUNetTrainerMetaSSL_voxelMean", {0: 0.55}, {"A": 1.0, "B": 1.0}),
        trainer("nnUNetTrainerMeanTeacher", {0: 0.51}, {"A": 1.0, "B": 1.0}))


def bench_b() -> dict:
    """labeled-only 80 / 81 / 82; FixMatch 80 / 81 / 82 (Δ 0); _good 81 / 81 / 82 (Δ mean +0.33); _big Δ +1 each;
    _weak Δ 0 each; the Mean Teacher family only on the stale data set."""
    lab = {0: 0.80, 1: 0.81, 2: 0.82}
    return summary(
        trainer("nnUNetTrainer", lab, {"LA": 1.0}),
        trainer("nnUNetTrainerFixMatch", lab, {"LA": 1.0}),
        trainer("nnUNetTrainerMetaSSLFixMatch_good", {0: 0.81, 1: 0.81, 2: 0.82}, {"LA": 1.02}),
        trainer("nnUNetTrainerMetaSSLFixMatch_big", {0: 0.81, 1: 0.82, 2: 0.83}, {"LA": 1.1}),
        trainer("nnUNetTrainerMetaSSLFixMatch_weak", lab, {"LA": 1.0}),
        stale=(trainer("nnUNetTrainerMetaSSL_voxelMean", {0: 0.9}, {"LA": 1.0}),))


def test_family_maps_each_metassl_trainer_to_its_base():
    assert M.family("nnUNetTrainerMetaSSL") == ""
    assert M.family("nnUNetTrainerMetaSSL_voxelMean") == ""
    assert M.family("nnUNetTrainerMetaSSLFixMatch_voxelMean") == "FixMatch"
    assert M.family("nnUNetTrainerMetaSSLCPS") == "CPS"
    assert M.family("nnUNetTrainerMetaSSLBCP") == "BCP"
    assert M.family("nnUNetTrainerFixMatch") is None
    assert M.family("nnUNetTrainerMetaSSLUnknownBase") is None


def test_rule_passes_fails_and_chooses_by_mean_delta():
    dec = M.decide({"a": bench_a(), "b": bench_b()}, min_seeds=3)
    good = dec["candidates"]["nnUNetTrainerMetaSSLFixMatch_good"]
    assert good["meets_bar"]
    assert good["per_benchmark"]["a"]["delta"]["mean"] == pytest.approx(0.07 / 3)
    assert good["per_benchmark"]["a"]["vs_base"]["base_delta"] == pytest.approx(0.02)
    # mean over the benchmarks of the mean Δ: (2.333 + 0.333) / 2 = 1.333 points
    assert good["mean_delta_over_benchmarks"] == pytest.approx((0.07 / 3 + 0.01 / 3) / 2)

    big = dec["candidates"]["nnUNetTrainerMetaSSLFixMatch_big"]
    assert not big["meets_bar"]
    assert big["per_benchmark"]["a"]["fails"] == ["LV volume 1.30"]
    assert big["per_benchmark"]["b"]["fails"] == []

    weak = dec["candidates"]["nnUNetTrainerMetaSSLFixMatch_weak"]
    (msg,) = weak["per_benchmark"]["a"]["fails"]
    assert msg.startswith("Δ +0.7 below FixMatch's +2.0 by more than 1")
    assert weak["per_benchmark"]["b"]["fails"] == []  # Δ 0 = FixMatch's 0: within 1 point

    # _big has the higher mean Δ (+3.33) but over-segments: _good is the FixMatch default
    assert dec["choice"]["FixMatch"] == {"default": "nnUNetTrainerMetaSSLFixMatch_good", "best_if_none_passes": None}

    # MeanTeacher family: one seed on a, only stale rows on b
    vm = dec["candidates"]["nnUNetTrainerMetaSSL_voxelMean"]
    assert vm["per_benchmark"]["a"]["fails"] == ["1 paired seed(s) < 3"]
    assert vm["per_benchmark"]["b"]["fails"] == ["no run on the current data"]
    assert vm["mean_delta_over_benchmarks"] is None
    assert dec["choice"]["MeanTeacher"] == {"default": None, "best_if_none_passes": None}
    assert dec["labeled_only_volume_failures"] == {"a": ["A volume 0.70"], "b": []}


def _without_good(s: dict) -> dict:
    s["contexts"][0]["trainers"] = [t for t in s["contexts"][0]["trainers"] if not t["key"].endswith("_good")]
    return s


def test_best_is_named_when_no_candidate_passes():
    # without _good: _big fails the volume bar, _weak the base-method check; _big has the higher mean Δ
    # ((+3.33 + 1) / 2 against (+0.67 + 0) / 2)
    dec = M.decide({"a": _without_good(bench_a()), "b": _without_good(bench_b())}, min_seeds=3)
    assert dec["choice"]["FixMatch"] == {"default": None, "best_if_none_passes": "nnUNetTrainerMetaSSLFixMatch_big"}
    assert "FixMatch: no candidate meets the bar; the best by mean Δ over the benchmarks, of those with >= 3 seeds " \
           "on every benchmark: `nnUNetTrainerMetaSSLFixMatch_big`" in M.render(dec)


def test_too_few_seeds_choose_nothing():
    dec = M.decide({"a": bench_a(), "b": bench_b()}, min_seeds=4)  # nobody has 4 seeds
    assert dec["choice"]["FixMatch"] == {"default": None, "best_if_none_passes": None}
    text = M.render(dec)
    assert "FixMatch: no candidate meets the bar, and none has >= 4 seeds on every benchmark" in text
    assert "a: 3 paired seed(s) < 4, LV volume 1.30" in text


def test_main_writes_tables_and_names_a_missing_summary(tmp_path, capsys):
    (tmp_path / "x_summary.json").write_text(json.dumps(bench_a()))
    assert M.main(["x", "y", "--results-dir", str(tmp_path)]) == 1
    assert f"{tmp_path / 'y_summary.json'} not found; run benchmarks/summarize.py y first" in capsys.readouterr().err
    assert not (tmp_path / "metassl_default.md").exists()

    (tmp_path / "y_summary.json").write_text(json.dumps(bench_b()))
    assert M.main(["x", "y", "--results-dir", str(tmp_path)]) == 0
    md = (tmp_path / "metassl_default.md").read_text()
    assert "- FixMatch: `nnUNetTrainerMetaSSLFixMatch_good` meets the bar." in md
    assert json.loads((tmp_path / "metassl_default.json").read_text())["choice"]["FixMatch"]["default"] \
        == "nnUNetTrainerMetaSSLFixMatch_good"
