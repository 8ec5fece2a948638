"""Shared plumbing of the real-data benchmarks (``ssl_acdc.py``, ``ssl_la.py``) and ``overhead.py``.

Not a library module: the benchmark scripts put this folder on ``sys.path`` and import it as ``_common``.

What lives here:

- where the real data, the work folder and the results are (``find_data``, ``DEFAULT_WORK``, ``RESULTS_DIR``);
- which trainers exist (``method_trainers``: every SSL *method* the installed package defines, no variants);
- the budget variants (``write_trainer_index``): a generated index module, put on ``nnUNet_extTrainer``, that
  subclasses every trainer with the benchmark's epochs / iterations / seed / unlabeled batch ratio and makes it
  write ``bench_stats.json`` (training-loop time, peak memory) at the end of training;
- a custom plans configuration (``add_configuration``: e.g. ``2d_cpu`` inheriting ``2d``) and identical plans for
  several datasets (``copy_plans``);
- running a console command with wall time and peak memory (``run_monitored``);
- the benchmark driver (``SSLBenchmark``): convert, plan, preprocess, then for each run ``nnUNetv2_train``,
  ``nnUNetv2_predict`` and ``nnunet_ssl.evaluation.evaluate_folder``; results merged into a JSON file keyed by run
  and a Markdown table regenerated from it after every run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from nnunet_ssl.evaluation import METRICS, POOLED, nan_to_none

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_WORK = Path(os.environ.get("NNUNET_SSL_BENCH_WORK", "/tmp/bench_work"))
PLANS = "nnUNetPlans"
SKIP_EXIT_CODE = 0  # "data absent" is a skip, not a failure


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------

def find_data(subfolder: str, explicit: Optional[str] = None) -> Optional[Path]:
    """``explicit``, else ``$NNUNET_SSL_DATA/<subfolder>``, else ``<repo>/../shared/data/<subfolder>``.

    None when the folder does not exist."""
    if explicit:
        p = Path(explicit)
        return p if p.is_dir() else None
    env = os.environ.get("NNUNET_SSL_DATA")
    p = (Path(env) if env else REPO.parent / "shared" / "data") / subfolder
    return p if p.is_dir() else None


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "trainers", "nnunet_ssl"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["nnunetv2"] = version("nnunetv2")
        info["nnunet_ssl"] = version("nnunet-ssl")
    except Exception:  # noqa: BLE001 - informative only
        pass
    return info


def loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def fmt_s(seconds: Optional[float]) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_mb(mb: Optional[float]) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def fmt_num(v, scale: float = 1.0, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * scale:.{nd}f}"


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(nan_to_none(data), indent=2) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def nnunet_env(work: Path, device: str, extra_ext: Sequence[str] = (), results: Optional[Path] = None) -> Dict[str, str]:
    """Environment of every subprocess: nnU-Net folders under ``work`` (``nnUNet_results`` under ``results`` if
    given), trainer discovery, CPU-friendly settings.

    ``nnUNet_n_proc_DA`` (augmentation workers per loader; SSL trainers run a second loader with as many) and
    ``nnUNet_compile`` are taken from the caller's environment when set; otherwise 1 worker and no compile on a
    machine with <= 4 cores, nnU-Net's own defaults on a larger one.
    """
    from nnunet_ssl.nnunet_ext import TRAINER_DIR

    env = dict(os.environ)
    for k, folder in (("nnUNet_raw", work / "raw"), ("nnUNet_preprocessed", work / "preprocessed"),
                      ("nnUNet_results", results or work / "results")):
        env[k] = str(folder)
        folder.mkdir(parents=True, exist_ok=True)
    env["nnUNet_extTrainer"] = os.pathsep.join([TRAINER_DIR, *map(str, extra_ext)])
    cores = os.cpu_count() or 1
    if device == "cpu":
        env.setdefault("nnUNet_compile", "0")
        if cores <= 4:
            env.setdefault("nnUNet_n_proc_DA", "1")
    env.setdefault("nnUNet_def_n_proc", str(max(1, min(cores, 4))))
    env["PYTHONUNBUFFERED"] = "1"
    # make the venv's console scripts win even if PATH was not activated
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# ----------------------------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------------------------

def method_trainers() -> List[str]:
    """Every SSL *method* trainer of the installed package, sorted: subclasses of ``nnUNetTrainerSSL`` without an
    underscore in their name (so no ``_sslTiny`` / ``_sslDemo`` / ``_ema0999`` ... variants), the base excluded."""
    from nnunet_ssl.trainers import all_trainers
    from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL

    return sorted(n for n, c in all_trainers().items()
                  if issubclass(c, nnUNetTrainerSSL) and c is not nnUNetTrainerSSL and "_" not in n)


def resolve_trainer(name: str) -> str:
    """Accept ``nnUNetTrainerMeanTeacher`` or the short ``MeanTeacher``; raise ValueError with the choices."""
    from nnunet_ssl.trainers import all_trainers

    known = set(all_trainers()) | {"nnUNetTrainer"}
    for cand in (name, f"nnUNetTrainer{name}"):
        if cand in known:
            return cand
    raise ValueError(f"unknown trainer '{name}'. SSL methods: {', '.join(method_trainers())}; any other trainer of "
                     f"`nnunet_ssl list-trainers` or nnUNetTrainer works too")


_INDEX_TEMPLATE = '''\
"""Generated by nnunet-ssl benchmarks/_common.py (write_trainer_index); do not edit, it is rewritten on every run.

Budget variants for one benchmark: every base trainer below, subclassed as ``<base>_<tag>`` with the benchmark's
epochs / iterations / seed (and, for SSL trainers, an unlabeled batch as large as the labeled one). Each variant
writes ``bench_stats.json`` (training-loop wall time, peak memory) into its fold folder when training ends.
nnU-Net imports this module through ``nnUNet_extTrainer`` and drops it from sys.modules afterwards, so the classes
are registered in ``nnunet_ssl.trainers.budgets`` (importable) as well.
"""
import json as _json
import os as _os
import random as _random
import time as _time

import numpy as _np
import torch as _torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _nnUNetTrainer

import nnunet_ssl.trainers.budgets as _home
from nnunet_ssl.progress import epoch_history as _epoch_history
from nnunet_ssl.trainers import all_trainers as _all_trainers
from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL as _SSL

_CFG = __CFG__
_BASES = __BASES__


def _seed_everything(seed):
    _random.seed(seed)
    _np.random.seed(seed % 2 ** 32)
    _torch.manual_seed(seed)


def _vm_kb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _make(base, tag, epochs):
    name = f"{base.__name__}_{tag}"

    def __init__(self, plans, configuration, fold, dataset_json, device=_torch.device("cuda")):
        if _CFG["seed"] is not None:
            _seed_everything(int(_CFG["seed"]))
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(epochs)
        self.num_iterations_per_epoch = int(_CFG["iterations"])
        self.num_val_iterations_per_epoch = int(_CFG["val_iterations"])

    def on_train_start(self):
        base.on_train_start(self)
        if self.device.type == "cuda":
            _torch.cuda.reset_peak_memory_stats()
        self._bench_t0 = _time.time()
        self._bench_epoch0 = self.current_epoch

    def on_train_end(self):
        t1 = _time.time()
        stats = {
            "trainer": name, "base": base.__name__, "budget": dict(_CFG, tag=tag, epochs=epochs),
            "train_loop_s": t1 - getattr(self, "_bench_t0", t1),
            "epochs_run": self.current_epoch - getattr(self, "_bench_epoch0", 0),
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "batch_size": self.batch_size,
            "unlabeled_batch_size": getattr(self, "unlabeled_batch_size", None),
            "peak_rss_main_mb": (_vm_kb("VmHWM") or 0) / 1024,
            "cuda_peak_allocated_mb": _torch.cuda.max_memory_allocated() / 2 ** 20
            if self.device.type == "cuda" else None,
            "cuda_peak_reserved_mb": _torch.cuda.max_memory_reserved() / 2 ** 20
            if self.device.type == "cuda" else None,
            "torch_threads": _torch.get_num_threads(),
            "nonfinite_steps": getattr(self, "nonfinite_total", None),
        }
        try:
            log = self.logger.get_checkpoint()
            durations = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
            stats["epoch_s_mean"] = sum(durations) / len(durations) if durations else None
            stats["final_train_loss"] = float(log["train_losses"][-1]) if log["train_losses"] else None
            stats["final_pseudo_dice"] = [float(x) for x in log["dice_per_class_or_region"][-1]] \\
                if log["dice_per_class_or_region"] else None
            # per-epoch curves (pseudo Dice, losses, SSL diagnostics) survive the work folder in the results file
            ssl_log = getattr(self, "ssl_log", None)
            stats["epoch_history"] = _epoch_history(log, ssl_log.values if ssl_log is not None else {})
        except Exception:  # informative only
            pass
        if self.local_rank == 0:
            _os.makedirs(self.output_folder, exist_ok=True)
            with open(_os.path.join(self.output_folder, "bench_stats.json"), "w") as f:
                _json.dump(stats, f, indent=2)
        base.on_train_end(self)

    def perform_actual_validation(self, save_probabilities=False):
        if _CFG.get("final_validation", True):
            return base.perform_actual_validation(self, save_probabilities)
        self.print_to_log_file("Final validation skipped (benchmark variant: the test set is evaluated separately; "
                               "fold 'all' has no held-out cases).")

    attrs = {"__init__": __init__, "on_train_start": on_train_start, "on_train_end": on_train_end,
             "perform_actual_validation": perform_actual_validation,
             "__module__": _home.__name__,
             "__doc__": f"{base.__name__}: benchmark budget {tag} ({epochs} x {_CFG['iterations']})"}
    if issubclass(base, _SSL) and _CFG.get("unlabeled_batch_ratio") is not None:
        attrs["unlabeled_batch_ratio"] = float(_CFG["unlabeled_batch_ratio"])
    cls = type(name, (base,), attrs)
    setattr(_home, name, cls)
    return cls


_known = dict(_all_trainers(), nnUNetTrainer=_nnUNetTrainer)
for _b in _BASES:
    if _b in _known:
        globals()[f"{_b}_{_CFG['tag']}"] = _make(_known[_b], _CFG["tag"], _CFG["epochs"])
# other epoch counts under their own suffix: "Half" (the teacher and the student of offline self-training share one
# budget between them), "2x" (the labeled-only control with twice the iterations)
for _suffix, _epochs, _bases in _CFG.get("scaled", ()):
    for _b in _bases:
        if _b in _known:
            globals()[f"{_b}_{_CFG['tag']}{_suffix}"] = _make(_known[_b], _CFG["tag"] + _suffix, _epochs)
'''


def write_trainer_index(folder: Path, tag: str, epochs: int, iterations: int, val_iterations: int,
                        seed: Optional[int], bases: Sequence[str], unlabeled_batch_ratio: Optional[float] = 1.0,
                        final_validation: bool = False,
                        scaled: Sequence[Tuple[str, int, Sequence[str]]] = ()) -> Tuple[Path, Dict[str, str]]:
    """Write ``folder/bench_trainer_index_<tag>.py`` (the only module there); return (folder, {base: variant}).

    Put ``folder`` on ``nnUNet_extTrainer`` (os.pathsep list) of the subprocesses. A base the installed package
    does not define is skipped by the module (nnU-Net then reports the unknown trainer). ``final_validation``
    False skips nnU-Net's validation at the end of training (with fold ``all`` it would only re-predict the
    training cases). Each ``(suffix, epochs, bases)`` of ``scaled`` also gives every one of its bases a variant
    ``<base>_<tag><suffix>`` with that many epochs (same iterations per epoch): ``Half`` for the two halves of
    offline self-training, ``2x`` for the labeled-only control with twice the iterations.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.py"):
        if old.name != f"bench_trainer_index_{tag}.py":
            old.unlink()
    cfg = {"tag": tag, "epochs": int(epochs), "iterations": int(iterations), "val_iterations": int(val_iterations),
           "seed": seed, "unlabeled_batch_ratio": unlabeled_batch_ratio, "final_validation": bool(final_validation),
           "scaled": [(str(sfx), int(ep), sorted(set(bs))) for sfx, ep, bs in scaled]}
    text = _INDEX_TEMPLATE.replace("__CFG__", repr(cfg)).replace("__BASES__", repr(sorted(set(bases))))
    write_text_atomic(folder / f"bench_trainer_index_{tag}.py", text)
    return folder, {b: f"{b}_{tag}" for b in bases}


# ----------------------------------------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------------------------------------

def plain_unet_architecture(template: dict, dim: int, features: Sequence[int], first_stride: Sequence[int] = None,
                            n_conv: int = 2) -> dict:
    """A PlainConvUNet ``architecture`` entry: ``len(features)`` stages, 3x3(x3) kernels, strides 1 then 2, ``n_conv``
    convolutions per stage in encoder and decoder; norm / nonlinearity / conv bias copied from ``template`` (nnU-Net's
    own entry of the parent configuration)."""
    import copy

    arch = copy.deepcopy(template)
    kw = arch["arch_kwargs"]
    n = len(features)
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    kw["n_stages"] = n
    kw["features_per_stage"] = list(features)
    kw["kernel_sizes"] = [[3] * dim for _ in range(n)]
    kw["strides"] = [list(first_stride or [1] * dim)] + [[2] * dim for _ in range(n - 1)]
    kw["n_conv_per_stage"] = [n_conv] * n
    kw["n_conv_per_stage_decoder"] = [n_conv] * (n - 1)
    kw.pop("n_blocks_per_stage", None)  # residual-encoder key, not a PlainConvUNet argument
    return arch


def add_configuration(plans_file: Path, name: str, parent: str, *, spacing: Sequence[float],
                      patch_size: Sequence[int], batch_size: int, features: Sequence[int]) -> dict:
    """Write configuration ``name`` (``inherits_from: parent``) into ``plans_file``; return the entry.

    The entry overrides spacing, patch size, batch size and the architecture (a PlainConvUNet, see
    :func:`plain_unet_architecture`) and gets its own ``data_identifier``; everything else (normalisation,
    resampling, transposition) is the parent's, i.e. nnU-Net's own plan.
    """
    plans = json.loads(plans_file.read_text())
    parent_cfg = plans["configurations"][parent]
    while "architecture" not in parent_cfg and "inherits_from" in parent_cfg:
        parent_cfg = {**plans["configurations"][parent_cfg["inherits_from"]], **parent_cfg}
    dim = len(patch_size)
    entry = {
        "inherits_from": parent,
        "data_identifier": f"{plans.get('plans_name', PLANS)}_{name}",
        "spacing": [float(s) for s in spacing],
        "patch_size": [int(p) for p in patch_size],
        "batch_size": int(batch_size),
        "architecture": plain_unet_architecture(parent_cfg["architecture"], dim, features),
    }
    plans["configurations"][name] = entry
    plans_file.write_text(json.dumps(plans, indent=2))
    return entry


def copy_plans(src_pre: Path, dst_pre: Path, dst_dataset_name: str, dst_raw: Path, plans_name: str = PLANS) -> None:
    """Copy ``src_pre/<plans_name>.json`` into ``dst_pre`` with ``dataset_name`` replaced (what nnU-Net's
    ``nnUNetv2_move_plans_between_datasets`` does for same-format datasets), plus the source's fingerprint
    (the trainer copies it into its output folder) and the target's own dataset.json (as nnU-Net's planning
    would have put there)."""
    dst_pre.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dst_raw / "dataset.json", dst_pre / "dataset.json")
    plans = json.loads((src_pre / f"{plans_name}.json").read_text())
    plans["dataset_name"] = dst_dataset_name
    (dst_pre / f"{plans_name}.json").write_text(json.dumps(plans, indent=2))
    shutil.copyfile(src_pre / "dataset_fingerprint.json", dst_pre / "dataset_fingerprint.json")


def configuration_summary(plans_file: Path, configuration: str) -> dict:
    """The resolved configuration (inheritance applied) in a few lines, for the results file."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(str(plans_file)).get_configuration(configuration)
    kw = cm.network_arch_init_kwargs
    return {"configuration": configuration, "spacing": list(cm.spacing), "patch_size": list(cm.patch_size),
            "batch_size": cm.batch_size, "network": cm.network_arch_class_name.split(".")[-1],
            "n_stages": kw.get("n_stages"), "features_per_stage": kw.get("features_per_stage"),
            "strides": kw.get("strides"), "normalization": cm.normalization_schemes,
            "data_identifier": cm.data_identifier}


# ----------------------------------------------------------------------------------------------------------------
# peak memory of one process's tensors on CPU (the counterpart of torch.cuda.max_memory_allocated)
# ----------------------------------------------------------------------------------------------------------------

# glibc raises its mmap threshold after large frees and then keeps freed blocks in the heap, so a process's RSS
# measures the allocator's fragmentation (which depends on the order and sizes of transient tensors) rather than
# its live tensors; with a fixed threshold every large block goes back to the OS on free. Set it in the environment
# of every subprocess whose resident memory is measured.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU tensor storages reachable by the garbage collector (weights, grads, optimizer
    state, teacher, queues, cached batches): the CPU counterpart of what CUDA reports as allocated."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - tensors without storage (e.g. meta, sparse) do not count
            continue
    return total


def profiled_step_peak(step: Callable[[], object], n: int) -> int:
    """Peak of (allocated - allocated at the start) bytes over ``n`` calls of ``step``, from the profiler's
    allocation events (every allocation and free of PyTorch's CPU allocator)."""
    import torch.profiler as tp

    with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(n):
            step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cpu_allocated_peak(step: Callable[[], object], n: int = 2, baseline_bytes: int = 0) -> Tuple[int, int]:
    """``(persistent, step_peak)`` bytes, whose sum is the CPU counterpart of ``torch.cuda.max_memory_allocated``:
    the tensors alive now (minus ``baseline_bytes``, those that existed before the trainer was built) and the peak of
    the allocations over ``n`` further calls of ``step``."""
    import gc

    gc.collect()
    persistent = live_tensor_bytes() - baseline_bytes
    return persistent, profiled_step_peak(step, n)


# ----------------------------------------------------------------------------------------------------------------
# running a command: wall time + peak memory
# ----------------------------------------------------------------------------------------------------------------

def _proc_children() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants (augmentation workers included), MB."""
    kids = _proc_children()
    stack, total = [root], 0
    while stack:
        pid = stack.pop()
        total += _rss_kb(pid)
        stack.extend(kids.get(pid, []))
    return total / 1024


@dataclass
class RunResult:
    rc: int
    wall_s: float
    peak_rss_tree_mb: float          # max over polls of the summed RSS of the process tree (every ~1 s)
    maxrss_mb: float                 # wait4() ru_maxrss: largest single process of the tree (exact high-water mark)
    log: str


def run_monitored(cmd: Sequence[str], env: Dict[str, str], log: Path, poll_s: float = 1.0,
                  progress: Optional[Callable[[str], None]] = None, progress_every_s: float = 60.0,
                  timeout_s: Optional[float] = None) -> RunResult:
    """Run ``cmd`` with stdout+stderr into ``log``; measure wall time and peak memory (Linux /proc + wait4).

    ``progress`` gets the last line of the log that mentions an epoch, every ``progress_every_s``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which(cmd[0], path=env.get("PATH")) or cmd[0]
    peak = 0.0
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        t0 = time.time()
        proc = subprocess.Popen([exe, *map(str, cmd[1:])], stdout=f, stderr=subprocess.STDOUT, env=env)
        last_progress = t0
        status, rusage = None, None
        try:
            while True:
                pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    status, rusage = st, ru
                    break
                peak = max(peak, tree_rss_mb(proc.pid))
                now = time.time()
                if progress is not None and now - last_progress >= progress_every_s:
                    last_progress = now
                    line = _last_epoch_line(log)
                    if line:
                        progress(line)
                if timeout_s is not None and now - t0 > timeout_s:
                    proc.kill()
                time.sleep(poll_s)
        except BaseException:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise
        wall = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return RunResult(proc.returncode, wall, peak, rusage.ru_maxrss / 1024 if rusage else 0.0, str(log))


def _last_epoch_line(log: Path) -> Optional[str]:
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 20000))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    epoch = next((ln for ln in reversed(lines) if ": Epoch " in ln and "time" not in ln), None)
    t = next((ln for ln in reversed(lines) if "Epoch time" in ln), None)
    return " | ".join(x.strip() for x in (epoch, t) if x) or None


def log_tail(path: str, n: int = 2500) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


class StepError(RuntimeError):
    pass


def run_step(cmd: Sequence[str], env: Dict[str, str], log: Path, what: str, **kw) -> RunResult:
    r = run_monitored(cmd, env, log, **kw)
    if r.rc != 0:
        raise StepError(f"{what} failed (exit code {r.rc}); log: {log}\n{log_tail(str(log))}")
    return r


# ----------------------------------------------------------------------------------------------------------------
# the benchmark driver
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Budget:
    """One named budget: configuration to train and how long; ``cpu_plan`` describes a custom configuration."""
    name: str
    configuration: str
    epochs: int
    iterations: int
    val_iterations: int
    tta: bool
    device: str
    cpu_plan: Optional[dict] = None       # kwargs of add_configuration (name = configuration), None = nnU-Net's own
    max_unlabeled: Optional[int] = None   # converter subset limits (smoke tests only)
    max_test: Optional[int] = None
    n_all: Optional[int] = None           # labeled cases of the upper-bound dataset (None = all)
    selftrain_args: Tuple[str, ...] = ()  # extra `nnunet_ssl self-train` options (smoke: keep every case)
    note: str = ""


@dataclass
class Spec:
    """What differs between the ACDC and LA benchmarks."""
    name: str                      # ssl_acdc
    title: str
    data_subfolder: str            # ACDC
    converter: str                 # acdc-h5
    dataset_ids: Tuple[int, int]   # (labeled subset + unlabeled, all labeled)
    dataset_names: Tuple[str, str]
    parent_configuration: str      # 2d
    default_n: int
    n_all_label: str               # "all 70"
    classes: List[str]
    budgets: Dict[str, Budget]
    # (source folder, N, seed, explicit cases, scratch folder) -> (source folder to convert, selection record)
    make_selection: Callable[..., Tuple[Path, dict]]
    unit: str = "cases"            # what N counts (ACDC: patients, 2 frames = 2 nnU-Net cases each)
    reference: Optional[dict] = None
    target_gain: Optional[float] = None   # Dice points the best SSL trainer should gain (shown in the table)
    protocol_note: str = ""
    extra_convert_args: List[str] = field(default_factory=list)


UPPER = "nnUNetTrainer@all"
LABELED_ONLY = "nnUNetTrainer"
POOL_SUFFIX = "_unlabeled_pool"  # predictions_dir / evaluation name of a row's unlabeled-pool diagnostic
#: control: labeled-only nnU-Net with twice the budget's epochs (is a gain the unlabeled data or more optimisation?)
CONTROL_2X = "nnUNetTrainer_2x"
CONTROL_2X_ROLE = "labeled only, 2x iterations (control)"
#: offline self-training, issue 8's protocol: a half-budget nnUNetTrainer teacher, pseudo-labels, a half-budget
#: noisy student (the same total iterations as every other row)
SELFTRAIN = "SelfTraining"
#: offline self-training as users run it: the teacher is this seed's full-budget labeled-only model (the
#: ``nnUNetTrainer`` row's checkpoint, reused), the student trains the full budget
SELFTRAIN_FULL = "SelfTraining_fullTeacher"
SELFTRAIN_KEYS = (SELFTRAIN, SELFTRAIN_FULL)
SELFTRAIN_TEACHER = "nnUNetTrainer"
SELFTRAIN_STUDENT = "nnUNetTrainerNoisyStudent"
SELFTRAIN_ROLE = "SSL (offline self-training)"
SELFTRAIN_FULL_ROLE = "SSL (offline self-training, full-budget teacher)"


def run_aliases(methods: Sequence[str]) -> Dict[str, List[str]]:
    """``--trainers`` words that name rows rather than trainers (lower case, ``-`` and ``_`` ignored)."""
    return {"upper": [UPPER], "all": [UPPER], "nnunettrainer@all": [UPPER], "methods": list(methods),
            "ssl": list(methods), "selftrain": [SELFTRAIN], "selftraining": [SELFTRAIN],
            "selftrainhalf": [SELFTRAIN], "selftrainfull": [SELFTRAIN_FULL],
            "selftrainingfullteacher": [SELFTRAIN_FULL],
            "labeled2x": [CONTROL_2X], "nnunettrainer2x": [CONTROL_2X], "2x": [CONTROL_2X],
            "controls": [CONTROL_2X, SELFTRAIN_FULL]}


def data_context(setting: dict) -> dict:
    """What a row's numbers depend on besides its trainer and seed: plans, schedule, device, the labeled cases and
    the sizes of the labeled / unlabeled / test / upper-bound sets. Rows are comparable (pairable) only when these
    agree; ``description`` says it in words and is not part of the comparison."""
    sel = setting.get("selection") or {}
    ds = setting.get("datasets") or {}
    d0, d1 = ds.get("labeled_subset") or {}, ds.get("all_labeled") or {}
    units = setting.get("labeled_units") or {}
    ctx = {"plans_sha256": setting.get("plans_sha256"), "configuration": setting.get("configuration"),
           "total_iterations": setting.get("total_iterations"), "tta": setting.get("tta"),
           "device": setting.get("device"),
           "labeled": sorted(sel["labeled"]) if sel.get("labeled") else None, "selection_seed": sel.get("seed"),
           "n_available": sel.get("n_available"), "n_present": sel.get("n_present"),
           "num_labeled": d0.get("num_labeled"), "num_unlabeled": d0.get("num_unlabeled"),
           "num_test": d0.get("num_test"), "upper_num_labeled": d1.get("num_labeled")}
    ctx["description"] = (f"{sel.get('description') or sel.get('rule') or '?'}; nnU-Net cases labeled / unlabeled / "
                          f"test {ctx['num_labeled']} / {ctx['num_unlabeled']} / {ctx['num_test']}, upper bound "
                          f"{units.get('all_labeled', '?')} {units.get('unit', 'cases')} labeled; "
                          f"`{ctx['configuration']}`, {ctx['total_iterations']} iterations, plans "
                          f"{str(ctx['plans_sha256'])[:8]}, {ctx['device']}")
    return ctx


def context_key(ctx: Optional[dict]) -> str:
    """``ctx`` without its description, as a string: equal keys = comparable rows."""
    return json.dumps({k: v for k, v in (ctx or {}).items() if k != "description"}, sort_keys=True)


def row_is_current(row: dict, setting: dict) -> bool:
    """Made with the setting's plans and, where the row records it, on the setting's data."""
    return row.get("plans_sha256") == setting.get("plans_sha256") and \
        ("data" not in row or context_key(row["data"]) == context_key(data_context(setting)))


def stamp_legacy_rows(data: dict) -> None:
    """Give every row recorded without its own ``data`` context the context of the file's setting, when the row was
    made with the setting's plans. Called before a run replaces the setting: rows older than per-row contexts were
    recorded under it, and would otherwise be paired with rows made on other data (e.g. after the data folder grew)."""
    old = data.get("setting")
    if not old:
        return
    ctx = data_context(old)
    for row in data.get("runs", {}).values():
        if "data" not in row and row.get("plans_sha256") == old.get("plans_sha256"):
            row["data"] = ctx


class SSLBenchmark:
    def __init__(self, spec: Spec, args: argparse.Namespace):
        self.spec, self.args = spec, args
        self.budget = spec.budgets[args.budget]
        self.device = args.device or self.budget.device
        self.seed = args.seed
        n = args.num_labeled if args.num_labeled is not None else spec.default_n
        self.n = n
        if args.labeled_cases:
            names = "-".join(c.replace("patient", "") for c in args.labeled_cases)
            sel_tag = f"n{len(args.labeled_cases)}_" + (names if len(names) <= 40 else
                                                         hashlib.sha1(names.encode()).hexdigest()[:10])
            self.n = len(args.labeled_cases)
        elif args.labeled_seed is not None:
            sel_tag = f"n{n}_seed{args.labeled_seed}"
        else:
            sel_tag = "" if n == spec.default_n else f"n{n}"
        self.sel_tag = sel_tag
        suffix = f"_{sel_tag}" if sel_tag else ""
        self.work = Path(args.work or DEFAULT_WORK) / spec.name / f"{args.budget}{suffix}"
        # Another training seed shares the prepared data (raw, preprocessed) but gets its own models, predictions,
        # logs and results table, so it can neither overwrite nor be merged into the seed-0 rows.
        seed_sub = f"seed{self.seed}" if self.seed else ""
        self.out = self.work / seed_sub
        # --results-dir is the root of every seed's table, as the default: seed S > 0 writes to <root>/seed<S>/
        self.results_root = Path(args.results_dir) if args.results_dir else \
            (RESULTS_DIR / "smoke" if args.budget == "smoke" else RESULTS_DIR)
        self.results_json = self.results_root / seed_sub / f"{spec.name}_{args.budget}{suffix}.json"
        self.results_md = self.results_json.with_suffix(".md")
        self.logs = self.out / "logs"
        self.ext = self.out / "ext"
        self.tag = "bench" + "".join(p.capitalize() for p in args.budget.split("_"))
        self.t_start = time.time()

    # ------------------------------------------------------------------ output
    def say(self, msg: str) -> None:
        print(f"[{self.spec.name} {self.args.budget} {time.strftime('%H:%M:%S')} +{fmt_s(time.time() - self.t_start)}]"
              f" {msg}", flush=True)

    # ------------------------------------------------------------------ runs
    def planned_runs(self) -> List[dict]:
        """The rows to run, in order. A row's ``scale`` (if any) selects the ``<trainer>_<tag><scale>`` budget
        variant. Default: labeled-only, upper bound, every SSL method, offline self-training with the full-budget
        teacher; the controls and the half-budget self-training on request."""
        methods = method_trainers()
        catalogue = [{"key": LABELED_ONLY, "trainer": "nnUNetTrainer", "dataset": 0, "role": "labeled only"},
                     {"key": UPPER, "trainer": "nnUNetTrainer", "dataset": 1,
                      "role": f"{self.spec.n_all_label} labeled (upper bound)"}]
        catalogue += [{"key": m, "trainer": m, "dataset": 0, "role": "SSL"} for m in methods]
        catalogue += [{"key": SELFTRAIN_FULL, "trainer": SELFTRAIN_STUDENT, "dataset": 0, "role": SELFTRAIN_FULL_ROLE},
                      {"key": SELFTRAIN, "trainer": SELFTRAIN_STUDENT, "dataset": 0, "role": SELFTRAIN_ROLE,
                       "scale": "Half"},
                      {"key": CONTROL_2X, "trainer": "nnUNetTrainer", "dataset": 0, "role": CONTROL_2X_ROLE,
                       "scale": "2x"}]
        by_key = {r["key"]: r for r in catalogue}
        if not self.args.trainers:
            return [r for r in catalogue if r["key"] not in (SELFTRAIN, CONTROL_2X)]
        aliases = run_aliases(methods)
        wanted: List[str] = []
        for t in self.args.trainers:
            word = t.lower().replace("-", "").replace("_", "")
            try:
                wanted += aliases.get(word) or ([t] if t in by_key else [resolve_trainer(t)])
            except ValueError as e:
                raise ValueError(f"{e}. Rows that are no trainer: upper, methods, selftrain-full ({SELFTRAIN_FULL}), "
                                 f"selftrain ({SELFTRAIN}), labeled2x ({CONTROL_2X}), controls") from None
        runs = [by_key.get(k) or {"key": k, "trainer": k, "dataset": 0,
                                  "role": "labeled only" if k == LABELED_ONLY else "SSL"}
                for k in dict.fromkeys(wanted)]
        # the full-teacher self-training reuses the labeled-only model: train that first when both are asked for
        keys = [r["key"] for r in runs]
        if SELFTRAIN_FULL in keys and LABELED_ONLY in keys and keys.index(SELFTRAIN_FULL) < keys.index(LABELED_ONLY):
            runs.append(runs.pop(keys.index(SELFTRAIN_FULL)))
        return runs

    def run_epochs(self, run: dict) -> int:
        return {"Half": self.budget.epochs // 2, "2x": 2 * self.budget.epochs}.get(run.get("scale", ""),
                                                                                  self.budget.epochs)

    def variant(self, run: dict) -> str:
        return f"{run['trainer']}_{self.tag}{run.get('scale', '')}"

    def command(self, trainers: Sequence[str]) -> str:
        """The benchmark command that runs ``trainers`` for this seed, labeled set and budget (for messages)."""
        a = self.args
        parts = [f"python benchmarks/{self.spec.name}.py", f"--budget {a.budget}"]
        if a.num_labeled is not None:
            parts.append(f"-n {a.num_labeled}")
        if a.labeled_seed is not None:
            parts.append(f"--labeled-seed {a.labeled_seed}")
        if a.labeled_cases:
            parts.append("--labeled-cases " + " ".join(a.labeled_cases))
        parts.append(f"--seed {self.seed}")
        for opt in ("work", "data", "results_dir", "device"):
            if getattr(a, opt, None):
                parts.append(f"--{opt.replace('_', '-')} {getattr(a, opt)}")
        return " ".join(parts + ["--trainers", *trainers])

    # ------------------------------------------------------------------ data
    def dataset_folder_name(self, i: int) -> str:
        return f"Dataset{self.spec.dataset_ids[i]:03d}_{self.spec.dataset_names[i]}"

    def predictions_dir(self, key: str) -> Path:
        """Where the test predictions of row ``key`` go (``@`` is not safe in file names)."""
        return self.out / "predictions" / key.replace("@", "_at_")

    def env(self) -> Dict[str, str]:
        return nnunet_env(self.work, self.device, [str(self.ext)], results=self.out / "results")

    def model_dir(self, dataset_folder: str, variant: str) -> Path:
        """nnU-Net's model folder of ``variant`` trained on ``dataset_folder`` with this budget's configuration."""
        return self.out / "results" / dataset_folder / f"{variant}__{PLANS}__{self.budget.configuration}"

    def raw(self, i: int) -> Path:
        return self.work / "raw" / self.dataset_folder_name(i)

    def pre(self, i: int) -> Path:
        return self.work / "preprocessed" / self.dataset_folder_name(i)

    def prepare(self, source: Path, env: Dict[str, str]) -> dict:
        """Convert, plan, add the budget's configuration, preprocess (labeled + unlabeled). Idempotent: every step
        is skipped when its output exists (``--reprepare`` wipes the work folder's data first)."""
        spec, b = self.spec, self.budget
        cfg = b.configuration
        info: dict = {}
        src, selection = spec.make_selection(source, self.n, self.args.labeled_seed, self.args.labeled_cases,
                                             self.work / "source")
        info["selection"] = selection
        self.check_same_source(selection, source)
        test_subset = ["--max-test", str(b.max_test)] if b.max_test is not None else []
        for i in (0, 1):
            if (self.raw(i) / "dataset.json").is_file():
                continue
            if i == 0:
                conv_src, n_lab = src, self.n
                subset = test_subset + (["--max-unlabeled", str(b.max_unlabeled)] if b.max_unlabeled is not None
                                        else [])
            else:  # the upper bound: every available training case labeled, no unlabeled folder needed
                conv_src, n_lab = source, b.n_all or selection["n_available"]
                subset = test_subset + ["--max-unlabeled", "0"]
            cmd = ["nnunet_ssl", "convert", spec.converter, str(conv_src), "-d", str(spec.dataset_ids[i]), "--name",
                   spec.dataset_names[i], "-o", str(self.work / "raw"), "-n", str(n_lab), *spec.extra_convert_args,
                   *subset]
            what = "labeled subset + unlabeled" if i == 0 else "all labeled"
            self.say(f"converting {self.dataset_folder_name(i)} ({what})")
            run_step(cmd, env, self.logs / f"convert_{i}.log", f"conversion of dataset {i}")
        for i in (0, 1):
            info[f"dataset_{i}"] = json.loads((self.raw(i) / "ssl_split.json").read_text())
            info[f"dataset_{i}"] = {k: info[f"dataset_{i}"].get(k) for k in
                                    ("dataset", "num_labeled", "num_unlabeled", "num_test", "labeled", "selection")}
        # plans: nnU-Net's planning on the all-labeled dataset, then the budget's configuration, then a copy for
        # the labeled-subset dataset, so that every run uses the same plans file
        plans_b = self.pre(1) / f"{PLANS}.json"
        if not plans_b.is_file():
            self.say(f"nnU-Net fingerprint + planning on {self.dataset_folder_name(1)}")
            run_step(["nnUNetv2_plan_and_preprocess", "-d", str(spec.dataset_ids[1]), "--no_pp", "-npfp",
                      env.get("nnUNet_def_n_proc", "2")], env, self.logs / "plan.log", "planning")
        if b.cpu_plan is not None:
            old = json.loads(plans_b.read_text())["configurations"].get(cfg)
            entry = add_configuration(plans_b, cfg, spec.parent_configuration, **b.cpu_plan)
            if old != entry:
                self.say(f"{'updated' if old else 'added'} configuration {cfg} in {plans_b.name}: "
                         f"{json.dumps({k: v for k, v in entry.items() if k != 'architecture'})}")
            if old is not None and old.get("spacing") != entry["spacing"]:  # preprocessed data is stale
                for i in (0, 1):
                    shutil.rmtree(self.pre(i) / entry["data_identifier"], ignore_errors=True)
                shutil.rmtree(self.pre(0) / f"{entry['data_identifier']}_unlabeled", ignore_errors=True)
        if not (self.pre(0) / f"{PLANS}.json").is_file() or not (self.pre(0) / "dataset.json").is_file() or \
                json.loads((self.pre(0) / f"{PLANS}.json").read_text())["configurations"] != \
                json.loads(plans_b.read_text())["configurations"]:
            copy_plans(self.pre(1), self.pre(0), self.dataset_folder_name(0), self.raw(0))
        info["plan"] = configuration_summary(plans_b, cfg)
        info["plans_sha256"] = hashlib.sha256(
            json.dumps(json.loads(plans_b.read_text())["configurations"], sort_keys=True).encode()).hexdigest()[:16]
        data_id = info["plan"]["data_identifier"]
        for i in (0, 1):
            if not (self.pre(i) / data_id).is_dir() or not (self.pre(i) / "dataset.json").is_file():
                self.say(f"nnUNetv2_preprocess {self.dataset_folder_name(i)} -c {cfg}")
                run_step(["nnUNetv2_preprocess", "-d", str(spec.dataset_ids[i]), "-c", cfg, "-plans_name", PLANS,
                          "-np", env.get("nnUNet_def_n_proc", "2")], env, self.logs / f"preprocess_{i}.log",
                         f"preprocessing of dataset {i}")
        if not (self.pre(0) / f"{data_id}_unlabeled").is_dir() and info["dataset_0"]["num_unlabeled"]:
            self.say(f"nnunet_ssl preprocess-unlabeled {self.dataset_folder_name(0)} -c {cfg}")
            r = run_step(["nnunet_ssl", "preprocess-unlabeled", "-d", str(spec.dataset_ids[0]), "-c", cfg,
                          "-np", env.get("nnUNet_def_n_proc", "2")], env, self.logs / "preprocess_unlabeled.log",
                         "unlabeled preprocessing")
            self.say(f"unlabeled preprocessing took {fmt_s(r.wall_s)}")
        return info

    def check_same_source(self, selection: dict, source: Path) -> None:
        """Conversion is skipped when its output exists, so a data folder that changed since (e.g. LA grew from 8 to
        28 training cases) would go on training on the old conversion: refuse, and say how to redo it. The record
        is written on the first preparation (work folders older than it get it now, unchecked)."""
        record = self.work / "source_selection.json"
        now = {k: selection.get(k) for k in ("n_available", "n_present", "labeled")}
        if record.is_file() and (self.raw(0) / "dataset.json").is_file():
            was = json.loads(record.read_text())
            if was != now:
                diff = ", ".join(f"{k} {was.get(k)} -> {now[k]}" for k in now if was.get(k) != now[k])
                raise StepError(f"{self.work} was prepared from other data than {source} holds now ({diff}); rerun "
                                f"with --reprepare to convert, plan and preprocess again")
        else:
            write_json_atomic(record, now)

    # ------------------------------------------------------------------ one run
    def run_one(self, run: dict, variant: str, env: Dict[str, str]) -> dict:
        spec, b = self.spec, self.budget
        i = run["dataset"]
        ds = str(spec.dataset_ids[i])
        key = run["key"].replace("@", "_at_")
        fold_dir = self.model_dir(self.dataset_folder_name(i), variant) / "fold_all"
        if fold_dir.exists() and not (fold_dir / "checkpoint_final.pth").is_file():
            shutil.rmtree(fold_dir)  # an interrupted earlier attempt: start clean (never resume a timing run)
        elif (fold_dir / "checkpoint_final.pth").is_file():
            shutil.rmtree(fold_dir)  # rerun requested: retrain from scratch so that the wall time is real
        rec = {"key": run["key"], "trainer": run["trainer"], "variant": variant, "role": run["role"],
               "dataset": self.dataset_folder_name(i), "started": now_iso(), "loadavg_start": loadavg()}
        self.say(f"training {variant} on {self.dataset_folder_name(i)} ({run['role']}), "
                 f"{self.run_epochs(run)} x {b.iterations} iterations, log {self.logs / f'train_{key}.log'}")
        r = run_monitored(["nnUNetv2_train", ds, b.configuration, "all", "-tr", variant, "-p", PLANS, "-device",
                           self.device], env, self.logs / f"train_{key}.log",
                          progress=lambda line: self.say(f"  {run['key']}: {line}"))
        rec.update({"train_wall_s": r.wall_s, "train_peak_rss_tree_mb": r.peak_rss_tree_mb,
                    "train_maxrss_mb": r.maxrss_mb, "train_log": r.log, "loadavg_end": loadavg()})
        stats_file = fold_dir / "bench_stats.json"
        if stats_file.is_file():
            rec["train_stats"] = json.loads(stats_file.read_text())
        if r.rc != 0:
            rec.update(status="train_failed", error=log_tail(r.log, 3000))
            self.say(f"  FAILED: training {variant} exited with {r.rc}; see {r.log}")
            return rec
        rec = self.predict_and_evaluate(rec, ds, variant, env)
        if rec.get("status") == "ok":
            self.diagnose_pool(rec, ds, variant, env)
        return rec

    def predict_and_evaluate(self, rec: dict, ds: str, variant: str, env: Dict[str, str]) -> dict:
        """Predict the test images with ``variant``'s final checkpoint on dataset ``ds``; evaluate into ``rec``."""
        b = self.budget
        pred = self.predictions_dir(rec["key"])
        shutil.rmtree(pred, ignore_errors=True)
        self.say(f"predicting {len(list((self.raw(0) / 'imagesTs').glob('*')))} test volumes with {variant}"
                 f"{'' if b.tta else ' (no TTA)'}")
        cmd = ["nnUNetv2_predict", "-i", str(self.raw(0) / "imagesTs"), "-o", str(pred), "-d", ds, "-c",
               b.configuration, "-p", PLANS, "-tr", variant, "-f", "all", "-chk", "checkpoint_final.pth", "-device",
               self.device, "-npp", "1", "-nps", "1"]
        if not b.tta:
            cmd.append("--disable_tta")
        rp = run_monitored(cmd, env, self.logs / f"predict_{pred.name}.log")
        rec.update({"predict_wall_s": rp.wall_s, "predict_log": rp.log})
        if rp.rc != 0:
            rec.update(status="predict_failed", error=log_tail(rp.log, 3000))
            self.say(f"  FAILED: prediction exited with {rp.rc}; see {rp.log}")
            return rec
        self.evaluate(rec, pred, env)
        rec.update(status="ok", finished=now_iso())
        return rec

    def evaluate(self, rec: dict, pred: Path, env: Dict[str, str]) -> dict:
        """Score the predictions in ``pred`` against the test labels into ``rec['metrics']``."""
        from nnunet_ssl.evaluation import evaluate_folder

        key = pred.name
        summary = evaluate_folder(pred, self.raw(0) / "labelsTs", dataset_json=self.raw(0) / "dataset.json",
                                  output_file=self.out / "evaluations" / f"{key}.json",
                                  num_processes=int(env.get("nnUNet_def_n_proc", "1")))
        mean = summary["mean"]
        keep = METRICS + ("n_empty_prediction", "n_valid_HD95_mm") + POOLED
        rec["metrics"] = {
            "n_test_cases": len(summary["per_case"]),
            "per_class": {c: {k: v for k, v in m.items() if k in keep} for c, m in mean["per_class"].items()},
            "mean": mean["mean_over_classes"],
            "evaluation_file": str(self.out / "evaluations" / f"{key}.json"),
        }
        d = mean["mean_over_classes"]["Dice"]
        self.say(f"  {rec['key']}: mean Dice {fmt_num(d, 100)} %, HD95 {fmt_num(mean['mean_over_classes']['HD95_mm'])} "
                 f"mm, train {fmt_s(rec.get('train_wall_s'))}, peak RSS {fmt_mb(rec.get('train_peak_rss_tree_mb'))}")
        return rec

    def diagnose_pool(self, rec: dict, ds: str, variant: str, env: Dict[str, str]) -> None:
        """The final network on the unlabeled pool (``imagesUnlabeled``), scored against the pool's true labels (the
        all-labeled dataset has them) into ``rec['unlabeled_pool']``: what pseudo-labels from a teacher like it are
        worth, and whether it over-segments the very images it was trained on without labels. Not for the upper
        bound, whose pool cases are labeled training cases. A failure is recorded, never fails the run."""
        images, truth = self.raw(0) / "imagesUnlabeled", self.raw(1) / "labelsTr"
        if rec["key"] == UPPER or not images.is_dir() or not truth.is_dir():
            return
        from nnunet_ssl.evaluation import evaluate_folder

        pred = self.predictions_dir(rec["key"] + POOL_SUFFIX)
        shutil.rmtree(pred, ignore_errors=True)
        n = len([f for f in images.iterdir() if not f.name.startswith(".")])
        self.say(f"  unlabeled pool: predicting its {n} images with {variant} (a diagnostic: scored against their "
                 f"true labels)")
        cmd = ["nnUNetv2_predict", "-i", str(images), "-o", str(pred), "-d", ds, "-c", self.budget.configuration,
               "-p", PLANS, "-tr", variant, "-f", "all", "-chk", "checkpoint_final.pth", "-device", self.device,
               "-npp", "1", "-nps", "1"] + ([] if self.budget.tta else ["--disable_tta"])
        rp = run_monitored(cmd, env, self.logs / f"predict_{pred.name}.log")
        if rp.rc != 0:
            rec["unlabeled_pool"] = {"error": f"prediction exited with {rp.rc}: {log_tail(rp.log, 600)}"}
            self.say(f"  (unlabeled-pool diagnostic failed: prediction exited with {rp.rc}; see {rp.log})")
            return
        try:
            summary = evaluate_folder(pred, truth, dataset_json=self.raw(0) / "dataset.json",
                                      output_file=self.out / "evaluations" / f"{pred.name}.json", allow_missing=True,
                                      num_processes=int(env.get("nnUNet_def_n_proc", "1")))
        except Exception as e:  # noqa: BLE001 - a diagnostic must not fail the run
            rec["unlabeled_pool"] = {"error": f"{type(e).__name__}: {e}"}
            self.say(f"  (unlabeled-pool diagnostic failed: {type(e).__name__}: {e})")
            return
        shutil.rmtree(pred, ignore_errors=True)  # the per-case scores are kept in the evaluation file
        keep = ("Dice", "volume_ratio", "precision", "recall")
        rec["unlabeled_pool"] = {
            "n_cases": len(summary["per_case"]), "predict_wall_s": rp.wall_s,
            "mean": {"Dice": summary["mean"]["mean_over_classes"]["Dice"]},
            "per_class": {c: {k: v for k, v in m.items() if k in keep} for c, m in summary["mean"]["per_class"].items()},
            "evaluation_file": str(self.out / "evaluations" / f"{pred.name}.json")}
        vol = " / ".join(fmt_num(m.get("volume_ratio"), nd=2) for m in rec["unlabeled_pool"]["per_class"].values())
        self.say(f"  unlabeled pool ({n} images): mean Dice {fmt_num(rec['unlabeled_pool']['mean']['Dice'], 100)} % "
                 f"against the truth, volume {vol}, {fmt_s(rp.wall_s)}")

    def diagnose_pools(self, runs: List[dict], env: Dict[str, str]) -> int:
        """``--diagnose-pool``: the unlabeled-pool diagnostic for finished rows that lack it, from their saved final
        checkpoints. A checkpoint written after the row finished belongs to a later training, not to the row: skipped."""
        data = self.load()
        for r in runs:
            key, old = r["key"], data["runs"].get(r["key"])
            if key in SELFTRAIN_KEYS or key == UPPER:
                continue
            if not old or old.get("status") != "ok":
                self.say(f"skip {key}: no finished run in {self.results_json.name}")
                continue
            if (old.get("unlabeled_pool") or {}).get("n_cases"):
                self.say(f"skip {key}: it has the diagnostic")
                continue
            ckpt = self.model_dir(old["dataset"], old["variant"]) / "fold_all" / "checkpoint_final.pth"
            finished = old.get("finished")
            if not ckpt.is_file() or not finished or \
                    ckpt.stat().st_mtime > _dt.datetime.fromisoformat(finished).timestamp() + 1:
                self.say(f"skip {key}: {ckpt} is " + ("missing" if not ckpt.is_file() else
                                                      "not the recorded run's (written after it finished)"))
                continue
            rec = dict(old)
            self.diagnose_pool(rec, str(self.spec.dataset_ids[0]), old["variant"], env)
            data = self.load()
            data["runs"][key] = rec
            self.save(data)
        self.update_summary()
        return 0

    # ------------------------------------------------------------------ offline self-training
    def diagnose_teacher(self, ds: str, variant: str, env: Dict[str, str]) -> Optional[dict]:
        """Test-set mean metrics of the self-training teacher (None if its prediction fails)."""
        r = self.predict_and_evaluate({"key": f"{SELFTRAIN}_teacher"}, ds, variant, env)
        return (r.get("metrics") or {}).get("mean") if r.get("status") == "ok" else None

    def diagnose_pseudolabels(self, pseudolabel_folder: str, key: str = SELFTRAIN) -> Optional[dict]:
        """Pseudo-labels of the unlabeled pool against the truth, where the all-labeled dataset has it (the
        benchmark's unlabeled cases are labeled training cases of the upper-bound dataset)."""
        from nnunet_ssl.evaluation import evaluate_folder
        from nnunet_ssl.selftrain.pseudolabel import LABELS

        labels = Path(pseudolabel_folder) / LABELS
        if not labels.is_dir() or not (self.raw(1) / "labelsTr").is_dir():
            return None
        try:
            summary = evaluate_folder(labels, self.raw(1) / "labelsTr", dataset_json=self.raw(0) / "dataset.json",
                                      output_file=self.out / "evaluations" / f"{key}_pseudolabels.json",
                                      allow_missing=True)
        except Exception as e:  # noqa: BLE001 - a diagnostic must not fail the run
            self.say(f"  (pseudo-label diagnostic skipped: {type(e).__name__}: {e})")
            return None
        self.say(f"  pseudo-labels vs truth: mean Dice {fmt_num(summary['mean']['mean_over_classes']['Dice'], 100)} % "
                 f"over {len(summary['per_case'])} cases")
        return {"n_cases": len(summary["per_case"]), "mean": summary["mean"]["mean_over_classes"]}

    def selftrain_dataset_id(self, key: str = SELFTRAIN) -> int:
        """The student dataset's id; each protocol has its own, so that neither rebuilds the other's."""
        return self.spec.dataset_ids[1] + 1 + SELFTRAIN_KEYS.index(key)

    def full_teacher(self, teacher: str) -> dict:
        """The ``nnUNetTrainer`` row of this seed whose checkpoint ``SelfTraining_fullTeacher`` reuses as its teacher.

        Raises StepError, saying which command trains it, when the row is missing, unfinished or made with other
        plans, or when its checkpoint is missing or newer than the row (retrained since: the row would not describe
        the teacher)."""
        row = self.load()["runs"].get(LABELED_ONLY) or {}
        ckpt = self.model_dir(self.dataset_folder_name(0), teacher) / "fold_all" / "checkpoint_final.pth"
        how = f"train it first with: {self.command([LABELED_ONLY])}"
        who = f"{SELFTRAIN_FULL} reuses the full-budget labeled-only model of seed {self.seed} as its teacher"
        if row.get("status") != "ok":
            raise StepError(f"{who}, but {self.results_json} has no finished `{LABELED_ONLY}` row; {how}")
        if not row_is_current(row, self.setting):
            raise StepError(f"{who}, but the `{LABELED_ONLY}` row of {self.results_json} was made with other plans or "
                            f"data (plans {row.get('plans_sha256')}, now {self.setting.get('plans_sha256')}); {how}")
        if not ckpt.is_file():
            raise StepError(f"{who}, but its checkpoint {ckpt} is missing (another --work folder, or the work folder "
                            f"was cleaned); {how}")
        finished = row.get("finished")
        if finished and ckpt.stat().st_mtime > _dt.datetime.fromisoformat(finished).timestamp() + 60:
            raise StepError(f"{who}, but {ckpt} is newer than the `{LABELED_ONLY}` row of {self.results_json} "
                            f"(finished {finished}): the model was retrained without being recorded; {how}")
        return row

    def run_selftrain(self, run: dict, env: Dict[str, str]) -> dict:
        """One round of ``nnunet_ssl self-train``: pseudo-labels of the unlabeled pool by a labeled-only
        ``nnUNetTrainer`` teacher (package defaults: voxel threshold, case cut), then ``nnUNetTrainerNoisyStudent``
        on the labeled + pseudo-labeled cases.

        ``SelfTraining`` (issue 8's protocol, the same total budget as every other row): the teacher is trained here
        for half the epochs, the student for the other half. ``SelfTraining_fullTeacher`` (as users run it): the
        teacher is the ``nnUNetTrainer`` row's full-budget model of this seed, reused, and the student trains the full
        budget (twice the iterations of the other rows in all). The row's train time is everything: teacher,
        pseudo-labelling, building and preprocessing the student dataset, student training."""
        b = self.budget
        full = run["key"] == SELFTRAIN_FULL
        ds0 = str(self.spec.dataset_ids[0])
        sid = self.selftrain_dataset_id(run["key"])
        scale = "" if full else "Half"
        epochs = self.run_epochs(run)
        teacher, student = f"{SELFTRAIN_TEACHER}_{self.tag}{scale}", f"{SELFTRAIN_STUDENT}_{self.tag}{scale}"
        teacher_dir = self.model_dir(self.dataset_folder_name(0), teacher)
        # a rerun starts clean: the student dataset, and the teacher's pseudo-labels (they live in its model folder;
        # a trained-here teacher goes with them)
        if full:
            teacher_row = self.full_teacher(teacher)
            for old in teacher_dir.glob("pseudolabels_*"):
                shutil.rmtree(old)
        else:
            shutil.rmtree(teacher_dir, ignore_errors=True)
        for parent in (self.work / "raw", self.work / "preprocessed", self.out / "results"):
            for d in parent.glob(f"Dataset{sid:03d}_*"):
                shutil.rmtree(d)
        rec = {"key": run["key"], "trainer": f"{teacher} -> {student}", "variant": student, "role": run["role"],
               "dataset": self.dataset_folder_name(0), "started": now_iso(), "loadavg_start": loadavg(),
               "selftrain": {"teacher": teacher, "student": student, "teacher_epochs": epochs,
                             "student_epochs": epochs, "student_dataset_id": sid, "teacher_reused": full}}
        progress = (lambda line: self.say(f"  {run['key']}: {line}"))
        teacher_log, student_log = (self.logs / f"train_{run['key']}_{part}.log" for part in ("teacher", "student"))
        if full:
            self.say(f"self-training: teacher {teacher} = the {LABELED_ONLY} row of seed {self.seed} (reused, "
                     f"{teacher_dir / 'fold_all' / 'checkpoint_final.pth'})")
            rt = RunResult(0, teacher_row.get("train_wall_s") or 0.0, teacher_row.get("train_peak_rss_tree_mb") or 0.0,
                           teacher_row.get("train_maxrss_mb") or 0.0, teacher_row.get("train_log") or "")
            rec["selftrain"].update(teacher_row_started=teacher_row.get("started"),
                                    teacher_test=(teacher_row.get("metrics") or {}).get("mean"))
        else:
            self.say(f"self-training: teacher {teacher} ({epochs} x {b.iterations} iterations) on "
                     f"{self.dataset_folder_name(0)}, log {teacher_log}")
            rt = run_monitored(["nnUNetv2_train", ds0, b.configuration, "all", "-tr", teacher, "-p", PLANS,
                                "-device", self.device], env, teacher_log, progress=progress)
        rec["selftrain"]["teacher_wall_s"] = rt.wall_s
        if rt.rc != 0:
            rec.update(status="train_failed", error=log_tail(rt.log, 3000), train_log=rt.log)
            self.say(f"  FAILED: teacher training exited with {rt.rc}; see {rt.log}")
            return rec
        if not full:  # diagnostics of an offline method: how good is the teacher? (seconds, not timed)
            rec["selftrain"]["teacher_test"] = self.diagnose_teacher(ds0, teacher, env)
        self.say(f"self-training: pseudo-labels, student dataset {sid}, student {student} ({epochs} x "
                 f"{b.iterations} iterations), log {student_log}")
        np_ = env.get("nnUNet_def_n_proc", "2")
        cmd = ["nnunet_ssl", "self-train", "-d", ds0, "-c", b.configuration, "-tr", teacher, "-p", PLANS, "-f", "all",
               "--student-trainer", student, "--student-id", str(sid), "-device", self.device, "-np", np_,
               "-npp", "1", "-nps", "1"] + ([] if b.tta else ["--disable_tta"]) + list(b.selftrain_args)
        rs = run_monitored(cmd, env, student_log, progress=progress)
        rec.update(train_wall_s=rt.wall_s + rs.wall_s,
                   train_peak_rss_tree_mb=max(rt.peak_rss_tree_mb, rs.peak_rss_tree_mb),
                   train_maxrss_mb=max(rt.maxrss_mb, rs.maxrss_mb), train_log=rs.log, loadavg_end=loadavg())
        rec["selftrain"]["pseudolabel_and_student_wall_s"] = rs.wall_s
        if rs.rc != 0:
            rec.update(status="train_failed", error=log_tail(rs.log, 3000))
            self.say(f"  FAILED: nnunet_ssl self-train exited with {rs.rc}; see {rs.log}")
            return rec
        student_raw = next((self.work / "raw").glob(f"Dataset{sid:03d}_*"))
        split = json.loads((student_raw / "ssl_split.json").read_text())
        rec["selftrain"].update(student_dataset=student_raw.name, num_pseudo_labeled=split["num_pseudo_labeled"],
                                num_dropped=len(split["self_training"]["dropped"]),
                                threshold=split["self_training"]["threshold"],
                                case_cut=split["self_training"]["case_cut"])
        rec["selftrain"]["pseudolabels_vs_truth"] = self.diagnose_pseudolabels(
            split["self_training"]["pseudolabel_folder"], run["key"])
        stats = {}
        for part, folder in (("teacher", teacher_dir / "fold_all"),
                             ("student", self.model_dir(student_raw.name, student) / "fold_all")):
            f = folder / "bench_stats.json"
            if f.is_file():
                stats[part] = json.loads(f.read_text())
        if len(stats) == 2:  # the table's training loop / epoch columns: both halves together
            loops = [stats[p].get("train_loop_s") for p in ("teacher", "student")]
            epochs = [stats[p].get("epochs_run") or 0 for p in ("teacher", "student")]
            if None not in loops and sum(epochs):
                stats.update(train_loop_s=sum(loops), epoch_s_mean=sum(loops) / sum(epochs))
        rec["train_stats"] = stats
        return self.predict_and_evaluate(rec, str(sid), student, env)

    def reevaluate(self, runs: List[dict], env: Dict[str, str]) -> int:
        """Score the saved test predictions of finished runs again, without training (after a change to the
        evaluation). A row is only replaced when the new Dice equals the recorded one, so predictions from another
        work folder, seed or plan cannot silently overwrite a result."""
        data = self.load()
        failures = 0
        for r in runs:
            key = r["key"]
            old = data["runs"].get(key)
            pred = self.predictions_dir(key)
            if not old or old.get("status") != "ok":
                self.say(f"skip {key}: no finished run in {self.results_json.name}")
                continue
            if not pred.is_dir():
                self.say(f"skip {key}: its predictions are not in {pred}")
                continue
            self.say(f"re-evaluating {key} from {pred}")
            rec = self.evaluate(dict(old), pred, env)
            was, now = old["metrics"]["mean"]["Dice"], rec["metrics"]["mean"]["Dice"]
            if not math.isclose(was, now, rel_tol=0, abs_tol=1e-9):
                self.say(f"  NOT updated: mean Dice {100 * now:.4f} % differs from the recorded {100 * was:.4f} %, so "
                         f"{pred} does not hold this row's predictions (other --work, --seed or plans?)")
                failures += 1
                continue
            rec["reevaluated"] = now_iso()
            data = self.load()
            data["runs"][key] = rec
            self.save(data)
        self.say(f"done; results in {self.results_json} and {self.results_md}")
        return 1 if failures else 0

    # ------------------------------------------------------------------ results
    def load(self) -> dict:
        if self.results_json.is_file():
            return json.loads(self.results_json.read_text())
        return {"benchmark": self.spec.name, "budget": self.args.budget, "runs": {}}

    def save(self, data: dict) -> None:
        write_json_atomic(self.results_json, data)
        write_text_atomic(self.results_md, render_markdown(self.spec, data))

    def update_summary(self) -> Optional[Path]:
        """Regenerate the summary over every seed's table of this benchmark, budget and labeled set (Markdown, JSON,
        plot); the Markdown's path, or None when it failed (a summary must never stop a benchmark run)."""
        from summarize import write_summary

        try:
            return write_summary(self.spec, self.results_root, self.results_json.stem, data_dir=self.args.data)
        except Exception as e:  # noqa: BLE001
            self.say(f"WARNING: summary over seeds not updated: {type(e).__name__}: {e}")
            return None

    # ------------------------------------------------------------------ main
    def main(self) -> int:
        args = self.args
        source = find_data(self.spec.data_subfolder, args.data)
        runs = self.planned_runs()
        if args.list:
            data = self.load()
            for r in runs:
                st = data["runs"].get(r["key"], {}).get("status", "not run")
                print(f"{r['key']:<40} {r['role']:<32} {st}")
            return 0
        if args.reevaluate:
            if not (self.raw(0) / "labelsTs").is_dir():
                print(f"{self.spec.name}: error: --reevaluate needs the prepared work folder {self.work}, which has no "
                      f"test labels; run the benchmark (or --prepare-only) first", file=sys.stderr, flush=True)
                return 2
            return self.reevaluate(runs, self.env())
        if args.diagnose_pool:
            if not (self.raw(0) / "imagesUnlabeled").is_dir():
                print(f"{self.spec.name}: error: --diagnose-pool needs the prepared work folder {self.work}, which has "
                      f"no unlabeled pool; run the benchmark (or --prepare-only) first", file=sys.stderr, flush=True)
                return 2
            self.ext = self.out / "ext_diagnose"  # not the folder that a training running beside it imports
            write_trainer_index(self.ext, self.tag, self.budget.epochs, self.budget.iterations,
                                self.budget.val_iterations, self.seed, sorted({r["trainer"] for r in runs}),
                                unlabeled_batch_ratio=1.0, final_validation=args.final_validation)
            return self.diagnose_pools(runs, self.env())
        if source is None:
            where = args.data or os.environ.get("NNUNET_SSL_DATA") or str(REPO.parent / "shared" / "data")
            print(f"SKIP {self.spec.name}: real data not found ({self.spec.data_subfolder} under {where}); set "
                  f"NNUNET_SSL_DATA or pass --data. See benchmarks/README.md.", flush=True)
            return SKIP_EXIT_CODE
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print(f"{self.spec.name}: error: budget '{args.budget}' runs on CUDA but no GPU is visible; use "
                      f"--budget cpu (or --device cpu to force this budget on the CPU)", file=sys.stderr, flush=True)
                return 2
        if args.reprepare:
            for sub in ("raw", "preprocessed", "source"):
                shutil.rmtree(self.work / sub, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        b = self.budget
        keys = {r["key"] for r in runs}
        # the full-teacher self-training needs its teacher's and its student's full-budget variants importable
        bases = sorted({r["trainer"] for r in runs if "scale" not in r} |
                       ({SELFTRAIN_TEACHER, SELFTRAIN_STUDENT} if SELFTRAIN_FULL in keys else set()))
        scaled = [(sfx, self.run_epochs({"scale": sfx}), sorted({r["trainer"] for r in runs if r.get("scale") == sfx} |
                                                                ({SELFTRAIN_TEACHER} if sfx == "Half" else set())))
                  for sfx in sorted({r["scale"] for r in runs if "scale" in r})]
        write_trainer_index(self.ext, self.tag, b.epochs, b.iterations, b.val_iterations, self.seed, bases,
                            unlabeled_batch_ratio=1.0, final_validation=args.final_validation, scaled=scaled)
        env = self.env()
        self.say(f"work folder {self.work}{f' (seed {self.seed}: models in {self.out})' if self.seed else ''}; results "
                 f"{self.results_json}; device {self.device}; "
                 f"nnUNet_n_proc_DA={env.get('nnUNet_n_proc_DA', 'nnU-Net default')}")
        info = self.prepare(source, env)
        if args.prepare_only:
            self.say(f"prepared: {json.dumps(info['plan'])}")
            for i in (0, 1):
                d = info[f"dataset_{i}"]
                self.say(f"  {d['dataset']}: {d['num_labeled']} labeled, {d['num_unlabeled']} unlabeled, "
                         f"{d['num_test']} test cases")
            return 0
        data = self.load()
        setting = {
            "budget": b.name, "configuration": b.configuration, "epochs": b.epochs,
            "iterations_per_epoch": b.iterations, "total_iterations": b.epochs * b.iterations,
            "val_iterations_per_epoch": b.val_iterations, "tta": b.tta, "device": self.device, "seed": self.seed,
            "fold": "all", "checkpoint": "checkpoint_final.pth", "unlabeled_batch": "= labeled batch",
            "plan": info["plan"], "plans_sha256": info["plans_sha256"], "selection": info["selection"],
            "datasets": {"labeled_subset": info["dataset_0"], "all_labeled": info["dataset_1"]},
            "labeled_units": {"unit": self.spec.unit, "labeled_subset": len(info["selection"]["labeled"]),
                              "all_labeled": b.n_all or info["selection"]["n_available"]},
            "budget_note": b.note, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA"),
            "final_validation": bool(args.final_validation),
            "source": str(source),
        }
        if data.get("setting") and data["setting"].get("plans_sha256") != setting["plans_sha256"]:
            self.say("WARNING: the plans differ from those of the runs already in the results file; those rows are "
                     "marked as stale in the table")
        stamp_legacy_rows(data)
        self.setting = setting
        data.update(benchmark=self.spec.name, title=self.spec.title, budget=args.budget, setting=setting,
                    reference=self.spec.reference, protocol_note=self.spec.protocol_note)
        todo = []
        for r in runs:
            old = data["runs"].get(r["key"])
            if args.skip_existing and old and old.get("status") == "ok" and row_is_current(old, setting):
                self.say(f"skip {r['key']}: already in {self.results_json.name} (--skip-existing)")
                continue
            todo.append(r)
        self.save(data)
        self.say(f"{len(todo)} run(s) to do: {', '.join(r['key'] for r in todo) or 'none'}")
        teacher = f"{SELFTRAIN_TEACHER}_{self.tag}"
        if SELFTRAIN_FULL in {r["key"] for r in todo} and LABELED_ONLY not in {r["key"] for r in todo}:
            self.full_teacher(teacher)  # fail before hours of other runs, not after them
        failures = 0
        for k, r in enumerate(todo, 1):
            self.say(f"run {k}/{len(todo)}: {r['key']}")
            variant = self.variant(r)
            if r["key"] == SELFTRAIN_FULL:
                try:  # e.g. the labeled-only run just before failed: keep the recorded row, record nothing
                    self.full_teacher(teacher)
                except StepError as e:
                    self.say(f"  ERROR {r['key']}: {e} (nothing recorded)")
                    failures += 1
                    continue
            # the training subprocess imports the trainers as they are now, not when the row is recorded
            commit = git_commit()
            try:
                rec = self.run_selftrain(r, env) if r["key"] in SELFTRAIN_KEYS else self.run_one(r, variant, env)
            except Exception as e:  # noqa: BLE001 - record and go on with the next trainer
                rec = {"key": r["key"], "trainer": r["trainer"], "variant": variant, "role": r["role"],
                       "status": "error", "error": f"{type(e).__name__}: {e}"}
                self.say(f"  ERROR {r['key']}: {type(e).__name__}: {e}")
            # the self-training rows train two networks one after the other, teacher and student
            iterations = self.run_epochs(r) * b.iterations * (2 if r["key"] in SELFTRAIN_KEYS else 1)
            rec.update(plans_sha256=setting["plans_sha256"], seed=self.seed, git=commit,
                       machine=machine_info(self.device), total_iterations=iterations, data=data_context(setting))
            failures += rec.get("status") != "ok"
            data = self.load()
            data.update(setting=setting, reference=self.spec.reference, title=self.spec.title,
                        protocol_note=self.spec.protocol_note)
            data["runs"][r["key"]] = rec
            self.save(data)
            self.update_summary()
        print(render_markdown(self.spec, self.load()), flush=True)
        summary = self.update_summary()
        self.say(f"done; results in {self.results_json} and {self.results_md}" +
                 (f"; summary over seeds {summary}" if summary else ""))
        return 1 if failures else 0


def build_parser(spec: Spec, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(spec.budgets), default="cpu",
                   help="; ".join(f"{k}: {v.note}" for k, v in spec.budgets.items()))
    p.add_argument("--trainers", nargs="+", default=None,
                   help="runs to do: nnUNetTrainer (labeled only), upper (nnUNetTrainer on all labeled cases), "
                        "methods (every SSL method), or trainer names, short names allowed (MeanTeacher); "
                        f"selftrain-full ({SELFTRAIN_FULL}: the teacher is the seed's labeled-only model), selftrain "
                        f"({SELFTRAIN}: half-budget teacher and student), labeled2x ({CONTROL_2X}: labeled-only at "
                        "twice the iterations), controls (labeled2x + selftrain-full). Default: labeled-only, upper, "
                        f"every SSL method, {SELFTRAIN_FULL}. The SSL methods found now: " +
                        ", ".join(_safe_methods()))
    p.add_argument("--skip-existing", action="store_true",
                   help="skip runs already in the results file with status ok and the same plans")
    p.add_argument("-n", "--num-labeled", type=int, default=None,
                   help=f"labeled cases (default {spec.default_n}): the first N of the literature's list")
    p.add_argument("--labeled-seed", type=int, default=None,
                   help="choose the N labeled cases at random with this seed instead of the first N")
    p.add_argument("--labeled-cases", nargs="+", default=None, help="explicit labeled cases (patients for ACDC)")
    p.add_argument("--seed", type=int, default=None,
                   help="training seed of every run (network init, main-process RNG; default 0). Seed S > 0 has its "
                        "own models under <work>/seed<S>/ and its own table in <results>/seed<S>/")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every seed in turn (each exactly as --seed S), e.g. --seeds 0 1 2; the summary over seeds "
                        "is regenerated after every run")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the budget's")
    sub = spec.data_subfolder
    p.add_argument("--data", default=None,
                   help=f"the {sub} folder (default: $NNUNET_SSL_DATA/{sub} or <repo>/../shared/data/{sub})")
    p.add_argument("--work", default=None, help=f"work folder (default {DEFAULT_WORK}, or $NNUNET_SSL_BENCH_WORK)")
    p.add_argument("--results-dir", default=None,
                   help="where the JSON/Markdown go (default benchmarks/results, smoke runs in results/smoke)")
    p.add_argument("--final-validation", action="store_true",
                   help="keep nnU-Net's validation at the end of training (fold 'all': the training cases); off by "
                        "default, the test set is what is evaluated")
    p.add_argument("--reprepare", action="store_true", help="redo conversion, planning and preprocessing")
    p.add_argument("--list", action="store_true", help="list the planned runs and their status, run nothing")
    p.add_argument("--prepare-only", action="store_true",
                   help="convert, plan and preprocess (idempotent), train nothing")
    p.add_argument("--render-only", action="store_true",
                   help="only regenerate the Markdown from the JSON (every seed of --seeds) and the summary")
    p.add_argument("--summary-only", action="store_true",
                   help="only regenerate the summary over seeds (<name>_<budget>[_<selection>]_summary.md/.json/.png) "
                        "from the per-seed JSON files; the same as benchmarks/summarize.py for this labeled set")
    p.add_argument("--reevaluate", action="store_true",
                   help="score the saved test predictions of the finished runs (--trainers, default all) again and "
                        "update their metrics; trains and predicts nothing")
    p.add_argument("--diagnose-pool", action="store_true",
                   help="for finished runs (--trainers, default all) without it: predict the unlabeled pool with the "
                        "saved final checkpoint and score it against the pool's true labels (done after every new "
                        "run); trains nothing")
    return p


def _safe_methods() -> List[str]:
    try:
        return method_trainers()
    except Exception as e:  # noqa: BLE001
        return [f"(could not import trainers: {e})"]


def main(spec: Spec, description: str, argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser(spec, description).parse_args(argv)
    if args.labeled_cases and args.labeled_seed is not None:
        print("error: --labeled-cases and --labeled-seed exclude each other", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seed is not None:
        print("error: --seed and --seeds exclude each other (--seeds 0 1 2 runs each seed as --seed S)",
              file=sys.stderr)
        return 2
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [0 if args.seed is None else args.seed]
    if args.summary_only:
        bench = SSLBenchmark(spec, argparse.Namespace(**{**vars(args), "seed": seeds[0]}))
        path = bench.update_summary()
        if path is None:
            print(f"{spec.name}: error: no summary written: no table {bench.results_json.name} in "
                  f"{bench.results_root} or its seed<S>/ folders (or see the warning above)", file=sys.stderr)
            return 1
        print(path.read_text())
        return 0
    rc = 0
    for seed in seeds:
        bench = SSLBenchmark(spec, argparse.Namespace(**{**vars(args), "seed": seed}))
        if len(seeds) > 1:
            print(f"== {spec.name} {args.budget}: training seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})",
                  flush=True)
        rc = max(rc, _main_one_seed(spec, bench))
    if args.render_only:
        path = bench.update_summary()
        print(path.read_text() if path else "")
    return rc


def _main_one_seed(spec: Spec, bench: SSLBenchmark) -> int:
    if bench.args.render_only:
        if bench.results_json.is_file():  # a seed without results gets no empty table
            bench.save(bench.load())
            print(bench.results_md.read_text())
        return 0
    try:
        return bench.main()
    except StepError as e:
        print(f"\n{spec.name}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except ValueError as e:  # e.g. an unknown trainer name
        print(f"{spec.name}: error: {e}", file=sys.stderr, flush=True)
        return 2


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------

def _row_order(runs) -> List[str]:
    """Labeled-only, its 2x control and the upper bound first, then the trainers by name (variants after their
    base), then offline self-training."""
    first = [k for k in (LABELED_ONLY, CONTROL_2X, UPPER) if k in runs]
    last = [k for k in SELFTRAIN_KEYS if k in runs]
    return first + sorted(k for k in runs if k not in first + last) + last


def _selftrain_diagnostics(st_rec: dict) -> str:
    teacher = (st_rec.get("teacher_test") or {}).get("Dice")
    pl = st_rec.get("pseudolabels_vs_truth") or {}
    out = ""
    if teacher is not None:
        out += f" Diagnostics: the teacher alone scores {fmt_num(teacher, 100)} mean Dice on the test set"
    if pl.get("mean", {}).get("Dice") is not None:
        out += (", and" if out else " Diagnostics:") + \
            f" its pseudo-labels score {fmt_num(pl['mean']['Dice'], 100)} against the truth ({pl['n_cases']} cases)"
    return out + "." if out else ""


def render_markdown(spec: Spec, data: dict) -> str:
    s = data.get("setting") or {}
    runs = data.get("runs", {})
    plan = s.get("plan", {})
    smoke = data.get("budget") == "smoke"
    lines = [f"# {spec.title} — budget `{data.get('budget')}`", ""]
    if smoke:
        lines += ["> **SMOKE RUN** — a plumbing check with a few iterations and a subset of the data. The numbers "
                  "below say nothing about the methods.", ""]
    lines += ["Generated by `benchmarks/" + spec.name + ".py` from `" + f"{spec.name}_{data.get('budget')}" +
              "*.json` (same folder); do not edit by hand.", ""]
    if s:
        sel = s.get("selection", {})
        d0 = (s.get("datasets") or {}).get("labeled_subset") or {}
        d1 = (s.get("datasets") or {}).get("all_labeled") or {}
        lines += [
            "| setting | value |", "|---|---|",
            f"| labeled | {sel.get('description', '')} |",
            f"| nnU-Net cases (labeled / unlabeled / test) | {d0.get('num_labeled')} / {d0.get('num_unlabeled')} / "
            f"{d0.get('num_test')} (upper bound: {d1.get('num_labeled')} labeled) |",
            f"| configuration | `{plan.get('configuration')}`: spacing {plan.get('spacing')}, patch "
            f"{plan.get('patch_size')}, batch {plan.get('batch_size')} (+{plan.get('batch_size')} unlabeled for SSL), "
            f"{plan.get('network')} {plan.get('n_stages')} stages {plan.get('features_per_stage')} |",
            f"| schedule | {s.get('epochs')} epochs x {s.get('iterations_per_epoch')} iterations = "
            f"{s.get('total_iterations')} iterations, fold `all`, final checkpoint, "
            f"{'TTA' if s.get('tta') else 'no TTA'}, seed {s.get('seed')} |",
            f"| device | {s.get('device')} (nnUNet_n_proc_DA={s.get('nnUNet_n_proc_DA')}) |",
            "",
        ]
    classes = spec.classes
    unit = (s.get("labeled_units") or {}).get("unit", "cases")
    head = ["run", f"labeled {unit}"] + [f"{c} Dice" for c in classes] + ["mean Dice", "Δ vs labeled-only",
                                                                   "HD95 mm", "ASD mm", "train time", "peak RAM",
                                                                   "status"]
    lines += ["Dice in % (mean over test volumes), HD95 / ASD in mm (mean over classes of the per-class means over "
              "volumes where both masks are non-empty). Train time: `nnUNetv2_train` wall time (start-up, training" +
              (", nnU-Net's final validation on the training cases" if s.get("final_validation") else "") +
              "); peak RAM: summed resident memory of the training process and "
              "its augmentation workers (polled every second)" + (" and peak GPU memory allocated by torch" if
                                                                     s.get("device") == "cuda" else "") + ".", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = runs.get("nnUNetTrainer", {})
    base_d = (base.get("metrics") or {}).get("mean", {}).get("Dice") if base.get("status") == "ok" else None
    best = None
    for k in _row_order(runs):
        r = runs[k]
        m = r.get("metrics") or {}
        per = m.get("per_class", {})
        mean = m.get("mean", {})
        stale = "†" if s.get("plans_sha256") and r.get("plans_sha256") is not None and not row_is_current(r, s) \
            else ""
        lab = (s.get("labeled_units") or {}).get("all_labeled" if k == UPPER else "labeled_subset")
        d = mean.get("Dice")
        delta = "" if k in ("nnUNetTrainer", UPPER) or d is None or base_d is None else \
            f"{100 * (d - base_d):+.1f}"
        if str(r.get("role", "")).startswith("SSL") and d is not None and r.get("status") == "ok":
            best = max(best or (None, -1), (k, d), key=lambda x: x[1])
        st = r.get("train_stats") or {}
        mem = r.get("train_peak_rss_tree_mb")
        mem_s = fmt_mb(mem)
        if st.get("cuda_peak_allocated_mb"):
            mem_s += f" (GPU {fmt_mb(st['cuda_peak_allocated_mb'])})"
        row = [f"`{k}`{stale}", str(lab or "")] + [fmt_num((per.get(c) or {}).get("Dice"), 100) for c in classes] + \
              [f"**{fmt_num(d, 100)}**" if d is not None else "-", delta, fmt_num(mean.get("HD95_mm")),
               fmt_num(mean.get("ASD_mm")), fmt_s(r.get("train_wall_s")), mem_s, r.get("status", "?")]
        lines.append("| " + " | ".join(row) + " |")
    ref = data.get("reference") or spec.reference
    if ref:
        lines += ["", f"Reference ({ref.get('source')}):", "",
                  "| run | labeled | " + " | ".join(f"{c} Dice" for c in classes) +
                  " | mean Dice | training wall time |",
                  "|" + "---|" * (len(classes) + 4)]
        for row in ref.get("rows", []):
            lines.append(f"| {row['run']} | {row['labeled']} | " + " | ".join(fmt_num(row.get(c)) for c in classes) +
                         f" | {fmt_num(row.get('mean'))} | {row.get('time', '')} |")
    if base_d is not None and best is not None:
        gain = 100 * (best[1] - base_d)
        target = "" if spec.target_gain is None or data.get("budget") != "cpu" else \
            f" (target: at least +{spec.target_gain:.1f} at the CPU budget; " \
            f"{'met' if gain >= spec.target_gain else 'NOT met'})"
        lines += ["", f"Best SSL trainer: `{best[0]}`, {gain:+.1f} Dice points over labeled-only nnU-Net{target}."]
    for key in SELFTRAIN_KEYS:
        st_rec = (runs.get(key) or {}).get("selftrain")
        if not st_rec:
            continue
        how = "as users run it, twice the iterations of the other rows in all" if st_rec.get("teacher_reused") \
            else "within the same total budget"
        reused = f", this seed's `{LABELED_ONLY}` row reused" if st_rec.get("teacher_reused") else ""
        lines += ["", f"`{key}`: one round of `nnunet_ssl self-train` {how}: teacher `{st_rec['teacher']}`{reused} "
                      f"({st_rec['teacher_epochs']} epochs, labeled cases only), pseudo-labels of the unlabeled pool" +
                  (f" ({st_rec['num_pseudo_labeled']} cases kept, {st_rec['num_dropped']} dropped by the case cut "
                   f"{st_rec['case_cut']}; voxels below {st_rec['threshold']} confidence ignored)"
                   if "num_pseudo_labeled" in st_rec else "") +
                  f", student `{st_rec['student']}` ({st_rec['student_epochs']} epochs, labeled + pseudo-labeled). "
                  f"Its train time covers all of it: teacher {fmt_s(st_rec.get('teacher_wall_s'))}, pseudo-labelling "
                  f"+ student dataset + student {fmt_s(st_rec.get('pseudolabel_and_student_wall_s'))}." +
                  _selftrain_diagnostics(st_rec)]
    if CONTROL_2X in runs:
        lines += ["", f"`{CONTROL_2X}`: labeled-only nnU-Net with twice the epochs "
                      f"({runs[CONTROL_2X].get('total_iterations', '2x')} iterations), a control: a trainer that beats "
                      f"labeled-only but not this row may owe its gain to more optimisation, not to the unlabeled "
                      f"data."]
    if any(r.get("status") != "ok" for r in runs.values()):
        lines += ["", "Runs that did not finish (see the JSON for the error and the log path):", ""]
        for k in _row_order(runs):
            r = runs[k]
            if r.get("status") != "ok":
                err = (r.get("error") or "").strip().splitlines()
                lines.append(f"- `{k}`: {r.get('status')}: {err[-1] if err else ''}")
    # distances per class
    lines += ["", "Per class (HD95 / ASD in mm; in voxels as in the literature's tables in parentheses):", "",
              "| run | " + " | ".join(f"{c} HD95" for c in classes) + " | " + " | ".join(f"{c} ASD" for c in classes)
              + " |", "|" + "---|" * (2 * len(classes) + 1)]
    for k in _row_order(runs):
        per = (runs[k].get("metrics") or {}).get("per_class", {})
        if not per:
            continue
        cells = [f"{fmt_num(per[c].get('HD95_mm'))} ({fmt_num(per[c].get('HD95_vox'))})" for c in classes] + \
                [f"{fmt_num(per[c].get('ASD_mm'), nd=2)} ({fmt_num(per[c].get('ASD_vox'), nd=2)})" for c in classes]
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    # how the Dice is lost: over- or under-segmentation
    rows = [k for k in _row_order(runs)
            if any("volume_ratio" in m for m in ((runs[k].get("metrics") or {}).get("per_class") or {}).values())]
    if rows:
        lines += ["", "Predicted / true volume, precision and recall per class (voxels pooled over the test volumes; "
                      "volume > 1 with low precision is over-segmentation, < 1 with low recall under-segmentation):",
                  "", "| run | " + " | ".join(f"{c} volume / precision / recall" for c in classes) + " |",
                  "|" + "---|" * (len(classes) + 1)]
        for k in rows:
            per = runs[k]["metrics"]["per_class"]
            lines.append(f"| `{k}` | " + " | ".join(
                " / ".join(fmt_num(per[c].get(m), nd=2) for m in POOLED)
                for c in classes) + " |")
    lines += ["", "Timing per run (training loop: first to last epoch, without start-up" +
              (" and final validation" if s.get("final_validation") else "") + "):", "",
              "| run | training loop | s / epoch | train wall | predict wall | peak RAM (tree) | max RSS (one process) "
              "| load avg start/end | host | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in _row_order(runs):
        r = runs[k]
        st = r.get("train_stats") or {}
        lines.append(f"| `{k}` | {fmt_s(st.get('train_loop_s'))} | {fmt_num(st.get('epoch_s_mean'))} | "
                     f"{fmt_s(r.get('train_wall_s'))} | {fmt_s(r.get('predict_wall_s'))} | "
                     f"{fmt_mb(r.get('train_peak_rss_tree_mb'))} | {fmt_mb(r.get('train_maxrss_mb'))} | "
                     f"{r.get('loadavg_start', '-')}/{r.get('loadavg_end', '-')} | "
                     f"{(r.get('machine') or {}).get('host', '-')} | {r.get('git') or '-'} |")
    if data.get("protocol_note"):
        lines += ["", data["protocol_note"]]
    if any("†" in ln for ln in lines):
        lines += ["", "† run made with other plans or data than the current setting (stale; rerun it)."]
    return "\n".join(lines) + "\n"


def reorder_list(lines: List[str], first: List[str], key: Callable[[str], str]) -> List[str]:
    """``lines`` with the lines whose ``key`` is in ``first`` moved to the front (in the order of ``first``),
    blocks kept contiguous, the rest in their original order."""
    by = {}
    for ln in lines:
        by.setdefault(key(ln), []).append(ln)
    missing = [f for f in first if f not in by]
    if missing:
        raise ValueError(f"unknown case(s) {missing}")
    head = [ln for f in first for ln in by[f]]
    return head + [ln for ln in lines if key(ln) not in set(first)]


def scratch_source(real: Path, scratch: Path, list_name: str, new_lines: List[str]) -> Path:
    """A folder that mirrors ``real`` with symlinks except ``list_name``, rewritten (for seeded/explicit selections;
    the real data is never copied)."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for item in real.iterdir():
        if item.name != list_name:
            (scratch / item.name).symlink_to(item)
    (scratch / list_name).write_text("\n".join(new_lines) + "\n")
    return scratch


def print_wrapped(text: str) -> None:
    print(textwrap.fill(text, 110))
