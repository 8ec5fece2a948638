"""BCP, bidirectional copy-paste (Bai et al., CVPR 2023), as an nnU-Net trainer. Specification: ``specs/bcp.md``.

Stage 1 (first ``pretrain_fraction`` of the epochs): labeled-only copy-paste (a box of case ``(i + 1) mod B`` pasted
into case ``i``, with its ground truth), nnU-Net's loss. Stage 2 (from epoch ``E_pre``, teacher reset to the student):
Mean Teacher; one box per step shared by ``X_LU`` (labeled box, unlabeled background) and ``X_UL``; targets = ground
truth + the teacher's argmax (largest component per class) on the *clean* unlabeled patch. Loss ``sup + alpha unsup``
(alpha = ``lambda_max``), ``sup / unsup = 1/2 sum_d l(R_lab,d) / l(R_pse,d)``: nnU-Net's Dice+CE at every DS scale,
the other region set to an ignore label (the dataset's, else ``C``). The stage follows ``current_epoch`` and the base
class checkpoints the teacher, so ``--c`` resumes either stage. DDP: each rank draws its own box. It only shapes that
rank's inputs and targets; gradients and batch-Dice statistics are summed over ranks anyway, so nothing must agree,
and per-rank boxes give more box positions per step at no communication cost.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from nnunet_ssl.algorithms.bcp import (DEFAULT_BOX_FRACTION, bcp_pairs, bidirectional_mix,
                                       largest_component_per_class, pretrain_mix, random_box, region_targets_ds,
                                       stage_boundary)
from nnunet_ssl.algorithms.labels import class_argmax
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL

_COUNT = "bcp#"  # prefix of per-step counts that finalize_metrics turns into epoch ratios


class nnUNetTrainerBCP(nnUNetTrainerSSL):
    num_stages = 2
    lambda_max = 0.5                # alpha, the weight of the pseudo-labeled regions; constant (spec 3)
    rampup_fraction = 0.0
    ema_decay = 0.99
    ema_warmup = False
    pretrain_fraction = 0.25        # stage 1 share of the epochs
    box_fraction = DEFAULT_BOX_FRACTION  # beta: box side / patch side on every axis
    pseudo_label_lcc = True         # largest connected component per class of the teacher's argmax
    pretrain_region_split = False   # True: stage-1 loss = mean of the box and outside-box losses (ACDC script)
    box_seed: Optional[int] = None  # None: drawn from torch's RNG

    def build_method_modules(self) -> None:
        super().build_method_modules()
        lm = self.label_manager
        self.region_ignore = lm.ignore_label if lm.has_ignore_label else lm.num_segmentation_heads
        self.region_loss = self.build_loss_with_ignore_label(self.region_ignore)
        self.box_generator = self.method_generator(self.box_seed)

    @property
    def pretrain_epochs(self) -> int:
        """``E_pre``: the first epoch of the mean-teacher stage (a property: budget variants set epochs late)."""
        return stage_boundary(self.num_epochs, self.pretrain_fraction)

    def stage_of_epoch(self, epoch: int) -> int:
        return 1 if epoch < self.pretrain_epochs else 2

    @property
    def stage(self) -> int:
        return self.stage_of_epoch(self.current_epoch)

    def stage_span(self, stage: int):  # [start, end) epochs of a stage (benchmarks/overhead.py times each)
        return (0, self.pretrain_epochs) if stage == 1 else (self.pretrain_epochs, self.num_epochs)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.current_epoch == self.pretrain_epochs:
            self.teacher.load_state_dict(self.student.state_dict())
            self.print_to_log_file(f"BCP: stage 2 (mean teacher) from epoch {self.current_epoch}, teacher reset")

    def unsup_weight(self, t: Optional[int] = None) -> float:
        # the current step follows the epoch's stage (as the loss does); an explicit t the iteration clock
        stage2 = self.stage == 2 if t is None else t >= self.pretrain_epochs * self.num_iterations_per_epoch
        return super().unsup_weight(t) if stage2 else 0.0

    def after_optimizer_step(self) -> None:
        if self.stage == 2:  # the teacher is frozen during pre-training
            super().after_optimizer_step()

    def compute_losses(self, data, target, unlabeled):
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        box = random_box(data.shape[2:], self.box_fraction, self.box_generator)
        mask = box.mask(data.device)
        metrics = {"stage": float(self.stage), "box_frac": box.volume_fraction}
        if self.stage == 1:
            x, y = pretrain_mix(mask, data, targets)
            out = self.network(x)
            if self.pretrain_region_split:  # "LU" with Y as both parts: (Y in the box, Y outside it)
                parts = region_targets_ds(mask, y, y[0][:, 0], "LU", self.region_ignore)
                sup = 0.5 * sum(self.ds_loss(self.region_loss, out, t) for t in parts)
            else:
                sup = self.ds_loss(self.loss, out, y)
            return sup, sup.new_zeros(()), metrics
        pairs = bcp_pairs(data.shape[0], unlabeled.shape[0])
        pseudo, counts = self.pseudo_labels(unlabeled[:pairs.k])
        outs = self.forward_parts(self.network, *bidirectional_mix(mask, data, unlabeled, pairs))
        sup = unsup = 0.0
        for out, idx, direction in zip(outs, (list(pairs.lu), list(pairs.ul)), ("LU", "UL")):
            lab, pse = region_targets_ds(mask, [t[idx] for t in targets], pseudo[idx], direction, self.region_ignore)
            sup = sup + 0.5 * self.ds_loss(self.region_loss, out, lab)
            unsup = unsup + 0.5 * self.ds_loss(self.region_loss, out, pse)
        return sup, unsup, {**metrics, **counts}

    @torch.no_grad()
    def pseudo_labels(self, unlabeled: torch.Tensor):
        """Teacher argmax (float32) on the clean ``(k, C_in, *S)`` patches -> ``(k, *S)`` int64, LCC-filtered,
        and the step's counts (class histogram, foreground voxels removed by the filter)."""
        pseudo = class_argmax(self.teacher_logits(unlabeled).float())
        pseudo, removed, _ = largest_component_per_class(pseudo) if self.pseudo_label_lcc else (pseudo, 0, 0)
        hist = torch.bincount(pseudo.flatten(), minlength=self.label_manager.num_segmentation_heads)
        counts = {f"{_COUNT}n_pl_{c}": v for c, v in enumerate(hist.double().tolist())}
        return pseudo, {**counts, f"{_COUNT}n_vox": float(pseudo.numel()), f"{_COUNT}n_removed": float(removed)}

    def finalize_metrics(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
        counts = {k[len(_COUNT):]: v for k, v in sums.items() if k.startswith(_COUNT)}
        out = super().finalize_metrics({k: v for k, v in sums.items() if not k.startswith(_COUNT)}, steps)
        if counts:  # stage 2 only
            n_vox, removed = counts["n_vox"], counts["n_removed"]
            for c in range(self.label_manager.num_segmentation_heads):
                out[f"pl_frac_{c}"] = counts[f"n_pl_{c}"] / n_vox
            teacher_fg = n_vox - counts["n_pl_0"] + removed
            out["lcc_removed_frac"] = removed / teacher_fg if teacher_fg > 0 else float("nan")
        return out

    def summary_keys(self) -> Sequence[str]:
        return tuple(super().summary_keys()) + ("stage", "lcc_removed_frac")

    def plot_groups(self) -> Dict[str, List[str]]:
        c = range(self.label_manager.num_segmentation_heads)
        return {**super().plot_groups(), "pseudo-labels (teacher argmax after LCC)":
                [f"pl_frac_{i}" for i in c] + ["lcc_removed_frac"]}


class nnUNetTrainerBCP_noLCC(nnUNetTrainerBCP):
    pseudo_label_lcc = False  # LCC is wrong for classes with several true components


class nnUNetTrainerBCP_pretrain0(nnUNetTrainerBCP):
    pretrain_fraction = 0.0   # no pre-training: mean-teacher copy-paste from epoch 0


class nnUNetTrainerBCP_pre012(nnUNetTrainerBCP):
    pretrain_fraction = 0.12  # the LA script's ratio (2k of 17k iterations)


class nnUNetTrainerBCP_regionSplitPretrain(nnUNetTrainerBCP):
    pretrain_region_split = True  # the ACDC script's stage-1 loss


nnUNetTrainerBCP_sslTiny = budget_variant(nnUNetTrainerBCP, "sslTiny")
nnUNetTrainerBCP_sslDemo = budget_variant(nnUNetTrainerBCP, "sslDemo")
