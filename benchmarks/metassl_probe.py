#!/usr/bin/env python
"""Probe finished MetaSSL benchmark runs: how the region-weighted loss splits its weight between classes.

    python benchmarks/metassl_probe.py --work /tmp/bench_work/ssl_acdc/cpu \\
        --trainers nnUNetTrainerMetaSSL_paper nnUNetTrainerMetaSSL_voxelMean --batches 20

For each trainer, loads ``checkpoint_final.pth`` of its benchmark run (``<work>/results/*/<trainer>_<tag>__*/fold_all``,
networks and tau sets as they were at the end of training), draws ``--batches`` training batches (labeled +
unlabeled, the run's own augmentation, seeded) and evaluates the trainer's own MetaSSL losses on them without any
optimizer step. The tau sets go on updating from each batch, as in training. Reported per run, pooled over the
batches like the training diagnostics (``metassl_diagnostics.jsonl``):

- ``u_fg_weight`` / ``l_fg_weight``: mean loss weight of a voxel whose target (pseudo-label / label) is foreground,
  over that of a background one. A plain voxel-mean CE gives 1; region means give a voxel of a small region a large
  weight, so when the small regions are mostly foreground the loss favours foreground like a class weight would.
- ``u_frac_R`` / ``u_fgfrac_R``: share of the unlabeled voxels in region ``R``, and foreground share of ``R``.
- The reference's unlabeled thresholds ``tau_ref_u`` (per class) after the batches.

With ``--at-start TRAINER``, the probe also evaluates TRAINER's loss on the labeled-only run's final weights
(``nnUNetTrainer``; student = reference = that network, thresholds from their 0.9 start): the state in which SSL
training would begin from a supervised model. Runs trained before these diagnostics existed are probed the same way.

Writes ``benchmarks/results/<name>.json`` and ``.md`` (``--name``, default ``metassl_probe_<work leaf parent>_<leaf>``).
Needs the run folders of the benchmark (not in the repository); exits 0 with a message when they are absent.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

def find_run(work: Path, trainer: str, tag: str) -> Optional[Path]:
    hits = sorted((work / "results").glob(f"*/{trainer}_{tag}__*__*/fold_all/checkpoint_final.pth"))
    return hits[0].parent if hits else None


def probe(work: Path, trainer: str, run_dir: Path, batches: int, seed: int,
          checkpoint_of: Optional[Path] = None) -> Dict[str, float]:
    """Evaluate ``trainer``'s MetaSSL losses on ``batches`` batches with the weights of ``checkpoint_of``
    (default: ``run_dir``'s final checkpoint); return the pooled diagnostics and the final thresholds."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_ssl.algorithms.metassl import RegionCounter
    from nnunet_ssl.trainers import all_trainers

    # the folder name is <trainer>_<tag>__<plans>__<configuration>
    _, plans_name, configuration = run_dir.parent.name.split("__")
    dataset = run_dir.parent.parent.name
    pre = work / "preprocessed" / dataset
    cls = all_trainers()[trainer]
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    plans = load_json(str(pre / f"{plans_name}.json"))
    plans["continue_training"] = False  # nnUNetv2_train passes this flag inside the plans
    tr = cls(plans=plans, configuration=configuration, fold="all", dataset_json=load_json(str(pre / "dataset.json")),
             device=torch.device("cpu"))
    tr.on_train_start()
    # --at-start: a plain nnU-Net checkpoint has no SSL state, so the teacher starts from its weights and tau from
    # tau_init, as when SSL training begins from a supervised model
    tr.load_checkpoint(str((checkpoint_of or run_dir) / "checkpoint_final.pth"))
    counters: Dict[str, RegionCounter] = {}
    with torch.no_grad():  # networks stay in training mode, as in the training steps being imitated
        for _ in range(batches):
            batch = next(tr.dataloader_train)
            target = batch["target"]
            target = [t.to(tr.device) for t in target] if isinstance(target, list) else target.to(tr.device)
            unlabeled = next(tr.dataloader_unlabeled)["data"].to(tr.device)
            tr._metassl_pending = []
            tr.compute_losses(batch["data"].to(tr.device), target, unlabeled)
            for key, stats in tr._metassl_pending:  # key = kind + direction suffix, e.g. "u", "shadow_1"
                kind = key.split("_")[0]
                counters.setdefault(key, RegionCounter(kind, tr.metassl.regions, key[len(kind):])).add(stats)
    out: Dict[str, float] = {}
    for counter in counters.values():
        out.update(counter.summary())
    out.update(tr.metassl.threshold_diagnostics())
    return out


# every region name of either UC setting, in table order
REGIONS = ("UCfg", "UCbg", "UC", "US", "DC", "DS")


def directions(v: Dict[str, float]) -> List[str]:
    """Diagnostics key suffixes of a run: "" for one direction, "_1" and "_2" for CPS."""
    return [""] if "u_fg_weight" in v else ["_1", "_2"]


def render(rows: Dict[str, Dict[str, float]], batches: int, work: Path) -> str:
    regions = [r for r in REGIONS if any(k.startswith(f"u_frac_{r}") for v in rows.values() for k in v)]
    def f(x: Optional[float], nd: int = 2) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"

    lines = [f"# MetaSSL probe: {work}", "",
             f"{batches} training batches per run (labeled + unlabeled, the run's augmentation, seeded), evaluated "
             "with the run's final weights and no optimizer step (`benchmarks/metassl_probe.py`). "
             "`u_fg_weight`: mean loss weight of a foreground-pseudo-labelled unlabeled voxel over a "
             "background one (1 = plain voxel-mean CE); `l_fg_weight`: the same on labeled voxels (target y*). "
             "Then, per unlabeled region: share of the unlabeled voxels / foreground share of the region.", "",
             "A run with one UC region (`split_uc=False`) fills the UC column.", "",
             "| run | u_fg_weight | l_fg_weight | fg share of pseudo-labels | "
             + " | ".join(f"{r} frac / fg" for r in regions) + " |",
             "|---" * (4 + len(regions)) + "|"]
    for name, v in rows.items():
        for sfx in directions(v):
            present = [r for r in regions if f"u_frac_{r}{sfx}" in v]
            fg = sum(v[f"u_frac_{r}{sfx}"] * v[f"u_fgfrac_{r}{sfx}"]
                     for r in present if not math.isnan(v[f"u_fgfrac_{r}{sfx}"]))
            cells = [f(v.get(f"u_fg_weight{sfx}"), 1), f(v.get(f"l_fg_weight{sfx}"), 1), f"{100 * fg:.1f} %"]
            cells += [f"{100 * v[f'u_frac_{r}{sfx}']:.1f} % / {f(v[f'u_fgfrac_{r}{sfx}'])}"
                      if r in present else "" for r in regions]
            head = f"`{name}`" + (f" (direction {sfx[1:]})" if sfx else "")
            lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, required=True,
                   help="the benchmark's work folder, e.g. /tmp/bench_work/ssl_acdc/cpu")
    p.add_argument("--trainers", nargs="+", required=True, help="MetaSSL trainer names (finished runs)")
    p.add_argument("--tag", default="benchCpu", help="budget tag of the run folders (default benchCpu)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--at-start", default=None, metavar="TRAINER",
                   help="also probe TRAINER's loss on the labeled-only run's weights (nnUNetTrainer_<tag>)")
    p.add_argument("--name", default=None, help="results file name (without extension)")
    a = p.parse_args(argv)
    if a.batches < 1:
        p.error(f"--batches must be >= 1, got {a.batches}")
    work = a.work.resolve()
    if not (work / "results").is_dir():
        print(f"[metassl_probe] no benchmark runs under {work}/results: nothing to probe (run the benchmark first)")
        return C.SKIP_EXIT_CODE
    env = C.nnunet_env(work, "cpu")
    env["nnUNet_n_proc_DA"] = "0"  # one process: the probe is short and must be reproducible
    scratch = Path(tempfile.mkdtemp(prefix="metassl_probe_"))
    env["nnUNet_results"] = str(scratch)  # the trainers' logs and folders go here, never into the runs
    os.environ.update(env)

    from nnunet_ssl.trainers import all_trainers
    from nnunet_ssl.trainers.nnUNetTrainerMetaSSL import MetaSSLMixin

    known = all_trainers()
    for t in a.trainers + ([a.at_start] if a.at_start else []):
        if t not in known or not issubclass(known[t], MetaSSLMixin):
            metassl = sorted(n for n, c in known.items() if issubclass(c, MetaSSLMixin) and "_ssl" not in n)
            p.error(f"{t!r} is not a MetaSSL trainer; choose from {', '.join(metassl)}")
    jobs = []
    for t in a.trainers:
        run = find_run(work, t, a.tag)
        if run is None:
            p.error(f"no finished run of {t} under {work}/results (looked for */{t}_{a.tag}__*/fold_all/"
                    "checkpoint_final.pth); check --trainers and --tag")
        jobs.append((t, t, run, None))
    if a.at_start:
        lo = find_run(work, "nnUNetTrainer", a.tag)
        like = find_run(work, a.at_start, a.tag)
        if lo is None or like is None:
            p.error(f"--at-start needs finished runs of nnUNetTrainer and {a.at_start} under {work}/results")
        jobs.insert(0, (f"{a.at_start} on labeled-only weights", a.at_start, like, lo))

    name = a.name or f"metassl_probe_{work.parent.name}_{work.name}"
    rows: Dict[str, Dict[str, float]] = {}
    for i, (label, trainer, run, weights_of) in enumerate(jobs):
        print(f"[metassl_probe] {i + 1}/{len(jobs)} {label}: {a.batches} batches", flush=True)
        # nnU-Net prints plans and banners on start; keep them in the scratch folder
        with open(scratch / f"trainer_stdout_{i}.txt", "w") as sink, contextlib.redirect_stdout(sink):
            rows[label] = probe(work, trainer, run, a.batches, a.seed, weights_of)
        print("    " + ", ".join(f"{k} {v:.3g}" for k, v in rows[label].items() if "fg_weight" in k), flush=True)
        # after every run, so an interruption loses only the run in progress
        C.write_json_atomic(C.RESULTS_DIR / f"{name}.json",
                            {"work": str(work), "batches": a.batches, "seed": a.seed, "git": C.git_commit(),
                             "created": C.now_iso(), "runs": rows})
        C.write_text_atomic(C.RESULTS_DIR / f"{name}.md", render(rows, a.batches, work))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"[metassl_probe] wrote {C.RESULTS_DIR / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
