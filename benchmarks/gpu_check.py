#!/usr/bin/env python
"""GPU readiness in one command (at most 10 minutes on one GPU): does every method trainer train under CUDA with
mixed precision, and what does each cost per step and in GPU memory against nnU-Net's own ``nnUNetTrainer``?

    python benchmarks/gpu_check.py                              # on a GPU machine; results/gpu_check.md + .json
    python benchmarks/gpu_check.py --device cpu --dry-run       # the same code path on CPU, tiny sizes, a temp folder

On a synthetic 3D dataset (``overhead.py``'s: 4 labeled + 4 unlabeled volumes, planned by nnU-Net, its own
``3d_fullres`` plan, preprocessed once and cached in the work folder):

1. **Tiny runs**: ``nnUNetTrainer`` and every SSL method trainer the installed package defines at run time (the
   same discovery as the benchmarks: a trainer added tomorrow is checked without touching this file), each in its own
   subprocess, in its ``_sslTiny`` variant (2 epochs x 3 iterations; built here when the package defines none), as
   ``nnUNetv2_train`` runs it: ``run_training`` (CUDA: nnU-Net's autocast + GradScaler, i.e. AMP), then nnU-Net's
   final validation (sliding-window prediction with the exported network). Checks: every epoch's train and
   validation loss finite, no skipped non-finite step, AMP on (CUDA), and the checkpoint round trip: a fresh trainer
   loads ``checkpoint_final.pth`` and saves it again, and the two files must hold the same keys and values (network,
   optimizer, grad scaler, teacher / second network / heads, logs).
2. **Cost per step and peak GPU memory** of the same trainers on nnU-Net's ``3d_fullres`` plan: ``overhead.py``
   itself (``--plan nnunet --configs 3d_fullres``): interleaved timed steps (medians), FLOP-counted compute bound,
   ``torch.cuda.max_memory_allocated`` in one subprocess per trainer (ACTION / ACTION++ once per stage).

``torch.compile`` stays off (``nnUNet_compile=0``): compiling every trainer would not fit the 10 minutes.

Results: ``benchmarks/results/gpu_check.md`` + ``.json`` (the device named in both); ``--dry-run`` writes them to
``--results-dir`` or a temporary folder, never to the committed results. Exit code 0 when every check passed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import overhead as O  # noqa: E402

CONFIG = "3d_fullres"
TINY = "sslTiny"
DRY_SHAPE = (16, 32, 32)
#: rounds, warm-up rounds, memory steps of the cost measurement (full / dry run)
TIMING = {False: (10, 3, 3), True: (2, 1, 1)}
RESULT_TAG = "TINY_RESULT "


# ----------------------------------------------------------------------------------------------------------------
# the tiny run of one trainer (in its own process)
# ----------------------------------------------------------------------------------------------------------------

def check_trainers(requested: Optional[List[str]] = None) -> List[str]:
    """``nnUNetTrainer`` (whether a failure is the environment's or the method's) + the requested or every SSL
    method trainer found at run time."""
    names = [C.resolve_trainer(t) for t in requested] if requested else C.method_trainers()
    return ["nnUNetTrainer"] + [n for n in names if n != "nnUNetTrainer"]


def tiny_class(name: str):
    """``<name>_sslTiny`` of the package, else built from ``name`` with the package's ``budget_variant``."""
    from nnunet_ssl.trainers import all_trainers
    from nnunet_ssl.trainers.budgets import budget_variant, nnUNetTrainer_sslTiny
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    known = dict(all_trainers(), nnUNetTrainer=nnUNetTrainer, nnUNetTrainer_sslTiny=nnUNetTrainer_sslTiny)
    if f"{name}_{TINY}" in known:
        return known[f"{name}_{TINY}"], ""
    return budget_variant(known[name], TINY, module=__name__), f"the package defines no {name}_{TINY}; built here"


def same(a, b, path: str = "") -> List[str]:
    """Where two loaded checkpoints differ (key paths), NaN equal to NaN; empty when they are identical."""
    import numpy as np
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one of them" for k in set(a) ^ set(b)]
        for k in sorted(set(a) & set(b), key=str):
            out += same(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        ok = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()) and \
            torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else torch.equal(a, b)
        return [] if ok else [f"{path}: tensors differ"]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b, equal_nan=True) else [f"{path}: arrays differ"]
    return [] if a == b else [f"{path}: {str(a)[:40]} != {str(b)[:40]}"]


def shrink_network(work: Path) -> None:
    """Dry run: a U-Net of 4..32 features in the plans (CPU seconds per step); patch, spacing and preprocessing stay
    nnU-Net's, so the preprocessed data remain valid."""
    f = work / "preprocessed" / f"Dataset{O.DATASET_ID:03d}_{O.DATASET_NAME}" / f"{C.PLANS}.json"
    plans = json.loads(f.read_text())
    kw = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]
    kw["features_per_stage"] = [min(4 * 2 ** i, 32) for i in range(kw["n_stages"])]
    C.write_text_atomic(f, json.dumps(plans, indent=2))


def finite(xs) -> bool:
    return all(x is not None and math.isfinite(float(x)) for x in xs)


def tiny_run(name: str, work: Path, device: str) -> dict:
    import torch

    cls, note = tiny_class(name)
    out = {"trainer": name, "variant": cls.__name__, "note": note}
    folder = work / "results" / f"Dataset{O.DATASET_ID:03d}_{O.DATASET_NAME}" / \
        f"{cls.__name__}__{C.PLANS}__{CONFIG}" / "fold_all"
    shutil.rmtree(folder, ignore_errors=True)  # a clean training, never a resumed one
    torch.manual_seed(0)
    t0 = time.time()
    tr = O.new_trainer(cls, CONFIG, work, device)
    tr.run_training()
    out["train_s"] = time.time() - t0
    log = tr.logger.get_checkpoint()
    out.update(epochs=tr.num_epochs, iterations_per_epoch=tr.num_iterations_per_epoch,
               amp=tr.grad_scaler is not None, grad_scale=tr.grad_scaler.get_scale() if tr.grad_scaler else None,
               train_losses=[float(x) for x in log["train_losses"]], val_losses=[float(x) for x in log["val_losses"]],
               nonfinite_steps=int(getattr(tr, "nonfinite_total", 0)))
    ssl_log = getattr(tr, "ssl_log", None)
    if ssl_log is not None:
        out["ssl_losses"] = {k: v for k, v in ssl_log.values.items() if k in ("sup_loss", "unsup_loss")}
    t1 = time.time()
    tr.perform_actual_validation(False)  # what nnUNetv2_train does next
    out["final_validation_s"] = time.time() - t1
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    out["final_validation_dice"] = summary["foreground_mean"]["Dice"]
    # round trip: nnU-Net saves current_epoch + 1 (the next epoch) from within an epoch, and loading sets the next
    # epoch, so the fresh trainer steps back one before saving again
    ckpt = folder / "checkpoint_final.pth"
    fresh = O.new_trainer(cls, CONFIG, work, device)
    fresh.load_checkpoint(str(ckpt))
    fresh.current_epoch -= 1
    again = folder / "checkpoint_roundtrip.pth"
    fresh.save_checkpoint(str(again))
    diffs = same(torch.load(ckpt, map_location="cpu", weights_only=False),
                 torch.load(again, map_location="cpu", weights_only=False))
    again.unlink()
    out["roundtrip_differences"] = diffs[:8]
    losses = out["train_losses"] + out["val_losses"] + [x for v in out.get("ssl_losses", {}).values() for x in v]
    out["losses_finite"] = finite(losses) and out["nonfinite_steps"] == 0
    problems = ([] if out["losses_finite"] else ["non-finite loss"]) + \
        ([] if not diffs else ["checkpoint round trip differs"]) + \
        (["AMP off (no GradScaler) on CUDA"] if device == "cuda" and not out["amp"] else [])
    out.update(ok=not problems, problems=problems)
    return out


def tiny_worker(args) -> int:
    """``--_tiny-worker``: one trainer's tiny run and checks; one JSON line on stdout."""
    O.setup_env(Path(args.work_resolved), args.device)
    os.environ["nnUNet_n_proc_DA"] = str(args.n_proc_da)  # setup_env's 0 suits replayed batches, not a training
    try:
        out = tiny_run(args.trainer, Path(args.work_resolved), args.device)
    except Exception as e:  # noqa: BLE001 - the report says what failed, the main process goes on
        out = {"trainer": args.trainer, "ok": False, "problems": [f"{type(e).__name__}: {e}"],
               "traceback": traceback.format_exc()[-3000:]}
    print(RESULT_TAG + json.dumps(C.nan_to_none(out)), flush=True)
    return 0


def run_tiny(names: List[str], args, work: Path, say) -> List[dict]:
    """Every trainer's tiny run in its own subprocess (a CUDA error cannot poison the next one), ``--jobs`` at once."""
    def one(name: str) -> dict:
        log = work / "logs" / f"tiny_{name}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_tiny-worker", "--trainer", name, "--device",
               args.device, "--work-resolved", str(work), "--n-proc-da", str(args.n_proc_da)]
        r = C.run_monitored(cmd, {**os.environ, "nnUNet_def_n_proc": "1", "nnUNet_compile": "0"}, log,
                            timeout_s=args.tiny_timeout)
        line = next((ln for ln in reversed(Path(r.log).read_text(errors="replace").splitlines())
                     if ln.startswith(RESULT_TAG)), None)
        res = json.loads(line[len(RESULT_TAG):]) if line else \
            {"trainer": name, "ok": False, "problems": [f"worker exited with {r.rc} without a result (timeout "
                                                        f"{args.tiny_timeout} s?); log {r.log}: "
                                                        f"{C.log_tail(r.log, 300)}"]}
        res.update(wall_s=r.wall_s, log=r.log)
        say(f"tiny {name}: {'ok' if res.get('ok') else 'FAILED: ' + '; '.join(res.get('problems', []))[:300]} "
            f"({C.fmt_s(r.wall_s)})")
        return res

    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return list(pool.map(one, names))


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2 ** 30:.0f} GiB), CUDA {torch.version.cuda}"
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor() or "CPU") \
        if Path("/proc/cpuinfo").is_file() else platform.processor() or "CPU"
    return f"CPU: {model}, {os.cpu_count()} cores"


def overhead_ok(result: dict) -> List[str]:
    entries = (result.get("configs", {}).get(CONFIG) or {}).get("entries", [])
    if not entries:
        return ["no cost measurement"]
    return [f"{e['label']}: {e.get('error') or (e.get('memory') or {}).get('error') or 'no time or memory'}"[:200]
            for e in entries if "median_s" not in e or "peak_mb" not in e]


def render(report: dict) -> str:
    lines = ["# GPU readiness check" + (" (DRY RUN: CPU, tiny sizes; says nothing about a GPU)"
                                       if report["dry_run"] else ""), "",
             "Generated by `benchmarks/gpu_check.py`; do not edit by hand.", "",
             f"Device: **{report['device_name']}** (`--device {report['device']}`); torch "
             f"{report['machine'].get('torch')}, nnU-Net {report['machine'].get('nnunetv2')}, commit {report['git']}, "
             f"{report['date']}; {C.fmt_s(report['elapsed_s'])} in all (data "
             f"{C.fmt_s(report['phases_s']['data'])}, tiny runs {C.fmt_s(report['phases_s']['tiny'])}, cost "
             f"{C.fmt_s(report['phases_s']['cost'])}). Verdict: "
             f"**{'PASSED' if report['passed'] else 'FAILED'}**.", "",
             f"## Tiny runs (`_{TINY}`: 2 epochs x 3 iterations, then nnU-Net's final validation) on nnU-Net's "
             f"`{CONFIG}` plan of a synthetic dataset ({' x '.join(map(str, report['shape']))} voxels)", "",
             "AMP: nnU-Net's autocast + GradScaler (CUDA only). Losses: every epoch's train / validation loss (and an "
             "SSL trainer's supervised / unsupervised loss) finite, no step skipped as non-finite. Round trip: "
             "`checkpoint_final.pth` loaded into a fresh trainer and saved again holds the same keys and values.", "",
             "| trainer | variant | AMP (scale) | train losses | finite | round trip | final validation Dice | "
             "time | problems |", "|---|---|---|---|---|---|---|---|---|"]
    for t in report["tiny"]:
        amp = "-" if "amp" not in t else ("on" if t["amp"] else "off") + \
            (f" ({t['grad_scale']:.0f})" if t.get("grad_scale") else "")
        losses = ", ".join(C.fmt_num(x, nd=3) for x in t.get("train_losses", [])) or "-"
        rt = "-" if "roundtrip_differences" not in t else "identical" if not t["roundtrip_differences"] else \
            "DIFFERS: " + "; ".join(t["roundtrip_differences"][:2])
        lines.append(f"| `{t['trainer']}` | `{t.get('variant', '-')}`{' (built here)' if t.get('note') else ''} | "
                     f"{amp} | {losses} | {'yes' if t.get('losses_finite') else 'NO' if 'losses_finite' in t else '-'}"
                     f" | {rt} | {C.fmt_num(t.get('final_validation_dice'), 100)} | {C.fmt_s(t.get('wall_s'))} | "
                     f"{'; '.join(t.get('problems', []))[:200] or '-'} |")
    lines += [""]
    if report.get("overhead"):
        md = [ln for ln in O.render(report["overhead"]).splitlines()[1:] if not ln.startswith("Generated by")]
        while md and not md[0].strip():
            md.pop(0)
        # overhead's own title becomes a section of this report
        lines += ["## Cost per step and peak memory vs nnUNetTrainer (`overhead.py --plan nnunet --configs "
                  f"{CONFIG}`)", ""] + ["#" + ln if ln.startswith("## ") else ln for ln in md]
    if report["overhead_problems"]:
        lines += ["", "Cost measurement problems: " + "; ".join(report["overhead_problems"])]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="default cuda (the point of the check)")
    p.add_argument("--dry-run", action="store_true",
                   help=f"tiny volumes ({' x '.join(map(str, DRY_SHAPE))}) and network (4..32 features), "
                        f"{TIMING[True][0]} timed rounds, results in --results-dir or a temporary folder")
    p.add_argument("--trainers", nargs="+", default=None,
                   help="SSL trainers to check (default: every SSL method trainer found at run time); nnUNetTrainer "
                        "is always checked")
    p.add_argument("--jobs", type=int, default=None, help="tiny runs at once (default 4 on CUDA, 1 on CPU)")
    p.add_argument("--n-proc-da", type=int, default=None,
                   help="augmentation workers per loader in the tiny runs (default 2 on CUDA, 0 on CPU)")
    p.add_argument("--tiny-timeout", type=float, default=240.0, help="seconds per tiny run before it is killed")
    p.add_argument("--work", default=None,
                   help=f"work folder (default {C.DEFAULT_WORK}/gpu_check; --dry-run: a temporary folder)")
    p.add_argument("--results-dir", default=None,
                   help="where gpu_check.md / .json go (default benchmarks/results; --dry-run: <work>/results)")
    # internal
    p.add_argument("--_tiny-worker", dest="tiny_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--work-resolved", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.n_proc_da is None:
        args.n_proc_da = 2 if args.device == "cuda" else 0
    if args.tiny_worker:
        return tiny_worker(args)
    t_start = time.time()
    say = lambda m: print(f"[gpu_check {time.strftime('%H:%M:%S')} +{C.fmt_s(time.time() - t_start)}] {m}",  # noqa
                          flush=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device is visible; run it on a GPU machine, or check the script itself with "
              "--device cpu --dry-run", file=sys.stderr)
        return 2
    os.environ["nnUNet_compile"] = "0"  # also for overhead.py's memory subprocesses
    args.jobs = args.jobs or (4 if args.device == "cuda" else 1)
    shape = DRY_SHAPE if args.dry_run else O.SHAPE
    work_root = Path(args.work) if args.work else \
        Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else C.DEFAULT_WORK / "gpu_check"
    results_dir = Path(args.results_dir) if args.results_dir else \
        work_root / "results_out" if args.dry_run else C.RESULTS_DIR
    work = O.work_dir(work_root, "nnunet", shape)
    O.setup_env(work, args.device)
    try:
        names = check_trainers(args.trainers)
    except ValueError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    say(f"device {device_name(args.device)}; trainers {', '.join(names)}; work {work_root}")
    O.prepare(work, [CONFIG], "nnunet", shape)
    if args.dry_run:
        shrink_network(work)
    phases = {"data": time.time() - t_start}
    say(f"tiny runs of {len(names)} trainers, {args.jobs} at a time")
    tiny = run_tiny(names, args, work, say)
    phases["tiny"] = time.time() - t_start - phases["data"]
    rounds, warmup, mem_steps = TIMING[bool(args.dry_run)]
    out_dir = work_root / "overhead_results"
    say(f"cost per step and peak memory on nnU-Net's {CONFIG} plan (overhead.py, {rounds} rounds)")
    O.main(["--configs", CONFIG, "--device", args.device, "--plan", "nnunet", "--work", str(work_root),
            "--results-dir", str(out_dir), "--no-preprocessing", "--shape", *map(str, shape), "--rounds", str(rounds),
            "--warmup", str(warmup), "--memory-steps", str(mem_steps), "--trainers", *names])
    cost = json.loads((out_dir / "overhead.json").read_text()) if (out_dir / "overhead.json").is_file() else None
    phases["cost"] = time.time() - t_start - phases["data"] - phases["tiny"]
    problems = overhead_ok(cost or {})
    report = {"device": args.device, "device_name": device_name(args.device), "dry_run": bool(args.dry_run),
              "shape": list(shape), "trainers": names, "machine": C.machine_info(args.device), "git": C.git_commit(),
              "date": C.now_iso(), "tiny": tiny, "overhead": cost, "overhead_problems": problems,
              "elapsed_s": time.time() - t_start, "phases_s": phases}
    report["passed"] = all(t.get("ok") for t in tiny) and not problems
    C.write_json_atomic(results_dir / "gpu_check.json", report)
    C.write_text_atomic(results_dir / "gpu_check.md", render(report))
    say(f"{'PASSED' if report['passed'] else 'FAILED'} in {C.fmt_s(report['elapsed_s'])}; "
        f"{results_dir / 'gpu_check.md'} and gpu_check.json")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
