"""The benchmarks' summary over training seeds (benchmarks/summarize.py) and the multi-seed / control plumbing of
benchmarks/_common.py, on small hand-made per-seed tables with hand-computed expectations.

benchmarks/ is not a package: its scripts put their own folder on sys.path and import ``_common``; so does this test.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import summarize as S  # noqa: E402

SHA = "aaaaaaaaaaaaaaaa"


def setting(seed: int, num_unlabeled: int = 10, sha: str = SHA) -> dict:
    return {"plans_sha256": sha, "configuration": "2d_cpu", "total_iterations": 2000, "tta": False, "device": "cpu",
            "seed": seed, "selection": {"labeled": ["p2", "p1"], "seed": None, "n_available": 12,
                                        "description": "2 patients (first 2)"},
            "datasets": {"labeled_subset": {"num_labeled": 4, "num_unlabeled": num_unlabeled, "num_test": 6},
                         "all_labeled": {"num_labeled": 24}},
            "labeled_units": {"unit": "patients", "labeled_subset": 2, "all_labeled": 12}}


def row(dice: float, seed, *, hd95=10.0, vol=1.0, wall=100.0, started="2026-01-01T00:00:00+00:00", status="ok",
        **extra) -> dict:
    r = {"status": status, "seed": seed, "plans_sha256": SHA, "started": started, "train_wall_s": wall,
         "role": "SSL", "total_iterations": 2000,
         "metrics": {"mean": {"Dice": dice, "HD95_mm": hd95},
                     "per_class": {"A": {"Dice": dice, "volume_ratio": vol}}}}
    r.update(extra)
    return r


def table(seed: int, runs: dict, **kw) -> dict:
    return {"benchmark": "fakebench", "budget": "cpu", "title": "Fake benchmark", "setting": setting(seed, **kw),
            "runs": runs}


@pytest.fixture
def results(tmp_path) -> Path:
    """Three seeds. labeled-only 50 / 54 / 46, Mean Teacher 55 / 53 / 50 (HD95 10 / 12 / 14, volume 1.0 / 0.8 /
    0.9, train 100 / 200 / 300 s), upper bound on seeds 0 and 1 only (80 / 84), FixMatch failed on seed 2, and one
    FixMatch row of seed 2 made on other data (4 unlabeled cases), older than the rest."""
    t0 = {"nnUNetTrainer": row(0.50, 0),
          "nnUNetTrainerMeanTeacher": row(0.55, 0, hd95=10, vol=1.0, wall=100),
          "nnUNetTrainer@all": row(0.80, 0)}
    t1 = {"nnUNetTrainer": row(0.54, 1),
          "nnUNetTrainerMeanTeacher": row(0.53, 1, hd95=12, vol=0.8, wall=200),
          "nnUNetTrainer@all": row(0.84, 1)}
    other = C.data_context(setting(2, num_unlabeled=4))
    t2 = {"nnUNetTrainer": row(0.46, 2),
          "nnUNetTrainerMeanTeacher": row(0.50, 2, hd95=14, vol=0.9, wall=300),
          "nnUNetTrainerCPS": row(0.9, 2, status="train_failed"),
          "nnUNetTrainerFixMatch": row(0.70, 2, started="2025-01-01T00:00:00+00:00", data=other)}
    for sub, t, seed in (("", t0, 0), ("seed1", t1, 1), ("seed2", t2, 2)):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / "fakebench_cpu.json").write_text(json.dumps(table(seed, t)))
    return tmp_path


def test_paired_differences_by_seed():
    p = S.paired({0: 0.55, 1: 0.53, 2: 0.50}, {0: 0.50, 1: 0.54})
    assert p["seeds"] == [0, 1]                      # seed 2 has no labeled-only run: not paired
    assert p["per_seed"] == pytest.approx({0: 0.05, 1: -0.01})
    assert p["mean"] == pytest.approx(0.02) and p["min"] == pytest.approx(-0.01) and p["max"] == pytest.approx(0.05)
    assert p["wins"] == 1 and p["n"] == 2
    assert S.paired({0: 0.5}, {}) == {"seeds": [], "per_seed": {}, "n": 0, "mean": None, "min": None, "max": None,
                                      "wins": 0}


def test_seed_of_old_rows():
    data = {"setting": {"seed": 5}}
    assert S.row_seed({"seed": 2}, data) == 2
    # rows older than a recorded seed: the budget variant's seed, also inside self-training's teacher stats
    assert S.row_seed({"seed": None, "train_stats": {"budget": {"seed": 3}}}, data) == 3
    assert S.row_seed({"train_stats": {"teacher": {"budget": {"seed": 4}}}}, data) == 4
    assert S.row_seed({}, data) == 5


def test_summary_statistics(results):
    files = [(str(p.relative_to(results)), json.loads(p.read_text())) for p in S.seed_files(results, "fakebench_cpu")]
    assert [f for f, _ in files] == ["fakebench_cpu.json", "seed1/fakebench_cpu.json", "seed2/fakebench_cpu.json"]
    summary = S.build_summary(files, stem="fakebench_cpu")
    current, stale = summary["contexts"]
    assert current["status"] == "current" and stale["status"] == "stale"
    t = {x["key"]: x for x in current["trainers"]}
    assert list(t) == ["nnUNetTrainer", "nnUNetTrainer@all", "nnUNetTrainerMeanTeacher"]   # failed CPS left out
    mt = t["nnUNetTrainerMeanTeacher"]
    assert mt["seeds"] == [0, 1, 2] and mt["n"] == 3 and not mt["few_seeds"]
    assert mt["dice_mean"] == pytest.approx(1.58 / 3)
    # sample SD of 0.55, 0.53, 0.50: squared deviations 0.0005444 + 0.0000111 + 0.0007111 = 0.0012667, / 2, sqrt
    assert mt["dice_sd"] == pytest.approx(0.0251661, abs=1e-6)
    d = mt["delta"]          # 0.55 - 0.50, 0.53 - 0.54, 0.50 - 0.46
    assert d["per_seed"] == pytest.approx({0: 0.05, 1: -0.01, 2: 0.04})
    assert d["mean"] == pytest.approx(0.08 / 3) and d["min"] == pytest.approx(-0.01) and d["max"] == pytest.approx(0.05)
    assert d["wins"] == 2 and d["n"] == 3
    assert mt["hd95_mm_mean"] == pytest.approx(12.0)
    assert mt["volume_ratio_mean"] == {"A": pytest.approx(0.9)}
    assert mt["train_wall_s_mean"] == pytest.approx(200.0)
    up = t["nnUNetTrainer@all"]
    assert up["n"] == 2 and up["few_seeds"]
    assert up["delta"]["mean"] == pytest.approx(0.30) and up["delta"]["wins"] == 2
    lo = t["nnUNetTrainer"]
    assert "delta" not in lo and lo["dice_mean"] == pytest.approx(0.50)
    # the FixMatch row made on other data is not paired with this set's labeled-only rows
    assert [x["key"] for x in stale["trainers"]] == ["nnUNetTrainerFixMatch"]
    assert stale["trainers"][0]["delta"]["n"] == 0
    assert stale["stale_reasons"] == ["unlabeled cases 4 (current: 10)"]


def test_markdown_and_plot(results):
    md_path = S.write_summary(None, results, "fakebench_cpu")
    assert md_path == results / "fakebench_cpu_summary.md"
    md = md_path.read_text()
    assert "| MeanTeacher | 0, 1, 2 | 3 | **52.7** ± 2.5 | +2.7 [-1.0, +5.0] | 2/3 | 12.0 | 0.90 | 3.3 min |" in md
    assert "| upper bound | 0, 1 | 2* | **82.0** ± 2.8 | +30.0 [+30.0, +30.0] | 2/2 |" in md
    assert "| labeled-only | 0, 1, 2 | 3 | **50.0** ± 4.0 |  |  |" in md
    assert "## † Stale:" in md and "| FixMatch† | 2 | 1* | **70.0** | - | - |" in md
    assert "| MeanTeacher | 55.0 (+5.0) | 53.0 (-1.0) | 50.0 (+4.0) |" in md
    summary = json.loads((results / "fakebench_cpu_summary.json").read_text())
    assert summary["plot"] == "fakebench_cpu_summary.png"
    assert (results / "fakebench_cpu_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_a_row_is_current_only_on_the_same_plans_and_data():
    s = setting(0)
    assert C.row_is_current(row(0.5, 0), s)                          # no data record: the plans decide
    assert C.row_is_current(row(0.5, 0, data=C.data_context(s)), s)
    assert not C.row_is_current(row(0.5, 0, data=C.data_context(setting(0, num_unlabeled=4))), s)
    assert not C.row_is_current(row(0.5, 0, plans_sha256="b" * 16), s)


def test_rows_without_a_data_record(tmp_path):
    """A row older than per-row data records takes its file's setting when made with its plans, else it is a set of
    its own (unknown data); the benchmark stamps such rows with the setting before it replaces the setting."""
    data = table(0, {"nnUNetTrainer": row(0.5, 0), "nnUNetTrainerX": row(0.6, 0, plans_sha256="b" * 16)})
    assert S.row_context(data["runs"]["nnUNetTrainer"], data) == C.data_context(data["setting"])
    assert S.row_context(data["runs"]["nnUNetTrainerX"], data)["plans_sha256"] == "b" * 16
    C.stamp_legacy_rows(data)
    assert data["runs"]["nnUNetTrainer"]["data"]["num_unlabeled"] == 10
    assert "data" not in data["runs"]["nnUNetTrainerX"]


def _bench(tmp_path, **kw) -> C.SSLBenchmark:
    import ssl_acdc

    args = dict(budget="cpu", trainers=None, num_labeled=None, labeled_seed=None, labeled_cases=None, seed=0,
                work=str(tmp_path / "work"), results_dir=str(tmp_path / "res"), data=None, device=None)
    args.update(kw)
    return C.SSLBenchmark(ssl_acdc.SPEC, argparse.Namespace(**args))


def test_seeds_share_a_results_root(tmp_path):
    assert _bench(tmp_path).results_json == tmp_path / "res" / "ssl_acdc_cpu.json"
    assert _bench(tmp_path, seed=2).results_json == tmp_path / "res" / "seed2" / "ssl_acdc_cpu.json"
    assert _bench(tmp_path, seed=2, labeled_seed=1).results_json == \
        tmp_path / "res" / "seed2" / "ssl_acdc_cpu_n3_seed1.json"


def test_controls_are_rows_of_their_own(tmp_path):
    bench = _bench(tmp_path, trainers=["SelfTraining_fullTeacher", "labeled2x", "nnUNetTrainer", "selftrain"])
    runs = bench.planned_runs()
    # the full-teacher self-training is moved behind the labeled-only run whose model it reuses
    assert [r["key"] for r in runs] == ["nnUNetTrainer_2x", "nnUNetTrainer", "SelfTraining", "SelfTraining_fullTeacher"]
    by = {r["key"]: r for r in runs}
    assert bench.variant(by["nnUNetTrainer_2x"]) == "nnUNetTrainer_benchCpu2x"
    assert bench.run_epochs(by["nnUNetTrainer_2x"]) == 40 and bench.run_epochs(by["SelfTraining"]) == 10
    assert bench.run_epochs(by["SelfTraining_fullTeacher"]) == 20
    assert bench.selftrain_dataset_id("SelfTraining") == 813 and bench.selftrain_dataset_id(C.SELFTRAIN_FULL) == 814
    default = [r["key"] for r in _bench(tmp_path).planned_runs()]
    assert default[:2] == ["nnUNetTrainer", "nnUNetTrainer@all"] and default[-1] == "SelfTraining_fullTeacher"
    assert "SelfTraining" not in default and "nnUNetTrainer_2x" not in default


def test_full_teacher_missing_says_how_to_train_it(tmp_path):
    bench = _bench(tmp_path, seed=1)
    bench.setting = setting(1)
    with pytest.raises(C.StepError) as e:
        bench.full_teacher("nnUNetTrainer_benchCpu")
    assert "no finished `nnUNetTrainer` row" in str(e.value)
    assert "python benchmarks/ssl_acdc.py --budget cpu --seed 1 " in str(e.value)
    assert str(e.value).endswith("--trainers nnUNetTrainer")
    bench.results_json.parent.mkdir(parents=True)
    made_on_other_data = row(0.5, 1, finished="2026-01-01T00:00:00", data=C.data_context(setting(1, num_unlabeled=4)))
    bench.results_json.write_text(json.dumps({"runs": {"nnUNetTrainer": made_on_other_data}}))
    with pytest.raises(C.StepError, match="made with other plans or data"):
        bench.full_teacher("nnUNetTrainer_benchCpu")
    bench.results_json.write_text(json.dumps({"runs": {"nnUNetTrainer": row(0.5, 1, finished="2026-01-01T00:00:00")}}))
    with pytest.raises(C.StepError, match="checkpoint_final.pth is missing"):
        bench.full_teacher("nnUNetTrainer_benchCpu")


@pytest.fixture
def clean_budgets_module():
    """The generated index registers its classes in nnunet_ssl.trainers.budgets, where the trainer discovery of
    later tests would find them: remove them again."""
    import nnunet_ssl.trainers.budgets as budgets

    before = set(vars(budgets))
    yield
    for name in set(vars(budgets)) - before:
        delattr(budgets, name)


def test_trainer_index_scaled_variants(tmp_path, clean_budgets_module):
    folder, _ = C.write_trainer_index(tmp_path, "benchCpu", 20, 100, 10, 0, ["nnUNetTrainer"],
                                      scaled=[("2x", 40, ["nnUNetTrainer"]),
                                              ("Half", 10, ["nnUNetTrainer", "nnUNetTrainerNoisyStudent"])])
    spec = importlib.util.spec_from_file_location("bench_index_test", folder / "bench_trainer_index_benchCpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "(20 x 100)" in mod.nnUNetTrainer_benchCpu.__doc__
    assert "(40 x 100)" in mod.nnUNetTrainer_benchCpu2x.__doc__
    assert "(10 x 100)" in mod.nnUNetTrainerNoisyStudent_benchCpuHalf.__doc__


def test_a_changed_data_folder_needs_reprepare(tmp_path):
    bench = _bench(tmp_path)
    eight = {"n_available": 8, "n_present": 8, "labeled": ["a", "b", "c", "d"]}
    bench.check_same_source(eight, tmp_path / "LA")                   # first preparation: recorded
    (bench.raw(0)).mkdir(parents=True)
    (bench.raw(0) / "dataset.json").write_text("{}")
    bench.check_same_source(dict(eight), tmp_path / "LA")             # same data: fine
    with pytest.raises(C.StepError, match=r"n_available 8 -> 28, n_present 8 -> 28\); rerun with --reprepare"):
        bench.check_same_source({**eight, "n_available": 28, "n_present": 28}, tmp_path / "LA")


def pool(dice: float, vol: float, prec: float, n: int = 134) -> dict:
    return {"n_cases": n, "mean": {"Dice": dice}, "per_class": {"A": {"Dice": dice, "volume_ratio": vol,
                                                                      "precision": prec}}}


def test_unlabeled_pool_diagnostic_in_the_summary(tmp_path):
    """Mean over the seeds that have it; a trainer without it gets no row in the pool table."""
    t0 = {"nnUNetTrainer": row(0.50, 0, unlabeled_pool=pool(0.40, 1.2, 0.5)),
          "nnUNetTrainerBCP": row(0.55, 0, unlabeled_pool=pool(0.60, 1.0, 0.7)),
          "nnUNetTrainerMeanTeacher": row(0.52, 0)}
    t1 = {"nnUNetTrainer": row(0.54, 1),
          "nnUNetTrainerBCP": row(0.60, 1, unlabeled_pool=pool(0.70, 0.8, 0.9))}
    for sub, t, seed in (("", t0, 0), ("seed1", t1, 1)):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / "fakebench_cpu.json").write_text(json.dumps(table(seed, t)))
    md = S.write_summary(None, tmp_path, "fakebench_cpu").read_text()
    summary = json.loads((tmp_path / "fakebench_cpu_summary.json").read_text())
    t = {x["key"]: x for x in summary["contexts"][0]["trainers"]}
    assert t["nnUNetTrainerBCP"]["pool"]["seeds"] == [0, 1]
    assert t["nnUNetTrainerBCP"]["pool"]["dice_mean"] == pytest.approx(0.65)
    assert t["nnUNetTrainerBCP"]["pool"]["volume_ratio_mean"] == {"A": pytest.approx(0.9)}
    assert t["nnUNetTrainerBCP"]["pool"]["precision_mean"] == {"A": pytest.approx(0.8)}
    assert "pool" not in t["nnUNetTrainerMeanTeacher"]
    assert "| BCP | 0, 1 | 134 | **65.0**; 60.0, 70.0 | 0.90 | 0.80 |" in md
    assert "| labeled-only | 0 | 134 | **40.0**; 40.0 | 1.20 | 0.50 |" in md
    assert "| MeanTeacher | 0 |" not in md.split("Unlabeled pool:")[1]


def test_diagnose_pool_only_from_the_recorded_runs_checkpoint(tmp_path, monkeypatch):
    """--diagnose-pool: a missing checkpoint, or one written after the row finished (a later training's), is
    skipped; a row that has the diagnostic is not redone; the others get it and are saved."""
    import os

    bench = _bench(tmp_path)
    finished = "2026-01-01T00:00:00+00:00"
    rows = {k: row(0.5, 0, key=k, finished=finished, dataset="Dataset811_X", variant=f"{k}_benchCpu")
            for k in ("nnUNetTrainer", "nnUNetTrainerBCP", "nnUNetTrainerFixMatch", "nnUNetTrainerCPS")}
    rows["nnUNetTrainerCPS"]["unlabeled_pool"] = pool(0.3, 1.0, 1.0)
    bench.results_json.parent.mkdir(parents=True)
    bench.results_json.write_text(json.dumps(table(0, rows)))
    t_row = C._dt.datetime.fromisoformat(finished).timestamp()
    for key, mtime in (("nnUNetTrainer", t_row - 60), ("nnUNetTrainerBCP", t_row + 3600),
                       ("nnUNetTrainerCPS", t_row - 60)):
        ckpt = bench.model_dir("Dataset811_X", f"{key}_benchCpu") / "fold_all" / "checkpoint_final.pth"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (mtime, mtime))
    done = []

    def fake(rec, ds, variant, env):
        done.append((rec["key"], variant))
        rec["unlabeled_pool"] = pool(0.45, 1.1, 0.6)

    monkeypatch.setattr(bench, "diagnose_pool", fake)
    monkeypatch.setattr(C, "render_markdown", lambda spec, data: "")  # ACDC's tables need its classes
    said = []
    monkeypatch.setattr(bench, "say", said.append)
    runs = [{"key": k, "trainer": k} for k in rows]
    assert bench.diagnose_pools(runs, {}) == 0
    assert done == [("nnUNetTrainer", "nnUNetTrainer_benchCpu")]
    saved = json.loads(bench.results_json.read_text())["runs"]
    assert saved["nnUNetTrainer"]["unlabeled_pool"]["mean"]["Dice"] == 0.45
    assert "unlabeled_pool" not in saved["nnUNetTrainerBCP"] and "unlabeled_pool" not in saved["nnUNetTrainerFixMatch"]
    assert any("nnUNetTrainerBCP" in m and "written after it finished" in m for m in said)
    assert any("nnUNetTrainerFixMatch" in m and "missing" in m for m in said)
    assert any("nnUNetTrainerCPS: it has the diagnostic" in m for m in said)


def test_ssl_rows_against_the_compute_control(tmp_path):
    """Paired by seed with labeled-only at 2x iterations, over the seeds both have; labeled-only, the control itself
    and the upper bound get no such comparison, nor does a trainer without a shared seed."""
    t0 = {"nnUNetTrainer": row(0.50, 0), "nnUNetTrainer_2x": row(0.50, 0), "nnUNetTrainer@all": row(0.80, 0),
          "nnUNetTrainerFixMatch": row(0.52, 0), "nnUNetTrainerMeanTeacher": row(0.51, 0)}
    t1 = {"nnUNetTrainer": row(0.40, 1), "nnUNetTrainer_2x": row(0.45, 1), "nnUNetTrainerFixMatch": row(0.44, 1)}
    t2 = {"nnUNetTrainer": row(0.60, 2), "nnUNetTrainerFixMatch": row(0.70, 2), "nnUNetTrainerCPS": row(0.61, 2)}
    for sub, t, seed in (("", t0, 0), ("seed1", t1, 1), ("seed2", t2, 2)):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / "fakebench_cpu.json").write_text(json.dumps(table(seed, t)))
    md = S.write_summary(None, tmp_path, "fakebench_cpu").read_text()
    summary = json.loads((tmp_path / "fakebench_cpu_summary.json").read_text())
    t = {x["key"]: x for x in summary["contexts"][0]["trainers"]}
    fm = t["nnUNetTrainerFixMatch"]["vs_control"]      # 0.52 - 0.50, 0.44 - 0.45; seed 2 has no control
    assert fm["seeds"] == [0, 1] and fm["wins"] == 1
    assert fm["per_seed"] == {"0": pytest.approx(0.02), "1": pytest.approx(-0.01)}
    assert fm["mean"] == pytest.approx(0.005)
    assert t["nnUNetTrainerMeanTeacher"]["vs_control"]["per_seed"] == {"0": pytest.approx(0.01)}
    for key in ("nnUNetTrainer", "nnUNetTrainer_2x", "nnUNetTrainer@all", "nnUNetTrainerCPS"):
        assert "vs_control" not in t[key]
    # FixMatch vs labeled-only on seeds 0-1 only: +2.0, +4.0
    assert "| FixMatch | 0, 1* | +0.5 [-1.0, +2.0] | 1/2 | +3.0 [+2.0, +4.0] |" in md
    assert "| MeanTeacher | 0* | +1.0 | 1/1 | +1.0 |" in md
    assert "| CPS | 2" not in md.split("Against the compute control")[1].split("\n\n")[1]
