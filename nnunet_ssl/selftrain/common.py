"""Shared pieces of offline self-training: the error class, the default thresholds, the teacher model spec.

Default thresholds, and why
---------------------------
nnU-Net's softmax is very polarised: trained with Dice + CE and deep supervision, it puts the large majority of
voxels above 0.99 *even where it is wrong*, and the fold ensemble (logits averaged over folds) sharpens it only a
little. Confidence therefore separates "boundary band and genuinely ambiguous tissue" from "everything else", not
right from wrong. The defaults are chosen for that regime:

``DEFAULT_THRESHOLD = 0.9`` (voxel level, ``--threshold``)
    Voxels whose maximum class probability is below 0.9 become nnU-Net's ignore label in the student's labels.
    Below 0.9 is almost only the one-to-two-voxel band along predicted boundaries and truly ambiguous regions
    (partial volume, low contrast), where the teacher's hard label is close to a coin toss; ignoring them removes
    the teacher's boundary guesses while keeping nearly all of the volume (typically a few percent ignored).
    Lower values (0.5-0.7) are close to a no-op for few classes (the maximum of K probabilities is >= 1/K anyway);
    higher ones (0.99) start to ignore whole thin structures and the boundary of every object systematically,
    so the student would never see a pseudo-labeled boundary. The boundary itself is still learned from the truly
    labeled cases. ``0`` switches voxel filtering off (no ignore label is added).

``DEFAULT_CASE_CUT = 0.8`` (case level, ``--case-cut``)
    A whole case is dropped when the mean confidence over its *predicted foreground* is below 0.8. The mean over
    all voxels is useless as a case score (background dominates and is >= 0.99 in nearly every case); over the
    predicted foreground it measures how much of what the teacher segments it is unsure about. With interior
    voxels at ~0.99 and ambiguous ones at ~0.6-0.7, a foreground mean of 0.8 means roughly two thirds of the
    predicted foreground is ambiguous: the teacher does not know what it is segmenting (unusual anatomy,
    artefacts, another protocol), which is where whole-structure errors (hallucinated or swapped structures)
    concentrate. The cut is gentle on purpose: small structures have a large boundary-to-volume ratio, so a
    correct small lesion can score ~0.85. A case with no predicted foreground has no score; it is dropped
    while the cut is active (for datasets where every case holds the structure an empty prediction is a failure
    far more often than the truth) and kept with ``--case-cut 0``, which switches case filtering off.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

#: voxel level: confidence < threshold -> ignore label (see module docstring)
DEFAULT_THRESHOLD = 0.9
#: case level: mean confidence over predicted foreground < cut -> case dropped (see module docstring)
DEFAULT_CASE_CUT = 0.8
#: the student nnU-Net trainer used by ``self-train`` unless told otherwise
DEFAULT_STUDENT_TRAINER = "nnUNetTrainerNoisyStudent"

Fold = Union[int, str]


class SelfTrainingError(RuntimeError):
    """Bad input or refused operation in pseudo-labelling / self-training; the message names the file or value."""


def check_fraction(value: float, option: str) -> float:
    """``value`` as float in [0, 1], else one clear error naming ``option``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SelfTrainingError(f"{option} {value!r} is not a number; give a value in [0, 1]") from None
    if not 0.0 <= v <= 1.0 or v != v:
        raise SelfTrainingError(f"{option} {value} is outside [0, 1]: it is a probability (confidence), "
                                f"e.g. {option} {DEFAULT_THRESHOLD}")
    return v


def parse_folds(folds: Optional[Sequence[Fold]]) -> Optional[Tuple[Fold, ...]]:
    """``["0", "1"]`` -> ``(0, 1)``; ``["all"]`` -> ``("all",)``; None stays None (= every trained fold)."""
    if folds is None:
        return None
    out = []
    for f in folds:
        if str(f) == "all":
            out.append("all")
        else:
            try:
                out.append(int(f))
            except ValueError:
                raise SelfTrainingError(f"fold '{f}' is not a fold number or 'all' (-f)") from None
    if not out:
        raise SelfTrainingError("no fold given (-f): give fold numbers, 'all', or leave -f out to use every "
                                "trained fold")
    if len(set(out)) != len(out):
        raise SelfTrainingError(f"fold list {list(folds)} repeats a fold (-f)")
    return tuple(out)


def folds_tag(folds: Sequence[Fold]) -> str:
    """``(0,)`` -> ``f0``; ``(0, 1, 2)`` -> ``f0-1-2``; ``("all",)`` -> ``fall``."""
    return "f" + "-".join(str(f) for f in folds)


def nnunet_env_path(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise SelfTrainingError(f"{var} is not set: nnU-Net's environment variables nnUNet_raw, nnUNet_preprocessed "
                                f"and nnUNet_results must point to your nnU-Net folders")
    return value


def ensure_ext_trainer_env() -> None:
    """Put this package's trainer folder into ``nnUNet_extTrainer`` so nnU-Net finds our trainers by name.

    Needed by the predictor (it rebuilds the network through the trainer class named in the checkpoint) and by
    the ``nnUNetv2_train`` subprocesses (they inherit the environment).
    """
    from nnunet_ssl.nnunet_ext import TRAINER_DIR

    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if not any(os.path.abspath(p) == TRAINER_DIR for p in current):
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [TRAINER_DIR])


def check_trainer_exists(name: str, option: str = "-tr") -> None:
    """Fail early, with the list command, when nnU-Net cannot find a trainer class of that name."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    import contextlib
    import io

    ensure_ext_trainer_env()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its search path
            cls = recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        cls = None
    if cls is None:
        raise SelfTrainingError(f"unknown trainer '{name}' ({option}): neither nnU-Net nor nnunet_ssl defines it; "
                                f"`nnunet_ssl list-trainers` lists this package's trainers")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ModelSpec:
    """A trained nnU-Net model: ``nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>/<checkpoint>``.

    ``folds`` None means every fold that holds ``checkpoint`` (as nnUNetv2_predict does without -f).
    """
    dataset: str
    configuration: str
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    folds: Optional[Tuple[Fold, ...]] = None
    checkpoint: str = "checkpoint_final.pth"

    @property
    def model_folder(self) -> str:
        return os.path.join(nnunet_env_path("nnUNet_results"), self.dataset,
                            f"{self.trainer}__{self.plans}__{self.configuration}")

    def train_command(self, fold: Fold = 0) -> str:
        return (f"nnUNetv2_train {self.dataset} {self.configuration} {fold} -tr {self.trainer} -p {self.plans}")

    def resolve_folds(self) -> Tuple[Fold, ...]:
        """The folds to use; every one must hold the checkpoint, else one clear error naming the missing file."""
        folder = self.model_folder
        if not os.path.isdir(folder):
            raise SelfTrainingError(
                f"no trained model: {folder} does not exist. Train it first, e.g. `{self.train_command()}` "
                f"(or pass the right -tr/-p/-c)")
        for f in ("dataset.json", "plans.json"):
            if not os.path.isfile(os.path.join(folder, f)):
                raise SelfTrainingError(f"no trained model: {os.path.join(folder, f)} is missing; the model folder is "
                                        f"incomplete. Train it with `{self.train_command()}`")
        if self.folds is None:
            found = []
            for d in sorted(os.listdir(folder)):
                if d.startswith("fold_") and os.path.isfile(os.path.join(folder, d, self.checkpoint)):
                    tag = d[len("fold_"):]
                    if tag != "all":
                        found.append(int(tag))
            if not found and os.path.isfile(os.path.join(folder, "fold_all", self.checkpoint)):
                found = ["all"]
            if not found:
                raise SelfTrainingError(f"no trained model: no fold in {folder} has {self.checkpoint}. Train one, e.g. "
                                        f"`{self.train_command()}`, or pass -chk")
            return tuple(sorted(found, key=str))
        missing = [os.path.join(folder, f"fold_{f}", self.checkpoint) for f in self.folds
                   if not os.path.isfile(os.path.join(folder, f"fold_{f}", self.checkpoint))]
        if missing:
            raise SelfTrainingError(
                f"no trained model for fold(s) {[m.split(os.sep)[-2][5:] for m in missing]}: {missing[0]} is missing. "
                f"Train it (`{self.train_command(missing[0].split(os.sep)[-2][5:])}`), or choose other -f / -chk")
        return tuple(self.folds)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["folds"] = None if self.folds is None else list(self.folds)
        d["model_folder"] = self.model_folder
        return d


def atomic_write_json(obj, path: Union[str, Path]) -> None:
    """Write JSON through a temporary file and ``os.replace`` so a reader never sees a truncated file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_json(path: Union[str, Path]) -> dict:
    with open(path) as f:
        return json.load(f)


def trained_iterations(model_folder: str, folds: Sequence[Fold]) -> List[int]:
    """Iterations each fold was trained for (``num_epochs x num_iterations_per_epoch`` from nnU-Net's debug.json)."""
    out = []
    for f in folds:
        p = os.path.join(model_folder, f"fold_{f}", "debug.json")
        if not os.path.isfile(p):
            out.append(None)
            continue
        d = load_json(p)
        try:
            out.append(int(d["num_epochs"]) * int(d["num_iterations_per_epoch"]))
        except (KeyError, ValueError):
            out.append(None)
    return out
