#!/usr/bin/env python
"""What an SSL trainer costs per iteration, relative to nnU-Net's own ``nnUNetTrainer``, on one synthetic plan.

    python benchmarks/overhead.py                                   # 2d and 3d_fullres, CPU plan, 20 timed rounds
    python benchmarks/overhead.py --configs 2d --trainers MeanTeacher ACTION
    python benchmarks/overhead.py --device cuda --plan nnunet       # nnU-Net's own plans, on a GPU
    python benchmarks/overhead.py --smoke                           # 2 timed rounds: checks the script, no numbers

For each configuration (``2d``, ``3d_fullres``), in ONE process:

1. a synthetic 3D dataset (``nnunet_ssl.synthetic``: 4 labeled and 4 unlabeled volumes of 40 x 128 x 128 voxels at
   (2, 1, 1) mm) is planned and preprocessed once (nnU-Net's API + ``preprocess_unlabeled``; cached in the work folder).
   With ``--plan cpu`` (the default on CPU) the configuration gets the benchmarks' CPU network and batch:
   2d = the ACDC CPU protocol's (patch 128 x 128, batch 12, PlainConvUNet 5 stages 16..256), 3d_fullres = the LA CPU
   budget's (patch 32 x 48 x 64, batch 2, same U-Net); ``--plan nnunet`` keeps nnU-Net's own plan.
2. every trainer is built in-process exactly as ``nnUNetv2_train`` builds it (fold ``all``, ``on_train_start``); a few
   augmented labeled and unlabeled batches are drawn once and replayed, so the timing is the training step itself
   (forward, losses, backward, optimizer, EMA / second network), not data augmentation (which runs in background
   workers in real training). Trainers with stages (ACTION, BCP: ``num_stages``) are measured in every stage.
3. the compute bound of every trainer is its counted floating-point work (``torch.utils.flop_counter``: forward and
   backward of every network and head in one training step) divided by nnUNetTrainer's. The analytic value for Mean
   Teacher with an equal unlabeled batch is 7/3 (student forward + backward on twice the data = 6, one teacher
   forward on the unlabeled half = 1, against 3 for the supervised step).
4. after warm-up, one training step of each trainer in turn, round-robin (the order rotates every round), for
   ``--rounds`` rounds; the medians are compared. Interleaving makes the ratios robust to a machine whose load
   changes during the measurement.
5. peak memory, one subprocess per trainer (a process's peak cannot be attributed to one of several trainers that
   share it): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set (VmHWM, reset with
   /proc/self/clear_refs after set-up), the spec's CPU measure, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc
   returns freed large blocks instead of keeping them in its heap. Beside it, the CPU counterpart of
   ``max_memory_allocated``: tensors alive between steps + the peak of PyTorch's CPU allocations within a step
   (profiler allocation events), which leaves out what the allocator and libraries keep.
6. preprocessing: time per case of ``nnunet_ssl``'s unlabeled preprocessing against nnU-Net's own preprocessing
   (``DefaultPreprocessor.run_case_save``, with the label) of the same images, interleaved, median of ``--pp-rounds``.

Results: ``benchmarks/results/overhead.json`` + ``overhead.md`` (``--smoke``: ``results/smoke/``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DATASET_ID = 951
DATASET_NAME = "OverheadSynthetic"
SHAPE = (40, 128, 128)
CPU_PLANS = {
    "2d": dict(patch_size=(128, 128), batch_size=12, features=(16, 32, 64, 128, 256)),
    "3d_fullres": dict(patch_size=(32, 48, 64), batch_size=2, features=(16, 32, 64, 128, 256)),
}
ANALYTIC_BOUND = {"nnUNetTrainer": (1.0, "1"), "nnUNetTrainerMeanTeacher": (7 / 3, "7/3")}


# ----------------------------------------------------------------------------------------------------------------
# environment and data
# ----------------------------------------------------------------------------------------------------------------

def setup_env(work: Path, device: str) -> None:
    """nnU-Net's variables for this process (before nnunetv2 is imported) and its children."""
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(work / sub)
    os.environ["nnUNet_n_proc_DA"] = "0"   # batches are drawn once, in this process
    if device == "cpu":
        os.environ.setdefault("nnUNet_compile", "0")


def work_dir(root: Path, plan: str, shape=SHAPE) -> Path:
    """The cached dataset's folder: one per plan and, since another volume size is another dataset, per size."""
    return root / (plan if tuple(shape) == SHAPE else f"{plan}_{'x'.join(map(str, shape))}")


def config_name(cfg: str, plan: str) -> str:
    return f"{cfg}_overhead" if plan == "cpu" else cfg


def prepare(work: Path, configs: List[str], plan: str, shape=SHAPE) -> Dict[str, str]:
    """Synthetic dataset (volumes of ``shape``), nnU-Net planning, the benchmark configurations, preprocessing.
    Returns {cfg: trained cfg}."""
    import torch

    from nnunet_ssl.data.unlabeled import preprocess_unlabeled
    from nnunet_ssl.synthetic import make_synthetic_dataset

    threads = torch.get_num_threads()
    raw = work / "raw" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    pre = work / "preprocessed" / raw.name
    if not (raw / "dataset.json").is_file():
        make_synthetic_dataset(str(work / "raw"), DATASET_ID, name=DATASET_NAME, dim=3, n_labeled=4, n_unlabeled=4,
                               n_test=0, shape=tuple(shape), seed=0)
    plans_file = pre / f"{C.PLANS}.json"
    if not plans_file.is_file():
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

        os.environ["nnUNet_n_proc_DA"] = "1"  # the planner calls torch.set_num_threads(n_proc_DA)
        try:
            with quiet(work / "logs" / "plan.log"):
                extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, clean=True,
                                     verbose=False)
                plan_experiments([DATASET_ID])
        finally:
            os.environ["nnUNet_n_proc_DA"] = "0"
    out = {}
    plans = json.loads(plans_file.read_text())
    for cfg in configs:
        name = config_name(cfg, plan)
        if plan == "cpu":  # (re)write: patch / batch / network edits need no new preprocessing, spacing is nnU-Net's
            spacing = plans["configurations"][cfg]["spacing"]
            C.add_configuration(plans_file, name, cfg, spacing=spacing, **CPU_PLANS[cfg])
            plans = json.loads(plans_file.read_text())
        out[cfg] = name
        data_id = C.configuration_summary(plans_file, name)["data_identifier"]
        if not (pre / data_id).is_dir():
            from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

            with quiet(work / "logs" / f"preprocess_{name}.log"):
                preprocess([DATASET_ID], C.PLANS, configurations=[name], num_processes=[1], verbose=False)
        if not (pre / f"{data_id}_unlabeled").is_dir():
            with quiet(work / "logs" / f"preprocess_unlabeled_{name}.log"):
                preprocess_unlabeled(DATASET_ID, name, C.PLANS, 1, verbose=False)
    torch.set_num_threads(threads)  # nnU-Net's planner changes it
    return out


@contextlib.contextmanager
def quiet(log: Path):
    """Send stdout (nnU-Net's chatter) to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        yield


# ----------------------------------------------------------------------------------------------------------------
# trainers in-process
# ----------------------------------------------------------------------------------------------------------------

class _Replay:
    """Stands in for the unlabeled loader: replays pre-drawn batches (copies, so in-place ops cannot leak)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return {k: (v.clone() if hasattr(v, "clone") else v) for k, v in b.items()}

    def __iter__(self):
        return self


def entries_for(trainer_names: List[str]) -> List[dict]:
    """One entry per trainer, or per stage for trainers with stages (``num_stages``, ``stage_span``: ACTION, BCP)."""
    from nnunet_ssl.trainers import all_trainers
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    known = dict(all_trainers(), nnUNetTrainer=nnUNetTrainer)
    out = []
    for n in trainer_names:
        cls = known[n]
        if hasattr(cls, "num_stages") and hasattr(cls, "stage_span"):
            out += [{"name": n, "stage": s, "label": f"{n} [stage {'i' * s}]"} for s in range(1, cls.num_stages + 1)]
        else:
            out.append({"name": n, "stage": None, "label": n})
    return out


def new_trainer(cls, cfg: str, work: Path, device: str, batch_size: Optional[int] = None):
    """``cls`` on the synthetic dataset, fold 'all', constructed as ``nnUNetv2_train`` constructs it."""
    import torch

    pre = work / "preprocessed" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    plans = json.loads((pre / f"{C.PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
    if batch_size:
        plans["configurations"][cfg]["batch_size"] = int(batch_size)
    return cls(plans=plans, configuration=cfg, fold="all", dataset_json=dataset_json, device=torch.device(device))


def build(entry: dict, cfg: str, work: Path, device: str, n_batches: int = 2, batch_size: Optional[int] = None):
    """A trainer as ``nnUNetv2_train`` builds it (fold 'all'), started, with replayable batches."""
    import torch
    from nnunet_ssl.trainers import all_trainers
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    known = dict(all_trainers(), nnUNetTrainer=nnUNetTrainer)
    torch.manual_seed(0)
    with quiet(work / "logs" / "trainers.log"):
        tr = new_trainer(known[entry["name"]], cfg, work, device, batch_size)
        tr.num_epochs, tr.num_iterations_per_epoch = 20, 100
        tr.on_train_start()
        if entry["stage"] is not None:
            tr.current_epoch = tr.stage_span(entry["stage"])[0]
        tr.on_train_epoch_start()
        labeled = [next(tr.dataloader_train) for _ in range(n_batches)]
        if getattr(tr, "dataloader_unlabeled", None) is not None:
            tr.dataloader_unlabeled = _Replay([next(tr.dataloader_unlabeled) for _ in range(n_batches)])
    return tr, labeled


def clone_batch(b: dict) -> dict:
    return {"data": b["data"].clone(),
            "target": [t.clone() for t in b["target"]] if isinstance(b["target"], list) else b["target"].clone()}


def step(tr, labeled: list, i: int, device: str) -> float:
    import torch

    batch = clone_batch(labeled[i % len(labeled)])
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tr.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def count_flops(tr, labeled: list) -> Optional[float]:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            tr.train_step(clone_batch(labeled[0]))
        return float(fc.get_total_flops())
    except Exception as e:  # noqa: BLE001 - an op the counter cannot trace must not stop the timing
        print(f"  (FLOP count failed for {type(tr).__name__}: {type(e).__name__}: {e})", flush=True)
        return None


def time_config(cfg: str, trained_cfg: str, names: List[str], args, work: Path) -> dict:
    import torch

    entries = entries_for(names)
    built = []
    for e in entries:
        t0 = time.time()
        try:
            tr, labeled = build(e, trained_cfg, work, args.device, batch_size=args.batch_size)
        except Exception as ex:  # noqa: BLE001 - report and go on
            print(f"  {e['label']}: could not be built: {type(ex).__name__}: {ex}", flush=True)
            e["error"] = f"{type(ex).__name__}: {ex}"
            continue
        e["flops"] = count_flops(tr, labeled)
        e["batch_size"] = tr.batch_size
        e["unlabeled_batch_size"] = getattr(tr, "unlabeled_batch_size", None) if hasattr(tr, "dataloader_unlabeled") \
            else None
        built.append((e, tr, labeled))
        gflop = "" if e["flops"] is None else f", {e['flops'] / 1e9:.1f} GFLOP per step"
        print(f"  built {e['label']} in {time.time() - t0:.0f} s{gflop}", flush=True)
    times: Dict[str, List[float]] = {e["label"]: [] for e, _, _ in built}
    n = len(built)
    for r in range(args.warmup + args.rounds):
        order = built[r % n:] + built[:r % n] if n else []
        for e, tr, labeled in order:
            try:
                dt = step(tr, labeled, r, args.device)
            except Exception as ex:  # noqa: BLE001
                e["error"] = f"{type(ex).__name__}: {ex}"
                print(f"  {e['label']}: step failed: {e['error']}", flush=True)
                continue
            if r >= args.warmup:
                times[e["label"]].append(dt)
        if r >= args.warmup:
            done = r - args.warmup + 1
            print(f"  round {done}/{args.rounds}: " + ", ".join(
                f"{short(e['label'])} {times[e['label']][-1]:.2f}s" for e, _, _ in built if times[e["label"]]),
                flush=True)
    for e, tr, _ in built:
        ts = times[e["label"]]
        if ts:
            q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else [ts[0]] * 3
            e.update(median_s=statistics.median(ts), p25_s=q[0], p75_s=q[2], min_s=min(ts), n=len(ts),
                     times_s=ts)
    del built
    torch.set_num_threads(torch.get_num_threads())
    return {"entries": entries}


def short(label: str) -> str:
    return label.replace("nnUNetTrainer", "") or "nnUNetTrainer"


# ----------------------------------------------------------------------------------------------------------------
# memory: one subprocess per trainer
# ----------------------------------------------------------------------------------------------------------------

def _status_kb(key: str) -> Optional[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def memory_worker(args) -> int:
    """``--_memory-worker``: build one trainer, reset the peak, run warm-up + steps, print one JSON line."""
    import torch

    work = Path(args.work_resolved)
    setup_env(work, args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    entry = {"name": args.trainer, "stage": args.stage, "label": args.trainer}
    import nnunet_ssl.trainers as _t  # noqa: F401 - imports done before the baseline is taken
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: F401

    _t.all_trainers()
    import gc

    gc.collect()
    rss_before = _status_kb("VmRSS")
    tensors_before = C.live_tensor_bytes() if args.device == "cpu" else 0
    tr, labeled = build(entry, args.config, work, args.device, batch_size=args.batch_size)
    rss_setup = _status_kb("VmRSS")
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_setup = torch.cuda.memory_allocated()
    for i in range(args.memory_steps + 1):
        step(tr, labeled, i, args.device)
    peak = _status_kb("VmHWM")
    out = {"peak_rss_mb": peak / 1024, "rss_after_setup_mb": rss_setup / 1024,
           "rss_before_trainer_mb": rss_before / 1024, "trainer_rss_mb": (peak - rss_before) / 1024,
           "hwm_reset": reset, "steps": args.memory_steps + 1}
    if args.device == "cuda":
        out.update(cuda_peak_allocated_mb=torch.cuda.max_memory_allocated() / 2 ** 20,
                   cuda_allocated_after_setup_mb=cuda_setup / 2 ** 20,
                   cuda_peak_reserved_mb=torch.cuda.max_memory_reserved() / 2 ** 20)
    else:
        # the CPU counterpart of max_memory_allocated: tensors alive between steps (weights, optimizer state,
        # teacher, heads, queues, the cached batches) + the peak of the allocations within a step
        k = iter(range(10 ** 9))
        persistent, step_peak = C.cpu_allocated_peak(lambda: step(tr, labeled, next(k), args.device),
                                                     baseline_bytes=tensors_before)
        out.update(allocated_persistent_mb=persistent / 2 ** 20, allocated_step_peak_mb=step_peak / 2 ** 20,
                   allocated_peak_mb=(persistent + step_peak) / 2 ** 20)
    print("MEMORY_RESULT " + json.dumps(out), flush=True)
    return 0


def measure_memory(entry: dict, trained_cfg: str, args, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", "--trainer", entry["name"],
           "--config", trained_cfg, "--device", args.device, "--work", str(args.work_root),
           "--shape", *map(str, args.shape),
           "--memory-steps", str(args.memory_steps), "--plan", args.plan]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if entry["stage"] is not None:
        cmd += ["--stage", str(entry["stage"])]
    log = work / "logs" / f"memory_{trained_cfg}_{short(entry['label']).replace(' ', '_')}.log"
    r = C.run_monitored(cmd, {**C.MALLOC_ENV, **os.environ}, log)
    text = Path(r.log).read_text(errors="replace")
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("MEMORY_RESULT ")), None)
    if r.rc != 0 or line is None:
        return {"error": f"memory worker failed (exit {r.rc}); log {r.log}: {C.log_tail(r.log, 400)}"}
    res = json.loads(line[len("MEMORY_RESULT "):])
    res["maxrss_mb"] = r.maxrss_mb
    return res


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------

def time_preprocessing(trained_cfg: str, work: Path, rounds: int, shape=SHAPE) -> dict:
    """Per case: nnU-Net's run_case_save (image + label) vs nnunet_ssl's unlabeled path (image only), same files."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ssl.data.unlabeled import _Job, _preprocess_case

    raw = work / "raw" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    pre = work / "preprocessed" / raw.name
    plans = json.loads((pre / f"{C.PLANS}.json").read_text())
    dj = json.loads((raw / "dataset.json").read_text())
    pm = PlansManager(copy.deepcopy(plans))
    cm = pm.get_configuration(trained_cfg)
    out = work / "pp_timing" / trained_cfg
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    t_nn, t_ssl = {c: [] for c in cases}, {c: [] for c in cases}
    with quiet(work / "logs" / "pp_timing.log"):
        for r in range(rounds + 1):  # round 0 warms caches / imports
            for c in cases:
                images = [str(raw / "imagesTr" / f"{c}_0000.nii.gz")]
                seg = str(raw / "labelsTr" / f"{c}.nii.gz")
                # fresh output names every round: blosc2 refuses to overwrite an existing file
                pairs = [("nn", lambda: cm.preprocessor_class(verbose=False).run_case_save(
                    str(out / f"nn_{c}_r{r}"), images, seg, pm, cm, dj)),
                    ("ssl", lambda: _preprocess_case(_Job(c, images, str(out / f"ssl_{c}_r{r}")), plans, trained_cfg,
                                                     dj))]
                for kind, fn in (pairs if (r % 2 == 0) else pairs[::-1]):
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    if r > 0:
                        (t_nn if kind == "nn" else t_ssl)[c].append(dt)
    shutil.rmtree(out, ignore_errors=True)
    nn = statistics.median([statistics.median(v) for v in t_nn.values()])
    ssl = statistics.median([statistics.median(v) for v in t_ssl.values()])
    return {"cases": len(cases), "rounds": rounds, "nnunet_s_per_case": nn, "unlabeled_s_per_case": ssl,
            "ratio": ssl / nn, "image_shape_zyx": list(shape),
            "what": "nnU-Net: DefaultPreprocessor.run_case_save(image, label) (crop, resample, normalise, "
                    "foreground sampling, blosc2); unlabeled: nnunet_ssl.data.unlabeled._preprocess_case(image) "
                    "(same preprocessor without label, blosc2)"}


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------

def analyse(result: dict) -> None:
    """Ratios vs nnUNetTrainer, bound ratios, and the two targets."""
    for cfg, res in result["configs"].items():
        entries = res["entries"]
        base = next((e for e in entries if e["name"] == "nnUNetTrainer" and "median_s" in e), None)
        mem_base = next((e for e in entries if e["name"] == "nnUNetTrainer" and "peak_mb" in e), None)
        for e in entries:
            if base and "median_s" in e:
                e["time_ratio"] = e["median_s"] / base["median_s"]
                e["time_ratio_min"] = e["min_s"] / base["min_s"]
            if base and e.get("flops") and base.get("flops"):
                e["flop_bound"] = e["flops"] / base["flops"]
                e["time_over_bound"] = e.get("time_ratio", float("nan")) / e["flop_bound"]
            if e["name"] in ANALYTIC_BOUND and e.get("time_ratio"):
                e["analytic_bound"], e["analytic_bound_text"] = ANALYTIC_BOUND[e["name"]]
                e["time_over_analytic_bound"] = e["time_ratio"] / e["analytic_bound"]
            if mem_base and "peak_mb" in e:
                e["mem_ratio"] = e["peak_mb"] / mem_base["peak_mb"]
            if mem_base and e.get("alloc_peak_mb") and mem_base.get("alloc_peak_mb"):
                e["alloc_ratio"] = e["alloc_peak_mb"] / mem_base["alloc_peak_mb"]
        targets = {}
        mt = next((e for e in entries if e["name"] == "nnUNetTrainerMeanTeacher" and "time_ratio" in e), None)
        if mt:
            targets["mean_teacher_time_over_7_3"] = mt["time_over_analytic_bound"]
            targets["mean_teacher_time_over_flop_bound"] = mt.get("time_over_bound")
        mt_mem = next((e for e in entries if e["name"] == "nnUNetTrainerMeanTeacher" and "peak_mb" in e), None)
        action = [e for e in entries if e["name"] == "nnUNetTrainerACTION" and "peak_mb" in e]
        if mt_mem and action:
            worst = max(action, key=lambda e: e["peak_mb"])
            targets["action_peak_over_mean_teacher"] = worst["peak_mb"] / mt_mem["peak_mb"]
            targets["action_peak_stage"] = worst["label"]
            if mt_mem.get("alloc_peak_mb") and all(e.get("alloc_peak_mb") for e in action):
                worst_alloc = max(action, key=lambda e: e["alloc_peak_mb"])
                targets["action_alloc_over_mean_teacher"] = worst_alloc["alloc_peak_mb"] / mt_mem["alloc_peak_mb"]
                targets["action_alloc_stage"] = worst_alloc["label"]
        bcp = [e for e in entries if e["name"] == "nnUNetTrainerBCP"]
        timed = [e for e in bcp if e.get("time_over_bound")]
        if timed:  # issue 19: time per step <= 1.10 x its FLOP bound, in every stage
            worst = max(timed, key=lambda e: e["time_over_bound"])
            targets["bcp_time_over_flop_bound"], targets["bcp_time_stage"] = worst["time_over_bound"], worst["label"]
        bcp_mem = [e for e in bcp if "peak_mb" in e]
        if mt_mem and bcp_mem:  # and peak memory <= 1.15 x Mean Teacher's
            worst = max(bcp_mem, key=lambda e: e["peak_mb"])
            targets["bcp_peak_over_mean_teacher"] = worst["peak_mb"] / mt_mem["peak_mb"]
            targets["bcp_peak_stage"] = worst["label"]
        res["targets"] = targets


def render(result: dict) -> str:
    smoke = result.get("smoke")
    s = result["setting"]
    lines = ["# Per-iteration overhead of the SSL trainers vs nnUNetTrainer", ""]
    if smoke:
        lines += [f"> **SMOKE RUN** ({s['rounds']} timed round(s), {s['memory_steps'] + 1} memory step(s)): checks "
                  "that the script works; the ratios are too noisy to quote.", ""]
    lines += ["Generated by `benchmarks/overhead.py`; do not edit by hand.", "",
              "Time: median seconds per training step (batches pre-drawn; data augmentation excluded). "
              "Compute bound: FLOPs counted by `torch.utils.flop_counter` for one step (forward + backward of every "
              "network and head) / nnUNetTrainer's; time / bound = 1 means the trainer is exactly as efficient per "
              "FLOP as nnUNetTrainer; `x (min times)` compares the fastest steps instead of the medians (less "
              "sensitive to other load on the machine). Memory: " + (
                  "peak GPU memory allocated by torch during warm-up + steps, one process per trainer." if
                  s["device"] == "cuda" else
                  "one process per trainer. `peak memory` (the measure of the ACTION target on CPU, "
                  "specs/action.md section 3) = peak resident set during warm-up + steps (VmHWM, reset after set-up) "
                  "minus the resident set before the trainer was built (Python, torch, nnU-Net imported), measured "
                  "with `MALLOC_MMAP_THRESHOLD_=65536` so that large freed blocks leave the resident set; besides "
                  "tensors it counts what the allocator and libraries keep (heap fragmentation, caches). `tensors "
                  "(allocated)` = the CPU counterpart of CUDA's `max_memory_allocated`: tensors alive between steps "
                  "(weights, optimizer state, teacher / second network, heads, queues, cached batches) + the peak of "
                  "PyTorch's CPU allocations within a step (profiler allocation events, 2 steps). The process's "
                  "absolute peak RSS is in the last column."), ""]
    for cfg, res in result["configs"].items():
        p = res["plan"]
        cs = res.get("setting", s)
        where = cs["machine"].get("gpu") or f"{cs['machine'].get('cpu_count')} CPU cores"
        lines += [f"## `{cfg}` (trained configuration `{res['trained_configuration']}`: patch {p['patch_size']}, batch "
                  f"{p['batch_size']}, {p['network']} {p['features_per_stage']})", "",
                  f"Device {cs['device']} ({where}"
                  f", torch {cs['machine'].get('torch')}, {cs['torch_threads']} threads), plan `{cs['plan']}`, "
                  f"{cs['rounds']} interleaved rounds after {cs['warmup']} warm-up, load average "
                  f"{cs.get('loadavg_start')} -> {cs.get('loadavg_end')}, {cs['date']}, commit {cs.get('git')}.", "",
                  "| trainer | s / step (median [p25, p75]) | x nnUNetTrainer | x (min times) | compute bound (FLOPs) "
                  "| time / bound | GFLOP / step | peak memory | x nnUNetTrainer | " +
                  ("peak GPU memory |" if s["device"] == "cuda" else
                   "tensors (allocated) | x nnUNetTrainer | peak RSS of the process |"),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("" if s["device"] == "cuda" else "---|---|")]
        for e in res["entries"]:
            if "median_s" not in e and "peak_mb" not in e:
                lines.append(f"| `{e['label']}` | failed: {e.get('error', '?')[:120]} | | | | | | | | |" +
                             ("" if s["device"] == "cuda" else " | |"))
                continue
            bound = C.fmt_num(e.get("flop_bound"), nd=2)
            if e.get("analytic_bound_text") and e["name"] != "nnUNetTrainer":
                bound += f" (analytic {e['analytic_bound_text']} = {e['analytic_bound']:.2f})"
            med = f"{e['median_s']:.3f} [{e['p25_s']:.3f}, {e['p75_s']:.3f}]" if "median_s" in e else "-"
            lines.append(f"| `{e['label']}` | {med} | {C.fmt_num(e.get('time_ratio'), nd=2)} | "
                         f"{C.fmt_num(e.get('time_ratio_min'), nd=2)} | {bound} | "
                         f"{C.fmt_num(e.get('time_over_bound'), nd=2)} | "
                         f"{C.fmt_num((e.get('flops') or float('nan')) / 1e9, nd=1)} | {C.fmt_mb(e.get('peak_mb'))} | "
                         f"{C.fmt_num(e.get('mem_ratio'), nd=2)} | " +
                         ("" if s["device"] == "cuda" else
                          f"{C.fmt_mb(e.get('alloc_peak_mb'))} | {C.fmt_num(e.get('alloc_ratio'), nd=2)} | ") +
                         f"{C.fmt_mb(e.get('abs_peak_mb'))} |")
        t = res.get("targets", {})
        lines.append("")
        if "mean_teacher_time_over_7_3" in t:
            mt = next(e for e in res["entries"] if e["name"] == "nnUNetTrainerMeanTeacher")
            lines.append(f"- Mean Teacher: {mt['time_ratio']:.2f}x nnUNetTrainer per step; compute bound 7/3 = 2.33 "
                         f"(FLOP count {C.fmt_num(mt.get('flop_bound'), nd=2)}); time / 7/3 = "
                         f"**{t['mean_teacher_time_over_7_3']:.2f}** (target <= 1.10: "
                         f"{'met' if t['mean_teacher_time_over_7_3'] <= 1.1 else 'NOT met'}).")
        if "action_peak_over_mean_teacher" in t:
            lines.append(f"- ACTION peak memory / Mean Teacher's: **{t['action_peak_over_mean_teacher']:.2f}** "
                         f"(worst stage: {t['action_peak_stage']}; target <= 1.15: "
                         f"{'met' if t['action_peak_over_mean_teacher'] <= 1.15 else 'NOT met'})" +
                         (f"; tensors (allocated): {t['action_alloc_over_mean_teacher']:.2f} "
                          f"({t['action_alloc_stage']})." if "action_alloc_over_mean_teacher" in t else "."))
        if "bcp_time_over_flop_bound" in t:
            v = t["bcp_time_over_flop_bound"]
            lines.append(f"- BCP time / FLOP bound: **{v:.2f}** (worst stage: {t['bcp_time_stage']}; target <= 1.10: "
                         f"{'met' if v <= 1.10 else 'NOT met'}).")
        if "bcp_peak_over_mean_teacher" in t:
            v = t["bcp_peak_over_mean_teacher"]
            lines.append(f"- BCP peak memory / Mean Teacher's: **{v:.2f}** (worst stage: {t['bcp_peak_stage']}; "
                         f"target <= 1.15: {'met' if v <= 1.15 else 'NOT met'}).")
        pp = res.get("preprocessing")
        if pp:
            lines.append(f"- Preprocessing per case ({pp['cases']} synthetic cases of {pp['image_shape_zyx']} voxels, "
                         f"median of {pp['rounds']} rounds): nnU-Net {pp['nnunet_s_per_case']:.3f} s, unlabeled "
                         f"{pp['unlabeled_s_per_case']:.3f} s, ratio **{pp['ratio']:.2f}**.")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["2d", "3d_fullres"], choices=["2d", "3d_fullres"])
    p.add_argument("--trainers", nargs="+", default=None,
                   help="default: nnUNetTrainer + every SSL method trainer of the installed package")
    p.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--memory-steps", type=int, default=3, help="steps per memory subprocess after one warm-up")
    p.add_argument("--pp-rounds", type=int, default=3, help="rounds of the preprocessing timing")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--plan", choices=("cpu", "nnunet"), default=None,
                   help="cpu: the benchmarks' CPU networks/batches (default on CPU); nnunet: nnU-Net's own plans")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override the plan's labeled batch size (SSL trainers draw as many unlabeled); quick checks")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-preprocessing", action="store_true")
    p.add_argument("--smoke", action="store_true", help="2 rounds, 1 warm-up, 1 memory step; results/smoke/")
    p.add_argument("--work", default=None, help=f"work folder (default {C.DEFAULT_WORK}/overhead)")
    p.add_argument("--shape", type=int, nargs=3, default=list(SHAPE), metavar=("Z", "Y", "X"),
                   help=f"synthetic volume size (default {' '.join(map(str, SHAPE))}; smaller for quick checks)")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--name", default="overhead",
                   help="results file name (default overhead: <results-dir>/overhead.json + .md); another name for a "
                        "run of a few trainers, which must not replace the full table")
    # internal
    p.add_argument("--_memory-worker", dest="memory_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.plan = args.plan or ("cpu" if args.device == "cpu" else "nnunet")
    args.work_root = Path(args.work) if args.work else C.DEFAULT_WORK / "overhead"
    work = work_dir(args.work_root, args.plan, args.shape)
    args.work_resolved = str(work)
    if args.memory_worker:
        return memory_worker(args)
    if args.smoke:
        args.rounds, args.warmup, args.memory_steps, args.pp_rounds = min(args.rounds, 2), 1, 0, 1
    setup_env(work, args.device)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_train -device cpu
    names = [C.resolve_trainer(t) for t in args.trainers] if args.trainers else \
        ["nnUNetTrainer"] + C.method_trainers()
    if "nnUNetTrainer" not in names:
        names.insert(0, "nnUNetTrainer")
    results_dir = Path(args.results_dir) if args.results_dir else \
        (C.RESULTS_DIR / "smoke" if args.smoke else C.RESULTS_DIR)
    t_start = time.time()
    say = lambda m: print(f"[overhead {time.strftime('%H:%M:%S')} +{C.fmt_s(time.time() - t_start)}] {m}",  # noqa
                          flush=True)
    say(f"device {args.device}, plan {args.plan}, trainers {', '.join(short(n) for n in names)}; work {work}")
    trained = prepare(work, args.configs, args.plan, args.shape)
    setting = {"device": args.device, "plan": args.plan, "rounds": args.rounds, "warmup": args.warmup,
               "memory_steps": args.memory_steps, "trainers": names, "date": C.now_iso(),
               "batch_size_override": args.batch_size,
               "machine": C.machine_info(args.device), "torch_threads": torch.get_num_threads(),
               "loadavg_start": C.loadavg(), "git": C.git_commit(), "synthetic_shape_zyx": list(args.shape)}
    result = {"smoke": args.smoke, "configs": {}, "setting": setting}
    old_file = results_dir / f"{args.name}.json"
    if old_file.is_file():  # keep the other configurations of a compatible earlier run (filled over sittings)
        old = json.loads(old_file.read_text())
        same = all(old.get("setting", {}).get(k) == setting[k] for k in ("device", "plan", "batch_size_override",
                                                                    "synthetic_shape_zyx"))
        if same and bool(old.get("smoke")) == bool(args.smoke):
            result["configs"] = {c: r for c, r in old.get("configs", {}).items() if c not in args.configs}
    for cfg in args.configs:
        tc = trained[cfg]
        plans_file = work / "preprocessed" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}" / f"{C.PLANS}.json"
        say(f"{cfg}: timing {len(names)} trainers on configuration {tc}")
        res = time_config(cfg, tc, names, args, work)
        res["trained_configuration"] = tc
        res["setting"] = setting
        res["plan"] = C.configuration_summary(plans_file, tc)
        if args.batch_size:
            res["plan"]["batch_size"] = f"{args.batch_size} (overridden; plan: {res['plan']['batch_size']})"
        if not args.no_memory:
            for e in res["entries"]:
                if e.get("error") and "median_s" not in e:
                    continue
                say(f"{cfg}: peak memory of {e['label']} (subprocess)")
                m = measure_memory(e, tc, args, work)
                e["memory"] = m
                if "error" in m:
                    say(f"  {m['error'][:300]}")
                    continue
                if args.device == "cuda":
                    e["peak_mb"], e["abs_peak_mb"] = m["cuda_peak_allocated_mb"], m["cuda_peak_allocated_mb"]
                else:  # what the trainer adds to a process that has imported torch / nnU-Net
                    e["peak_mb"], e["abs_peak_mb"] = m["trainer_rss_mb"], m["peak_rss_mb"]
                    e["alloc_peak_mb"] = m["allocated_peak_mb"]
        if not args.no_preprocessing:
            say(f"{cfg}: preprocessing time per case")
            res["preprocessing"] = time_preprocessing(tc, work, args.pp_rounds, args.shape)
        result["configs"][cfg] = res
        analyse(result)
        setting["loadavg_end"] = C.loadavg()
        name = args.name
        C.write_json_atomic(results_dir / f"{name}.json", result)
        C.write_text_atomic(results_dir / f"{name}.md", render(result))
    md = render(result)
    print(md, flush=True)
    say(f"done; {results_dir / (args.name + '.json')} and {args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
