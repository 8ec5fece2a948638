"""Peak memory of ACTION vs Mean Teacher and per-iteration time of ACTION vs plain nnU-Net (specs/action.md section 3).

Builds a small synthetic dataset with nnU-Net's own planning (stock network sizes unless ``--shrink``) and
preprocessing, then runs every measurement in a fresh subprocess, one after the other:

* **memory** (3d_fullres): ``nnUNetTrainerMeanTeacher`` vs ``nnUNetTrainerACTION`` in stages ii and iii and
  ``nnUNetTrainerACTIONPlusPlus`` in stage iii, same plan, same B_l = B_u. CUDA: ``torch.cuda.max_memory_allocated``
  over iterations ``warmup..iters-1`` after ``reset_peak_memory_stats`` (AMP on, compile off, as nnU-Net on CUDA).
  CPU, two measures: (a) *allocated* = bytes of all live tensors after warm-up (weights, grads, optimizer state,
  teacher, heads, queues) + the peak of PyTorch's CPU allocations over two further steps, from the profiler's
  allocation events -- the CPU counterpart of ``max_memory_allocated``, and the ratio we report; (b) the process's
  peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` after warm-up), which includes Python,
  libraries and allocator caching. Runs use ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the
  resident set (glibc's dynamic threshold otherwise keeps them in the heap, and RSS measures fragmentation).
* **time** (2d and 3d_fullres): median seconds per ``train_step`` of ``nnUNetTrainer`` and of ACTION in each stage,
  and the stage-weighted mean (stage fractions 0.25 / 0.25 / 0.5).

Batches are drawn before timing and cycled, so data augmentation (single-threaded here) is not measured.

Usage::

    python benchmarks/action_memory.py [--work /tmp/action_work/bench] [--iters N --warmup W] [--shrink]

Writes ``benchmarks/results/action_memory.json`` and ``.md`` (``--out`` changes the stem) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

DATASET_ID = 995
DATASET_NAME = "ActionBench"
STAGE_FRACTIONS = {1: 0.25, 2: 0.25, 3: 0.5}
BATCHES_CACHED = 4
RESULTS = Path(__file__).resolve().parent / "results"


def set_environment(work: Path) -> None:
    """nnU-Net reads its folders from the environment at import time: set them before importing it."""
    for key, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(work / sub)
    os.environ["nnUNet_compile"] = "0"
    os.environ["nnUNet_n_proc_DA"] = "0"   # loaders in-process: the measured process holds everything
    os.environ.setdefault("nnUNet_def_n_proc", "1")


def dataset_folder(work: Path) -> Path:
    return work / "preprocessed" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"


def build_dataset(work: Path, shape, n_labeled: int, n_unlabeled: int, shrink: bool) -> None:
    """Synthetic raw data -> nnU-Net fingerprint, plans, preprocessing (2d, 3d_fullres) -> unlabeled preprocessing."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    from nnunet_ssl.data.unlabeled import preprocess_unlabeled
    from nnunet_ssl.synthetic import make_synthetic_dataset

    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner calls torch.set_num_threads(n_proc_DA)
    make_synthetic_dataset(os.environ["nnUNet_raw"], DATASET_ID, name=DATASET_NAME, dim=3, n_labeled=n_labeled,
                           n_unlabeled=n_unlabeled, n_test=0, shape=shape, seed=0)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([DATASET_ID])
    if shrink:
        plans_file = dataset_folder(work) / "nnUNetPlans.json"
        plans = json.loads(plans_file.read_text())
        for cfg in plans["configurations"].values():
            arch = cfg.get("architecture")
            if arch is not None:
                n = arch["arch_kwargs"]["n_stages"]
                arch["arch_kwargs"]["features_per_stage"] = [min(8 * 2 ** i, 64) for i in range(n)]
        plans_file.write_text(json.dumps(plans, indent=2))
    preprocess([DATASET_ID], configurations=["2d", "3d_fullres"], num_processes=[1, 1], verbose=False)
    for c in ("2d", "3d_fullres"):
        preprocess_unlabeled(DATASET_ID, c, "nnUNetPlans", 1, verbose=False)
    os.environ["nnUNet_n_proc_DA"] = "0"


# ----------------------------------------------------------------------------------------------- worker
def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(job: dict) -> dict:
    """Run one trainer for ``job['iters']`` steps in ``job['stage']``; return peak memory and step times."""
    import gc
    import itertools

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ssl.trainers import all_trainers

    torch.set_num_threads(job["threads"])
    cls = nnUNetTrainer if job["trainer"] == "nnUNetTrainer" else all_trainers()[job["trainer"]]
    pre = dataset_folder(Path(job["work"]))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8's run_training passes this through the plans
    dataset_json = json.loads((pre / "dataset.json").read_text())
    device = torch.device(job["device"])
    tr = cls(plans=plans, configuration=job["configuration"], fold=0, dataset_json=dataset_json, device=device)
    tr.num_epochs, tr.num_iterations_per_epoch = 4, 10 ** 6   # ACTION stages: epochs 0 | 1 | 2-3
    tr.print_to_log_file = lambda *a, **k: None
    tr.on_train_start()
    tr.current_epoch = {0: 0, 1: 0, 2: 1, 3: 2}[job["stage"]]
    tr.on_train_epoch_start()
    batches = [next(tr.dataloader_train) for _ in range(BATCHES_CACHED)]
    if getattr(tr, "dataloader_unlabeled", None) is not None:
        tr.dataloader_unlabeled = itertools.cycle([next(tr.dataloader_unlabeled) for _ in range(BATCHES_CACHED)])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    rss_before = _rss_kb("VmRSS")
    times, cpu_times = [], []
    for i in range(job["iters"]):
        if i == job["warmup"]:
            gc.collect()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            else:
                with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                    f.write("5")
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        tr.train_step(batches[i % BATCHES_CACHED])
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    median = lambda v: sorted(v[job["warmup"]:])[len(v[job["warmup"]:]) // 2]  # noqa: E731
    out = {**job, "wall_sec_per_iter": median(times), "cpu_sec_per_iter": median(cpu_times), "wall_sec_all": times,
           # on a shared CPU wall time is dominated by other load: the ratio uses the process's CPU time there
           "sec_per_iter": median(times) if cuda else median(cpu_times),
           "batch_size": tr.batch_size, "patch_size": list(tr.configuration_manager.patch_size),
           "features_per_stage": list(tr.configuration_manager.network_arch_init_kwargs["features_per_stage"]),
           "params_network": sum(p.numel() for p in tr.network.parameters())}
    if hasattr(tr, "ssl_modules"):
        out["params_ssl_modules"] = sum(p.numel() for p in tr.ssl_modules.parameters())
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        out["peak_rss_mb"] = _rss_kb("VmHWM") / 1024
        out["rss_before_mb"] = rss_before / 1024
        out["train_rss_mb"] = out["peak_rss_mb"] - out["rss_before_mb"]
        k = iter(range(10 ** 9))
        persistent, step_peak = C.cpu_allocated_peak(lambda: tr.train_step(batches[next(k) % BATCHES_CACHED]))
        out["persistent_mb"] = persistent / 2 ** 20
        out["step_peak_mb"] = step_peak / 2 ** 20
        out["peak_mb"] = out["persistent_mb"] + out["step_peak_mb"]  # ~ CUDA's max_memory_allocated
    return out


# ----------------------------------------------------------------------------------------------- driver
def run_job(job: dict) -> dict:
    env = {**C.MALLOC_ENV, **os.environ}  # RSS of live tensors, not of glibc's heap (see _common.MALLOC_ENV)
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                       env=env)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"job {job} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def jobs_for(args, device: str) -> list:
    base = {"work": str(args.work), "device": device, "iters": args.iters, "warmup": args.warmup,
            "threads": args.threads}
    out = []
    for cfg in ("3d_fullres", "2d"):
        runs = [("nnUNetTrainer", 0)] + [("nnUNetTrainerACTION", s) for s in (1, 2, 3)]
        if cfg == "3d_fullres":
            runs += [("nnUNetTrainerMeanTeacher", 0), ("nnUNetTrainerACTIONPlusPlus", 3)]
        out += [{**base, "configuration": cfg, "trainer": t, "stage": s} for t, s in runs]
    return out


def summarise(results: list) -> dict:
    """Ratios: peak memory vs Mean Teacher (3d_fullres), step time vs nnUNetTrainer (per configuration)."""
    def find(cfg, trainer, stage):
        return next(r for r in results if r["configuration"] == cfg and r["trainer"] == trainer and r["stage"] == stage)

    summary = {"memory_3d_fullres": {}, "time": {}}
    mt = find("3d_fullres", "nnUNetTrainerMeanTeacher", 0)
    for trainer, stage in (("nnUNetTrainerACTION", 2), ("nnUNetTrainerACTION", 3), ("nnUNetTrainerACTIONPlusPlus", 3)):
        r = find("3d_fullres", trainer, stage)
        entry = {"peak_ratio_vs_mean_teacher": r["peak_mb"] / mt["peak_mb"]}
        if "peak_rss_mb" in r:
            entry["rss_ratio_vs_mean_teacher"] = r["peak_rss_mb"] / mt["peak_rss_mb"]
        summary["memory_3d_fullres"][f"{trainer} stage {stage}"] = entry
    for cfg in ("2d", "3d_fullres"):
        ref = find(cfg, "nnUNetTrainer", 0)["sec_per_iter"]
        per_stage = {s: find(cfg, "nnUNetTrainerACTION", s)["sec_per_iter"] / ref for s in (1, 2, 3)}
        summary["time"][cfg] = {**{f"stage {s}": v for s, v in per_stage.items()},
                                "stage-weighted": sum(STAGE_FRACTIONS[s] * v for s, v in per_stage.items())}
    plain_3d = find("3d_fullres", "nnUNetTrainer", 0)["sec_per_iter"]
    summary["time_mean_teacher_3d_fullres"] = mt["sec_per_iter"] / plain_3d
    return summary


def markdown(results: list, summary: dict, meta: dict) -> str:
    cuda = meta["device"] == "cuda"
    mem = "peak CUDA allocated (MB)" if cuda else "peak allocated (MB)"
    lines = [f"# ACTION memory and time ({meta['device']}, {meta['date']})", "",
             f"Command: `{meta['command']}`", "",
             f"Synthetic dataset {meta['shape']} ({meta['n_labeled']} labeled + {meta['n_unlabeled']} unlabeled), "
             f"nnU-Net's own plans{' shrunk to 8..64 features' if meta['shrink'] else ''}; iterations "
             f"{meta['warmup']}..{meta['iters'] - 1} measured, batches cached (no augmentation in the timing), "
             f"{meta['threads']} torch thread(s); "
             + ("wall-clock time." if cuda else "time = the process's CPU time (the machine is shared)."), "",
             f"| configuration | trainer | stage | batch | patch | {mem} |"
             + ("" if cuda else " of which persistent (MB) | peak RSS (MB) |") + " s / iteration |",
             "|---|---|---|---|---|---|---|" + ("" if cuda else "---|---|")]
    for r in results:
        row = (f"| {r['configuration']} | {r['trainer']} | {r['stage'] or '-'} | {r['batch_size']} | "
               f"{'x'.join(map(str, r['patch_size']))} | {r['peak_mb']:.0f} |")
        if not cuda:
            row += f" {r['persistent_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        lines.append(row + f" {r['sec_per_iter']:.3f} |")
    lines += ["", "**Peak memory vs nnUNetTrainerMeanTeacher (3d_fullres, target <= 1.15)**", "",
              "| run | peak allocated ratio |" + ("" if cuda else " peak RSS ratio |"),
              "|---|---|" + ("" if cuda else "---|")]
    for k, v in summary["memory_3d_fullres"].items():
        lines.append(f"| {k} | {v['peak_ratio_vs_mean_teacher']:.3f} |"
                     + ("" if cuda else f" {v['rss_ratio_vs_mean_teacher']:.3f} |"))
    lines += ["", "**Time per iteration, nnUNetTrainerACTION / nnUNetTrainer**", "",
              "| configuration | stage i | stage ii | stage iii | stage-weighted (0.25/0.25/0.5) |",
              "|---|---|---|---|---|"]
    for cfg, v in summary["time"].items():
        lines.append(f"| {cfg} | {v['stage 1']:.2f} | {v['stage 2']:.2f} | {v['stage 3']:.2f} | "
                     f"{v['stage-weighted']:.2f} |")
    lines += ["", f"For reference, nnUNetTrainerMeanTeacher / nnUNetTrainer on 3d_fullres: "
                  f"{summary['time_mean_teacher_3d_fullres']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/action_work/bench"))
    p.add_argument("--shape", type=int, nargs=3, default=(32, 96, 96), help="synthetic volume shape (z y x)")
    p.add_argument("--n-labeled", type=int, default=5, help="at least 5 (nnU-Net's 5 folds)")
    p.add_argument("--n-unlabeled", type=int, default=4)
    p.add_argument("--shrink", action="store_true", help="tiny networks (8..64 features), for a quick check")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--iters", type=int, default=None, help="steps per run (default: 16 on CUDA, 7 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured first steps (default: 5 on CUDA, 2 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only jobs whose 'configuration:trainer:stage' contains one of these strings")
    p.add_argument("--out", type=Path, default=RESULTS / "action_memory", help="output stem (.json and .md)")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from an existing .json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        saved["summary"] = summarise(saved["runs"])
        args.out.with_suffix(".json").write_text(json.dumps(saved, indent=2))
        args.out.with_suffix(".md").write_text(markdown(saved["runs"], saved["summary"], saved["meta"]))
        print(args.out.with_suffix(".md").read_text())
        return
    if args.worker is not None:
        job = json.loads(args.worker)
        set_environment(Path(job["work"]))
        print("RESULT " + json.dumps(worker(job)), flush=True)
        os._exit(0)  # skip interpreter teardown of loaders and threads

    args.work = args.work.resolve()
    set_environment(args.work)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.iters = args.iters or (16 if device == "cuda" else 7)
    args.warmup = args.warmup if args.warmup is not None else (5 if device == "cuda" else 2)
    stamp = args.work / f"dataset_{'x'.join(map(str, args.shape))}_{'shrunk' if args.shrink else 'stock'}.ok"
    if not stamp.exists():
        print(f"building the dataset in {args.work} ...", flush=True)
        build_dataset(args.work, tuple(args.shape), args.n_labeled, args.n_unlabeled, args.shrink)
        stamp.write_text("ok\n")
    results = []
    jobs = [j for j in jobs_for(args, device)
            if not args.only or any(o in f"{j['configuration']}:{j['trainer']}:{j['stage']}" for o in args.only)]
    for job in jobs:
        r = run_job(job)
        results.append(r)
        print(f"{r['configuration']:10s} {r['trainer']:28s} stage {r['stage'] or '-'}  peak {r['peak_mb']:8.0f} MB  "
              f"{r['sec_per_iter']:.3f} s/iter", flush=True)
    if args.only:
        print(json.dumps(results, indent=1))
        return
    summary = summarise(results)
    meta = {"device": device, "date": time.strftime("%Y-%m-%d"), "shape": list(args.shape),
            "n_labeled": args.n_labeled, "n_unlabeled": args.n_unlabeled, "shrink": args.shrink,
            "iters": args.iters, "warmup": args.warmup, "threads": args.threads,
            "command": "python benchmarks/action_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=2))
    text = markdown(results, summary, meta)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
