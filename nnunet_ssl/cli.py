"""``nnunet_ssl`` console script: thin wrappers over the library.

    nnunet_ssl trainer-dir                       folder for nnUNet_extTrainer
    nnunet_ssl list-trainers                     every trainer this package adds
    nnunet_ssl preprocess-unlabeled -d ID -c CONFIG [-p PLANS] [-np N]
    nnunet_ssl plan-and-preprocess -d ID [-c CONFIG ...] [-pl PLANNER] [-np N]
    nnunet_ssl demo [-o FOLDER]                  synthetic end-to-end run: labeled-only vs Mean Teacher
    nnunet_ssl convert NAME ...                  dataset conversion scripts
    nnunet_ssl evaluate PRED REF ...             Dice / HD95 / ASD per class
    nnunet_ssl pseudolabel -d ID -c CONFIG [-tr TRAINER] [-p PLANS] [-f FOLDS ...] [-chk CHK] [-o OUT]
                           [-num_parts N -part_id K]
                                                 pseudo-labels + confidence/entropy maps of imagesUnlabeled/
    nnunet_ssl self-train -d ID -c CONFIG --rounds N [--student-trainer TRAINER] [--student-id ID]
                          [--pseudolabels DIR] ...
                                                 offline self-training (noisy student) with stock nnU-Net
    nnunet_ssl --version

Every command answers ``-h`` (``nnunet_ssl convert NAME -h`` for a converter) and reports bad input as one
``nnunet_ssl: error: ...`` line with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from typing import Dict, List, Optional

from nnunet_ssl.cli_common import Parser, first_sentence, print_error


def _trainer_dir(args) -> int:
    from nnunet_ssl.nnunet_ext import TRAINER_DIR

    print(TRAINER_DIR)
    return 0


def trainer_description(cls: type) -> str:
    """One line about a trainer class, a whole sentence (or two for a variant).

    The first sentence of its own docstring; else, for the class a file is named after, of the file's docstring;
    else (a variant) its nearest trainer base's description plus what the variant sets or overrides.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    own = first_sentence(cls.__dict__.get("__doc__"))
    if own:
        return own
    module = sys.modules.get(cls.__module__)
    if module is not None and module.__name__.rsplit(".", 1)[-1] == cls.__name__:
        from_module = first_sentence(module.__doc__)
        if from_module:
            return from_module
    base = next((b for b in cls.__mro__[1:] if issubclass(b, nnUNetTrainer)), None)
    if base is None:
        return "nnU-Net's own trainer (labeled data only)." if cls is nnUNetTrainer else \
            f"nnU-Net trainer {cls.__name__}."
    changes = [f"overrides {k}()" if callable(v) or isinstance(v, (staticmethod, classmethod, property))
               else f"{k} = {v!r}" for k, v in cls.__dict__.items() if not k.startswith("__")]
    return f"{trainer_description(base)} Variant: {', '.join(changes) or f'a subclass of {base.__name__}'}."


def _list_trainers(args) -> int:
    from nnunet_ssl.trainers import all_trainers

    for name, cls in sorted(all_trainers().items()):
        print(f"{name:48s} {trainer_description(cls)}")
    return 0


def _preprocess_unlabeled(args) -> int:
    from nnunet_ssl.data.unlabeled import preprocess_unlabeled

    for c in args.c:
        out = preprocess_unlabeled(args.d, c, args.p, args.np)
        print(f"Unlabeled cases for configuration {c} written to {out}")
    return 0


def _plan_and_preprocess(args) -> int:
    cmd = ["nnUNetv2_plan_and_preprocess", "-d", str(args.d), "-c", *args.c, "-np",
           *[str(args.np)] * len(args.c)]
    if args.pl:
        cmd += ["-pl", args.pl]
    if args.verify_dataset_integrity:
        cmd.append("--verify_dataset_integrity")
    print("Running:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"nnUNetv2_plan_and_preprocess failed with exit code {rc}", file=sys.stderr)
        return rc
    plans = args.p
    if plans is None:
        plans = "nnUNetResEncUNetMPlans" if args.pl == "nnUNetPlannerResEncM" else \
            "nnUNetResEncUNetLPlans" if args.pl == "nnUNetPlannerResEncL" else \
            "nnUNetResEncUNetXLPlans" if args.pl == "nnUNetPlannerResEncXL" else "nnUNetPlans"
    from nnunet_ssl.data.unlabeled import preprocess_unlabeled

    for c in args.c:
        print(f"Unlabeled cases for {c}: {preprocess_unlabeled(args.d, c, plans, args.np)}")
    return 0


def _demo(args) -> int:
    from nnunet_ssl.demo import run_demo

    return run_demo(args.output, configuration=args.c, device=args.device)


def converters() -> Dict[str, str]:
    """Converter name -> one-line description (the first sentence of its module's docstring)."""
    from nnunet_ssl.dataset_conversion import CONVERTERS

    return {name: first_sentence(importlib.import_module(f"nnunet_ssl.dataset_conversion.{module}").__doc__)
            for name, module in sorted(CONVERTERS.items())}


def _converter_list() -> str:
    listed = converters()
    width = max(map(len, listed), default=0) + 2
    return "converters (nnunet_ssl convert NAME -h shows one's options):\n" + "\n".join(
        f"  {name:{width}s}{text}" for name, text in listed.items())


def _convert(args, rest: List[str]) -> int:
    from nnunet_ssl.dataset_conversion import CONVERTERS

    parser = args.convert_parser
    parser.epilog = _converter_list()
    if args.name is None and args.help:
        parser.print_help()
        return 0
    if args.name not in CONVERTERS:
        formatter = parser._get_formatter()
        formatter.add_text(parser.epilog)
        print(formatter.format_help(), end="", file=sys.stderr)
        parser.error("no converter named: name one of the converters listed above" if args.name is None else
                     f"unknown converter '{args.name}': name one of the converters listed above")
    module = importlib.import_module(f"nnunet_ssl.dataset_conversion.{CONVERTERS[args.name]}")
    return int(module.main((["-h"] if args.help else []) + rest) or 0)


def _evaluate(rest: List[str]) -> int:
    from nnunet_ssl.evaluation import main as evaluate_main

    return int(evaluate_main(rest) or 0)


def _pseudolabel(args) -> int:
    from nnunet_ssl.selftrain import predict_pseudolabels

    out = predict_pseudolabels(args.d, args.c, args.tr, args.p, args.f, args.chk, args.o, args.threshold,
                               not args.disable_tta, args.step_size, args.device, args.npp, args.nps,
                               args.overwrite, num_parts=args.num_parts, part_id=args.part_id)
    part = f" (part {args.part_id} of -num_parts {args.num_parts})" if args.num_parts > 1 else ""
    print(f"Pseudo-labels, confidence and entropy maps{part} written to {out}")
    return 0


def _self_train(args) -> int:
    from nnunet_ssl.selftrain import run_self_training

    result = run_self_training(args.d, args.c, args.rounds, args.tr, args.p, args.f, args.chk, args.student_trainer,
                               args.student_id, args.threshold, args.case_cut, args.train_teacher,
                               not args.disable_tta, args.step_size, args.device, args.npp, args.nps, args.np,
                               args.overwrite, pseudolabels=args.pseudolabels)
    for r in result.rounds:
        print(f"round {r.round}: {r.student_dataset} ({len(r.pseudo_labeled)} pseudo-labeled, {len(r.dropped)} "
              f"dropped) -> {r.student_model_folder}")
    print(f"Final student: {result.final_model_folder}")
    return 0


def _add_model_arguments(s: argparse.ArgumentParser, trainer_help: str) -> None:
    """The teacher model, named as for nnUNetv2_predict."""
    s.add_argument("-d", required=True, help="dataset id or name (its imagesUnlabeled/ is pseudo-labeled)")
    s.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    s.add_argument("-tr", default="nnUNetTrainer", help=trainer_help)
    s.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    s.add_argument("-f", nargs="+", default=None,
                   help="folds of the fold ensemble (default: every fold with a checkpoint); 'all' for fold_all")
    s.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")


def _add_prediction_arguments(s: argparse.ArgumentParser) -> None:
    from nnunet_ssl.selftrain.common import DEFAULT_THRESHOLD

    s.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="voxel confidence threshold in [0, 1]: voxels below it are counted as unconfident in the "
                        "summaries and become the ignore label in self-training")
    s.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    s.add_argument("-step_size", type=float, default=0.5, help="sliding-window step size")
    s.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda if available)")
    s.add_argument("-npp", type=int, default=2, help="preprocessing worker processes (0: none)")
    s.add_argument("-nps", type=int, default=2, help="resampling/export worker processes (0: none)")
    s.add_argument("--overwrite", action="store_true", help="redo instead of resuming")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from nnunet_ssl import __version__

    try:
        nnunet = version("nnunetv2")
    except PackageNotFoundError:
        nnunet = "not installed"
    return f"nnunet_ssl {__version__} (nnunetv2 {nnunet}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="nnunet_ssl", description="Semi-supervised segmentation for nnU-Net v2. "
                                              "`nnunet_ssl COMMAND -h` shows a command's options.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("trainer-dir", help="print the folder to put in nnUNet_extTrainer",
                       description="Print the folder to put in nnUNet_extTrainer, so that nnUNetv2_train and "
                                   "nnUNetv2_predict find this package's trainers: "
                                   "export nnUNet_extTrainer=$(nnunet_ssl trainer-dir)")
    s.set_defaults(func=_trainer_dir)
    s = sub.add_parser("list-trainers", help="list the trainers this package adds",
                       description="List every trainer this package adds, one line each: name and description.")
    s.set_defaults(func=_list_trainers)

    s = sub.add_parser("preprocess-unlabeled", help="preprocess imagesUnlabeled/ with the plans' own preprocessor",
                       description="Preprocess imagesUnlabeled/ of a planned dataset with the plans' own "
                                   "preprocessor (same cropping, resampling, normalisation as imagesTr).")
    s.add_argument("-d", required=True, help="dataset id or name")
    s.add_argument("-c", nargs="+", required=True, help="configuration(s), e.g. 3d_fullres")
    s.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    s.add_argument("-np", type=int, default=4, help="worker processes")
    s.set_defaults(func=_preprocess_unlabeled)

    s = sub.add_parser("plan-and-preprocess", help="nnUNetv2_plan_and_preprocess + preprocess-unlabeled",
                       description="Run nnUNetv2_plan_and_preprocess, then preprocess-unlabeled for every "
                                   "configuration.")
    s.add_argument("-d", required=True, help="dataset id")
    s.add_argument("-c", nargs="+", default=["2d", "3d_fullres"], help="configurations")
    s.add_argument("-pl", default=None, help="experiment planner, e.g. nnUNetPlannerResEncM")
    s.add_argument("-p", default=None, help="plans identifier (default: derived from -pl)")
    s.add_argument("-np", type=int, default=4, help="worker processes")
    s.add_argument("--verify_dataset_integrity", action="store_true", help="nnU-Net's dataset integrity check")
    s.set_defaults(func=_plan_and_preprocess)

    from nnunet_ssl.demo import DEFAULT_FOLDER

    s = sub.add_parser("demo", help="synthetic end-to-end run: labeled-only nnU-Net vs Mean Teacher",
                       description="Generate a small synthetic dataset, plan and preprocess it, train labeled-only "
                                   "nnU-Net and Mean Teacher with one short budget, predict the test cases and "
                                   "print a Dice table. The work folder (datasets, models with progress.png and "
                                   "progress_ssl.png, predictions, logs/) is kept.")
    s.add_argument("-o", "--output", default=DEFAULT_FOLDER,
                   help="work folder, kept at the end; an earlier demo's folder is replaced")
    s.add_argument("-c", default="2d", help="configuration")
    s.add_argument("-device", "--device", default=None, help="cuda or cpu (default: cuda if available)")
    s.set_defaults(func=_demo)

    s = sub.add_parser("convert", help="dataset conversion (nnunet_ssl convert -h lists the converters)",
                       description="Convert a dataset into nnU-Net's raw layout with an unlabeled pool "
                                   "(imagesUnlabeled/) and a split record (ssl_split.json).",
                       usage="nnunet_ssl convert [-h] NAME [options]", add_help=False)
    s.add_argument("name", nargs="?", metavar="NAME", help="converter, one of those listed below")
    s.add_argument("-h", "--help", action="store_true",
                   help="show this help (after NAME: that converter's help) and exit")
    s.set_defaults(func=_convert, passthrough=True, convert_parser=s)

    s = sub.add_parser("pseudolabel", help="pseudo-labels, confidence and entropy maps for imagesUnlabeled/",
                       description="Predict every case of imagesUnlabeled/ with nnU-Net's predictor (fold ensemble) "
                                   "and write hard pseudo-labels, confidence (max probability) and entropy maps in "
                                   "the dataset's image format plus a JSON summary per case. Resumable: finished "
                                   "cases are skipped. Output: <model folder>/pseudolabels_<folds>[_noTTA]/ "
                                   "unless -o is given. With -num_parts N -part_id K (as nnUNetv2_predict), N runs "
                                   "on N machines or GPUs label disjoint shares of the cases into one folder.")
    _add_model_arguments(s, "trainer of the model")
    s.add_argument("-o", default=None, help="output folder (default: pseudolabels_<folds>[_noTTA]/ in the model "
                                            "folder)")
    s.add_argument("-num_parts", type=int, default=1,
                   help="number of runs that share the cases (one per machine or GPU), each with its own -part_id")
    s.add_argument("-part_id", type=int, default=0,
                   help="which share this run labels: 0..num_parts-1 (cases sorted(cases)[part_id::num_parts])")
    _add_prediction_arguments(s)
    s.set_defaults(func=_pseudolabel)

    from nnunet_ssl.selftrain.common import DEFAULT_CASE_CUT, DEFAULT_STUDENT_TRAINER

    s = sub.add_parser("self-train", help="offline self-training (noisy student) with stock nnU-Net",
                       description="Rounds of: pseudo-label imagesUnlabeled/ with the teacher, build a new dataset "
                                   "(labeled + filtered pseudo-labeled cases, teacher's plans, pseudo-labeled cases "
                                   "never validated on), train a noisier student with nnUNetv2_train. Round r+1's "
                                   "teacher is round r's student. Resumable.")
    _add_model_arguments(s, "trainer of the teacher")
    s.add_argument("--rounds", type=int, default=1, help="self-training rounds")
    s.add_argument("--student-trainer", default=DEFAULT_STUDENT_TRAINER,
                   help="nnU-Net trainer of the students (the default adds stronger augmentation)")
    s.add_argument("--student-id", type=int, default=None,
                   help="dataset id of round 1's student dataset; round r uses ID+r-1 (default: the lowest free id "
                        "above the teacher's)")
    s.add_argument("--case-cut", type=float, default=DEFAULT_CASE_CUT,
                   help="drop a case whose mean confidence over its predicted foreground is below this, in [0, 1] "
                        "(0 keeps every case)")
    s.add_argument("--pseudolabels", default=None, metavar="DIR",
                   help="round 1 uses these pseudo-labels of the teacher (output of nnunet_ssl pseudolabel, e.g. "
                        "made in parts on several machines) instead of labelling again; checked to be complete")
    s.add_argument("--train-teacher", action="store_true",
                   help="train missing teacher folds first with nnUNetv2_train (default: error if missing)")
    s.add_argument("-np", type=int, default=2, help="preprocessing processes for the student dataset")
    _add_prediction_arguments(s)
    s.set_defaults(func=_self_train)

    s = sub.add_parser("evaluate", help="Dice / HD95 / ASD per class of a prediction folder", add_help=False)
    s.set_defaults(func=lambda a, rest: _evaluate(rest), passthrough=True)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    from nnunet_ssl.data.unlabeled import UnlabeledDataError
    from nnunet_ssl.selftrain.common import SelfTrainingError

    try:
        if getattr(args, "passthrough", False):
            return args.func(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except (UnlabeledDataError, SelfTrainingError) as e:
        print_error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
