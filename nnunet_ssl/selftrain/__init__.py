"""Offline self-training (noisy student) with stock nnU-Net: pseudo-label the unlabeled scans, retrain, repeat.

- :func:`predict_pseudolabels`: hard pseudo-labels, confidence and entropy maps and per-case summaries for every
  case of ``imagesUnlabeled/`` (``nnunet_ssl pseudolabel``).
- :func:`run_self_training`: N rounds of pseudo-label -> student dataset (labeled + filtered pseudo-labeled cases,
  teacher's plans, pseudo-labeled cases training-only in every fold) -> stock nnU-Net training of a noisier student
  (``nnunet_ssl self-train``).
- Defaults and their reasoning: :mod:`nnunet_ssl.selftrain.common`.
"""
from nnunet_ssl.selftrain.common import (DEFAULT_CASE_CUT, DEFAULT_STUDENT_TRAINER, DEFAULT_THRESHOLD, ModelSpec,
                                         SelfTrainingError, trained_iterations)
from nnunet_ssl.selftrain.pseudolabel import (apply_confidence_threshold, confidence_and_entropy,
                                              default_output_folder, predict_pseudolabels, read_map,
                                              summarize_case)
from nnunet_ssl.selftrain.selftrain import (RoundResult, SelfTrainingResult, StudentDataset, build_student_dataset,
                                            prepare_student_dataset, run_self_training, select_cases,
                                            student_splits, train_model)

__all__ = [
    "DEFAULT_CASE_CUT", "DEFAULT_STUDENT_TRAINER", "DEFAULT_THRESHOLD", "ModelSpec", "SelfTrainingError",
    "trained_iterations", "apply_confidence_threshold", "confidence_and_entropy", "default_output_folder",
    "predict_pseudolabels", "read_map", "summarize_case", "RoundResult", "SelfTrainingResult", "StudentDataset",
    "build_student_dataset", "prepare_student_dataset", "run_self_training", "select_cases", "student_splits",
    "train_model",
]
