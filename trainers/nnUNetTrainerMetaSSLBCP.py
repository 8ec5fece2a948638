"""MetaSSL on BCP (issue 19 part 3; ``specs/bcp.md``, ``specs/metassl.md`` section 7); machinery: ``MetaSSLMixin``."""
from __future__ import annotations

import torch

from nnunet_ssl.algorithms.bcp import bcp_pairs, bidirectional_mix, random_box, region_targets_ds
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerBCP import nnUNetTrainerBCP
from nnunet_ssl.trainers.nnUNetTrainerMetaSSL import MetaSSLMixin, nnUNetTrainerMetaSSL, scalars_to_floats


class nnUNetTrainerMetaSSLBCP(MetaSSLMixin, nnUNetTrainerBCP):
    """MetaSSL's heterogeneous loss on BCP's pseudo-labeled regions.

    Stage 1 is BCP's labeled copy-paste pre-training unchanged: no MetaSSL term, lambda = 0, tau sets untouched.
    Stage 2, per direction ``d`` in {LU, UL} with BCP's box and pairs: supervised = the student on ``X_d`` (full
    resolution); reference = the EMA teacher on the *clean* ``L_i`` and ``U_i`` (one pass), pasted into the mixed
    frame with the same box (``bidirectional_mix`` on logits, exactly as on images). Both directions are stacked
    into one batch part, so each tau set is updated once per step from pooled statistics (section 2.2) and region
    means are pooled over both mixed images (section 3). Loss: ``sup + lambda(t) (L_u + L_l)`` with

    - ``sup``: BCP's ``1/2 sum_d`` Dice+CE on ``R_lab,d`` at every deep-supervision scale (BCP's alpha-weighted
      ``R_pse`` loss is *replaced* by ``L_u``, as MetaSSL replaces every base method's unsupervised loss, section 6);
    - ``L_u``: MetaSSL's unlabeled term on ``R_pse,d`` only (``valid``; tau set ``ref_u`` from the teacher there);
    - ``L_l``: MetaSSL's labeled term toward the ground truth on ``R_lab,d`` (target ``IGN`` elsewhere, so the
      dataset's ignore voxels stay out; ``released`` regions: student vs pasted teacher, student tau ``sup_l``).

    Target of ``L_u``: BCP's pseudo-label (teacher argmax, largest component per class), not the bare reference
    argmax. The filter is BCP's guard against false-positive islands, and MetaSSL's measured failure on ACDC is
    over-segmentation (section 13), so dropping it would remove the part of BCP that counters it. The regions then
    follow the target (``MetaSSLLoss.unlabeled_loss(target=...)``): where the filter keeps the argmax the loss is
    MetaSSL's exactly; a removed island is trained toward background with the teacher's background probability as
    its confidence, i.e. as a suspicious voxel, not as unanimous-confident foreground. ``_noLCC`` is MetaSSL's
    own definition (target = reference argmax).

    Lambda: ``lambda_max = 0.1``, ``rampup_fraction = 0.6`` (MetaSSL's section 6) on the global iteration clock,
    gated to 0 in stage 1 by BCP's ``unsup_weight``; at the switch (25 % of the budget) lambda is already 0.18
    lambda_max, since the teacher starts from a trained stage-1 network, not from noise. Shadow check: the unlabeled
    rule applied to ``R_lab,d``, whose reference is built like the pseudo-labels (teacher on the clean patch, pasted),
    so ``shadow_acc_R`` estimates the accuracy of the teacher argmax per region (before the LCC filter).
    """

    lambda_max = 0.1
    rampup_fraction = 0.6
    # the MetaSSL mode chosen for the EMA-teacher MetaSSL (issue 18): released weights of the dimension, one voxel mean
    metassl_preset = nnUNetTrainerMetaSSL.metassl_preset
    metassl_overrides = nnUNetTrainerMetaSSL.metassl_overrides

    @property
    def metassl_ignore_label(self) -> int:
        return self.region_ignore  # L_l and the shadow check see R_lab only: IGN marks R_pse and dataset-ignore

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        # BCP's pseudo_labels() asks for the teacher on the clean unlabeled patches: already run with the labeled ones
        memo = getattr(self, "_clean_teacher_u", None)
        return memo[1] if memo is not None and memo[0] is x else super().teacher_logits(x)

    def compute_losses(self, data, target, unlabeled):
        if self.stage == 1:
            return super().compute_losses(data, target, unlabeled)
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        box = random_box(data.shape[2:], self.box_fraction, self.box_generator)
        mask = box.mask(data.device)
        pairs = bcp_pairs(data.shape[0], unlabeled.shape[0])
        u = unlabeled[:pairs.k]
        with torch.no_grad():
            t_l, t_u = [self.full_res(o) for o in self.forward_parts(self.teacher, data[:pairs.k], u)]
            self._clean_teacher_u = (u, t_u)
            try:
                pseudo, counts = self.pseudo_labels(u)
            finally:
                self._clean_teacher_u = None
            ref = torch.cat(bidirectional_mix(mask, t_l, t_u, pairs))
        outs = self.forward_parts(self.network, *bidirectional_mix(mask, data, unlabeled, pairs))
        sup, y_lab, y_pse = 0.0, [], []
        for out, idx, direction in zip(outs, (list(pairs.lu), list(pairs.ul)), ("LU", "UL")):
            lab, pse = region_targets_ds(mask, [t[idx] for t in targets], pseudo[idx], direction, self.region_ignore)
            sup = sup + 0.5 * self.ds_loss(self.region_loss, out, lab)
            y_lab.append(lab[0])
            y_pse.append(pse[0])
        z, y_pse = torch.cat([self.full_res(o) for o in outs]), torch.cat(y_pse)
        l_u, l_l = self.metassl_losses(z, ref, z, ref, torch.cat(y_lab), u_valid=y_pse[:, 0] != self.region_ignore,
                                       u_target=y_pse)
        metrics = {"stage": 2.0, "box_frac": box.volume_fraction, **counts}
        return sup, l_u + l_l, {**metrics, **scalars_to_floats(self.metassl_step_metrics(l_u, l_l))}


class nnUNetTrainerMetaSSLBCP_noLCC(nnUNetTrainerMetaSSLBCP):
    """MetaSSL's own target: the reference argmax on ``R_pse`` (no largest-component filter)."""
    pseudo_label_lcc = False


nnUNetTrainerMetaSSLBCP_sslTiny = budget_variant(nnUNetTrainerMetaSSLBCP, "sslTiny")
nnUNetTrainerMetaSSLBCP_sslDemo = budget_variant(nnUNetTrainerMetaSSLBCP, "sslDemo")
